"""The one entry point of the frozen (PyInstaller) fedtray app: dispatch on argv.

A bundle has one Python and one executable, yet it must be four programs. This script
decides which, importing nothing heavy before it has decided:

1. ``multiprocessing.freeze_support()`` runs first. In a spawned child (the training
   worker, or multiprocessing's resource tracker) the bootloader passes
   ``--multiprocessing-fork ...`` / ``-c 'from multiprocessing.resource_tracker ...'``;
   freeze_support then runs the child's target and exits, so nothing below ever runs
   twice. (PyInstaller's runtime hook makes it work on Linux and macOS too, not only on
   Windows.)
2. ``fedtray --gpu-probe`` (exactly that one argument) runs :func:`client.gpu_probe.main`:
   it is how :mod:`client.device` asks torch about the GPU from a frozen app, where
   ``sys.executable -m client.gpu_probe`` does not exist.
3. The headless client: ``fedtray client ARGS...`` on every OS, or any argv[0] whose
   name is ``fedtray-client`` (the .deb's ``/usr/bin/fedtray-client`` is a symlink to
   the one executable) -> :func:`client.cli.main`.
4. Anything else is the tray and its helpers -> :func:`tray.__main__.main`
   (``fedtray``, ``fedtray --version``, ``fedtray autostart ...``, ``fedtray settings``).

The exit status is the chosen program's; this script never prints anything itself.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Sequence

CLIENT_NAME = "fedtray-client"
CLIENT_SUBCOMMAND = "client"
GPU_PROBE_FLAG = "--gpu-probe"  # the same string as client.gpu_probe.GPU_PROBE_FLAG


def program_for(argv: Sequence[str]) -> tuple[str, list[str]]:
    """Which program ``argv`` (``sys.argv``, argv[0] included) asks for, and its arguments.

    Returns ``("gpu-probe" | "client" | "tray", args)``. Pure: no I/O, no imports.
    """
    args = list(argv[1:])
    if args == [GPU_PROBE_FLAG]:
        return "gpu-probe", []
    # Either separator, whatever this OS is: the table tests cover Windows paths too.
    invoked = argv[0].replace("\\", "/").rsplit("/", 1)[-1] if argv else ""
    stem = invoked[:-4] if invoked.lower().endswith(".exe") else invoked
    if stem == CLIENT_NAME:
        return "client", args
    if args[:1] == [CLIENT_SUBCOMMAND]:
        return "client", args[1:]
    return "tray", args


def main() -> int:
    """Run the program ``sys.argv`` asks for; returns its exit status."""
    multiprocessing.freeze_support()
    program, args = program_for(sys.argv)
    if program == "gpu-probe":
        from client.gpu_probe import main as probe_main

        return probe_main()
    if program == "client":
        from client.cli import main as client_main

        return client_main(args)
    from tray.__main__ import main as tray_main

    return tray_main(args)


if __name__ == "__main__":
    sys.exit(main())
