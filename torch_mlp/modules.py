"""``nn.Module`` twins of torch.nn's Linear, ReLU and CrossEntropyLoss, an MLP, and ``convert``.

The twins have torch.nn's constructor arguments, defaults, initialisation, ``extra_repr`` and
state_dict keys, so a state_dict saved from one loads into the other. Only ``forward`` differs:
it calls the hand-derived Functions in :mod:`torch_mlp.functional`.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.module import _WrappedHook
from torch.nn.parameter import Parameter
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import _checks
from . import functional as F

__all__ = [
    "MLP", "TWINS", "ConvertStep", "CrossEntropyLoss", "Linear", "ReLU", "convert", "convert_plan",
]


def _linear_holding(cls: type[nn.Module], src: nn.Module) -> nn.Module:
    """A ``cls`` with ``src``'s sizes holding ``src``'s very weight and bias. Built on meta, so
    that no parameter memory is allocated only to be dropped."""
    new = cls(src.in_features, src.out_features, bias=src.bias is not None, device="meta")
    new.weight = src.weight
    new.bias = src.bias
    return new


def _not_scriptable(module: nn.Module) -> NoReturn:
    """Every torch_mlp module's ``__prepare_scriptable__``: torch.jit.script is refused,
    naming what to use instead."""
    raise RuntimeError(
        f"torch.jit.script: torch_mlp.{type(module).__name__} cannot be scripted: its "
        f"hand-derived autograd.Functions are Python, which TorchScript (deprecated upstream) "
        f"does not compile. Use torch.compile(model) or torch.export.export(model, args) "
        f"instead, or script the native model: torch_mlp.convert(model, to_native=True)"
    )


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

    __prepare_scriptable__ = _not_scriptable

    @classmethod
    def from_native(cls, module: nn.Linear) -> Linear:
        """A Linear with ``module``'s options holding its very weight and bias (no copy)."""
        return _linear_holding(cls, module)

    def to_native(self) -> nn.Linear:
        """The ``torch.nn.Linear`` holding this module's very weight and bias."""
        return _linear_holding(nn.Linear, self)

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

    __prepare_scriptable__ = _not_scriptable

    @classmethod
    def from_native(cls, module: nn.ReLU) -> ReLU:
        """A ReLU with ``module``'s ``inplace``."""
        return cls(inplace=module.inplace)

    def to_native(self) -> nn.ReLU:
        """The ``torch.nn.ReLU`` with this module's ``inplace``."""
        return nn.ReLU(inplace=self.inplace)

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
            reduction = _checks.legacy_get_string(size_average, reduce)
        # torch.nn only finds these at the first call; failing at construction is kinder.
        _checks.check_reduction(reduction)
        _checks.check_label_smoothing(label_smoothing)
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

    __prepare_scriptable__ = _not_scriptable

    @classmethod
    def from_native(cls, module: nn.CrossEntropyLoss) -> CrossEntropyLoss:
        """A CrossEntropyLoss with ``module``'s options and its very ``weight`` buffer. Raises
        ValueError for options torch.nn only rejects at the first call (e.g. ``reduction``)."""
        return cls(weight=module.weight, ignore_index=module.ignore_index,
                   reduction=module.reduction, label_smoothing=module.label_smoothing)

    def to_native(self) -> nn.CrossEntropyLoss:
        """The ``torch.nn.CrossEntropyLoss`` with this module's options and ``weight`` buffer."""
        return nn.CrossEntropyLoss(weight=self.weight, ignore_index=self.ignore_index,
                                   reduction=self.reduction,
                                   label_smoothing=self.label_smoothing)


def _as_size(n: object) -> int | None:
    """``n`` as an int where it is an integer-like (int, numpy integer, integer 0-d tensor),
    as ``nn.Linear`` takes it through ``operator.index``; None otherwise. A bool is refused:
    True as a layer size is a mistake."""
    if isinstance(n, bool):
        return None
    try:
        return operator.index(n)
    except TypeError:
        return None


