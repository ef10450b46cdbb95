"""Argument checks with PyTorch-style messages, and autocast's casting rules, for the wrappers.

The one place that touches private torch APIs: each is aliased here, once, with why.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import _reduction
from torch.utils._python_dispatch import TorchDispatchMode

# --------------------------------------------------------------------------------------------
# Private torch APIs
# --------------------------------------------------------------------------------------------
# Whether a torch.func transform (vmap, grad, jvp, ...) is running: picks the Function variant.
transforms_active = torch._C._are_functorch_transforms_active
# Whether a tensor is a torch.func wrapper, whose values cannot be read.
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
# One C call that says whether autocast is on anywhere: the common case skips building t.device.
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)
# size_average / reduce -> reduction, with torch.nn's deprecation warning.
legacy_get_string = _reduction.legacy_get_string


# --------------------------------------------------------------------------------------------
# Exception types: where native raises RuntimeError (or NotImplementedError) and the wrappers,
# to name the argument, a ValueError (or TypeError), they raise an instance of both, so that
# code written against either catches it.
# --------------------------------------------------------------------------------------------
class ArgumentError(ValueError, RuntimeError):
    """A bad shape or value: a ValueError, and a RuntimeError as native's."""


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """A dtype the op has no form for: a TypeError, and a NotImplementedError (a RuntimeError)
    as native's."""


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------
def shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def agree(t0: Tensor, t1: Tensor | None, t2: Tensor | None = None) -> bool:
    """Whether t1 and t2 (if given) have t0's dtype and device: the common case, checked
    without building the message that ``same_dtype_device`` writes when they do not."""
    dtype, device = t0.dtype, t0.device
    return (t1 is None or (t1.dtype == dtype and t1.device == device)) and (
        t2 is None or (t2.dtype == dtype and t2.device == device)
    )


def same_dtype_device(fn: str, **tensors: Tensor | None) -> None:
    named = [(k, t) for k, t in tensors.items() if t is not None]
    (k0, t0), rest = named[0], named[1:]
    for k, t in rest:
        if t.device != t0.device:
            raise RuntimeError(
                f"{fn}: expected all tensors on the same device, but {k0} is on {t0.device} "
                f"and {k} is on {t.device}"
            )
        if t.dtype != t0.dtype:
            raise RuntimeError(
                f"{fn}: expected {k0} and {k} to have the same dtype, but got "
                f"{k0}: {t0.dtype} and {k}: {t.dtype}"
            )


def refuse_complex(name: str, dtype: torch.dtype) -> None:
    raise UnsupportedDtypeError(
        f"{name}: complex input is not supported (ReLU has no complex form, as in "
        f"torch.nn.functional.relu), got {dtype}"
    )


class _ChecksPassed(Exception):  # noqa: N818 (a signal, not an error)
    """Raised where an op reaches its kernel: autograd's checks before it have passed."""


