"""``torch.nn.functional``-style wrappers around the hand-derived Functions.

``linear``, ``relu`` and ``cross_entropy`` have their ``torch.nn.functional`` namesakes'
signatures; ``l2_penalty`` is the derivation's ½λΣ‖W‖². Each follows autocast's dtype rules as
the native op does and runs its Function (:mod:`torch_mlp.functions`); inside
:func:`torch_mlp.use_native` it runs the native op instead. Each is a leaf of
``torch.fx.symbolic_trace``: a traced model calls it as one node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx
import torch.nn.functional as TF
from torch import Tensor
from torch.nn import _reduction

from . import _checks, functions
from ._dispatch import apply, native_enabled, variants
from .functions import (
    L2PenaltyFunction,
    LinearFunction,
    ReLUFunction,
    SoftmaxCrossEntropyFunction,
)

__all__ = [*functions.__all__, "apply", "cross_entropy", "l2_penalty", "linear", "native_enabled",
           "relu", "variants"]  # apply, native_enabled, variants: for Functions of your own

_LINEAR = variants(LinearFunction)
_RELU = variants(ReLUFunction)
_CROSS_ENTROPY = variants(SoftmaxCrossEntropyFunction)
_L2_PENALTY = variants(L2PenaltyFunction)


@torch.fx.wrap
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x · weightᵀ + bias``, like :func:`torch.nn.functional.linear`; hand-derived backward.

    Args:
        x: input of shape (*, D).
        weight: (H, D), stored (out, in) as in ``nn.Linear``; the derivation's W is ``weight.T``.
            A (D,) weight, as ``F.linear`` takes it, gives an output of shape (*) (no bias).
        bias: (H) or None.

    Under autocast, runs in the autocast dtype (float16 / bfloat16), as ``F.linear`` does.
    """
    if native_enabled():
        return TF.linear(x, weight, bias)
    _checks.check_linear(x, weight, bias)
    if weight.dim() == 1:  # as F.linear: a (D,) weight is one output feature, dropped
        return linear(x, weight.unsqueeze(0), bias).squeeze(-1)
    cast = _checks.autocast_dtype(x)
    if cast is None:
        return apply(_LINEAR, x, weight, bias)
    x, weight, bias = (_checks.autocast_to(t, cast) for t in (x, weight, bias))
    with torch.autocast(x.device.type, enabled=False):  # backward then sees the cast dtypes
        return apply(_LINEAR, x, weight, bias)


@torch.fx.wrap
def relu(u: Tensor, inplace: bool = False) -> Tensor:
    """``max(0, u)``, like :func:`torch.nn.functional.relu`, with a hand-derived backward.

    ``inplace=True`` writes the result into ``u`` with ``copy_``, whose checks (a leaf that
    requires grad, a view made under no_grad, ...) and version counter are autograd's own.
    """
    if native_enabled():
        return TF.relu(u, inplace=inplace)
    h = apply(_RELU, u)
    return u.copy_(h) if inplace else h


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
        input: logits, (C), (N, C) or (N, C, d1, ..., dk), with C ≥ 1.
        target: class indices of shape (), (N) or (N, d1, ..., dk), or class probabilities of
            the input's shape (a probability target of another floating dtype promotes the
            loss, as native).
        weight: per-class weight, (C); it gets no gradient (one that requires grad is refused).
        size_average, reduce: deprecated, as in torch.nn.functional; use ``reduction``.
        ignore_index: target value that contributes neither loss nor gradient (index targets).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``. With index targets, ``"mean"`` divides
            by the summed weight of the non-ignored targets (NaN when all are ignored).
        label_smoothing: at most 1; mixes the target with the uniform distribution.

    Under autocast it computes in float32, as the native op does.
    """
    if native_enabled():
        return TF.cross_entropy(input, target, weight, size_average, ignore_index, reduce,
                                reduction, label_smoothing)
    if size_average is not None or reduce is not None:  # as torch: warns, then maps
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if type(label_smoothing) is not float:  # as native's argument parser: a number or a
        label_smoothing = _checks.as_float(label_smoothing, "label_smoothing")  # 0-dim tensor
    if not label_smoothing > 0:  # as native: NaN or a negative value is no smoothing
        label_smoothing = 0.0
    input, target, weight, label_smoothing = _checks.check_cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing)
    nd = input.dim()
    if nd == 2:
        z, t = input, target
    elif nd == 1:  # unbatched (C): one row
        z, t = input.unsqueeze(0), target.unsqueeze(0)
    else:  # (N, C, d1, ..., dk) -> (N·d1···dk, C): classes last, one row per position
        z = input.movedim(1, -1).reshape(-1, input.shape[1])
        if target.is_floating_point():
            t = target.movedim(1, -1).reshape(z.shape)
        else:
            t = target.reshape(-1)
    loss = apply(_CROSS_ENTROPY, z, t, weight, ignore_index, reduction, label_smoothing)[0]
    if reduction != "none" or nd == 2:
        return loss
    return loss.reshape(input.shape[:1] + input.shape[2:] if nd > 2 else ())  # batch shape


@torch.fx.wrap
def l2_penalty(weights: Sequence[Tensor] | Tensor, lam: float) -> Tensor:
    """The derivation's regularisation term ``½ λ Σ_k ‖W_k‖²``; its gradient is ``λ W_k``.

    Args:
        weights: a tensor or a sequence of tensors (typically the weight matrices, not biases).
        lam: λ ≥ 0, a Python number.
    """
    if isinstance(weights, Mapping):  # list() would take its keys
        raise TypeError("l2_penalty: weights must be a tensor or a sequence of tensors, got a "
                        f"{type(weights).__name__}; pass its values()")
    weights = [weights] if isinstance(weights, Tensor) else list(weights)
    _checks.check_l2_penalty(weights, lam)
    if native_enabled():  # the same formula in native ops, autograd's backward
        return 0.5 * lam * sum(w.square().sum() for w in weights)
    return apply(_L2_PENALTY, float(lam), *weights)
