#!/usr/bin/env bash
# Build fedtray.dmg on macOS: fedtray.app (PyInstaller BUNDLE, menu-bar only: LSUIElement)
# next to an Applications link, so installing is one drag.
#
#   packaging/macos/build-dmg.sh        # -> dist/fedtray.app and dist/fedtray.dmg
#
# Needs: Python 3.11 with `pip install -c constraints.txt -e .[train,tray,package]`
# (PYTHON, default .venv/bin/python) and the Xcode command line tools (hdiutil, codesign,
# xcrun). Nothing is downloaded.
#
# Signing and notarization run only when their variables are set (the release owner's):
#   FEDTRAY_CODESIGN_IDENTITY  "Developer ID Application: NAME (TEAMID)" -- PyInstaller
#                              signs every binary and the .app with the hardened runtime,
#                              using packaging/macos/entitlements.plist; the .dmg is signed too.
#   FEDTRAY_NOTARY_PROFILE     a `xcrun notarytool store-credentials` keychain profile:
#                              the .dmg is submitted, waited for and stapled.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
APP=dist/fedtray.app
DMG=dist/fedtray.dmg

if [[ -n "${FEDTRAY_CODESIGN_IDENTITY:-}" ]]; then
    export FEDTRAY_ENTITLEMENTS=${FEDTRAY_ENTITLEMENTS:-$PWD/packaging/macos/entitlements.plist}
fi
"$PYTHON" -m PyInstaller --noconfirm --distpath dist --workpath build/pyinstaller \
    packaging/fedtray.spec
"$APP/Contents/MacOS/fedtray" --version

STAGE=build/dmg
rm -rf "$STAGE" "$DMG"
mkdir -p "$STAGE"
cp -R "$APP" "$STAGE/"
ln -s /Applications "$STAGE/Applications"
hdiutil create -volname fedtray -srcfolder "$STAGE" -fs HFS+ -format UDZO -ov "$DMG"

if [[ -n "${FEDTRAY_CODESIGN_IDENTITY:-}" ]]; then
    codesign --sign "$FEDTRAY_CODESIGN_IDENTITY" --timestamp "$DMG"
fi
if [[ -n "${FEDTRAY_NOTARY_PROFILE:-}" ]]; then
    xcrun notarytool submit "$DMG" --keychain-profile "$FEDTRAY_NOTARY_PROFILE" --wait
    xcrun stapler staple "$DMG"
fi
echo "disk image: $DMG"
