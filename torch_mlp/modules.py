"""torch.nn's Linear, ReLU and CrossEntropyLoss with hand-derived backward passes, an MLP of
them, and ``convert``.

Each twin is a subclass of its torch.nn class that overrides ``forward`` only: construction,
initialisation, ``extra_repr``, state_dict keys and hooks are torch.nn's own, and
``isinstance(torch_mlp.Linear(2, 3), nn.Linear)`` holds.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from . import functional as F

__all__ = ["MLP", "TWINS", "CrossEntropyLoss", "Linear", "ReLU", "convert"]


class Linear(nn.Linear):
    r""":class:`torch.nn.Linear`, :math:`y = xA^T + b`, whose backward is the hand-derived
    :class:`~torch_mlp.functional.LinearFunction`. In the derivation's notation
    :math:`u = xW + c`, ``W`` is ``weight.T`` and ``c`` is ``bias``.

    Examples::

        >>> m = torch_mlp.Linear(20, 30)
        >>> m(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)


class ReLU(nn.ReLU):
    r""":class:`torch.nn.ReLU`, :math:`\max(0, x)`, whose backward is the hand-derived
    :math:`1[x > 0] \odot g` (:class:`~torch_mlp.functional.ReLUFunction`)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input, inplace=self.inplace)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    r""":class:`torch.nn.CrossEntropyLoss`, whose backward is the hand-derived
    :math:`(\sum_c Q_c)\, p - Q`, that is :math:`p - \text{onehot}(y)` without options
    (:class:`~torch_mlp.functional.SoftmaxCrossEntropyFunction`)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


class MLP(nn.Sequential):
    r"""``Linear → ReLU → … → Linear`` of torch_mlp's modules: an ``nn.Sequential``, so its
    state_dict keys (``0.weight``, ``0.bias``, ``2.weight``, …) are those of the native
    ``nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)`` and load both ways.

    Args:
        in_features: D, e.g. 784 for MNIST.
        hidden_features: H, one int or a sequence of ints (one per hidden layer, may be empty).
        out_features: K, the number of classes.
        bias, device, dtype: passed to every Linear.

    Examples::

        >>> model = torch_mlp.MLP(784, [1024], 10)
        >>> loss = F.cross_entropy(model(x), y) + model.l2_penalty(1e-4)
    """

    def __init__(self, in_features: int, hidden_features: int | Sequence[int],
                 out_features: int, bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        one = not isinstance(hidden_features, Iterable) or isinstance(hidden_features, Tensor)
        hidden = [hidden_features] if one else list(hidden_features)
        sizes = [in_features, *hidden, out_features]
        if not all(_size(n) for n in sizes):
            raise ValueError(f"MLP: layer sizes must be positive integers, got {sizes}")
        sizes = [operator.index(n) for n in sizes]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(sizes[:-1], sizes[1:]):
            layers += [Linear(d_in, d_out, bias=bias, device=device, dtype=dtype), ReLU()]
        super().__init__(*layers[:-1])  # no ReLU after the last Linear: it outputs logits

    def l2_penalty(self, lam: float) -> Tensor:
        """½ λ Σ ‖W‖² over every weight matrix, biases excluded (as in the derivation)."""
        return F.l2_penalty([m.weight for m in self if isinstance(m, nn.Linear)], lam)


def _size(n: object) -> bool:
    """Whether ``n`` is a positive integer (int, numpy integer, not bool), as ``nn.Linear``."""
    try:
        return not isinstance(n, bool) and operator.index(n) > 0
    except TypeError:
        return False


TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: Linear, nn.ReLU: ReLU, nn.CrossEntropyLoss: CrossEntropyLoss}
"""torch.nn class → its twin: the table :func:`convert` reads."""


def convert(model: nn.Module, *, to_native: bool = False, verbose: bool = False) -> nn.Module:
    """Make every ``nn.Linear``, ``nn.ReLU`` and ``nn.CrossEntropyLoss`` in ``model`` its
    torch_mlp twin, in place, and return ``model``.

    A twin is a subclass that overrides ``forward`` only, so the swap is a change of class of
    the very module object: its parameters, buffers, hooks, attributes, training mode and
    places in the model (a module used twice, tied weights) all stay as they are, and an
    optimizer built earlier keeps training the same tensors. Exact types only
    (``type(m) is nn.Linear``): a subclass, e.g. ``nn.LazyLinear``, a parametrized Linear or
    your own, may behave differently and is left alone with a warning, and so is a module
    whose ``forward`` was replaced on the instance (it would go on calling the old class's).
    ``to_native=True`` swaps the other way, twin → torch.nn, e.g. before
    ``torch.ao.quantization.quantize_dynamic``, which swaps exact ``nn.Linear`` only.

    Modules are swapped, function calls are not: ``F.relu`` called in a forward
    (``nn.TransformerEncoderLayer(activation="relu")``, ``nn.MultiheadAttention``) stays native.

    Args:
        model: any module (a ``torch.jit.ScriptModule`` is refused).
        to_native: swap torch_mlp → torch.nn instead.
        verbose: print one line per module swapped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("convert: model is a torch.jit.ScriptModule, whose compiled code cannot "
                        "change; convert the eager model, then script it")
    table = {ours: native for native, ours in TWINS.items()} if to_native else TWINS
    swaps = []  # every change is decided before any is made: all or nothing
    left: dict[tuple[str, str], list[str]] = {}  # (class, why) -> modules: one warning each
    for name, module in model.named_modules():  # each shared module once
        cls = type(module)
        base = next((k for k in table if isinstance(module, k)), None)
        if cls in table and "forward" in vars(module):
            why = ("its forward is replaced on the instance (e.g. by accelerate's hooks) and "
                   "would still call the old class's; convert before patching it")
            left.setdefault((cls.__qualname__, why), []).append(name or "the model")
        elif cls in table:
            swaps.append((name, module, table[cls]))
        # A subclass is left with a warning, but not MultiheadAttention's out_proj (a
        # NonDynamicallyQuantizableLinear): attention never calls its forward.
        elif base is not None and cls is not nn.modules.linear.NonDynamicallyQuantizableLinear \
                and (to_native or not isinstance(module, tuple(TWINS.values()))):
            why = (f"a subclass of {_qualname(base)} whose forward may differ; only exact types "
                   f"are swapped")
            left.setdefault((cls.__qualname__, why), []).append(name or "the model")
    for (cls_name, why), names in left.items():
        if len(names) == 1:
            warnings.warn(f"convert: left {names[0]} ({cls_name}) as it is: {why}", stacklevel=2)
        else:
            where = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            warnings.warn(f"convert: left {len(names)} {cls_name} modules ({where}) as they are: "
                          f"{why}", stacklevel=2)
    for name, module, new in swaps:
        if verbose:
            print(f"convert: {name or '(model)'}: {_qualname(type(module))} -> {_qualname(new)}")
        module.__class__ = new
    return model


def _qualname(cls: type) -> str:
    return f"{'torch_mlp' if cls.__module__ == __name__ else 'torch.nn'}.{cls.__name__}"
