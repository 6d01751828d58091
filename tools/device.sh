#!/usr/bin/env bash
# device.sh — build mkad and run its tests, the GPU ones included, on the GPU
# machine (a box with CUDA, PyTorch and transformers but none of mkad's -dev
# packages and no package registry), in one call.
#
#   tools/device.sh fetch
#       Here, on a Debian 12 machine with apt and pip (a development box):
#       fill .carry/ (ignored through .git/info/exclude, which this adds to)
#       with what the GPU machine lacks:
#         .carry/debs/               mkad's -dev packages + their runtime closure
#                                    (~16 MB; resolved from this machine's apt lists)
#         .carry/autotools.tar.gz    configure, Makefile.in, aclocal.m4, config.h.in,
#                                    build-aux/, m4/ from `autoreconf -fi` in a clean
#                                    copy of the working tree (tracked + untracked,
#                                    not ignored files: what travels to the device)
#         .carry/autotools.sum       sha256 of the configure.ac/Makefile.am they came from
#         .carry/whl/                the openai client and its dependencies as
#                                    CPython 3.12 manylinux wheels (black-box suite)
#       Run it again after configure.ac or Makefile.am change (`gpu` otherwise
#       falls back to autoreconf on the device, which works while it has
#       autotools), or when the apt/pip sets should be refreshed.
#
#   tools/device.sh gpu [all|cuda|bench]
#       There, from the repository root, with .carry carried:
#       unpack the debs into /tmp/mkad-deps (never into /), the autotools files
#       over the tree, the wheels into /tmp/mkad-site (on PYTHONPATH for the
#       black-box suites only); ./configure --with-cuda=yes --enable-werror;
#       make -j; then, at the same time,
#         the CPU group (`all`, the default): every test of make check but
#           tests/test_cuda — Check suites, parity scripts, tokenizer parity,
#           the daemon's black-box suite;
#         the GPU group: tests/test_cuda (CUDA vs CPU), tests/cuda_hf.sh
#           (CUDA vs transformers run now), tests/cuda_blackbox.sh (the
#           black-box suite on mkad --backend cuda) — i.e. make check-cuda.
#       `cuda` runs the GPU group only; `bench` runs no tests but
#       tools/bench_cuda.sh (make bench-cuda: the Qwen2.5-7B shape, its table
#       in $OUT/bench_cuda.txt; BENCH_CHECK_FIRST=1 runs tests/test_cuda
#       before it, =all the whole GPU group; BENCH_CHECK_VARIANTS="VAR=x ..."
#       runs tests/test_cuda once more under each setting).  Ends with ONE table (test, result,
#       seconds, key number) and exits 0 only when nothing failed.  Files in
#       $OUT (the device tool's folder; ./device-out elsewhere): summary.txt
#       (the table), device.log (everything printed), build.log, logs.tar.gz
#       (one log per test, config.log).  Without $OUT: /tmp/mkad-device-out.
#
# A device run with the `run` tool, after `tools/device.sh fetch` here:
#     command: bash tools/device.sh gpu
#     carry:   [".carry"]
# It takes about 4-6 minutes (build 1-2); each test is stopped at
# TEST_TIMEOUT and all of them by DEVICE_DEADLINE so that the table always
# comes back inside the call's 10 minutes.
#
# Environment (gpu): CONFIGURE_FLAGS (extra ./configure flags), JOBS (make -j,
# default nproc), TEST_TIMEOUT (seconds per test, default 330),
# DEVICE_DEADLINE (seconds from start by which every test must end, default
# 540), and the tests' own: CUDA_TOL, TEST_CUDA_ONLY (tests/test_cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=.carry
DEPS_PREFIX=/tmp/mkad-deps
SITE=/tmp/mkad-site

