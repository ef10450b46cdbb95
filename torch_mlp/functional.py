"""``torch.nn.functional``-style wrappers around the hand-derived Functions.

``linear``, ``relu``, ``cross_entropy`` have their ``torch.nn.functional`` namesakes'
signatures; ``linear_relu`` is ``relu(linear(...))`` in one Function and ``l2_penalty`` the
derivation's ½λΣ‖W‖². Each checks its arguments (:mod:`torch_mlp._checks`), follows autocast's
dtype rules as the native op does, and runs its Function (:mod:`torch_mlp.functions`) through
:func:`torch_mlp._dispatch.apply`; inside :func:`torch_mlp.use_native` it runs the native op.

Each wrapper is a leaf of ``torch.fx.symbolic_trace``: a traced model calls it as one node.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as TF
from torch import Tensor

from . import _checks, functions
from ._dispatch import Variants, apply, native_enabled, variants
from .functions import (
    L2PenaltyFunction,
    LinearFunction,
    LinearReLUFunction,
    ReLUFunction,
    SoftmaxCrossEntropyFunction,
)

__all__ = [  # the Functions themselves, re-exported, and the wrappers
    *functions.__all__,
    "apply",
    "cross_entropy",
    "l2_penalty",
    "linear",
    "linear_relu",
    "native_enabled",
    "relu",
    "variants",
]

# Each Function's eager / transform / compile variants, derived once (see _dispatch.apply).
_LINEAR = variants(LinearFunction)
_RELU = variants(ReLUFunction)
_LINEAR_RELU = variants(LinearReLUFunction)
_CROSS_ENTROPY = variants(SoftmaxCrossEntropyFunction)
_L2_PENALTY = variants(L2PenaltyFunction)


@torch.fx.wrap
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x · weightᵀ + bias``, like :func:`torch.nn.functional.linear`; hand-derived backward.

    Args:
        x: input of shape (*, D).
        weight: (H, D), stored (out, in) as in ``nn.Linear``; the derivation's W is ``weight.T``.
            A (D,) weight, as ``F.linear`` takes it, gives an output of shape (*) (no bias).
        bias: (H), a shape that broadcasts to the output's (*, H) without enlarging it (its
            gradient is summed down to its shape), or None.

    Under autocast, runs in the autocast dtype (float16 / bfloat16), as ``F.linear`` does.
    """
    if native_enabled():
        return TF.linear(x, weight, bias)
    return _linear_call("linear", _LINEAR, x, weight, bias)


@torch.fx.wrap
def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``max(0, x · weightᵀ + bias)``: ``relu(linear(x, weight, bias))`` as one Function,
    :class:`LinearReLUFunction` (the same values and gradients, less overhead); ``MLP`` runs
    its Linear → ReLU pairs through it. Arguments and checks as :func:`linear`.
    """
    if native_enabled():
        return TF.relu(TF.linear(x, weight, bias))
    return _linear_call("linear_relu", _LINEAR_RELU, x, weight, bias)


def _linear_call(name: str, fn: Variants, x: Tensor, weight: Tensor, bias: Tensor | None
                 ) -> Tensor:
    """Check ``linear``'s arguments (messages start with ``name``), apply autocast, run fn."""
    _checks.check_linear(name, x, weight, bias)
    cast = _checks.autocast_dtype(x)
    if cast is not None:
        x, weight, bias = (_checks.autocast_to(t, cast) for t in (x, weight, bias))
    if not _checks.agree(x, weight, bias):
        _checks.same_dtype_device(name, input=x, weight=weight, bias=bias)
    if name != "linear" and x.is_complex():  # linear_relu: its ReLU has no complex form
        _checks.refuse_complex(name, x.dtype)
    vector = weight.dim() == 1  # as F.linear: a (D,) weight is one output feature, dropped
    if vector:
        weight = weight.unsqueeze(0)  # (1, D)
    if cast is None:
        out = apply(fn, x, weight, bias)
    else:
        with torch.autocast(x.device.type, enabled=False):
            out = apply(fn, x, weight, bias)
    return out.squeeze(-1) if vector else out  # (*,) for a (D,) weight


@torch.fx.wrap
def relu(u: Tensor, inplace: bool = False) -> Tensor:
    """``max(0, u)``, like :func:`torch.nn.functional.relu`, with a hand-derived backward.

    ``inplace=True`` overwrites ``u`` and marks it dirty, so autograd's version counter still
    catches a later use of the overwritten values. Bool and complex tensors are refused, as
    ``F.relu`` refuses them; other dtypes keep their dtype.
    """
    if native_enabled():
        return TF.relu(u, inplace=inplace)
    dtype = u.dtype
    if dtype == torch.bool:  # clamp_min(0) would promote it to int64
        raise _checks.UnsupportedDtypeError(
            "relu: Boolean inputs are not supported, got torch.bool"
        )
    if dtype.is_complex:
        _checks.refuse_complex("relu", dtype)
    if inplace and (torch.compiler.is_compiling() or _checks.transforms_active()):
        # The in-place Function returns u itself and saves it: vmap refuses a Function that
        # saves an input returned as-is, and Dynamo cannot trace mark_dirty. There: the same
        # values, the same in-place effect on u and the same hand-derived backward, computed
        # out of place and then written into u.
        return u.copy_(apply(_RELU, u, False))
    if inplace and u.requires_grad and (u.is_leaf or u._is_view()) and torch.is_grad_enabled():
        # The cases autograd refuses, refused before anything is written, as native relu_ does
        # (copy_ above checks them itself).
        _checks.check_inplace(u)
    return apply(_RELU, u, inplace)


