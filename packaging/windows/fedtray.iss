; Inno Setup 6 script: fedtray-setup.exe, a per-user install (no administrator rights).
;
; Build on Windows after the bundle (see packaging/README.md, or run build.ps1):
;   iscc /DAppVersion=0.1.0 packaging\windows\fedtray.iss
; Signing (optional; the release owner's certificate):
;   iscc /DAppVersion=0.1.0 /DSign "/Sfedtraysign=signtool sign /fd sha256 /tr http://timestamp.digicert.com /td sha256 /f $qC:\path\cert.pfx$q /p PASSWORD $f" packaging\windows\fedtray.iss
; signs the installer and the uninstaller with that command.
;
; Start at login agrees with the app's own switch (tray/autostart.py): the SAME value
; HKCU\Software\Microsoft\Windows\CurrentVersion\Run\fedtray holding the SAME command
; (the executable's path, quoted only when it contains a space, as Python's
; subprocess.list2cmdline writes it). One value name means fedtray can never be started
; twice at login, whichever of the two wrote it, and the tray menu's toggle shows the
; installer's choice. Uninstalling removes that value (and a Startup-folder fedtray.lnk)
; whoever made it, but never the user's settings, logs or caches.

#ifndef AppVersion
  #define AppVersion "0.0.0"
#endif
#define AppName "fedtray"
#define AppExe "fedtray.exe"
#define DistDir "..\..\dist\fedtray"
#define RunKey "Software\Microsoft\Windows\CurrentVersion\Run"

[Setup]
AppId={{6C3F2A9E-5B1D-4F7A-9E2C-8D4B1A0F3E71}
AppName={#AppName}
AppVersion={#AppVersion}
AppVerName={#AppName} {#AppVersion}
AppPublisher=fedtray
; Per user, no UAC prompt: %LOCALAPPDATA%\Programs\fedtray, like other per-user apps.
PrivilegesRequired=lowest
PrivilegesRequiredOverridesAllowed=
DefaultDirName={localappdata}\Programs\{#AppName}
DisableProgramGroupPage=yes
DefaultGroupName={#AppName}
UninstallDisplayIcon={app}\{#AppExe}
UninstallDisplayName={#AppName}
OutputDir=..\..\dist
OutputBaseFilename=fedtray-setup
SetupIconFile=..\..\build\icons\fedtray.ico
Compression=lzma2/max
SolidCompression=yes
WizardStyle=modern
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
; A running fedtray holds its files open: ask it to close (Restart Manager).
CloseApplications=force
RestartApplications=no
#ifdef Sign
SignTool=fedtraysign
SignedUninstaller=yes
#endif

[Tasks]
Name: "autostart"; Description: "Start fedtray when I log in"; GroupDescription: "Options:"

[Files]
Source: "{#DistDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{userprograms}\{#AppName}"; Filename: "{app}\{#AppExe}"; Comment: "Lend this computer's spare power to federated training"

[Registry]
; The task's value (the same one `fedtray autostart enable` writes).
Root: HKCU; Subkey: "{#RunKey}"; ValueType: string; ValueName: "fedtray"; ValueData: "{code:LoginCommand}"; Tasks: autostart; Flags: uninsdeletevalue
; Always removed at uninstall, even when the app (not this installer) created it:
; ValueType none creates nothing at install time.
Root: HKCU; Subkey: "{#RunKey}"; ValueType: none; ValueName: "fedtray"; Flags: uninsdeletevalue

[UninstallDelete]
; tray/autostart.py also honours a Startup-folder shortcut; a login item must not
; outlive the program it starts.
Type: files; Name: "{userstartup}\fedtray.lnk"

[Run]
Filename: "{app}\{#AppExe}"; Description: "Start fedtray now"; Flags: nowait postinstall skipifsilent

[Code]
{ The executable as subprocess.list2cmdline([exe]) writes it: quoted only when it
  contains a space or a tab, so the app sees its own value and leaves it alone. }
function LoginCommand(Param: String): String;
var
  Exe: String;
begin
  Exe := ExpandConstant('{app}\{#AppExe}');
  if (Pos(' ', Exe) > 0) or (Pos(#9, Exe) > 0) then
    Result := '"' + Exe + '"'
  else
    Result := Exe;
end;