class MLP(nn.Sequential):
    r"""``Linear → ReLU → … → Linear``, built only from torch_mlp's modules.

    A subclass of ``nn.Sequential``, so its state_dict keys (``0.weight``, ``0.bias``,
    ``2.weight``, …) are those of the native ``nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)``
    and load both ways.

    Args:
        in_features: D, e.g. 784 for MNIST. Sizes are ints or integer-likes (a numpy
            integer, an integer 0-d tensor), as ``nn.Linear`` takes them.
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
        one = _as_size(hidden_features) is not None or not isinstance(hidden_features, Iterable)
        hidden = [hidden_features] if one else list(hidden_features)
        given = [in_features, *hidden, out_features]
        names = ("in_features", *["hidden_features"] * len(hidden), "out_features")
        sizes = [_as_size(n) for n in given]
        for name, n, size in zip(names, given, sizes):
            if size is None or size < 1:
                raise ValueError(f"MLP: {name} must be positive integers, got {n!r}")
        layers: list[nn.Module] = []
        for k, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(Linear(d_in, d_out, bias=bias, device=device, dtype=dtype))
            if k < len(sizes) - 2:
                layers.append(ReLU())
        super().__init__(*layers)
        self.sizes = tuple(sizes)

    def forward(self, input: Tensor) -> Tensor:
        """The layers in order, as ``nn.Sequential`` runs them, except that in eager code a
        Linear → ReLU pair with a small output runs as one fused Function,
        :func:`torch_mlp.functional.linear_relu`: the same values and gradients with one Python
        forward and backward less per hidden layer.

        Small: at most ``FUSE_MAX_ELEMENTS`` entries in the (N, H) output. The fused backward
        holds h and dL/dh until it returns, where the pair frees them after ReLU's backward, so
        fusing raises the step's peak memory by about two (N, H) tensors; the Python work it
        saves is a large part of a small step and nothing measurable of a large one. A pair
        whose modules carry hooks (or while any global module hook is set) runs module by
        module, so that the hooks see what they would see. Under torch.compile, torch.export
        and torch.fx tracing nothing is fused: there the size would become a guard (or a trace
        error), and there is no per-call Python work to save."""
        if not _fusion_allowed(input):
            return super().forward(input)
        layers = list(self._modules.values())
        x, i, n = input, 0, len(layers)
        while i < n:
            m = layers[i]
            if (i + 1 < n and type(m) is Linear and type(layers[i + 1]) is ReLU
                    and x.numel() // max(x.shape[-1], 1) * m.out_features
                    <= self.FUSE_MAX_ELEMENTS
                    and not _hooks(m) and not _hooks(layers[i + 1])):
                x = F.linear_relu(x, m.weight, m.bias)
                i += 2
            else:
                x = m(x)
                i += 1
        return x

    __prepare_scriptable__ = _not_scriptable

    def linears(self) -> list[Linear]:
        return [m for m in self if isinstance(m, Linear)]

    def l2_penalty(self, lam: float) -> Tensor:
        """½ λ Σ ‖W‖² over every weight matrix, biases excluded (as in the derivation)."""
        return F.l2_penalty([m.weight for m in self.linears()], lam)


def _fusion_allowed(input: Tensor) -> bool:
    """Eager code only: a size read under compile / export / fx would be a guard or an error."""
    if isinstance(input, torch.fx.Proxy) or torch.compiler.is_compiling():
        return False
    return input.dim() > 0 and not _global_hooks()


def _hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _global_hooks() -> bool:
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------
TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: Linear,
    nn.ReLU: ReLU,
    nn.CrossEntropyLoss: CrossEntropyLoss,
}
"""The table :func:`convert` reads: torch.nn class → its twin. A twin class defines the
classmethod ``from_native(module)`` and the method ``to_native()``; adding a pair here is all it
takes for ``convert`` to swap it (both ways)."""

# nn.Module's own bookkeeping besides parameters, buffers and submodules: the hook dicts (with
# their with_kwargs / always_call side dicts) and _is_full_backward_hook.
_HOOK_STATE = tuple(
    k for k in nn.Module().__dict__
    if k not in ("training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")
)

# Old-style reparametrizations: a forward-pre hook that rebuilds `weight` from other tensors.
_REPARAMETRIZING_HOOKS = (
    (WeightNorm, "torch.nn.utils.weight_norm"),
    (SpectralNorm, "torch.nn.utils.spectral_norm"),
    (BasePruningMethod, "torch.nn.utils.prune"),
)


@dataclass(frozen=True)
class ConvertStep:
    """One line of :func:`convert`'s plan: the module at ``path`` (``""``: the model itself)
    becomes ``new``, or, where ``new`` is None, stays as it is because of ``reason``.
    ``warn`` says whether ``convert`` warns about that skip."""

    path: str
    module: nn.Module
    new: nn.Module | None
    reason: str = ""
    warn: bool = False

    @property
    def swapped(self) -> bool:
        return self.new is not None

    def __str__(self) -> str:
        where = self.path or "(model)"
        if self.new is not None:
            return f"swap {where}: {_name(type(self.module))} -> {_name(type(self.new))}"
        return f"skip {where}: {_name(type(self.module))}, {self.reason}"


def _name(cls: type) -> str:
    if cls.__module__.startswith("torch.nn."):
        return f"torch.nn.{cls.__qualname__}"
    if cls.__module__ == __name__:
        return f"torch_mlp.{cls.__qualname__}"
    return cls.__qualname__


def _where(path: str) -> str:
    return repr(path) if path else "the model itself"


def _table(to_native: bool) -> dict[type[nn.Module], type[nn.Module]]:
    return {ours: native for native, ours in TWINS.items()} if to_native else dict(TWINS)


def _carry(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` what ``old`` holds beyond its options: the very parameters and buffers (in
    their order, extra ones included), submodules, training mode, hooks and instance attributes.
    Reads ``old`` only, so a plan that is dropped leaves the model as it was."""
    for key in ("_parameters", "_buffers"):
        theirs = old.__dict__[key]
        for k, v in new.__dict__[key].items():
            if k not in theirs or theirs[k] is not v:
                raise RuntimeError(f"{type(new).__name__} does not hold the module's own "
                                   f"{key[1:-1]} {k!r}")
        new.__dict__[key] = theirs.copy()
    for key in ("_non_persistent_buffers_set", "_modules"):
        new.__dict__[key] = old.__dict__[key].copy()
    new.training = old.training
    # The hook dicts themselves, so that handles returned before convert still remove them.
    for key in _HOOK_STATE:
        new.__dict__[key] = old.__dict__[key]
    pre = old._load_state_dict_pre_hooks
    if any(_bound_to(h, old) for h in pre.values()):
        # register_load_state_dict_pre_hook keeps a weak reference to the module it was
        # registered on: the twin's copy must call the hook with the twin.
        new._load_state_dict_pre_hooks = OrderedDict(
            (k, _WrappedHook(h.hook, new) if _bound_to(h, old) else h) for k, h in pre.items()
        )
    for key, value in old.__dict__.items():
        if key not in new.__dict__:  # an attribute set on the instance, e.g. lin.my_tag = 3
            new.__dict__[key] = value


