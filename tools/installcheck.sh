#!/bin/sh
# installcheck.sh — checks what make install put in place; run by
# `make installcheck` (and so by make distcheck), which passes the configured
# directories in the environment.  With DESTDIR set, the file list under it
# must be exactly the expected one.
#
# Checks: every file is there; the installed mkad, mkad-cli and mkad-genmodel
# answer --help and --version (the configured version); the installed
# mkad.conf serves the installed bundled model; the unit's ExecStart= names
# the installed binary and config; the installed mkad, started with that
# config, answers /health and a completion from the installed model.
set -eu
: "${bindir:?}" "${pkgsysconfdir:?}" "${modeldir:?}" "${docdir:?}" "${VERSION:?}"
D=${DESTDIR:-}
fail() { echo "installcheck: $*" >&2; exit 1; }
command -v curl >/dev/null 2>&1 || fail "curl is required (apt-get install curl)"

expected=$(mktemp)
tmp=$(mktemp -d)
pid=
trap 'test -z "$pid" || kill "$pid" 2>/dev/null; rm -rf "$expected" "$tmp"' EXIT INT TERM
{
    for p in mkad mkad-cli mkad-genmodel; do echo "$D$bindir/$p"; done
    echo "$D$pkgsysconfdir/mkad.conf"
    for f in config.json model.safetensors tokenizer.json tokenizer_config.json train_log.json; do
        echo "$D$modeldir/$f"
    done
    for f in README.md docs/api.md docs/architecture.md docs/model-format.md docs/operations.md \
             docs/performance.md docs/tokenizer.md; do
        echo "$D$docdir/$f"
    done
    test -z "${systemdsystemunitdir:-}" || echo "$D$systemdsystemunitdir/mkad.service"
} | sort >"$expected"
while read -r f; do test -f "$f" || fail "missing $f"; done <"$expected"
if [ -n "$D" ]; then
    find "$D" -type f | sort | diff -u "$expected" - >&2 ||
        fail "the files under DESTDIR=$D differ from the expected list (- expected, + installed)"
fi

for p in mkad mkad-cli mkad-genmodel; do
    "$D$bindir/$p" --help >"$tmp/help" || fail "$p --help failed"
    grep -q -e '--version' "$tmp/help" || fail "$p --help does not list --version"
    v=$("$D$bindir/$p" --version) || fail "$p --version failed"
    case "$v" in "$p $VERSION"|"$p $VERSION "*) ;; *) fail "$p --version says '$v', expected '$p $VERSION'" ;; esac
done

conf=$D$pkgsysconfdir/mkad.conf
"$D$bindir/mkad" --config "$conf" --print-config >"$tmp/config" || fail "mkad rejects the installed $conf"
grep -qx "model = $modeldir" "$tmp/config" || fail "$conf does not serve the installed model $modeldir"

if [ -n "${systemdsystemunitdir:-}" ]; then
    unit=$D$systemdsystemunitdir/mkad.service
    grep -q "^ExecStart=$bindir/mkad --config $pkgsysconfdir/mkad.conf " "$unit" ||
        fail "$unit: ExecStart= does not run $bindir/mkad with $pkgsysconfdir/mkad.conf"
    grep -q "^Documentation=file://$docdir/docs/operations.md\$" "$unit" || fail "$unit: Documentation= is not $docdir/docs/operations.md"
fi

# Serve the installed model with the installed config (the model path moved
# by DESTDIR; everything else as installed), on a port the kernel picks.
"$D$bindir/mkad" --config "$conf" --model "$D$modeldir" --port 0 --state-dir "$tmp/state" 2>"$tmp/log" &
pid=$!
port=
for _ in $(seq 100); do
    port=$(sed -n 's/.*event=listening .*port=\([0-9]*\).*/\1/p' "$tmp/log")
    [ -n "$port" ] && curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { cat "$tmp/log" >&2; fail "the installed mkad exited"; }
    sleep 0.1
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { cat "$tmp/log" >&2; fail "the installed mkad never answered /health"; }
curl -sf "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model":"mkad-tiny","prompt":"It is a truth","max_tokens":4}' >"$tmp/out" ||
    fail "the installed mkad did not answer a completion"
grep -q '"completion_tokens": *4' "$tmp/out" || fail "unexpected completion: $(cat "$tmp/out")"
kill "$pid"
wait "$pid" || fail "the installed mkad did not exit 0 on SIGTERM"
pid=
echo "installcheck: ${D:+DESTDIR=$D: }$(wc -l <"$expected") files in place; mkad, mkad-cli, mkad-genmodel $VERSION run; the installed config serves the installed model"
