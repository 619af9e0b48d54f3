"""One-shot GPU probe, run as a short-lived subprocess by :mod:`client.device`.

The tray process must stay torch-free (torch costs seconds and hundreds of MB to
import), yet only torch can say which accelerator it can use. So
:func:`client.device.detect_device` runs this module in a child process:

* from source or a pip install: ``python -m client.gpu_probe``;
* from a PyInstaller bundle, where ``sys.executable -m`` does not work: ``<bundle>
  --gpu-probe``. The bundle's entry point must route that flag here, before anything
  else, e.g.::

      if sys.argv[1:] == [GPU_PROBE_FLAG]:
          raise SystemExit(client.gpu_probe.main())

Contract of :func:`main`: prints exactly one JSON line on stdout and returns 0 --
``null`` when torch cannot be imported or sees no accelerator,
``{"kind": "cuda", "name": ..., "memoryMb": ...}`` for a CUDA (or ROCm) device,
``{"kind": "mps"}`` for Apple silicon. When torch imports but querying the device
fails (e.g. a broken driver), it prints nothing on stdout, explains on stderr and
returns 1, so the caller does not cache a transient failure as "no GPU".
Importing this module does not import torch; only :func:`main` does.
"""

from __future__ import annotations

import json
import sys
from typing import Any

GPU_PROBE_FLAG = "--gpu-probe"

_MIB = 1024 * 1024


def probe() -> dict[str, Any] | None:
    """The accelerator torch would use, as the wire dict, or None. May raise if torch does."""
    try:
        import torch
    except Exception:  # not installed, or a broken install: either way no usable GPU
        return None
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {
            "kind": "cuda",
            "name": str(props.name),
            "memoryMb": int(props.total_memory) // _MIB,
        }
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return {"kind": "mps"}
    return None


def main() -> int:
    """Print the probe's answer as one JSON line; exit status as in the module contract."""
    try:
        answer = probe()
    except Exception as exc:
        print(f"gpu probe failed: {exc!r}", file=sys.stderr)
        return 1
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
