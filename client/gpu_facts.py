"""The accelerator torch would use, read from the OS without importing torch.

Importing torch to ask it costs seconds (tens of seconds on a loaded machine); the OS
usually knows the answer already. This module gathers what it says and decides.

Contract:

* :func:`decide` (pure) turns :class:`GpuFacts` into a :class:`~client.protocol.GpuInfo`,
  ``None`` (torch can use no accelerator here) or :data:`ASK_TORCH` (the facts do not
  settle it: the torch probe of :mod:`client.gpu_probe` must answer). It answers only
  when the facts leave no doubt: a CPU-only torch build, an Apple silicon Mac (``mps``),
  Linux without an NVIDIA driver or AMD GPU, or one GPU model of the kind the torch build
  supports; ``CUDA_VISIBLE_DEVICES`` set to anything but empty/``-1``, several GPU models,
  an unknown torch build with a GPU present, or an OS it cannot read give
  :data:`ASK_TORCH`.
* The parsers :func:`parse_nvidia_smi`, :func:`parse_nvidia_proc_model`,
  :func:`parse_amd_card`, :func:`torch_build` and :func:`parse_mac_version` are pure and
  never raise: what they cannot read gives nothing (no card, an unknown build).
* :func:`read_gpu_facts` does the I/O: ``/proc/driver/nvidia/gpus/*/information``,
  ``nvidia-smi --query-gpu=name,memory.total`` (when on ``PATH``, at most
  :data:`NVIDIA_SMI_TIMEOUT_S`), ``/sys/class/drm/card*/device`` (AMD), ``platform`` for
  macOS, the torch package's metadata. It never raises: anything unreadable counts as
  "could not look" (``nvidia=None``) or as absent, never as a GPU.
* Never imports torch.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Final, Literal

from client.protocol import GpuInfo

__all__ = [
    "ASK_TORCH",
    "NVIDIA_SMI_TIMEOUT_S",
    "AskTorch",
    "Card",
    "GpuFacts",
    "TorchBuild",
    "decide",
    "parse_amd_card",
    "parse_mac_version",
    "parse_nvidia_proc_model",
    "parse_nvidia_smi",
    "read_gpu_facts",
    "torch_build",
]

NVIDIA_SMI_TIMEOUT_S: Final = 5.0
NVIDIA_SMI_QUERY: Final = (
    "nvidia-smi",
    "--query-gpu=name,memory.total",
    "--format=csv,noheader,nounits",
)
AMD_VENDOR_ID: Final = "0x1002"
#: The first macOS with the Metal backend torch's ``mps`` needs.
MPS_MIN_MACOS: Final = (12, 3)
_MIB: Final = 1024 * 1024
_NAME_MAX: Final = 200

TorchBuild = Literal["cpu", "cuda", "rocm", "unknown"]


class AskTorch(Enum):
    """The facts do not settle it: ask torch."""

    ASK_TORCH = "ask torch"


ASK_TORCH: Final = AskTorch.ASK_TORCH


@dataclass(frozen=True)
class Card:
    """One GPU the OS lists."""

    name: str
    memory_mb: int | None = None


@dataclass(frozen=True)
class GpuFacts:
    """What the OS says. ``nvidia``/``amd``: ``None`` when this OS could not be asked."""

    system: str
    machine: str
    torch_build: TorchBuild
    nvidia: tuple[Card, ...] | None = None
    amd: tuple[Card, ...] | None = None
    mac_version: tuple[int, ...] | None = None
    cuda_visible_devices: str | None = None


# --- pure parsing ------------------------------------------------------------------------


def _name(text: str) -> str:
    return " ".join(text.split())[:_NAME_MAX]


def parse_nvidia_smi(stdout: str) -> tuple[Card, ...]:
    """Cards from ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader[,nounits]``:
    one ``NAME, MEMORY`` line each (``MiB`` after the number tolerated; ``[N/A]`` gives no
    memory). Lines without a name are skipped."""
    cards: list[Card] = []
    for line in stdout.splitlines():
        name, comma, memory = line.rpartition(",")
        if not comma or not name.strip():
            continue
        number = memory.strip().removesuffix("MiB").strip()
        cards.append(Card(_name(name), int(number) if number.isdigit() else None))
    return tuple(cards)


def parse_nvidia_proc_model(text: str) -> str | None:
    """The ``Model:`` of a ``/proc/driver/nvidia/gpus/*/information`` file, or None."""
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() == "Model" and value.strip():
            return _name(value)
    return None


def parse_amd_card(vendor: str, vram_bytes: str | None, product: str | None) -> Card | None:
    """An AMD GPU from ``/sys/class/drm/cardN/device``: its ``vendor`` must be AMD's and
    ``mem_info_vram_total`` (only the amdgpu driver, which ROCm needs, writes it) a
    number; ``product_name`` (often absent) names it."""
    if vendor.strip().lower() != AMD_VENDOR_ID or vram_bytes is None:
        return None
    vram = vram_bytes.strip()
    if not vram.isdigit():
        return None
    name = _name(product) if product and product.strip() else "AMD GPU"
    return Card(name, int(vram) // _MIB)


def torch_build(version: str, requires: Sequence[str]) -> TorchBuild:
    """Which accelerators the installed torch was built for, from its version's local
    part (``+cpu``, ``+cu121``, ``+rocm6.1``) or, without one, its ``nvidia-*``
    requirements (the CUDA wheels on PyPI); else ``unknown``."""
    local = version.partition("+")[2].lower()
    if local.startswith("cpu"):
        return "cpu"
    if local.startswith("cu"):
        return "cuda"
    if local.startswith("rocm"):
        return "rocm"
    if not local and any(r.strip().lower().startswith("nvidia-") for r in requires):
        return "cuda"
    return "unknown"


def parse_mac_version(text: str) -> tuple[int, ...] | None:
    """``"14.2.1"`` -> ``(14, 2, 1)``; None for anything else (e.g. ``""`` off macOS)."""
    parts = text.strip().split(".")
    if not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


# --- the decision --------------------------------------------------------------------------


def _single(cards: tuple[Card, ...]) -> GpuInfo | AskTorch | None:
    """The first card, when every card is the same model (else torch's order decides)."""
    if not cards:
        return None
    if len({c.name for c in cards}) > 1:
        return ASK_TORCH
    return GpuInfo(kind="cuda", name=cards[0].name, memory_mb=cards[0].memory_mb)


def decide(facts: GpuFacts) -> GpuInfo | AskTorch | None:
    """The accelerator torch would use, ``None`` for none, or :data:`ASK_TORCH`."""
    if facts.system == "Darwin":
        version = facts.mac_version or ()
        if facts.machine == "arm64" and version >= MPS_MIN_MACOS:
            return GpuInfo(kind="mps")
        return ASK_TORCH  # an Intel Mac's AMD GPU may or may not work with mps
    if facts.torch_build == "cpu":
        return None
    visible = facts.cuda_visible_devices
    if visible is not None:
        return None if visible.strip() in ("", "-1") else ASK_TORCH
    if facts.system not in ("Linux", "Windows") or facts.nvidia is None:
        return ASK_TORCH
    amd = facts.amd or ()
    if facts.torch_build == "cuda":
        return _single(facts.nvidia)
    if facts.torch_build == "rocm":
        return _single(amd)
    # A build of unknown kind: only "no GPU at all" is certain, and only where the OS
    # lists every GPU torch could drive (Linux: the NVIDIA driver's /proc, amdgpu's /sys).
    if facts.system == "Linux" and not facts.nvidia and not amd:
        return None
    return ASK_TORCH


# --- I/O at the edges ----------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _nvidia_smi() -> tuple[Card, ...] | None:
    """nvidia-smi's cards, or None when it is missing or fails (no driver, a timeout)."""
    exe = shutil.which(NVIDIA_SMI_QUERY[0])
    if exe is None:
        return None
    creationflags = 0
    if sys.platform == "win32":
        creationflags = subprocess.CREATE_NO_WINDOW
    try:
        done = subprocess.run(
            [exe, *NVIDIA_SMI_QUERY[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=NVIDIA_SMI_TIMEOUT_S,
            creationflags=creationflags,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else None


def _nvidia_linux(proc: Path) -> tuple[Card, ...]:
    """NVIDIA GPUs on Linux: nvidia-smi (names and memory), else the driver's /proc files
    (names only); no driver loaded means none."""
    cards = _nvidia_smi()
    if cards is not None:
        return cards
    found = []
    for info in sorted((proc / "driver" / "nvidia" / "gpus").glob("*/information")):
        model = parse_nvidia_proc_model(_read(info) or "")
        if model is not None:
            found.append(Card(model))
    return tuple(found)


