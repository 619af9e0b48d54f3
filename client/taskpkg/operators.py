"""The operator allowlist of task packages: the one table, by group.

Contract: pure data, no torch. :data:`OPERATOR_GROUPS` names each group and its
serialized node targets (``torch.ops.aten.<op>.<overload>``, written here without the
``torch.ops.aten.`` prefix; the ``_operator.*`` entries are Python's own integer
arithmetic on symbolic sizes, which torch resolves from the ``operator`` module).
:data:`ALLOWED_OPERATORS` is derived from it; ``docs/task-package.md`` shows the table
(a test keeps the doc in step).
"""

from __future__ import annotations

from typing import Final

__all__ = ["ALLOWED_OPERATORS", "ATEN_PREFIX", "OPERATOR_GROUPS"]

ATEN_PREFIX: Final = "torch.ops.aten."

#: Group -> space-separated operators (aten ``op.overload``, or ``_operator.name``).
OPERATOR_GROUPS: Final[dict[str, str]] = {
    "layers": (
        "conv1d.default conv2d.default conv3d.default conv1d.padding conv2d.padding "
        "conv3d.padding convolution.default conv_transpose1d.default "
        "conv_transpose2d.input conv_transpose3d.input linear.default addmm.default "
        "mm.default bmm.default matmul.default t.default embedding.default"
    ),
    "normalisation": (
        "batch_norm.default native_batch_norm.default _native_batch_norm_legit.default "
        "_native_batch_norm_legit.no_stats _native_batch_norm_legit_functional.default "
        "_native_batch_norm_legit_no_training.default layer_norm.default "
        "native_layer_norm.default group_norm.default native_group_norm.default "
        "instance_norm.default"
    ),
    "dropout": (
        "dropout.default native_dropout.default feature_dropout.default "
        "alpha_dropout.default feature_alpha_dropout.default"
    ),
    "activations": (
        "relu.default relu_.default gelu.default silu.default silu_.default "
        "sigmoid.default tanh.default leaky_relu.default leaky_relu_.default elu.default "
        "hardtanh.default hardtanh_.default hardswish.default hardsigmoid.default "
        "softplus.default mish.default log_sigmoid.default softmax.int log_softmax.int "
        "_softmax.default _log_softmax.default"
    ),
    "pooling": (
        "max_pool1d.default max_pool2d.default max_pool3d.default "
        "max_pool2d_with_indices.default max_pool3d_with_indices.default "
        "avg_pool1d.default avg_pool2d.default avg_pool3d.default "
        "adaptive_avg_pool1d.default adaptive_avg_pool2d.default "
        "adaptive_avg_pool3d.default _adaptive_avg_pool2d.default "
        "adaptive_max_pool1d.default adaptive_max_pool2d.default"
    ),
    "shapes and views": (
        "view.default reshape.default _unsafe_view.default flatten.using_ints unflatten.int "
        "squeeze.default squeeze.dim squeeze.dims unsqueeze.default permute.default "
        "transpose.int contiguous.default expand.default slice.Tensor select.int "
        "cat.default stack.default split.Tensor split_with_sizes.default chunk.default "
        "clone.default alias.default detach.default to.dtype _to_copy.default"
    ),
    "arithmetic and reductions": (
        "add.Tensor add.Scalar add_.Tensor sub.Tensor sub.Scalar rsub.Scalar mul.Tensor "
        "mul.Scalar div.Tensor div.Scalar neg.default pow.Tensor_Scalar sqrt.default "
        "rsqrt.default exp.default log.default abs.default clamp.default "
        "clamp_min.default maximum.default minimum.default mean.dim mean.default "
        "sum.dim_IntList sum.default amax.default copy_.default"
    ),
    "symbolic sizes (dynamic batch)": (
        "sym_size.int sym_numel.default _assert_scalar.default "
        "sym_constrain_range_for_size.default _assert_tensor_metadata.default "
        "_operator.getitem _operator.add _operator.sub _operator.mul _operator.floordiv"
    ),
}


def _target(op: str) -> str:
    return op if op.startswith("_operator.") else ATEN_PREFIX + op


#: Every node target a package's program may call (derived from :data:`OPERATOR_GROUPS`).
ALLOWED_OPERATORS: Final[frozenset[str]] = frozenset(
    _target(op) for ops in OPERATOR_GROUPS.values() for op in ops.split()
)
