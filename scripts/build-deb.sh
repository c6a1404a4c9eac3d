#!/bin/sh
# `make deb`: build the Debian package from a clean copy of this tree (what git would track:
# no .venv, no caches) and put vpnmasq_<version>_all.deb into OUTDIR (default dist/).
# Needs the build dependencies of debian/control; scripts/setup.sh installs them.
set -eu
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-dist}")
VERSION=$(dpkg-parsechangelog -S Version)
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
SRC="$BUILD/vpnmasq-$VERSION"
mkdir -p "$SRC" "$OUT"
tar -c --exclude-vcs --exclude-vcs-ignores --exclude=./dist . | tar -x -C "$SRC"
# Debian's python3, not one that comes first on PATH (pyenv, a venv)
(cd "$SRC" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b --no-sign) >"$BUILD/build.log" 2>&1 || {
    tail -n 40 "$BUILD/build.log" >&2
    exit 1
}
cp "$BUILD/vpnmasq_${VERSION}_all.deb" "$OUT/"
echo "$OUT/vpnmasq_${VERSION}_all.deb"
