"""The wrappers' argument checks, and autocast's casting rules.

Only the checks that prevent a silently wrong result (a shape the math would broadcast, an
option the Functions do not derive) or give a clearer error than the kernel would; where the
kernel's own error is clear (mismatched sizes, dtypes, devices, an out-of-range class index),
it raises. No check reads tensor values, so none synchronises with the device.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

# One C call that says whether autocast is on anywhere: the common case skips building t.device.
_any_autocast_enabled = torch._C._is_any_autocast_enabled


class ArgumentError(ValueError, RuntimeError):
    """A bad shape or value: a ValueError, and a RuntimeError as native's refusals are."""


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The autocast compute dtype for ``t``'s device type, or None when autocast is off."""
    if not _any_autocast_enabled():
        return None
    device = t.device.type
    if device not in ("cpu", "cuda", "mps", "xpu") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def autocast_to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Autocast's eligibility rule: floating tensors other than float64 are cast.
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def check_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Shapes ``x + bias`` would broadcast into a larger output than ``F.linear``'s."""
    if weight.dim() not in (1, 2) or x.dim() == 0:
        raise ArgumentError(
            f"linear: expected weight of shape (out_features, in_features) or (in_features,) "
            f"and input with at least 1 dimension, got weight {tuple(weight.shape)} and input "
            f"{tuple(x.shape)}"
        )
    if bias is None or (weight.dim() == 2 and bias.shape == weight.shape[:1]):
        return
    out = (*x.shape[:-1], *weight.shape[:-1])
    try:  # F.linear also takes a bias that broadcasts to the output without enlarging it
        fits = weight.dim() == 2 and torch.broadcast_shapes(bias.shape, out) == out
    except RuntimeError:
        fits = False
    if not fits:
        raise ArgumentError(
            f"linear: expected bias of shape (out_features,) or one that broadcasts to the "
            f"output's shape {out} with a 2-D weight, got bias {tuple(bias.shape)} and weight "
            f"{tuple(weight.shape)}"
        )


def as_float(value: object, name: str) -> float:
    """``value`` as native's argument parser takes a float: a number, or a 0-dim tensor's."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.requires_grad:
        return value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"cross_entropy: {name} must be a float, got {type(value).__name__}")
    return value


def check_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None,
                        ignore_index: int, reduction: str, label_smoothing: float
                        ) -> tuple[Tensor, Tensor, Tensor | None, float]:
    """Check ``cross_entropy``'s arguments; returns (input, target, weight, label_smoothing) as
    the Function takes them: upcast to float32 under autocast, Byte targets as int64, a (1,)
    target of an unbatched input as (), a probability target of another dtype promoted."""
    if reduction not in ("none", "mean", "sum"):
        raise ArgumentError(f"{reduction} is not a valid value for reduction")  # as native
    if label_smoothing > 1.0:
        raise ArgumentError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    nd = input.dim()
    C = input.shape[nd > 1] if nd else 0
    if C == 0:
        raise ArgumentError(
            f"cross_entropy: expected input of shape (C), (N, C) or (N, C, d1, ...) with C ≥ 1 "
            f"classes, got {tuple(input.shape)}"
        )
    if autocast_dtype(input) is not None:
        # cross_entropy is on autocast's float32 list: every low-precision floating argument
        # (logits, probability target, class weight) is upcast; float64 stays, as native.
        input, target, weight = (autocast_to(t, torch.float32) for t in (input, target, weight))
    if weight is not None and weight.shape != (C,):  # the general path would broadcast it
        raise ArgumentError(f"cross_entropy: expected weight of shape ({C},) (one per class), "
                            f"got {tuple(weight.shape)}")
    if weight is not None and weight.requires_grad:  # its gradient would be silently missing
        raise ArgumentError("cross_entropy: the derivative with respect to weight is not "
                            "supported; pass weight.detach()")
    if target.is_floating_point():
        return _prob_target(input, target, weight, C, ignore_index, label_smoothing)
    return input, _index_target(input, target, label_smoothing), weight, label_smoothing


def _prob_target(input: Tensor, target: Tensor, weight: Tensor | None, C: int, ignore_index: int,
                 label_smoothing: float) -> tuple[Tensor, Tensor, Tensor | None, float]:
    """Probability targets, promoted with the logits (and weight) to one dtype, as native's
    composite of elementwise ops computes in it."""
    if ignore_index >= 0:  # native's rule: only a non-negative ignore_index is refused
        raise ArgumentError("cross_entropy: ignore_index is not supported for floating point "
                            f"target, got ignore_index={ignore_index}")
    if target.shape != input.shape:
        raise ArgumentError(f"cross_entropy: a class-probability target must have the input's "
                            f"shape {tuple(input.shape)}, got {tuple(target.shape)} (class "
                            f"indices are an integer tensor)")
    dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
    if dtype != input.dtype or dtype != target.dtype:
        if label_smoothing > 0 and target.dtype != dtype:
            # Native smooths the target in its own dtype, before it meets the logits.
            target = target * (1 - label_smoothing) + label_smoothing / C
            label_smoothing = 0.0
        # Cast outside the Function: the cast's backward is autograd's, as in native.
        input, target = input.to(dtype), target.to(dtype)
        weight = None if weight is None else weight.to(dtype)
    return input, target, weight, label_smoothing


def _index_target(input: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    """A target whose numel fits but whose shape does not would be read in the wrong order
    after flattening: the shape must be the input's without the class dim."""
    if target.dtype == torch.uint8:  # native nll_loss also takes Byte class indices
        target = target.long()
    nd = input.dim()
    if nd == 2 and target.dim() == 1 and target.shape[0] == input.shape[0]:  # no Size built
        return target
    if target.is_complex():  # native's words
        raise ArgumentError(f"Expected floating point type for target with class probabilities, "
                            f"got {target.dtype}")
    expected = input.shape[:1] + input.shape[2:] if nd > 1 else torch.Size()
    if target.shape == expected:
        return target
    if nd == 1 and target.shape == (1,) and label_smoothing == 0:
        return target.reshape(())  # as native: an unbatched input also takes a (1,) target
    if nd > 1 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ArgumentError(f"Expected input batch_size ({input.shape[0]}) to match target "
                            f"batch_size ({target.shape[0]}).")  # native's words
    raise ArgumentError(f"cross_entropy: expected target of shape {tuple(expected)} for input "
                        f"of shape {tuple(input.shape)}, got {tuple(target.shape)}")


def check_l2_penalty(weights: Sequence[Tensor], lam: float) -> None:
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool):  # a tensor: no d/dλ derived
        raise TypeError(f"l2_penalty: lam must be a Python number, got {type(lam).__name__}")
    if not lam >= 0:  # not >=: NaN is refused too
        raise ValueError(f"l2_penalty: lam must be a non-negative Python number, got {lam!r}")
    if not weights:
        raise ValueError("l2_penalty: expected at least one weight tensor, got none")
    for k, w in enumerate(weights):
        if not isinstance(w, Tensor) or not w.is_floating_point():  # complex: |W|², not W²
            what = w.dtype if isinstance(w, Tensor) else type(w).__name__
            raise TypeError(f"l2_penalty: weights[{k}] must be a real floating-point tensor, "
                            f"got {what}")