def _bound_to(hook: object, module: nn.Module) -> bool:
    return (isinstance(hook, _WrappedHook) and hook.with_module
            and hook.module() is module)


def _unswappable(module: nn.Module) -> str:
    for kind, where in _REPARAMETRIZING_HOOKS:
        if any(isinstance(h, kind) for h in module._forward_pre_hooks.values()):
            return (f"its weight is recomputed before each call by {where}; "
                    f"apply {where} after convert instead")
    if "_compiled_call_impl" in module.__dict__:
        return "it was compiled in place by Module.compile(); compile after convert instead"
    return ""


def _build(module: nn.Module, path: str, target: type[nn.Module], to_native: bool) -> nn.Module:
    hook = "to_native" if to_native else "from_native"
    owner = type(module) if to_native else target
    if not callable(getattr(owner, hook, None)):
        raise TypeError(f"convert: {_name(owner)} has no {hook}(); every twin class in "
                        f"torch_mlp.modules.TWINS must define from_native(module) and to_native()")
    try:
        new = module.to_native() if to_native else target.from_native(module)
        _carry(module, new)
    except (TypeError, ValueError, RuntimeError) as exc:
        kind = next(k for k in (TypeError, ValueError, RuntimeError) if isinstance(exc, k))
        raise kind(f"convert: cannot swap {_where(path)} ({_name(type(module))}) for "
                   f"{_name(target)}: {exc}. The model was left unchanged.") from exc
    return new