log() { printf 'device: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# ---- Debian packages (the recipe of device-deps.sh, verified 2026-12-02:
#      Debian 12 fetch -> Ubuntu 24.04 / glibc 2.39 install) -------------------

DEV_PKGS="libuv1-dev libmicrohttpd-dev libjansson-dev librocksdb-dev libxxhash-dev libpcre2-dev
          libinih-dev check libsubunit-dev libsystemd-dev"
# Fallback tools, used on the target only when it lacks them.
TOOL_PKGS="pkgconf pkgconf-bin libpkgconf3 make"
# Never carried: the C/C++ runtime and friends that any box with a compiler has.
SKIP_RE='^(libc6|libc-bin|libc-dev-bin|libgcc-s1|libstdc\+\+6|gcc-[0-9]+-base|libcrypt1|zlib1g|linux-libc-dev|debconf|dpkg|tar|perl-base|mawk)$'

apt_closure() {  # real (non-virtual) packages in the recursive Depends closure of "$@"
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "$@" 2>/dev/null |
        grep -v '^ ' | grep -v '^<' | sort -u
}

fetch_debs() {
    local dir=$1
    command -v apt-get >/dev/null || die "fetch needs apt-get (a Debian machine)"
    apt-cache show libuv1-dev >/dev/null 2>&1 || { log "apt-get update"; apt-get update -qq; }
    # Runtime libraries: the direct non-dev lib* Depends of the -dev packages,
    # then their recursive closure (this leaves out e.g. libgnutls28-dev's tree).
    local rt pkgs
    rt=$(for p in $DEV_PKGS; do
            apt-cache depends --no-recommends --no-suggests "$p" 2>/dev/null |
                awk '$1 == "Depends:" && $2 ~ /^lib/ && $2 !~ /-dev$/ {print $2}'
         done | sort -u)
    # shellcheck disable=SC2086
    pkgs=$( { echo $DEV_PKGS | tr ' ' '\n'; apt_closure $rt $TOOL_PKGS; } |
            grep -Ev "$SKIP_RE" | grep -v -- '-dev$' | sort -u)
    pkgs="$pkgs $DEV_PKGS"
    rm -rf "$dir"; mkdir -p "$dir"
    log "downloading .debs into $dir"
    # apt's _apt user may not be able to write into DIR; that only costs a warning.
    # shellcheck disable=SC2086
    (cd "$dir" && apt-get download $pkgs 2>&1 | { grep -v 'unsandboxed' || true; } >&2)
    log "$(ls "$dir"/*.deb | wc -l) packages, $(du -sh "$dir" | cut -f1)"
}

have_soname() {  # is shared library $1 (a SONAME such as libuv.so.1) on the target already?
    if command -v ldconfig >/dev/null 2>&1 || [ -x /sbin/ldconfig ]; then
        local lc; lc=$(command -v ldconfig || echo /sbin/ldconfig)
        "$lc" -p 2>/dev/null | grep -q "^[[:space:]]*$1 " && return 0
    fi
    local d
    for d in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64 /usr/lib /lib; do
        [ -e "$d/$1" ] && return 0
    done
    return 1
}

soname_of() {  # the DT_SONAME of shared library $1 (its file name if no tool reads it)
    local s=""
    if command -v objdump >/dev/null; then
        s=$(objdump -p "$1" 2>/dev/null | awk '$1 == "SONAME" {print $2; exit}')
    elif command -v readelf >/dev/null; then
        s=$(readelf -d "$1" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p' | head -n 1)
    fi
    echo "${s:-$(basename "$1")}"
}

# install_debs DIR PREFIX: unpacks DIR/*.deb into PREFIX and exports PATH,
# PKG_CONFIG_PATH, CPPFLAGS, LDFLAGS, LD_LIBRARY_PATH, ACLOCAL_PATH for it.
install_debs() {
    local dir=$1 prefix=$2 f n=0
    [ "$prefix" != / ] || die "refusing to unpack into /"
    rm -rf "$prefix"; mkdir -p "$prefix"; prefix=$(cd "$prefix" && pwd)
    dir=$(cd "$dir" && pwd)
    for f in "$dir"/*.deb; do
        if command -v dpkg >/dev/null; then
            dpkg -x "$f" "$prefix"
        else  # no dpkg: a .deb is an ar archive holding data.tar.*
            (cd "$prefix" && ar p "$f" "$(ar t "$f" | grep '^data\.tar')" | tar xf - --no-same-owner)
        fi
        n=$((n + 1))
    done
    log "unpacked $n packages into $prefix"
    # .pc files: /usr -> PREFIX/usr on the path variables; drop Requires.private
    # (shared linking only; e.g. libmicrohttpd.pc names gnutls, not carried).
    local pcd
    for pcd in "$prefix/usr/lib/x86_64-linux-gnu/pkgconfig" "$prefix/usr/share/pkgconfig" "$prefix/usr/lib/pkgconfig"; do
        [ -d "$pcd" ] || continue
        for f in "$pcd"/*.pc; do
            [ -e "$f" ] || continue
            sed -i -E -e "s#^([A-Za-z_]+)=(\"?)/usr#\1=\2$prefix/usr#" -e '/^Requires\.private:/d' "$f"
        done
    done
    # Runtime dir: a SONAME link for each carried shared library whose SONAME
    # the target lacks, so nothing of the target's own is shadowed.
    local rt=$prefix/rt d name
    mkdir -p "$rt"
    for d in "$prefix/usr/lib/x86_64-linux-gnu" "$prefix/lib/x86_64-linux-gnu"; do
        [ -d "$d" ] || continue
        for f in "$d"/lib*.so.*; do
            [ -f "$f" ] && [ ! -L "$f" ] || continue
            name=$(soname_of "$f")
            have_soname "$name" || ln -sf "$f" "$rt/$name"
        done
    done
    log "runtime libraries the target lacks: $(ls "$rt" | tr '\n' ' ')"
    mkdir -p "$prefix/bin"
    if ! command -v pkg-config >/dev/null && [ -x "$prefix/usr/bin/pkgconf" ]; then
        printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' \
            "$rt" "$prefix/usr/bin/pkgconf" >"$prefix/bin/pkg-config"
        chmod +x "$prefix/bin/pkg-config"; log "using the carried pkgconf as pkg-config"
    fi
    if ! command -v make >/dev/null && [ -x "$prefix/usr/bin/make" ]; then
        ln -sf "$prefix/usr/bin/make" "$prefix/bin/make"; log "using the carried make"
    fi
    local libdir=$prefix/usr/lib/x86_64-linux-gnu
    export PATH="$prefix/bin:$PATH"
    export PKG_CONFIG_PATH="$libdir/pkgconfig:$prefix/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
    export CPPFLAGS="-I$prefix/usr/include${CPPFLAGS:+ $CPPFLAGS}"
    export LDFLAGS="-L$libdir -Wl,-rpath-link,$rt -Wl,-rpath-link,$libdir${LDFLAGS:+ $LDFLAGS}"
    export LD_LIBRARY_PATH="$rt${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    if [ -f "$prefix/usr/share/aclocal/pkg.m4" ]; then
        export ACLOCAL_PATH="$prefix/usr/share/aclocal${ACLOCAL_PATH:+:$ACLOCAL_PATH}"
    fi
}

# ---- autotools output, made here --------------------------------------------------

AUTOTOOLS_FILES="configure Makefile.in aclocal.m4 config.h.in build-aux m4"

fetch_autotools() {
    command -v autoreconf >/dev/null || die "fetch needs autoreconf (apt-get install autoconf automake pkg-config)"
    local tmp
    tmp=$(mktemp -d /tmp/mkad-autotools.XXXXXX)
    # A clean copy of what travels: tracked and untracked-but-not-ignored files.
    git ls-files -z --cached --others --exclude-standard |
        tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$tmp"
    log "autoreconf -fi in a clean copy of the working tree"
    (cd "$tmp" && autoreconf -fi >/dev/null 2>"$tmp/.autoreconf.log") ||
        { cat "$tmp/.autoreconf.log" >&2; rm -rf "$tmp"; die "autoreconf failed"; }
    # shellcheck disable=SC2086
    (cd "$tmp" && tar -czf - $AUTOTOOLS_FILES) >"$CARRY/autotools.tar.gz"
    (cd "$tmp" && sha256sum configure.ac Makefile.am) >"$CARRY/autotools.sum"
    rm -rf "$tmp"
    log "autotools files: $(du -h "$CARRY/autotools.tar.gz" | cut -f1)"
}

# Unpacks the carried autotools files, with mtimes that keep make from
# rerunning autoconf/automake; autoreconf on the spot when configure.ac or
# Makefile.am changed since the fetch.
unpack_autotools() {
    if [ -f "$CARRY/autotools.tar.gz" ] && sha256sum --quiet -c "$CARRY/autotools.sum" >/dev/null 2>&1; then
        tar -xzf "$CARRY/autotools.tar.gz"
        local now
        now=$(date +%s)
        touch -d "@$((now - 30))" configure.ac Makefile.am
        find m4 -type f -exec touch -d "@$((now - 20))" {} +
        touch -d "@$((now - 20))" aclocal.m4
        touch -d "@$((now - 10))" configure config.h.in Makefile.in
        find build-aux -type f -exec touch -d "@$((now - 10))" {} +
        log "autotools files from .carry (made by tools/device.sh fetch)"
    elif command -v autoreconf >/dev/null; then
        log "configure.ac/Makefile.am changed since tools/device.sh fetch (or none carried): autoreconf -fi here"
        autoreconf -fi >/dev/null
    else
        die "no matching .carry/autotools.tar.gz and no autoreconf here: run tools/device.sh fetch again"
    fi
}

# ---- Python wheels -------------------------------------------------------------------

fetch_wheels() {
    local dir=$CARRY/whl spec=openai ver
    # The version the black-box suite is developed against, when installed here.
    ver=$(python3 -c 'import openai; print(openai.__version__)' 2>/dev/null || true)
    [ -z "$ver" ] || spec="openai==$ver"
    rm -rf "$dir"; mkdir -p "$dir"
    log "pip download $spec (+ dependencies) for CPython 3.12 manylinux x86_64"
    local plat=() n
    for n in 39 35 34 31 28 27 24 17; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
    python3 -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
        --implementation cp "${plat[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$dir" "$spec"
    log "$(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1): $(ls "$dir" | sed 's/-py.*//; s/-cp.*//' | tr '\n' ' ')"
}

fetch() {
    command -v git >/dev/null && git rev-parse --git-dir >/dev/null 2>&1 || die "run fetch in mkad's git checkout"
    local excl
    excl=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$excl")"
    grep -qxF '/.carry/' "$excl" 2>/dev/null || { echo '/.carry/' >>"$excl"; log "added /.carry/ to $excl"; }
    mkdir -p "$CARRY"
    fetch_debs "$CARRY/debs"
    fetch_autotools
    fetch_wheels
    log ".carry: $(du -sh "$CARRY" | cut -f1) — device run: command 'bash tools/device.sh gpu', carry ['.carry']"
}

# ---- the GPU machine ---------------------------------------------------------------

# One line of a test log that sums it up.
key_of() {
    local name=$1 f=$2 k=""
    case $name in
    *test_cuda*)
        k=$(awk '/^cuda / {
                n++; if ($NF ~ /s\)$/ && $(NF-1) == "ok") ok++
                for (i = 1; i < NF; i++) {
                    if ($i ~ /^(prefill|decode|chunked|ragged|truncate|cuda->cpu|cpu->cuda)$/ && $(i+1) + 0 > w) w = $(i+1) + 0
                    if ($i == "equal") { split($(i+1), a, "/"); eq += a[1]; all += a[2] }
                }
            }
            END { if (n) printf "shapes ok %d/%d, worst rel err %.2e, greedy equal %d/%d", ok, n, w, eq, all }' "$f")
        ;;
    esac
    [ -n "$k" ] || k=$(grep -E '^[0-9]+%: Checks:|passed in|^[a-z_]+: (PASS|FAIL|SKIP)|SKIP:|FAIL' "$f" | tail -n 1 || true)
    [ -n "$k" ] || k=$(grep -v '^[[:space:]]*$' "$f" | tail -n 1 || true)
    printf '%s' "$k" | tr '\t' ' ' | cut -c1-100
}

