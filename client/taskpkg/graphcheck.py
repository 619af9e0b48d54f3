"""Checks of a package's program JSON that need no torch: schema, operators, names, specs.

Contract: pure functions over the parsed JSON of a serialized ``torch.export``
``ExportedProgram`` (the ``program/*.json`` members, ``docs/task-package.md``). No torch,
no I/O. :func:`check_program` raises :class:`client.errors.FedtrayError`:

* ``package_program`` -- not the supported schema (major :data:`SCHEMA_MAJOR`), guards
  code present (torch turns it into Python source), custom objects, subgraphs or
  operators passed as values, a node or tensor name that is not a plain identifier, a
  symbolic expression outside the small arithmetic grammar (torch hands those strings
  to ``sympy.sympify``, i.e. ``eval``), more than one user input or output;
* ``package_operator`` -- a node whose target is not in :data:`ALLOWED_OPERATORS`,
  naming it;
* ``package_shape`` -- the manifest's input or label spec disagrees with the program's
  input or output (:func:`check_specs`).

It returns a :class:`ProgramInfo` (parameter, buffer and constant names; the user input
and output tensors). :mod:`client.taskpkg.program` runs the same check before it builds
anything, so the server (which may not import torch) and the device refuse the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from client.errors import FedtrayError
from client.taskpkg.manifest import Manifest, TensorDtype
from client.taskpkg.operators import ALLOWED_OPERATORS

__all__ = [
    "ALLOWED_OPERATORS",
    "SCHEMA_MAJOR",
    "ProgramInfo",
    "check_program",
    "check_specs",
    "parse_program_json",
]

#: The ``schema_version.major`` of torch's export serde schema this code reads
#: (torch 2.13: 8). A test fails when the installed torch's differs.
SCHEMA_MAJOR: Final = 8

#: Argument kinds that carry Python objects (custom classes, subgraphs, callables).
_FORBIDDEN_ARGUMENTS: Final = frozenset(
    ["as_graph", "as_custom_obj", "as_operator", "custom_obj", "as_complex"]
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")
_FQN = re.compile(r"^[A-Za-z0-9_]{1,200}(\.[A-Za-z0-9_]{1,200}){0,31}$")
_SYMBOL = re.compile(r"^[a-z]{1,2}[0-9]{1,9}$")
# sympy's srepr form, e.g. "Symbol('s77', positive=True, integer=True)": numbers, quoted
# symbol names, the names below and arithmetic -- no attribute access, no other names.
_EXPR_TOKEN = re.compile(
    r"\s+|[0-9]+(\.[0-9]+)?|'[a-z]{1,2}[0-9]{1,9}'|[A-Za-z_][A-Za-z0-9_]*|\*\*|//|[-+*/%(),<>=!]"
)
_EXPR_NAMES: Final = (
    "Symbol Integer Rational Add Mul Pow Eq Ne Lt Le Gt Ge StrictLessThan "
    "StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Mod Max Min "
    "FloorDiv CleanDiv PythonMod CeilToInt FloorToInt TruncToInt IntTrueDiv "
    "ModularIndexing Where True False oo int_oo positive negative nonnegative "
    "nonpositive integer real finite infinite zero nonzero even odd commutative"
)
_EXPR_FUNCTIONS: Final = frozenset(_EXPR_NAMES.split())
_MAX_EXPR = 1000

_SCALAR_TYPES: Final[dict[TensorDtype, int]] = {
    # torch._export.serde.schema.ScalarType
    "uint8": 1,
    "int32": 4,
    "int64": 5,
    "float16": 6,
    "float32": 7,
    "float64": 8,
    "bool": 12,
    "bfloat16": 13,
}

#: Bytes of one element per ScalarType code (for the activation estimate).
_ITEM_BYTES: Final[dict[int, int]] = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 12: 1, 13: 2}


@dataclass(frozen=True)
class TensorMeta:
    """A program tensor's dtype code and sizes (``None`` for a symbolic size)."""

    dtype: int
    sizes: tuple[int | None, ...]


@dataclass(frozen=True)
class ProgramInfo:
    """What the archive checks need to know about one program."""

    parameters: frozenset[str]
    buffers: frozenset[str]
    constants: frozenset[str]
    operators: frozenset[str]
    input: TensorMeta
    output: TensorMeta
    sample_bytes: int
    """Bytes of every batch-sized tensor of the graph, per sample (activations)."""

    @property
    def state_names(self) -> frozenset[str]:
        """Names the weights must have: parameters and persistent buffers (the state dict)."""
        return self.parameters | self.buffers


