# Build fedtray-setup.exe on Windows: bundle (PyInstaller), sign (optional), installer.
#
#   powershell -ExecutionPolicy Bypass -File packaging\windows\build.ps1
#
# Needs: Python 3.11 with `pip install -c constraints.txt -e .[train,tray,package]`
# (PYTHON, default .venv\Scripts\python.exe) and Inno Setup 6 (ISCC, default its usual
# path). Signing is off unless FEDTRAY_SIGN_CERT (a .pfx) is set; then
# FEDTRAY_SIGN_PASSWORD and FEDTRAY_TIMESTAMP_URL (default DigiCert's) are used with
# signtool (Windows SDK) for both executables, the installer and its uninstaller.
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..\..")

$Python = if ($env:PYTHON) { $env:PYTHON } else { ".venv\Scripts\python.exe" }
$Iscc = if ($env:ISCC) { $env:ISCC } else { "${env:ProgramFiles(x86)}\Inno Setup 6\ISCC.exe" }
$Timestamp = if ($env:FEDTRAY_TIMESTAMP_URL) { $env:FEDTRAY_TIMESTAMP_URL } else { "http://timestamp.digicert.com" }
$Version = & $Python -c "from client import __version__; print(__version__)"

& $Python packaging\make_icons.py build\icons | Out-Null
& $Python -m PyInstaller --noconfirm --distpath dist --workpath build\pyinstaller packaging\fedtray.spec
if ($LASTEXITCODE -ne 0) { throw "PyInstaller failed" }
& dist\fedtray\fedtray-client.exe --version
if ($LASTEXITCODE -ne 0) { throw "the bundle does not start" }

$IsccArgs = @("/DAppVersion=$Version")
if ($env:FEDTRAY_SIGN_CERT) {
    $Sign = "signtool sign /fd sha256 /tr $Timestamp /td sha256 /f `"$env:FEDTRAY_SIGN_CERT`" /p `"$env:FEDTRAY_SIGN_PASSWORD`""
    foreach ($exe in "dist\fedtray\fedtray.exe", "dist\fedtray\fedtray-client.exe") {
        Invoke-Expression "$Sign `"$exe`""
        if ($LASTEXITCODE -ne 0) { throw "signing $exe failed" }
    }
    # ISCC runs this for the installer and uninstaller ($f is the file; $q a quote).
    $IsccArgs += "/DSign", "/Sfedtraysign=$($Sign.Replace('"', '$q')) `$f"
}
& $Iscc @IsccArgs packaging\windows\fedtray.iss
if ($LASTEXITCODE -ne 0) { throw "Inno Setup failed" }
Write-Host "installer: dist\fedtray-setup.exe"
