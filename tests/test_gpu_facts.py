"""The torch-free GPU probe: parsing (table tests on fixtures) and the decision table."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import gpu_facts
from client.gpu_facts import (
    ASK_TORCH,
    AskTorch,
    Card,
    GpuFacts,
    decide,
    parse_amd_card,
    parse_mac_version,
    parse_nvidia_proc_model,
    parse_nvidia_smi,
    read_gpu_facts,
    torch_build,
)
from client.protocol import GpuInfo

PROC_INFORMATION = """\
Model: \t\t NVIDIA GeForce RTX 3080
IRQ:   \t\t 130
GPU UUID: \t GPU-6c3a1f1e-0000-0000-0000-000000000000
Video BIOS: \t 94.02.42.00.a9
Bus Type: \t PCIe
DMA Size: \t 47 bits
Bus Location: \t 0000:01:00.0
Device Minor: \t 0
GPU Excluded:\t No
"""


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("NVIDIA H200, 143771\n", (Card("NVIDIA H200", 143771),)),
        ("NVIDIA H200, 143771 MiB\n", (Card("NVIDIA H200", 143771),)),
        (
            "NVIDIA A100-SXM4-80GB, 81920\nNVIDIA A100-SXM4-80GB, 81920\n",
            (Card("NVIDIA A100-SXM4-80GB", 81920),) * 2,
        ),
        ("NVIDIA GeForce GTX 1650, [N/A]\n", (Card("NVIDIA GeForce GTX 1650", None),)),
        ("", ()),
        ("No devices were found\n", ()),
        (", 1024\n", ()),
    ],
)
def test_parse_nvidia_smi(stdout: str, expected: tuple[Card, ...]) -> None:
    assert parse_nvidia_smi(stdout) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PROC_INFORMATION, "NVIDIA GeForce RTX 3080"),
        ("Model:  Tesla   T4\n", "Tesla T4"),
        ("IRQ: 5\n", None),
        ("Model:\n", None),
        ("", None),
    ],
)
def test_parse_nvidia_proc_model(text: str, expected: str | None) -> None:
    assert parse_nvidia_proc_model(text) == expected


@pytest.mark.parametrize(
    ("vendor", "vram", "product", "expected"),
    [
        ("0x1002\n", "17163091968\n", "Radeon RX 7900 XT\n", Card("Radeon RX 7900 XT", 16368)),
        ("0x1002\n", "8589934592\n", None, Card("AMD GPU", 8192)),
        ("0x1002\n", "8589934592\n", "  \n", Card("AMD GPU", 8192)),
        ("0x1002\n", None, "Radeon", None),  # not amdgpu: no VRAM file
        ("0x1002\n", "lots\n", None, None),
        ("0x10de\n", "8589934592\n", None, None),  # NVIDIA through drm
        ("0x8086\n", "8589934592\n", None, None),  # Intel
    ],
)
def test_parse_amd_card(
    vendor: str, vram: str | None, product: str | None, expected: object
) -> None:
    assert parse_amd_card(vendor, vram, product) == expected


@pytest.mark.parametrize(
    ("version", "requires", "expected"),
    [
        ("2.13.0+cpu", [], "cpu"),
        ("2.5.1+cpu.cxx11.abi", [], "cpu"),
        ("2.5.1+cu121", [], "cuda"),
        ("2.5.1+rocm6.1", [], "rocm"),
        ("2.5.1", ['nvidia-cuda-runtime-cu12==12.4.127; platform_system == "Linux"'], "cuda"),
        ("2.5.1", ["filelock", "sympy"], "unknown"),  # Windows/macOS PyPI, conda, ...
        ("2.5.1+xpu", [], "unknown"),
        ("2.5.1+git1234", ["nvidia-nccl-cu12"], "unknown"),
    ],
)
def test_torch_build(version: str, requires: list[str], expected: str) -> None:
    assert torch_build(version, requires) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("14.2.1", (14, 2, 1)), ("12.3", (12, 3)), ("", None), ("14.x", None)],
)
def test_parse_mac_version(text: str, expected: tuple[int, ...] | None) -> None:
    assert parse_mac_version(text) == expected


H200 = Card("NVIDIA H200", 143771)
RTX = Card("NVIDIA GeForce RTX 3080", None)
RADEON = Card("Radeon RX 7900 XT", 16368)
CUDA_H200 = GpuInfo(kind="cuda", name="NVIDIA H200", memory_mb=143771)
MPS = GpuInfo(kind="mps")


def _linux(**kw: object) -> GpuFacts:
    base: dict[str, object] = {
        "system": "Linux",
        "machine": "x86_64",
        "torch_build": "cuda",
        "nvidia": (),
        "amd": (),
    }
    return GpuFacts(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        # Linux, CUDA build
        (_linux(nvidia=(H200,)), CUDA_H200),
        (_linux(nvidia=(H200, H200)), CUDA_H200),
        (_linux(nvidia=(RTX,)), GpuInfo(kind="cuda", name=RTX.name)),
        (_linux(nvidia=(H200, RTX)), ASK_TORCH),  # which is first is torch's call
        (_linux(), None),  # no NVIDIA driver, no GPU
        (_linux(amd=(RADEON,)), None),  # a CUDA build cannot drive an AMD GPU
        # CUDA_VISIBLE_DEVICES
        (_linux(nvidia=(H200,), cuda_visible_devices=""), None),
        (_linux(nvidia=(H200,), cuda_visible_devices="-1"), None),
        (_linux(nvidia=(H200,), cuda_visible_devices="1"), ASK_TORCH),
        # CPU-only build: whatever the hardware
        (_linux(torch_build="cpu", nvidia=(H200,)), None),
        (GpuFacts("Windows", "AMD64", "cpu"), None),
        # ROCm build
        (
            _linux(torch_build="rocm", amd=(RADEON,)),
            GpuInfo(kind="cuda", name=RADEON.name, memory_mb=16368),
        ),
        (_linux(torch_build="rocm", nvidia=(H200,)), None),
        # a build of unknown kind
        (_linux(torch_build="unknown"), None),
        (_linux(torch_build="unknown", nvidia=(H200,)), ASK_TORCH),
        (_linux(torch_build="unknown", amd=(RADEON,)), ASK_TORCH),
        # Windows: nvidia-smi is the only source
        (GpuFacts("Windows", "AMD64", "cuda", nvidia=(H200,)), CUDA_H200),
        (GpuFacts("Windows", "AMD64", "cuda", nvidia=None), ASK_TORCH),
        (GpuFacts("Windows", "AMD64", "unknown", nvidia=()), ASK_TORCH),
        # macOS
        (GpuFacts("Darwin", "arm64", "unknown", mac_version=(14, 2, 1)), MPS),
        (GpuFacts("Darwin", "arm64", "unknown", mac_version=(12, 3)), MPS),
        (GpuFacts("Darwin", "arm64", "unknown", mac_version=(12, 2)), ASK_TORCH),
        (GpuFacts("Darwin", "arm64", "unknown", mac_version=None), ASK_TORCH),
        (GpuFacts("Darwin", "x86_64", "unknown", mac_version=(14, 0)), ASK_TORCH),
        # other systems
        (GpuFacts("FreeBSD", "amd64", "cuda", nvidia=(H200,)), ASK_TORCH),
    ],
)
def test_decide(facts: GpuFacts, expected: GpuInfo | AskTorch | None) -> None:
    assert decide(facts) == expected


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_read_gpu_facts_from_linux_trees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The readers on made-up /proc and /sys trees (no nvidia-smi on PATH)."""
    monkeypatch.setattr(gpu_facts.platform, "system", lambda: "Linux")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_facts, "_installed_torch_build", lambda: "unknown")
    proc, sys_root = tmp_path / "proc", tmp_path / "sys"
    _write(proc / "driver/nvidia/gpus/0000:01:00.0/information", PROC_INFORMATION)
    _write(sys_root / "class/drm/card1/device/vendor", "0x1002\n")
    _write(sys_root / "class/drm/card1/device/mem_info_vram_total", "8589934592\n")
    _write(sys_root / "class/drm/card1-DP-1/device/vendor", "0x1002\n")  # a connector
    _write(sys_root / "class/drm/card0/device/vendor", "0x8086\n")
    facts = read_gpu_facts(proc=proc, sys_root=sys_root)
    assert facts.nvidia == (Card("NVIDIA GeForce RTX 3080"),)
    assert facts.amd == (Card("AMD GPU", 8192),)
    assert decide(facts) is ASK_TORCH  # unknown build with GPUs present
    empty = read_gpu_facts(proc=tmp_path / "none", sys_root=tmp_path / "none")
    assert (empty.nvidia, empty.amd) == ((), ())
    assert decide(empty) is None