def _fail(message: str) -> FedtrayError:
    return FedtrayError("package_program", message)


def parse_program_json(raw: bytes, member: str) -> dict[str, Any]:
    """The JSON object in ``raw``, or ``package_program``."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(f"{member} is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _fail(f"{member} must hold a JSON object")
    return data


def _walk(node: object) -> Iterator[tuple[str, object]]:
    """Every (key, value) pair of every object in ``node``, iteratively."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                yield str(key), value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _check_expr(expr: object, member: str) -> None:
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR:
        raise _fail(f"{member}: a symbolic expression is not a short string")
    pos = 0
    while pos < len(expr):
        match = _EXPR_TOKEN.match(expr, pos)
        if match is None:
            raise _fail(f"{member}: symbolic expression {expr[:80]!r} is not allowed")
        token = match.group(0)
        if (token[0].isalpha() or token[0] == "_") and not (
            token in _EXPR_FUNCTIONS or _SYMBOL.match(token)
        ):
            raise _fail(f"{member}: symbolic expression uses {token[:40]!r}")
        pos = match.end()


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(f"{what} must be a JSON object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(f"{what} must be a JSON list")
    return value


def _tensor_meta(values: dict[str, Any], name: str, member: str) -> TensorMeta:
    meta = _obj(values.get(name), f"{member}: tensor_values[{name!r}]")
    dtype = meta.get("dtype")
    sizes: list[int | None] = []
    for item in _list(meta.get("sizes"), f"{member}: sizes of {name!r}"):
        as_int = _obj(item, f"{member}: a size of {name!r}").get("as_int")
        sizes.append(as_int if isinstance(as_int, int) and not isinstance(as_int, bool) else None)
    if not isinstance(dtype, int) or isinstance(dtype, bool):
        raise _fail(f"{member}: tensor {name!r} has no dtype")
    return TensorMeta(dtype, tuple(sizes))


def _single_name(arg: object, what: str) -> str:
    tensor = _obj(_obj(arg, what).get("as_tensor"), f"{what} must be one tensor")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise _fail(f"{what} must be one tensor")
    return name


def check_program(data: dict[str, Any], member: str) -> ProgramInfo:
    """Check one parsed program JSON (module docstring); return what it declares."""
    version = _obj(data.get("schema_version"), f"{member}: schema_version")
    if version.get("major") != SCHEMA_MAJOR:
        raise _fail(
            f"{member} has export schema version {version.get('major')}; "
            f"this fedtray reads {SCHEMA_MAJOR}"
        )
    if data.get("guards_code", []) != []:
        raise _fail(f"{member} carries guards code; packages must not")
    for key in _obj(data.get("range_constraints", {}), f"{member}: range_constraints"):
        if not _SYMBOL.match(key):
            raise _fail(f"{member}: range constraint {key[:40]!r} is not a symbol")
    module = _obj(data.get("graph_module"), f"{member}: graph_module")
    graph = _obj(module.get("graph"), f"{member}: graph")
    nodes = _list(graph.get("nodes"), f"{member}: nodes")
    operators: set[str] = set()
    for node in nodes:
        target = _obj(node, f"{member}: a node").get("target")
        if not isinstance(target, str):
            raise _fail(f"{member}: a node has no target")
        if target not in ALLOWED_OPERATORS:
            raise FedtrayError(
                "package_operator",
                f"{member} calls {target[:120]!r}, which is not an allowed aten operator",
            )
        operators.add(target)
    for key, value in _walk(module):
        if key in _FORBIDDEN_ARGUMENTS:
            raise _fail(f"{member} passes a {key} value; packages carry tensors only")
        if key == "expr_str":
            _check_expr(value, member)
    for key, value in _walk(graph):
        if key == "name" and not (isinstance(value, str) and _IDENTIFIER.match(value)):
            raise _fail(f"{member}: name {str(value)[:40]!r} is not a plain identifier")
    signature = _obj(module.get("signature"), f"{member}: signature")
    params: set[str] = set()
    buffers: set[str] = set()
    constants: set[str] = set()
    user_inputs: list[str] = []
    for item in _list(signature.get("input_specs"), f"{member}: input_specs"):
        spec = _obj(item, f"{member}: an input spec")
        if len(spec) != 1:
            raise _fail(f"{member}: an input spec must have one kind")
        kind, body = next(iter(spec.items()))
        body = _obj(body, f"{member}: input spec {kind}")
        if kind == "user_input":
            user_inputs.append(_single_name(body.get("arg"), f"{member}: the user input"))
            continue
        field = {
            "parameter": "parameter_name",
            "buffer": "buffer_name",
            "tensor_constant": "tensor_constant_name",
        }.get(kind)
        if field is None:
            raise _fail(f"{member}: input spec kind {kind[:40]!r} is not allowed")
        fqn = body.get(field)
        if not isinstance(fqn, str) or not _FQN.match(fqn):
            raise _fail(f"{member}: {kind} name {str(fqn)[:60]!r} is not a dotted identifier")
        if kind == "buffer" and body.get("persistent") is False:
            constants.add(fqn)  # a non-persistent buffer travels with the constants
            continue
        {"parameter": params, "buffer": buffers, "tensor_constant": constants}[kind].add(fqn)
    user_outputs = [
        _single_name(_obj(spec, "output").get("user_output", {}).get("arg"), f"{member}: output")
        for spec in _list(signature.get("output_specs"), f"{member}: output_specs")
        if "user_output" in _obj(spec, f"{member}: an output spec")
    ]
    if len(user_inputs) != 1 or len(user_outputs) != 1:
        raise _fail(
            f"{member} must take one input tensor and return one tensor "
            f"(it takes {len(user_inputs)} and returns {len(user_outputs)})"
        )
    values = _obj(graph.get("tensor_values"), f"{member}: tensor_values")
    sample_bytes = 0
    for name in values:
        meta = _tensor_meta(values, name, member)
        if meta.sizes and meta.sizes[0] is None and all(s is not None for s in meta.sizes[1:]):
            cells = 1
            for size in meta.sizes[1:]:
                cells *= size or 0
            sample_bytes += cells * _ITEM_BYTES.get(meta.dtype, 8)
    return ProgramInfo(
        parameters=frozenset(params),
        buffers=frozenset(buffers),
        constants=frozenset(constants),
        operators=frozenset(operators),
        input=_tensor_meta(values, user_inputs[0], member),
        output=_tensor_meta(values, user_outputs[0], member),
        sample_bytes=sample_bytes,
    )


def _shape_error(message: str) -> FedtrayError:
    return FedtrayError("package_shape", message)


def check_specs(manifest: Manifest, info: ProgramInfo, member: str) -> None:
    """``package_shape`` unless the manifest's specs agree with the program's tensors.

    The input must be ``(batch, *input.shape)`` of ``input.dtype`` with a symbolic batch;
    the output ``(batch, C)`` for ``cross_entropy`` (``C == numClasses`` when given and a
    scalar label), else ``(batch, *label.shape)``.
    """
    want_in = _SCALAR_TYPES[manifest.input.dtype]
    sizes = info.input.sizes
    if info.input.dtype != want_in or list(sizes[1:]) != manifest.input.shape:
        raise _shape_error(
            f"manifest input is {manifest.input.dtype} {manifest.input.shape} but {member} "
            f"takes dtype code {info.input.dtype} with sample shape {list(sizes[1:])}"
        )
    if not sizes or sizes[0] is not None:
        raise _shape_error(f"{member} was exported without a dynamic batch axis")
    out = info.output.sizes
    if not out or out[0] is not None:
        raise _shape_error(f"{member}'s output has no batch axis")
    if manifest.loss == "cross_entropy":
        if manifest.label.shape != [] or len(out) != 2:
            raise _shape_error(
                "cross_entropy needs a scalar label and (batch, classes) logits; "
                f"the label is {manifest.label.shape} and the output has {len(out)} axes"
            )
        if manifest.num_classes is not None and out[1] != manifest.num_classes:
            raise _shape_error(
                f"manifest says {manifest.num_classes} classes but the program gives {out[1]}"
            )
    elif list(out[1:]) != manifest.label.shape:
        raise _shape_error(
            f"manifest label shape {manifest.label.shape} differs from the program's "
            f"output {list(out[1:])}"
        )
