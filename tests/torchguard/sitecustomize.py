"""Torch guard for child processes of "not slow" tests (see tests/conftest.py).

Python imports ``sitecustomize`` at start-up from its path; tests/conftest.py puts this folder
on ``PYTHONPATH`` and names a folder in ``FEDTRAY_TORCH_GUARD_DIR`` while a test not marked
slow runs, so every Python process that test starts inherits both. In such a process the
first import of ``torch`` writes one file into that folder (the pid and command line) and then
goes on unchanged; the fixture fails the test when the folder is not empty. Without the
variable this module does nothing. It never blocks an import and never raises.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

_GUARD_DIR = os.environ.get("FEDTRAY_TORCH_GUARD_DIR")


class _TorchImportRecorder:
    """A meta path finder that only watches: it records ``import torch`` and finds nothing."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.recorded = False

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not self.recorded and (name == "torch" or name.startswith("torch.")):
            self.recorded = True
            with contextlib.suppress(OSError):
                (self.folder / f"torch-in-{os.getpid()}.txt").write_text(" ".join(sys.argv))
        return None


if _GUARD_DIR:
    sys.meta_path.insert(0, _TorchImportRecorder(Path(_GUARD_DIR)))