DEADLINE=0
RESULTS=""
LOGDIR=""

# run_test NAME [VAR=VALUE]: runs one test the way automake's harness does,
# with its log (under that variable, when given).
run_test() {
    local t=$1 var=${2:-} name log rc t0 left tmo res env=()
    name=$(basename "$t")${var:+.$var}
    log=$LOGDIR/$name.log
    left=$((DEADLINE - $(date +%s)))
    tmo=${TEST_TIMEOUT:-330}
    if [ "$left" -lt "$tmo" ]; then tmo=$left; fi
    t0=$(date +%s)
    if [ "$tmo" -lt 5 ]; then
        echo "not started: the device deadline was reached" >"$log"
        rc=124
    else
        case $name in
        *blackbox*) env=(PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}") ;;
        esac
        # The CPU group's black-box suite runs the CPU backend (where it
        # checks exact outputs); cuda_blackbox.sh runs it on CUDA.
        case $name in server_blackbox.sh) env+=(MKAD_EXTRA_ARGS="--backend cpu") ;; esac
        [ -z "$var" ] || env+=("$var")
        local cmd=("./$t")
        [ -x "$t" ] || case $t in *.sh) cmd=(bash "$t") ;; esac
        rc=0
        env ${env[@]+"${env[@]}"} timeout -k 10 "$tmo" "${cmd[@]}" >"$log" 2>&1 </dev/null || rc=$?
    fi
    case $rc in
    0) res=PASS ;;
    77) res=SKIP ;;
    124 | 137) res=TIMEOUT ;;
    *) res="FAIL($rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$t${var:+ $var}" "$res" "$(($(date +%s) - t0))" "$(key_of "$name" "$log")" >>"$RESULTS"
    log "$res $t ($(($(date +%s) - t0))s)"
}