class _StopAtKernel(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise _ChecksPassed


def check_inplace(t: Tensor) -> None:
    """Autograd's own checks of an in-place op on ``t``, with its messages: a leaf that requires
    grad, a view of one, a view made under no_grad or by a multi-output op, ...

    A custom Function's mark_dirty checks less, and only after its forward has written ``t``;
    native ``relu_`` checks first. Its autograd kernel runs here and is stopped where it would
    reach the kernel below: nothing is written, no version bumped, the graph is untouched.
    """
    try:
        with _StopAtKernel():
            t.relu_()
    except _ChecksPassed:
        pass


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The autocast compute dtype for ``t``'s device type, or None when autocast is off."""
    if _any_autocast_enabled is not None and not _any_autocast_enabled():
        return None
    device_type = t.device.type
    if device_type not in ("cpu", "cuda", "mps", "xpu") or not torch.is_autocast_enabled(
        device_type
    ):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Autocast's eligibility rule: floating tensors other than float64 are cast.
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


# --------------------------------------------------------------------------------------------
# linear, linear_relu
# --------------------------------------------------------------------------------------------
def check_linear(name: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """``linear``'s shape checks; messages start with ``name``.

    As ``F.linear``: weight (H, D) or (D,) (then the output is (*,)), and a bias that
    broadcasts to the output's shape (*, H) without enlarging it."""
    wd = weight.dim()
    if wd not in (1, 2):
        raise ArgumentError(
            f"{name}: expected weight to be 1-D or 2-D (out_features, in_features), got shape "
            f"{shape(weight)}"
        )
    if x.dim() == 0:
        raise ArgumentError(
            f"{name}: expected input with at least 1 dimension, got a 0-d tensor"
        )
    d = weight.shape[-1]
    if x.shape[-1] != d:
        raise ArgumentError(
            f"{name}: input's last dimension ({x.shape[-1]}) does not match weight's "
            f"in_features ({d}): input shape {shape(x)}, weight shape {shape(weight)}"
        )
    if bias is not None and (bias.dim() != 1 or wd != 2 or bias.shape[0] != weight.shape[0]):
        _check_broadcast_bias(name, x, weight, bias)


def _check_broadcast_bias(name: str, x: Tensor, weight: Tensor, bias: Tensor) -> None:
    if weight.dim() == 1:  # F.linear takes it only for some input layouts and memory formats
        raise ArgumentError(
            f"{name}: a bias with a 1-D weight is not supported (torch.nn.functional.linear "
            f"takes it for some input layouts only); add the bias to the output"
        )
    out = (*x.shape[:-1], weight.shape[0])
    try:
        fits = torch.broadcast_shapes(bias.shape, out) == out
    except RuntimeError:
        fits = False
    if not fits:
        raise ArgumentError(
            f"{name}: bias of shape {shape(bias)} does not broadcast to the output's shape "
            f"{out} (expected ({weight.shape[0]},) or a shape that broadcasts to the output)"
        )


# --------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------
_REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")  # as native


def check_label_smoothing(label_smoothing: float) -> None:
    # As native: only a value above 1 is refused; NaN and negative values mean no smoothing.
    if label_smoothing > 1.0:
        raise ArgumentError(
            f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"
        )


def check_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None,
                        ignore_index: int, reduction: str,
                        label_smoothing: float
                        ) -> tuple[Tensor, Tensor, Tensor | None, float]:
    """Check ``cross_entropy``'s arguments; returns (input, target, weight, label_smoothing) as
    the loss takes them: upcast to float32 under autocast, Byte targets as int64, a (1,)
    unbatched target as (), a probability target of another dtype promoted.

    Each tensor attribute is read once: this runs every step (docs/performance.md).
    """
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    nd = input.dim()
    if nd == 0:
        raise ArgumentError(
            "cross_entropy: expected input of shape (C), (N, C) or (N, C, d1, ...)"
        )
    dtype = input.dtype
    if not dtype.is_floating_point:
        raise UnsupportedDtypeError(
            f"cross_entropy: expected floating-point input (logits), got {dtype}"
        )
    if autocast_dtype(input) is not None:
        # cross_entropy is on autocast's float32 list: every low-precision floating argument
        # (logits, probability target, class weight) is upcast; float64 stays, as native.
        input, target, weight = (autocast_to(t, torch.float32) for t in (input, target, weight))
    C = input.shape[0] if nd == 1 else input.shape[1]
    if target.dtype.is_floating_point:
        input, target, weight, label_smoothing = _check_prob_target(
            input, target, weight, C, ignore_index, label_smoothing)
    else:
        target = _check_index_target(input, target, weight, C, ignore_index, label_smoothing)
    if weight is not None:
        if shape(weight) != (C,):
            raise ArgumentError(
                f"cross_entropy: expected weight of shape ({C},) (one per class), got "
                f"{shape(weight)}"
            )
        if weight.requires_grad:
            raise RuntimeError(
                "cross_entropy: the gradient with respect to weight is not supported; pass "
                "weight.detach()"
            )
    return input, target, weight, label_smoothing


def _check_prob_target(input: Tensor, target: Tensor, weight: Tensor | None, C: int,
                       ignore_index: int, label_smoothing: float
                       ) -> tuple[Tensor, Tensor, Tensor | None, float]:
    """Probability-target checks; returns (input, target, weight) in their promoted dtype, as
    native's loss, a composite of elementwise ops, computes in it (float32 logits with a
    float64 target: a float64 loss), and the label smoothing left to apply."""
    if ignore_index != -100:  # as native: ignore_index means nothing for probabilities
        raise ArgumentError(
            f"cross_entropy: ignore_index is not supported for class-probability "
            f"(floating-point) targets, got ignore_index={ignore_index}"
        )
    if target.shape != input.shape:
        raise ArgumentError(
            f"cross_entropy: class-probability target must have the input's shape "
            f"{shape(input)}, got {shape(target)}"
        )
    if not agree(input, target, weight):
        dtype = torch.promote_types(input.dtype, target.dtype)
        if weight is not None:
            dtype = torch.promote_types(dtype, weight.dtype)
        if label_smoothing > 0 and target.dtype != dtype:
            # Native smooths the target in its own dtype, before it meets the logits.
            target = target * (1 - label_smoothing) + label_smoothing / C
            label_smoothing = 0.0
        # The cast outside the Function: its backward (to each argument's own dtype) is
        # autograd's, as native's own promotion.
        input, target, weight = (None if t is None else t.to(dtype)
                                 for t in (input, target, weight))
        same_dtype_device("cross_entropy", input=input, target=target, weight=weight)
    return input, target, weight, label_smoothing


def _check_index_target(input: Tensor, target: Tensor, weight: Tensor | None, C: int,
                        ignore_index: int, label_smoothing: float) -> Tensor:
    """Class-index target checks; returns the target as int64, a (1,) unbatched one as ()."""
    ishape, nd = input.shape, input.dim()
    if target.dtype == torch.uint8:  # native nll_loss also takes Byte class indices
        target = target.long()
    if target.dtype != torch.int64:
        raise UnsupportedDtypeError(
            f"cross_entropy: expected target of dtype torch.int64 (class indices) or "
            f"{input.dtype} (class probabilities), got {target.dtype}"
        )
    tshape = target.shape
    if nd == 1 and len(tshape) == 1:
        # As native: an unbatched (C) input also takes a (1,) target, read as (), but not
        # with label smoothing or zero classes (native's forward fails on the shapes there).
        if tshape[0] != 1 or label_smoothing > 0 or C == 0:
            raise ArgumentError(
                f"cross_entropy: for an unbatched input of shape {tuple(ishape)}, expected "
                f"target of shape ()" + (", or (1,) without label smoothing" if C else "")
                + f", got {tuple(tshape)}"
            )
        target = target.reshape(())
        tshape = target.shape
    if nd > 1 and len(tshape) >= 1 and tshape[0] != ishape[0]:
        raise ArgumentError(
            f"Expected input batch_size ({ishape[0]}) to match target batch_size ({tshape[0]})."
        )
    # target's shape must be input's without the class dim: () for (C), (N,) for (N, C), ...
    if len(tshape) != max(nd - 1, 0) or (nd > 2 and tshape[1:] != ishape[2:]):
        expected = tuple(ishape)[:1] + tuple(ishape)[2:] if nd > 1 else ()
        raise ArgumentError(
            f"cross_entropy: expected target of shape {expected} for input of shape "
            f"{tuple(ishape)}, got {tuple(tshape)}"
        )
    device = input.device
    if target.device != device:
        raise RuntimeError(
            f"cross_entropy: expected target on {device} like input, got {target.device}"
        )
    if weight is not None and not agree(input, weight):
        same_dtype_device("cross_entropy", input=input, weight=weight)
    if device.type not in ("cpu", "meta"):  # meta tensors have no values to check
        # On CPU the forward's kernel refuses an out-of-range index, explained afterwards: no
        # extra pass on the common path. A GPU kernel would hit a device-side assert instead.
        check_target_range(target, C, ignore_index)
    return target


def check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    # A value check needs concrete values; under torch.compile or a torch.func transform the
    # forward's kernel still refuses an out-of-range index, so nothing passes silently.
    if torch.compiler.is_compiling() or _is_functorch_wrapped(target):
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bad.any():
        value = target[bad][0].item()
        raise IndexError(
            f"cross_entropy: target {value} is out of bounds: class indices must be in "
            f"[0, {num_classes}) or equal ignore_index ({ignore_index})"
        )


# --------------------------------------------------------------------------------------------
# l2_penalty
# --------------------------------------------------------------------------------------------
def check_l2_penalty(weights: Sequence[Tensor], lam: float) -> None:
    if isinstance(lam, Tensor):
        raise TypeError("l2_penalty: lam must be a Python number, got a Tensor")
    if not lam >= 0:  # also refuses NaN
        raise ValueError(f"l2_penalty: lam must be non-negative, got {lam}")
    if not weights:
        raise ValueError("l2_penalty: expected at least one weight tensor, got none")
    for k, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(
                f"l2_penalty: weights[{k}] must be a floating-point tensor, got "
                f"{type(w).__name__}"
            )
        if not w.is_floating_point():  # complex too: its ½λ‖W‖² would need |W|², not W²
            raise TypeError(
                f"l2_penalty: weights[{k}] must be a floating-point tensor, got {w.dtype}"
                + (" (complex weights are not supported)" if w.is_complex() else "")
            )
    same_dtype_device("l2_penalty", **{f"weights[{k}]": w for k, w in enumerate(weights)})