@torch.fx.wrap
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Softmax cross-entropy, like :func:`torch.nn.functional.cross_entropy`, hand-derived backward.

    Args:
        input: logits, (C), (N, C) or (N, C, d1, ..., dk).
        target: class indices (int64) of shape () (or (1,) without label smoothing, as
            native), (N) or (N, d1, ..., dk), or class probabilities with the same shape as
            ``input`` (then ``ignore_index`` must stay -100, as native); a probability target
            of another floating dtype promotes the loss, as native (float64 with float32
            logits: a float64 loss).
        weight: per-class weight, (C).
        size_average, reduce: deprecated, as in torch.nn.functional; use ``reduction``.
        ignore_index: target value that contributes neither loss nor gradient (index targets).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``. With index targets, ``"mean"`` divides
            by the summed weight of the non-ignored targets (NaN when all are ignored).
        label_smoothing: at most 1; mixes the target with the uniform distribution. NaN or a
            negative value means none, as native.

    Under autocast it computes in float32, as the native op does.
    """
    if native_enabled():
        return TF.cross_entropy(input, target, weight, size_average, ignore_index, reduce,
                                reduction, label_smoothing)
    if size_average is not None or reduce is not None:  # as torch: warns, then maps
        reduction = _checks.legacy_get_string(size_average, reduce)
    if not label_smoothing > 0:  # as native: NaN or a negative value is no smoothing
        label_smoothing = 0.0
    input, target, weight, label_smoothing = _checks.check_cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing)
    shape, nd = input.shape, input.dim()
    C = shape[0] if nd == 1 else shape[1]
    probs = target.is_floating_point()
    if C == 0:
        return _no_class_loss(input, target, ignore_index, reduction, label_smoothing)
    if nd == 2:
        z, t = input, target
    elif nd == 1:  # unbatched (C)
        z, t = input.unsqueeze(0), target.unsqueeze(0)
    else:  # (N, C, d1, ..., dk) -> (N·d1···dk, C): classes last, one row per position
        z = input.movedim(1, -1).reshape(-1, C)
        t = target.movedim(1, -1).reshape(-1, C) if probs else target.reshape(-1)
    try:
        loss = apply(_CROSS_ENTROPY, z, t, weight, ignore_index, reduction,
                     label_smoothing)
    except (RuntimeError, IndexError):
        if not probs:  # an out-of-range target: say which, as PyTorch-style IndexError
            _checks.check_target_range(target, C, ignore_index)
        raise
    if reduction != "none" or nd == 2:
        return loss
    if nd == 1:
        return loss.squeeze(0)
    return loss.reshape(tuple(shape)[:1] + tuple(shape)[2:])


def _no_class_loss(input: Tensor, target: Tensor, ignore_index: int, reduction: str,
                   label_smoothing: float) -> Tensor:
    """Native's loss for an input with zero classes (C = 0): there is nothing to derive, the
    gradient is empty. Each row costs 0 (index targets must all be ignore_index); the mean is
    NaN (0 / 0), and so is everything with index targets and label smoothing (the smoothing
    term divides by C)."""
    nd = input.dim()
    probs = target.is_floating_point()
    if not probs:
        _checks.check_target_range(target, 0, ignore_index)  # refuses all but ignore_index
        if nd > 2 and target.numel() > 0:
            raise _checks.ArgumentError(
                f"cross_entropy: class-index targets of shape {_checks.shape(target)} need at "
                f"least one class, got input of shape {_checks.shape(input)} (as "
                f"torch.nn.functional's)"
            )
    loss = input.sum(1 if nd > 1 else 0)  # zeros of the batch shape, from input
    nan = not probs and label_smoothing > 0
    if reduction == "none":
        return loss + float("nan") if nan else loss
    total = loss.sum()
    return total + float("nan") if nan or reduction == "mean" else total


@torch.fx.wrap
def l2_penalty(weights: Sequence[Tensor] | Tensor, lam: float) -> Tensor:
    """The derivation's regularisation term ``½ λ Σ_k ‖W_k‖²``; its gradient is ``λ W_k``.

    Args:
        weights: a tensor or a sequence of tensors (typically the weight matrices, not biases).
        lam: λ ≥ 0.
    """
    weights = [weights] if isinstance(weights, Tensor) else list(weights)
    _checks.check_l2_penalty(weights, lam)
    if native_enabled():  # the same formula in native ops, autograd's backward
        return 0.5 * lam * sum(w.square().sum() for w in weights)
    return apply(_L2_PENALTY, float(lam), *weights)
