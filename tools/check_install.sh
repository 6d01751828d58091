#!/bin/sh
# check_install.sh — make install and make uninstall into a scratch DESTDIR,
# as a package build does (CI, .ci/run):
#   1. make install, then make installcheck (tools/installcheck.sh: the exact
#      file list, the installed programs' --help/--version, the installed
#      config serving the installed model);
#   2. a reinstall keeps a locally changed mkad.conf and puts the new
#      default next to it as mkad.conf.new;
#   3. make uninstall removes everything but that changed mkad.conf.
#
#   tools/check_install.sh [BUILDDIR]     (default: .)
set -eu
b=${1:-.}
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT INT TERM
fail() { echo "check_install: $*" >&2; exit 1; }

make -s -C "$b" install DESTDIR="$D" >/dev/null
make -s -C "$b" installcheck DESTDIR="$D"

conf=$(find "$D" -path '*/mkad/mkad.conf')
[ -n "$conf" ] || fail "no mkad.conf under $D"
echo "# changed locally" >>"$conf"
make -s -C "$b" install DESTDIR="$D" >/dev/null
tail -n 1 "$conf" | grep -qx "# changed locally" || fail "a reinstall overwrote the changed $conf"
[ -f "$conf.new" ] || fail "a reinstall over a changed $conf did not write $conf.new"
grep -q "# changed locally" "$conf.new" && fail "$conf.new is not the shipped default"

make -s -C "$b" uninstall DESTDIR="$D" >/dev/null
left=$(find "$D" -type f)
[ "$left" = "$conf" ] || fail "after make uninstall, expected only the changed $conf, found: $left"
rm -f "$conf"
make -s -C "$b" install DESTDIR="$D" >/dev/null
make -s -C "$b" uninstall DESTDIR="$D" >/dev/null
left=$(find "$D" -type f)
[ -z "$left" ] || fail "make uninstall left: $left"
echo "check_install: install, installcheck, reinstall over a changed config, uninstall: ok"
