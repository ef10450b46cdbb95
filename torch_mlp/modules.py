"""``nn.Module`` twins of torch.nn's Linear, ReLU and CrossEntropyLoss, an MLP, and ``convert``.

The twins have torch.nn's constructor arguments, defaults, initialisation, ``extra_repr`` and
state_dict keys, so a state_dict saved from one loads into the other. Only ``forward`` differs:
it calls the hand-derived Functions in :mod:`torch_mlp.functional`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.parameter import Parameter

from . import functional as F

__all__ = ["MLP", "CrossEntropyLoss", "Linear", "ReLU", "convert"]


class Linear(nn.Module):
    r"""Applies an affine transformation, :math:`y = xA^T + b`, with a hand-derived backward.

    A drop-in twin of :class:`torch.nn.Linear`. In the derivation's notation
    :math:`u = xW + c`, ``W`` is ``weight.T`` and ``c`` is ``bias``.

    Args:
        in_features: size of each input sample (D).
        out_features: size of each output sample (H).
        bias: if ``False``, the layer learns no additive bias. Default: ``True``.
        device, dtype: factory kwargs for the parameters.

    Shape:
        - Input: :math:`(*, D)`, any number of leading dims.
        - Output: :math:`(*, H)`.

    Examples::

        >>> m = torch_mlp.Linear(20, 30)
        >>> m(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    __constants__ = ["in_features", "out_features"]
    in_features: int
    out_features: int
    weight: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = Parameter(torch.empty((out_features, in_features), **factory_kwargs))
        if bias:
            self.bias = Parameter(torch.empty(out_features, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same as nn.Linear, so both draw identical parameters from the same RNG state:
        # kaiming_uniform with a=√5 is uniform(-1/√in_features, 1/√in_features), see
        # https://github.com/pytorch/pytorch/issues/57109.
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class ReLU(nn.Module):
    r"""Applies :math:`\max(0, x)` element-wise, with the hand-derived backward
    :math:`1[x > 0] \odot g`. A drop-in twin of :class:`torch.nn.ReLU`.

    Args:
        inplace: overwrite the input. Default: ``False``.

    Shape:
        - Input: :math:`(*)`. Output: :math:`(*)`, same shape.
    """

    __constants__ = ["inplace"]
    inplace: bool

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input, inplace=self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class CrossEntropyLoss(nn.Module):
    r"""Softmax cross-entropy with the hand-derived backward :math:`p - \text{onehot}(y)`.

    A drop-in twin of :class:`torch.nn.CrossEntropyLoss`: same arguments (the deprecated
    ``size_average`` / ``reduce`` included), ``weight`` kept as a buffer (state_dict key
    ``weight``), and every case of :func:`torch.nn.functional.cross_entropy`.

    Args:
        weight: per-class weight, (C).
        size_average, reduce: deprecated, as in torch.nn; use ``reduction``.
        ignore_index: target value that is ignored. Default: ``-100``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``. Default: ``"mean"``.
        label_smoothing: in [0, 1]. Default: ``0.0``.

    Shape:
        - Input: (C), (N, C) or (N, C, d1, ..., dk).
        - Target: class indices (), (N) or (N, d1, ..., dk), or probabilities shaped like input.
        - Output: scalar, or the target's batch shape with ``reduction="none"``.
    """

    __constants__ = ["ignore_index", "reduction", "label_smoothing"]
    ignore_index: int
    label_smoothing: float
    weight: Tensor | None

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = nn._reduction.legacy_get_string(size_average, reduce)
        # torch.nn only finds these at the first call; failing at construction is kinder.
        F._check_reduction(reduction)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class MLP(nn.Sequential):
    r"""``Linear → ReLU → … → Linear``, built only from torch_mlp's modules.

    A subclass of ``nn.Sequential``, so its state_dict keys (``0.weight``, ``0.bias``,
    ``2.weight``, …) are those of the native ``nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)``
    and load both ways.

    Args:
        in_features: D, e.g. 784 for MNIST.
        hidden_features: H, one int or a sequence of ints (one per hidden layer, may be empty).
        out_features: K, the number of classes.
        bias, device, dtype: passed to every Linear.

    Examples::

        >>> model = torch_mlp.MLP(784, [1024], 10)
        >>> loss = F.cross_entropy(model(x), y) + model.l2_penalty(1e-4)
    """

    # 2**16 float32 entries: 256 KiB, e.g. batch 128 × 512 hidden units. See forward.
    FUSE_MAX_ELEMENTS = 2**16

    def __init__(
        self,
        in_features: int,
        hidden_features: int | Sequence[int],
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        hidden = [hidden_features] if isinstance(hidden_features, int) else list(hidden_features)
        sizes = [in_features, *hidden, out_features]
        names = ("in_features", *["hidden_features"] * len(hidden), "out_features")
        for name, n in zip(names, sizes):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"MLP: {name} must be positive integers, got {n!r}")
        layers: list[nn.Module] = []
        for k, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(Linear(d_in, d_out, bias=bias, device=device, dtype=dtype))
            if k < len(sizes) - 2:
                layers.append(ReLU())
        super().__init__(*layers)
        self.sizes = tuple(sizes)

    def forward(self, input: Tensor) -> Tensor:
        """The layers in order, as ``nn.Sequential`` runs them, except that a Linear → ReLU
        pair with a small output runs as one fused Function,
        :func:`torch_mlp.functional.linear_relu`: the same values and gradients with one Python
        forward and backward less per hidden layer.

        Small: at most ``FUSE_MAX_ELEMENTS`` entries in the (N, H) output. The fused backward
        holds h and dL/dh until it returns, where the pair frees them after ReLU's backward, so
        fusing raises the step's peak memory by about two (N, H) tensors; the Python work it
        saves is a large part of a small step and nothing measurable of a large one. A pair
        whose modules carry hooks (or while any global module hook is set) runs module by
        module, so that the hooks see what they would see."""
        layers = list(self._modules.values())
        fuse = input.dim() > 0 and not _global_hooks()
        x, i, n = input, 0, len(layers)
        while i < n:
            m = layers[i]
            if (fuse and i + 1 < n and type(m) is Linear and type(layers[i + 1]) is ReLU
                    and x.numel() // max(x.shape[-1], 1) * m.out_features
                    <= self.FUSE_MAX_ELEMENTS
                    and not _hooks(m) and not _hooks(layers[i + 1])):
                x = F.linear_relu(x, m.weight, m.bias)
                i += 2
            else:
                x = m(x)
                i += 1
        return x

    def linears(self) -> list[Linear]:
        return [m for m in self if isinstance(m, Linear)]

    def l2_penalty(self, lam: float) -> Tensor:
        """½ λ Σ ‖W‖² over every weight matrix, biases excluded (as in the derivation)."""
        return F.l2_penalty([m.weight for m in self.linears()], lam)


def _hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _global_hooks() -> bool:
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


_TO_TORCH_MLP: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: Linear,
    nn.ReLU: ReLU,
    nn.CrossEntropyLoss: CrossEntropyLoss,
}
_TO_NATIVE: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_TORCH_MLP.items()}


def _twin(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` holding ``module``'s very parameters and buffers (no copy: optimizers that
    already hold them keep working)."""
    if isinstance(module, (nn.Linear, Linear)):
        new = cls(module.in_features, module.out_features, bias=module.bias is not None,
                  device="meta")
        new.weight = module.weight
        new.bias = module.bias
    elif isinstance(module, (nn.ReLU, ReLU)):
        new = cls(inplace=module.inplace)
    else:
        new = cls(weight=module.weight, ignore_index=module.ignore_index,
                  reduction=module.reduction, label_smoothing=module.label_smoothing)
    new.train(module.training)
    return new


def convert(model: nn.Module, *, to_native: bool = False) -> nn.Module:
    """Swap every ``nn.Linear``, ``nn.ReLU`` and ``nn.CrossEntropyLoss`` in ``model`` for its
    torch_mlp twin, in place, keeping the parameter tensors themselves (and so their device,
    dtype and values). Returns ``model``, or the twin if ``model`` itself is one of those.

    ``to_native=True`` swaps the other way, torch_mlp → torch.nn (e.g. to check one against the
    other). Subclasses of the swapped types are left alone: their behaviour may differ.

    Examples::

        >>> model = torch_mlp.convert(torchvision.ops.MLP(784, [256, 10]))
    """
    mapping = _TO_NATIVE if to_native else _TO_TORCH_MLP
    if type(model) in mapping:
        return _twin(model, mapping[type(model)])
    for name, child in model.named_children():
        if type(child) in mapping:
            setattr(model, name, _twin(child, mapping[type(child)]))
        else:
            convert(child, to_native=to_native)
    return model