def _decide(
    module: nn.Module, path: str, table: dict[type[nn.Module], type[nn.Module]], to_native: bool
) -> tuple[ConvertStep | None, bool]:
    """What becomes of ``module``: a step (or None where convert has nothing to say about it),
    and whether to look inside it."""
    cls = type(module)
    if isinstance(module, torch.jit.ScriptModule):
        return ConvertStep(path, module, None, "a torch.jit.ScriptModule, whose compiled code "
                           "cannot change; script after convert instead", warn=True), False
    if cls in table:
        reason = _unswappable(module)
        if reason:
            return ConvertStep(path, module, None, reason, warn=True), False
        return ConvertStep(path, module, _build(module, path, table[cls], to_native)), False
    native_calls = "" if to_native else _native_calls(module)
    if native_calls:  # a note, and its submodules are still converted
        return ConvertStep(path, module, None, native_calls), True
    if isinstance(module, LazyModuleMixin) and getattr(cls, "cls_to_become", None) in table:
        return ConvertStep(path, module, None, "a lazy module not initialised yet; run a forward "
                           "pass first, then convert", warn=True), False
    bases = [k for k in table if issubclass(cls, k)]
    if bases and parametrize.is_parametrized(module):
        return ConvertStep(path, module, None, "it has parametrizations "
                           "(torch.nn.utils.parametrize); convert before parametrizing instead",
                           warn=True), False
    if bases:
        # e.g. MultiheadAttention's out_proj: a subclass may behave differently, so it stays.
        return ConvertStep(path, module, None,
                           f"a subclass of {_name(bases[0])}, whose behaviour may differ"), True
    return None, True


def _native_calls(module: nn.Module) -> str:
    """Why ``module``, a torch.nn module whose forward calls F.relu / F.linear itself rather
    than through a submodule, keeps those calls native; "" for any other module."""
    cls = type(module)
    if cls in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        if getattr(module, "activation", None) is torch.nn.functional.relu:
            return ("its forward calls torch.nn.functional.relu itself (activation='relu'), "
                    "which stays native; its Linear submodules are converted (with "
                    "activation=nn.ReLU(), a module, the activation is converted too)")
    elif cls is nn.MultiheadAttention:
        return ("its forward runs torch.nn.functional.multi_head_attention_forward on "
                "in_proj_weight and out_proj's weight, which stays native")
    return ""


def _plan(
    model: nn.Module, to_native: bool
) -> tuple[list[ConvertStep], list[tuple[nn.Module | None, str, nn.Module]]]:
    """Every step, and every (parent, name, twin) to set, decided before anything changes."""
    table = _table(to_native)
    steps: list[ConvertStep] = []
    places: list[tuple[nn.Module | None, str, nn.Module]] = []
    decided: dict[int, nn.Module | None] = {}  # by id: a module used twice gets one twin
    seen: set[int] = set()

    def visit(module: nn.Module, path: str, parent: nn.Module | None, name: str) -> None:
        key = id(module)
        if key in decided:
            new = decided[key]
            if new is not None:
                steps.append(ConvertStep(path, module, new))
                places.append((parent, name, new))
            return
        if key in seen:
            return
        seen.add(key)
        step, descend = _decide(module, path, table, to_native)
        if step is not None:
            decided[key] = step.new
            steps.append(step)
            if step.new is not None:
                places.append((parent, name, step.new))
        if descend:
            for child_name, child in module._modules.items():
                if child is not None:
                    visit(child, f"{path}.{child_name}" if path else child_name, module,
                          child_name)

    visit(model, "", None, "")
    return steps, places


