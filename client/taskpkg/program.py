"""A package's programs: ``torch.export`` programs to JSON and back, without pickle.

Contract (imports torch; only the worker process and the packer import this module):

* :func:`export_program` exports a module with a dynamic batch axis (the first dimension
  of its one input), in its current train/eval mode.
* :func:`serialize_program` gives the JSON of the serialized ``ExportedProgram`` schema:
  no state dict, constants or example inputs (those travel as safetensors), node
  metadata (stack traces, module paths) dropped.
* :func:`load_program` rebuilds an ``ExportedProgram`` from that JSON, the weights and the
  constants. First it runs :func:`client.taskpkg.graphcheck.check_program` (schema,
  operator allowlist, names, expressions: ``package_program`` / ``package_operator``),
  then parses the JSON into torch's serde schema dataclasses and calls
  ``ExportedProgramDeserializer().deserialize`` with in-memory tensors and example
  inputs built from the manifest's spec, so torch never unpickles anything. A program
  the deserializer refuses raises ``package_program``.

Never: ``torch.load``, ``torch.export.load``, pickle. The deserializer is torch's
private ``torch._export.serde.serialize`` module (torch is pinned); the names used here
are listed in :data:`SERDE_API`, and a test fails loudly when a torch upgrade changes
them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from client.errors import FedtrayError
from client.taskpkg.graphcheck import check_program, parse_program_json
from client.taskpkg.manifest import TensorSpec

if TYPE_CHECKING:
    import torch
    from torch.export import ExportedProgram

__all__ = [
    "MAX_BATCH",
    "SERDE_API",
    "example_inputs",
    "export_program",
    "load_program",
    "serialize_program",
]

#: Upper bound of the exported dynamic batch axis.
MAX_BATCH: Final = 1 << 20

#: The private torch names this module relies on (module, attribute); a test checks them.
SERDE_API: Final = (
    ("torch._export.serde.serialize", "serialize"),
    ("torch._export.serde.serialize", "ExportedProgramDeserializer"),
    ("torch._export.serde.serialize", "_dict_to_dataclass"),
    ("torch._export.serde.schema", "ExportedProgram"),
    ("torch._export.serde.schema", "SCHEMA_VERSION"),
)


def export_program(model: torch.nn.Module, example: torch.Tensor) -> ExportedProgram:
    """``torch.export`` of ``model`` (in its current mode) with a dynamic batch axis."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _strip_metadata(data: dict[str, Any]) -> dict[str, Any]:
    module = data.get("graph_module")
    if isinstance(module, dict):
        graph = module.get("graph")
        if isinstance(graph, dict) and isinstance(graph.get("nodes"), list):
            for node in graph["nodes"]:
                if isinstance(node, dict):
                    node["metadata"] = {}
        module["metadata"] = {}
    return data


def serialize_program(ep: ExportedProgram) -> bytes:
    """The program's JSON (the serde ``ExportedProgram`` schema), without tensors or metadata."""
    from torch._export.serde.serialize import serialize

    artifact = serialize(
        ep,
        serialize_state_dict=False,
        serialize_constants=False,
        serialize_example_inputs=False,
    )
    data = _strip_metadata(json.loads(artifact.exported_program))
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")


_TORCH_DTYPES: Final = {
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float32": "float32",
    "float64": "float64",
    "int64": "int64",
    "int32": "int32",
    "uint8": "uint8",
    "bool": "bool",
}


def example_inputs(
    spec: TensorSpec, batch: int = 2
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """Zeros of ``(batch, *spec.shape)`` in the spec's dtype, as the deserializer wants them."""
    import torch

    dtype = getattr(torch, _TORCH_DTYPES[spec.dtype])
    return (torch.zeros((batch, *spec.shape), dtype=dtype),), {}


def _tensor(arr: npt.NDArray[Any]) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.array(arr, copy=True, order="C"))


def load_program(
    json_bytes: bytes,
    weights: Mapping[str, npt.NDArray[Any] | torch.Tensor],
    constants: Mapping[str, npt.NDArray[Any] | torch.Tensor],
    example_inputs: tuple[tuple[torch.Tensor, ...], dict[str, Any]],
    *,
    member: str = "program",
) -> ExportedProgram:
    """Rebuild a program from its JSON (module docstring); tensors are copied or shared."""
    import torch
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    data = _strip_metadata(parse_program_json(json_bytes, member))
    info = check_program(data, member)
    if not info.state_names <= set(weights) or not info.constants <= set(constants):
        raise FedtrayError(
            "package_weights", f"the weights do not hold every tensor {member} needs"
        )

    def as_tensor(value: npt.NDArray[Any] | torch.Tensor) -> torch.Tensor:
        return value if isinstance(value, torch.Tensor) else _tensor(value)

    state: dict[str, torch.Tensor] = {}
    for name in info.state_names:
        tensor = as_tensor(weights[name])
        state[name] = torch.nn.Parameter(tensor) if name in info.parameters else tensor
    consts = {name: as_tensor(constants[name]) for name in info.constants}
    try:
        parsed = _dict_to_dataclass(schema.ExportedProgram, data)  # type: ignore[no-untyped-call]
        program: ExportedProgram = ExportedProgramDeserializer().deserialize(
            parsed, state_dict=state, constants=consts, example_inputs=example_inputs
        )
    except FedtrayError:
        raise
    except Exception as exc:  # the deserializer raises many kinds on bad input
        raise FedtrayError(
            "package_program", f"{member} cannot be rebuilt: {type(exc).__name__}: {exc}"
        ) from None
    return program
