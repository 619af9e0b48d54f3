#!/usr/bin/env bash
# Build the Linux bundle (PyInstaller, onedir) and a .deb from it.
#
#   packaging/build-linux.sh            # -> dist/fedtray/ and dist/fedtray_<version>_<arch>.deb
#
# Needs: the venv with the `train,tray,package` extras (PYTHON, default .venv/bin/python),
# dpkg-deb (Debian/Ubuntu). Nothing is downloaded.
#
# The .deb installs:
#   /opt/fedtray/                          the bundle (one executable: fedtray)
#   /usr/bin/fedtray, /usr/bin/fedtray-client   symlinks to /opt/fedtray/fedtray
#                                          (the bundle dispatches on argv[0]; packaging/entry.py)
#   /usr/share/applications/fedtray.desktop     the menu entry
#   /usr/share/icons/hicolor/<N>x<N>/apps/fedtray.png
# Removing it never touches users' settings, logs or caches (~/.config/fedtray, ...).
#
# Environment: PYTHON; DEB_COMPRESSION and DEB_LEVEL (dpkg-deb -Z / -z; default gzip level
# 1: 10 s instead of 75 s at level 9 for ~10% more; a release may use DEB_COMPRESSION=xz
# DEB_LEVEL=9); FEDTRAY_NO_TRIM=1 (see fedtray.spec).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
DEB_COMPRESSION=${DEB_COMPRESSION:-gzip}
DEB_LEVEL=${DEB_LEVEL:-1}

die() { echo "error: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (a .deb is built on Debian or Ubuntu)"
"$PYTHON" -c 'import PyInstaller' 2>/dev/null \
    || die "PyInstaller is not installed in $PYTHON (pip install -e '.[package]')"

VERSION=$("$PYTHON" -c 'from client import __version__; print(__version__)')
ARCH=$(dpkg --print-architecture)

echo "== bundle: PyInstaller $("$PYTHON" -c 'import PyInstaller; print(PyInstaller.__version__)')"
# No --clean: the analysis cache in build/pyinstaller makes a rebuild take seconds.
"$PYTHON" -m PyInstaller --noconfirm --log-level WARN \
    --distpath "$ROOT/dist" --workpath "$ROOT/build/pyinstaller" packaging/fedtray.spec
BUNDLE=$ROOT/dist/fedtray
test -x "$BUNDLE/fedtray" || die "the bundle has no executable: $BUNDLE/fedtray"
"$BUNDLE/fedtray" --version >/dev/null || die "the bundle does not start: $BUNDLE/fedtray --version"

echo "== .deb"
STAGE=$ROOT/build/deb/fedtray_${VERSION}_${ARCH}
rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN" "$STAGE/opt" "$STAGE/usr/bin" "$STAGE/usr/share/applications" \
    "$STAGE/usr/share/icons"
# Hard links: the stage is read once by dpkg-deb, a copy of ~800 MB would only cost time.
cp -al "$BUNDLE" "$STAGE/opt/fedtray"
ln -s /opt/fedtray/fedtray "$STAGE/usr/bin/fedtray"
ln -s /opt/fedtray/fedtray "$STAGE/usr/bin/fedtray-client"
"$PYTHON" packaging/make_icons.py build/icons >/dev/null
cp -a build/icons/hicolor "$STAGE/usr/share/icons/hicolor"
install -m 0644 packaging/linux/fedtray.desktop "$STAGE/usr/share/applications/fedtray.desktop"
for script in postinst postrm; do
    install -m 0755 "packaging/linux/$script" "$STAGE/DEBIAN/$script"
done

# The newest glibc symbol any bundled binary needs is the one system library the bundle
# cannot carry: say so in Depends, so apt refuses an older system instead of a crash.
GLIBC=$(find "$STAGE/opt/fedtray" -type f \( -name '*.so*' -o -perm -u+x \) -print0 \
    | xargs -0 grep -aoh 'GLIBC_2\.[0-9]*' 2>/dev/null | sort -t. -k2,2n -u | tail -1 \
    | sed 's/GLIBC_//')
INSTALLED_KB=$(du -sk "$STAGE" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$ARCH/" -e "s/@GLIBC@/${GLIBC:-2.31}/" \
    -e "s/@INSTALLED_KB@/$INSTALLED_KB/" packaging/linux/control.in >"$STAGE/DEBIAN/control"

DEB=$ROOT/dist/fedtray_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Z"$DEB_COMPRESSION" -z"$DEB_LEVEL" --build "$STAGE" "$DEB" >/dev/null
echo "bundle: $BUNDLE ($(du -sh "$BUNDLE" | cut -f1))"
echo "package: $DEB ($(du -h "$DEB" | cut -f1))"