def _amd_linux(sys_root: Path) -> tuple[Card, ...]:
    cards = []
    for card in sorted((sys_root / "class" / "drm").glob("card*")):
        if not re.fullmatch(r"card\d+", card.name):  # connectors: card0-DP-1, ...
            continue
        device = card / "device"
        found = parse_amd_card(
            _read(device / "vendor") or "",
            _read(device / "mem_info_vram_total"),
            _read(device / "product_name"),
        )
        if found is not None:
            cards.append(found)
    return tuple(cards)


def _installed_torch_build() -> TorchBuild:
    try:
        version = importlib.metadata.version("torch")
        requires = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
    return torch_build(version, requires)


def read_gpu_facts(*, proc: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> GpuFacts:
    """Ask this OS (see the module contract); ``proc``/``sys_root`` move the Linux trees."""
    system = platform.system()
    facts = GpuFacts(
        system=system,
        machine=platform.machine(),
        torch_build=_installed_torch_build(),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    if system == "Darwin":
        return replace(facts, mac_version=parse_mac_version(platform.mac_ver()[0]))
    if facts.torch_build == "cpu":
        return facts  # nothing to look for: this torch drives no GPU
    if system == "Linux":
        return replace(facts, nvidia=_nvidia_linux(proc), amd=_amd_linux(sys_root))
    if system == "Windows":
        return replace(facts, nvidia=_nvidia_smi())
    return facts