def convert_plan(model: nn.Module, *, to_native: bool = False) -> list[ConvertStep]:
    """What :func:`convert` would do to ``model``, changing nothing: one :class:`ConvertStep`
    per module it swaps (each place a shared module sits at) or leaves alone, in ``named_modules``
    order. Raises what ``convert`` would raise.

    Examples::

        >>> for step in torch_mlp.modules.convert_plan(model):
        ...     print(step)
        swap 0: torch.nn.Linear -> torch_mlp.Linear
    """
    _refuse_script(model)
    return _plan(model, to_native)[0]


def _refuse_script(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("convert: model is a torch.jit.ScriptModule, whose compiled code cannot "
                        "change; convert the eager model, then script it")


def convert(model: nn.Module, *, to_native: bool = False, verbose: bool = False) -> nn.Module:
    """Swap every ``nn.Linear``, ``nn.ReLU`` and ``nn.CrossEntropyLoss`` in ``model`` for its
    torch_mlp twin, in place. Returns ``model``, or the twin if ``model`` itself is one of those
    (``model`` is then left as it is).

    A twin is what the module was, but for its class: the very parameter and buffer objects
    (so device, dtype, values, tied weights and an optimizer built earlier all carry over),
    training mode, forward / backward / state_dict hooks (handles returned earlier still remove
    them) and attributes set on the instance. A module used at several places becomes one twin.
    The table of pairs is :data:`TWINS`. ``to_native=True`` swaps the other way, torch_mlp →
    torch.nn.

    All-or-nothing: every swap is decided first, and if one fails (e.g. a CrossEntropyLoss
    with an option the twin refuses) convert raises, naming the module, with ``model``
    unchanged. Left alone, with a warning naming the module: a Linear whose weight is
    recomputed by ``torch.nn.utils.weight_norm`` / ``spectral_norm`` / ``prune`` or
    ``parametrize``, a lazy module not initialised yet, a ``torch.jit.ScriptModule`` inside
    the model, a module compiled in place. Left alone silently: subclasses (their behaviour
    may differ). A scripted ``model`` raises TypeError.

    convert swaps modules, not function calls: where a module's forward calls
    ``torch.nn.functional.relu`` / ``linear`` itself, those calls stay native. For the torch.nn
    modules known to do so (``nn.TransformerEncoderLayer`` / ``DecoderLayer`` with
    ``activation="relu"``, ``nn.MultiheadAttention``) ``verbose`` and :func:`convert_plan` say
    so (their Linear submodules are still swapped); for a module of your own, check its forward.

    Args:
        model: any module.
        to_native: swap torch_mlp → torch.nn instead.
        verbose: print one line per swap and per module left alone, e.g.
            ``convert: swap encoder.fc1: torch.nn.Linear -> torch_mlp.Linear``.
            :func:`convert_plan` returns the same lines as objects, changing nothing.

    Examples::

        >>> model = torch_mlp.convert(torchvision.ops.MLP(784, [256, 10]))
    """
    _refuse_script(model)
    steps, places = _plan(model, to_native)
    result = model
    # Dict assignments only, after every twin was built: nothing here can fail half-way.
    for parent, name, new in places:
        if parent is None:
            result = new
        else:
            parent._modules[name] = new
    for step in steps:
        if verbose:
            print(f"convert: {step}")
        if step.warn:
            warnings.warn(f"convert: left {_where(step.path)} ({_name(type(step.module))}) "
                          f"as it is: {step.reason}", stacklevel=2)
    return result
