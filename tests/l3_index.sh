#!/bin/sh
# The long-term memory's retrieval index picks exactly the chunks the scan
# of the store picks (same top R, same order, ties included) for a user with
# a few thousand chunks (tools/bench_l3.c; exits 1 on any difference).
: "${top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${top_builddir:=$(pwd)}"
exec "$top_builddir/mkad-bench-l3" --model "$top_srcdir/models/mkad-tiny" --chunks 3000 --queries 12
