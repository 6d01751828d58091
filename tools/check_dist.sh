#!/bin/sh
# check_dist.sh — every file git tracks is in the release tarball, so that a
# source, test fixture or doc added without a Makefile.am line fails CI
# instead of a user's build from the tarball.
#
#   tools/check_dist.sh mkad-0.1.0.tar.gz      (run from a git checkout)
#
# Files that are only for the repository itself are listed below.
set -eu
tarball=$1
top=$(basename "$tarball" .tar.gz)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
git ls-files | grep -v -x -e .gitignore -e m4/.keep | sort >"$tmp/git"
tar -tzf "$tarball" | sed -n "s|^$top/||p" | grep -v '/$' | sort >"$tmp/tar"
missing=$(comm -23 "$tmp/git" "$tmp/tar")
if [ -n "$missing" ]; then
    echo "check_dist: tracked by git but not in $tarball (add them to EXTRA_DIST or a _SOURCES/_DATA list in Makefile.am):" >&2
    echo "$missing" | sed 's/^/  /' >&2
    exit 1
fi
echo "check_dist: all $(wc -l <"$tmp/git") tracked files are in $tarball"
