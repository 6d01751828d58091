#!/bin/sh
# Black-box tests of the mkad daemon (tests/server_blackbox.py) under make
# check.  Skips (77) only when the official openai Python package is missing;
# tools/bootstrap.sh installs it.
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
exec "$PY" "$top_srcdir/tests/server_blackbox.py" --mkad "$top_builddir/mkad" \
    --model "$top_srcdir/models/mkad-tiny"