print_table() {
    printf '\n%-28s %-9s %5s  %s\n' TEST RESULT SEC KEY
    printf '%-28s %-9s %5s  %s\n' ---------------------------- --------- ----- ----------------------------------------
    awk -F'\t' '{ printf "%-28s %-9s %5s  %s\n", $1, $2, $3, $4 }' "$1"
}

gpu() {
    local mode=${1:-all} outdir=$2 t_start
    t_start=$(date +%s)
    DEADLINE=$((t_start + ${DEVICE_DEADLINE:-540}))
    case $mode in all | cuda | bench) ;; *) die "gpu: expected all, cuda or bench, got '$mode'" ;; esac
    [ -d "$CARRY/debs" ] || die "no $CARRY/debs: run 'tools/device.sh fetch' on the development machine and carry .carry"
    LOGDIR=$(mktemp -d /tmp/mkad-device-logs.XXXXXX)
    RESULTS=$LOGDIR/results.tsv
    : >"$RESULTS"

    log "$(uname -srm); $(nproc) cores; $(command -v nvidia-smi >/dev/null &&
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1 || echo 'no nvidia-smi')"
    log "$(command -v nvcc >/dev/null && nvcc --version | tail -n 1 || echo 'no nvcc on PATH')"
    install_debs "$CARRY/debs" "$DEPS_PREFIX"
    unpack_autotools
    if ls "$CARRY"/whl/*.whl >/dev/null 2>&1; then
        rm -rf "$SITE"
        python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$CARRY"/whl/*.whl >/dev/null 2>&1 && log "wheels installed into $SITE" ||
            log "warning: the carried wheels did not install; the black-box suites will skip"
    else
        log "warning: no wheels in $CARRY/whl; the black-box suites will skip"
    fi

    # Build.
    local t0 rc=0 flags="--with-cuda=yes --enable-werror${CONFIGURE_FLAGS:+ $CONFIGURE_FLAGS}"
    t0=$(date +%s)
    log "./configure $flags && make -j${JOBS:-$(nproc)}"
    # shellcheck disable=SC2086
    { ./configure $flags && make -j"${JOBS:-$(nproc)}" && make -j"${JOBS:-$(nproc)}" check TESTS=; } \
        >"$LOGDIR/build.log" 2>&1 || rc=$?
    cp "$LOGDIR/build.log" "$outdir/build.log"
    [ -f config.log ] && cp config.log "$LOGDIR/"
    local nvcc_v warn
    nvcc_v=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n 1)
    warn=$(grep -c 'warning' "$LOGDIR/build.log" || true)
    printf 'build\t%s\t%s\t%s\n' "$([ $rc -eq 0 ] && echo PASS || echo "FAIL($rc)")" "$(($(date +%s) - t0))" \
        "configure $flags; nvcc ${nvcc_v:-?}; $(grep -c 'NVCC ' "$LOGDIR/build.log" || true) .cu; $warn warning lines" >>"$RESULTS"
    if [ $rc -ne 0 ]; then
        log "build failed; the end of build.log:"
        tail -n 60 "$LOGDIR/build.log" >&2
    elif [ "$mode" = bench ]; then
        # BENCH_CHECK_FIRST=1: the CUDA-vs-CPU parity test before the bench,
        # so that a speed change is measured only once it is shown exact.
        # BENCH_CHECK_FIRST=all: the whole GPU group (make check-cuda's
        # tests); BENCH_CHECK_VARIANTS="VAR=x ...": tests/test_cuda again
        # under each of those settings.
        export top_srcdir=$PWD top_builddir=$PWD
        case ${BENCH_CHECK_FIRST:-0} in
        1) run_test tests/test_cuda ;;
        all) for t in $(make -s list-cuda-tests); do run_test "$t"; done ;;
        esac
        for v in ${BENCH_CHECK_VARIANTS:-}; do run_test tests/test_cuda "$v"; done
        local left=$((DEADLINE - $(date +%s))) brc=0
        t0=$(date +%s)
        timeout "$left" tools/bench_cuda.sh . "$outdir" 2>"$LOGDIR/bench_cuda.log" || brc=$?
        printf 'bench_cuda\t%s\t%s\t%s\n' "$([ $brc -eq 0 ] && echo PASS || echo "FAIL($brc)")" \
            "$(($(date +%s) - t0))" "table in bench_cuda.txt" >>"$RESULTS"
    else
        local all_tests cuda_tests cpu_tests="" t
        all_tests=$(make -s list-tests)
        cuda_tests=$(make -s list-cuda-tests)
        for t in $all_tests; do
            case " $cuda_tests " in *" $t "*) ;; *) cpu_tests="$cpu_tests $t" ;; esac
        done
        export top_srcdir=$PWD top_builddir=$PWD
        PYTHON=$(sed -n 's/^PYTHON = //p' Makefile)
        export PYTHON
        unset CI
        log "tests: GPU group: $cuda_tests"
        [ "$mode" = all ] && log "tests: CPU group:$cpu_tests"
        (for t in $cuda_tests; do run_test "$t"; done) &
        local gpu_pid=$!
        if [ "$mode" = all ]; then
            (for t in $cpu_tests; do run_test "$t"; done) &
            wait $! || true
        fi
        wait "$gpu_pid" || true
    fi

    # Order: build, GPU group, CPU group (as listed).
    local sorted=$LOGDIR/summary.tsv
    local order
    # shellcheck disable=SC2046
    order=$(printf '%s\n' build $(make -s list-cuda-tests 2>/dev/null) $(make -s list-tests 2>/dev/null))
    # listed order first, then anything else that ran
    awk -F'\t' 'NR == FNR { if (!($1 in rank)) rank[$1] = ++n; next } { print (($1 in rank) ? rank[$1] : 1000 + FNR) "\t" $0 }' \
        <(echo "$order") "$RESULTS" | sort -n -k1,1 | cut -f2- | awk -F'\t' '!seen[$1]++' >"$sorted"
    print_table "$sorted" | tee "$outdir/summary.txt"
    local failed
    failed=$(awk -F'\t' '$2 != "PASS" && $2 != "SKIP"' "$sorted" | wc -l)
    printf '\n%s: %d failed or timed out, %ds in all (host %s)\n' "$([ "$failed" -eq 0 ] && echo OK || echo FAILED)" \
        "$failed" "$(($(date +%s) - t_start))" "$(hostname)" | tee -a "$outdir/summary.txt"
    tar -czf "$outdir/logs.tar.gz" -C "$LOGDIR" . 2>/dev/null || true
    # The end of every failed test's log, so that output_tail shows why.
    awk -F'\t' '$2 != "PASS" && $2 != "SKIP" && $1 != "build" {print $1}' "$sorted" | while read -r t; do
        printf '\n---- %s (last 25 lines; all in logs.tar.gz) ----\n' "$t"
        tail -n 25 "$LOGDIR/$(basename "$t").log" 2>/dev/null || true
    done
    rm -rf "$LOGDIR"
    [ "$failed" -eq 0 ]
}

case ${1:-} in
fetch) fetch ;;
gpu)
    outdir=${OUT:-/tmp/mkad-device-out}
    mkdir -p "$outdir"
    outdir=$(cd "$outdir" && pwd)
    # No errexit from here on: gpu() handles every failure itself and always
    # prints its table.
    set +e
    gpu "${2:-all}" "$outdir" 2>&1 | tee "$outdir/device.log"
    exit "${PIPESTATUS[0]}"
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
