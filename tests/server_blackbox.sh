#!/bin/sh
# Black-box tests of the mkad daemon (tests/server_blackbox.py) under make
# check.  Skips (77) only when the official openai Python package is missing;
# tools/bootstrap.sh installs it.
# MKAD_EXTRA_ARGS: extra mkad options for every daemon the suite starts (split
# on blanks), e.g. MKAD_EXTRA_ARGS="--backend cuda" (tests/cuda_blackbox.sh).
: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${top_builddir:=$(pwd)}"  # make check runs in the build directory
PY=${PYTHON:-python3}
if ! "$PY" -c 'import openai' 2>/dev/null; then
    echo "server_blackbox: SKIP: the openai Python package is missing (pip install openai)"
    exit 77
fi
if ! command -v curl >/dev/null 2>&1; then
    echo "server_blackbox: FAIL: curl is required"
    exit 1
fi
export top_srcdir top_builddir
MKAD=$top_builddir/mkad
if [ -n "${MKAD_EXTRA_ARGS:-}" ]; then
    # The suite starts mkad itself: give it a wrapper that adds the options.
    wdir=$top_builddir/tests/tmp/blackbox-$$
    mkdir -p "$wdir" || exit 1
    qmkad=$(printf '%s' "$MKAD" | sed "s/'/'\\\\''/g")
    printf '#!/bin/sh\nexec '\''%s'\'' %s "$@"\n' "$qmkad" "$MKAD_EXTRA_ARGS" >"$wdir/mkad" &&
        chmod +x "$wdir/mkad" || exit 1
    echo "server_blackbox: mkad $MKAD_EXTRA_ARGS"
    trap 'rm -rf "$wdir"' EXIT
    "$PY" "$top_srcdir/tests/server_blackbox.py" --mkad "$wdir/mkad" --model "$top_srcdir/models/mkad-tiny"
    exit $?
fi
exec "$PY" "$top_srcdir/tests/server_blackbox.py" --mkad "$MKAD" \
    --model "$top_srcdir/models/mkad-tiny"
