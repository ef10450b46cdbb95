"""Gradient checks for your own CI: ``check_function`` and ``python -m torch_mlp.testing``.

``check_function(custom, reference, *inputs)`` puts a custom op (typically the ``apply`` of your
``torch.autograd.Function``) through torch's own checks in float64, ``gradcheck`` (backward and
forward mode against finite differences; complex tensors by the conjugate Wirtinger convention,
so a missing ``.conj()`` is caught) and ``gradgradcheck``, then parity with ``reference`` (the
native op): outputs and input gradients, float32 and float64, ``torch.testing.assert_close``.

``fast_mode=True`` compares one random projection ``vᵀJu`` of each Jacobian: cheap at any size,
but a few wrong rows are diluted in the sum (a gradient 10% off in one row of a (100, 4) input
passes). Parity catches that; without a reference, also run ``fast_mode=False`` on small
inputs: it compares every entry (refused past half this machine's memory, at most 16 GiB).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import re
import signal
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError  # torch.autograd.gradcheck is the function

from . import functional as F

__all__ = ["CheckResult", "GradientCheckError", "check_function", "function_cases", "main"]


class GradientCheckError(AssertionError):
    """A check failed; the message names the Function, the check, the input and torch's report."""


@dataclass
class CheckResult:
    """What :func:`check_function` ran and found; ``failures`` is empty when every check passed."""

    name: str = ""
    checks: list[str] = field(default_factory=list)  # e.g. "gradcheck", "parity float32"
    parity_max_err: dict[str, float] = field(default_factory=dict)  # dtype -> max |ours − ref|
    failures: list[str] = field(default_factory=list)  # one message per failed check

    @property
    def max_err(self) -> float:
        """The largest parity error (gradcheck gives a verdict, not an error size)."""
        return max(self.parity_max_err.values(), default=0.0)


def check_function(
    custom: Callable[..., Any],
    reference: Callable[..., Any] | None,
    *inputs: Any,
    name: str = "",
    gradgrad: bool = True,
    forward_ad: bool = True,
    fast_mode: bool = True,
    parity_dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
    fd_atol: float = 1e-5,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> CheckResult:
    """Run gradcheck, gradgradcheck and parity on ``custom``; see the module docstring.

    Args:
        custom: the function under test, e.g. ``MyFunction.apply``.
        reference: a native function with the same signature, or None to skip parity.
        inputs: its arguments; tensors that require grad are differentiated, others pass as is.
        name: the label in results and messages; defaults to the Function's name.
        gradgrad: also check double backward (False for a ``once_differentiable`` backward).
        forward_ad: also check forward mode, the Function's ``jvp`` (False if it has none).
        fast_mode: torch's random projections instead of whole Jacobians.
        parity_dtypes: the dtypes of the parity check (complex inputs take the complex twin).
        tolerances: ``{dtype: (rtol, atol)}`` for parity; assert_close's defaults otherwise.
        fd_atol: gradcheck's and gradgradcheck's ``atol``.
        seed: seeds the random upstream gradients of gradgradcheck and parity.
        raise_on_failure: raise :class:`GradientCheckError` on a failure, else list it.

    Raises:
        TypeError: tensors in a list input, or an output not a Tensor or tuple of Tensors.
        ValueError: a meta tensor input (gradcheck needs values).
        MemoryError: ``fast_mode=False`` on inputs whose Jacobians would not fit.
    """
    described = _describe(custom)
    result = CheckResult(name=name or described)
    _refuse_inputs(inputs)
    x64 = _cast(inputs, torch.float64)
    outputs = [o for o in _call(custom, "custom", x64) if o.requires_grad]
    if not fast_mode:
        _refuse_past_limit(x64, outputs, gradgrad)
    checks: dict[str, dict[str, Any]] = {"gradcheck": {"check_forward_ad": forward_ad}}
    if gradgrad and outputs:  # with no differentiable output, gradcheck has said so already
        gen = _generator(seed)
        g = [torch.randn(o.shape, dtype=o.dtype, generator=gen).requires_grad_() for o in outputs]
        checks["gradgradcheck"] = {"grad_outputs": g}
    for check, kwargs in checks.items():
        result.checks.append(check)
        result.failures += _torch_check(check, custom, x64, len(outputs), atol=fd_atol,
                                        fast_mode=fast_mode, **kwargs)
    for dtype in parity_dtypes if reference is not None else ():
        result.checks.append(f"parity {str(dtype).removeprefix('torch.')}")
        err, failures = _parity(custom, reference, inputs, dtype, tolerances or {}, seed)
        result.parity_max_err[str(dtype)] = err
        result.failures += [f"{result.checks[-1]} failed on {f}" for f in failures]
    if result.failures and raise_on_failure:
        label = described if name in ("", described) else f"{name} ({described})"
        raise GradientCheckError(f"{label}: " + "\n".join(result.failures))
    return result


def _torch_check(check: str, custom: Callable[..., Any], x64: Sequence[Any], n_outputs: int,
                 **kwargs: Any) -> list[str]:
    """[] when torch.autograd's ``check`` passes, else its report, naming the input."""
    try:
        getattr(torch.autograd, check)(custom, x64, raise_exception=True, **kwargs)
    except NotImplementedError as e:  # torch's, for a Function without jvp in forward mode
        return [f"{check} failed in forward mode: {e} (or pass forward_ad=False)"]
    except GradcheckError as e:
        hint = ("\n(if the backward is @once_differentiable, it has no second derivative to "
                "check: pass gradgrad=False)" if check == "gradgradcheck" else "")
        return [f"{check} failed{_where(str(e), x64, n_outputs)}: {e}{hint}"]
    return []


def _describe(fn: Callable[..., Any]) -> str:
    """``SomeFunction.apply``'s class, else the qualified name (and a lambda's file and line)."""
    if isinstance(fn, functools.partial):
        return _describe(fn.func)
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        return owner.__qualname__
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    code = getattr(fn, "__code__", None)
    if qual.endswith("<lambda>") and code is not None:
        return f"{qual} ({Path(code.co_filename).name}:{code.co_firstlineno})"
    return qual


def _cast(inputs: Sequence[Any], dtype: torch.dtype) -> list[Any]:
    """Floating tensors in ``dtype``, complex ones in its complex twin, as fresh leaves."""
    complex_dtype = torch.promote_types(dtype, torch.complex64)  # float64 -> complex128
    return [t.detach().to(complex_dtype if t.is_complex() else dtype)
            .requires_grad_(t.requires_grad)
            if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) else t
            for t in inputs]


def _refuse_inputs(inputs: Sequence[Any]) -> None:
    for k, t in enumerate(inputs):
        if isinstance(t, (list, tuple)) and any(isinstance(e, Tensor) for e in t):
            raise TypeError(f"input[{k}] is a {type(t).__name__} of tensors: pass them as "
                            "separate inputs, e.g. `lambda a, b: l2_penalty([a, b], 0.1)`")
        if isinstance(t, Tensor) and t.is_meta:
            raise ValueError(f"input[{k}] is a meta tensor: gradcheck needs values")


def _call(fn: Callable[..., Any], role: str, args: Sequence[Any]) -> tuple[Tensor, ...]:
    """``fn(*args)`` as a tuple of tensors; a TypeError naming ``role`` for anything else."""
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    if not all(isinstance(o, Tensor) for o in outs):
        raise TypeError(f"{role} {_describe(fn)} returned a {type(out).__name__}: "
                        "check_function needs a Tensor or a tuple of Tensors")
    return outs


def _differentiable(inputs: Sequence[Any]) -> list[int]:
    return [k for k, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]


def _where(message: str, inputs: Sequence[Any], n_outputs: int) -> str:
    """" on input[k]" for torch's "input j", which counts the inputs that require grad, then
    (in gradgradcheck) the grad_outputs."""
    names = [f"input[{k}]" for k in _differentiable(inputs)]
    names += [f"grad_output[{k}]" for k in range(n_outputs)]
    found = re.search(r"with respect to input (\d+)", message)
    return f" on {names[int(found[1])]}" if found and int(found[1]) < len(names) else ""


def _refuse_past_limit(x64: Sequence[Any], outputs: Sequence[Tensor], gradgrad: bool) -> None:
    """MemoryError, before any check runs, when fast_mode=False's Jacobians would not fit."""
    diff = [x64[k] for k in _differentiable(x64)]
    n_in, n_out = sum(t.numel() for t in diff), sum(o.numel() for o in outputs)
    # gradgradcheck differentiates (inputs, grad_outputs) -> input gradients: the larger one.
    rows, cols, check = ((n_in + n_out, n_in, "gradgradcheck") if gradgrad
                         else (n_in, n_out, "gradcheck"))
    itemsize = 16 if any(t.is_complex() for t in (*diff, *outputs)) else 8
    need = 8 * rows * cols * itemsize  # torch's slow mode peaks at 6.5-7.7 such matrices
    try:  # half this machine's memory, at most 16 GiB
        limit = min(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2, 16 * 2**30)
    except (AttributeError, ValueError, OSError):  # no sysconf, e.g. on Windows
        limit = 8 * 2**30
    if need > limit:
        raise MemoryError(
            f"fast_mode=False would need ~{need / 2**30:,.1f} GiB for the Jacobians of "
            f"{check} ({rows:,} × {cols:,} entries, each held several times); the limit is "
            f"{limit / 2**30:.1f} GiB (half this machine's memory, at most 16); use "
            "fast_mode=True, or smaller inputs")


def _parity(
    custom: Callable[..., Any], reference: Callable[..., Any], inputs: Sequence[Any],
    dtype: torch.dtype, tolerances: dict[torch.dtype, tuple[float, float]], seed: int,
) -> tuple[float, list[str]]:
    """Outputs, then input gradients for a random upstream gradient, in ``dtype``: the largest
    |ours − reference| and what differs, as assert_close words it."""
    ours_in, ref_in = _cast(inputs, dtype), _cast(inputs, dtype)
    ours, ref = _call(custom, "custom", ours_in), _call(reference, "reference", ref_in)
    shapes = [[tuple(o.shape) for o in out] for out in (ours, ref)]
    if shapes[0] != shapes[1]:
        return math.inf, [f"the outputs: custom's shapes {shapes[0]}, the reference's {shapes[1]}"]
    pairs = [(f"output[{k}]", a.detach(), b.detach()) for k, (a, b) in enumerate(zip(ours, ref))]
    outs = [k for k, a in enumerate(ours) if a.requires_grad]
    positions = _differentiable(ours_in)
    if outs and positions:
        gen = _generator(seed)
        g = [torch.randn(ours[k].shape, dtype=ours[k].dtype, generator=gen) for k in outs]
        grad = functools.partial(torch.autograd.grad, grad_outputs=g, allow_unused=True,
                                 materialize_grads=True)
        ours_grads = grad([ours[k] for k in outs], [ours_in[k] for k in positions])
        ref_grads = grad([ref[k] for k in outs], [ref_in[k] for k in positions])
        pairs += [(f"the gradient of input[{k}]", a, b)
                  for k, a, b in zip(positions, ours_grads, ref_grads)]
    (rtol, atol), failures = tolerances.get(dtype, (None, None)), []
    for what, a, b in pairs:
        try:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as e:
            failures.append(f"{what}: {e}")
    return max(_max_diff(a, b) for _, a, b in pairs), failures


def _generator(seed: int) -> torch.Generator:
    # Not seeded with `seed` itself: inputs drawn after torch.manual_seed(seed) would then equal
    # the upstream gradients, and xᵀx, being symmetric, hides a transposed grad_weight.
    return torch.Generator().manual_seed(seed ^ 0x5EED)


def _max_diff(a: Tensor, b: Tensor) -> float:
    """max |a − b|, NaN against NaN and inf against inf counted equal, as assert_close does."""
    same = (a == b) | (a.isnan() & b.isnan())
    err = torch.where(same, 0.0, (a - b).abs()).nan_to_num(nan=math.inf)
    return err.max().item() if err.numel() else 0.0


# --------------------------------------------------------------------------------------------
# torch_mlp's own matrix
# --------------------------------------------------------------------------------------------
Case = tuple[str, Callable[..., Any], Callable[..., Any] | None, tuple[Any, ...]]
REDUCTIONS = ("mean", "sum", "none")


def function_cases(
    seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
) -> Iterator[Case]:
    """Every Function × option combination the project checks: (id, custom, reference, inputs).

    Inputs are drawn in float64 on the CPU from ``seed``, so that every device and dtype starts
    from the same values, then put on ``device`` in ``dtype`` (float64, what gradcheck needs, by
    default). ReLU's are kept 0.1 away from its kink, where finite differences straddle slopes.
    """
    gen = torch.Generator().manual_seed(seed)
    for ident, custom, reference, inputs in (*_layer_cases(gen), *_cross_entropy_cases(gen)):
        yield ident, custom, reference, tuple(_place(t, device, dtype) for t in inputs)


def _place(t: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    if not isinstance(t, Tensor):
        return t
    to = dtype if t.is_floating_point() else t.dtype
    return t.detach().to(device, to).requires_grad_(t.requires_grad)


def _randn(gen: torch.Generator, *shape: int, grad: bool = True) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(grad)


def _layer_cases(gen: torch.Generator) -> Iterator[Case]:
    """Linear (1-D, 2-D, leading dims × bias), ReLU, and the L2 term against its formula."""
    for shape, bias in itertools.product([(4,), (3, 4), (2, 3, 4)], (True, False)):
        args = (_randn(gen, *shape), _randn(gen, 5, 4), *([_randn(gen, 5)] if bias else []))
        ident = f"linear-x{'x'.join(map(str, shape))}-{'bias' if bias else 'nobias'}"
        yield ident, F.linear, TF.linear, args
    u = _randn(gen, 3, 5, grad=False)
    yield "relu", F.relu, TF.relu, ((u + 0.1 * u.sign()).requires_grad_(),)
    for lam in (0.0, 0.3):
        yield (f"l2_penalty-lam{lam}", lambda a, b, lam=lam: F.l2_penalty([a, b], lam),
               lambda a, b, lam=lam: 0.5 * lam * (a.square().sum() + b.square().sum()),
               (_randn(gen, 3, 4), _randn(gen, 2, 3)))


def _ce(**options: Any) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """Ours and torch's cross_entropy with the same options: (input, target, weight=None)."""
    return (functools.partial(F.cross_entropy, **options),
            functools.partial(TF.cross_entropy, **options))


def _cross_entropy_cases(gen: torch.Generator, C: int = 4) -> Iterator[Case]:
    """Index and probability targets × reduction × class weight × label smoothing; ignore_index
    × reduction × weight; unbatched and k-dimensional inputs. The weight is an input, not a
    closure, so that parity casts it too."""
    weight = torch.rand(C, dtype=torch.float64, generator=gen) + 0.5
    index, prob = torch.tensor([0, 3, 1, 2, 3]), _randn(gen, 5, C, grad=False).softmax(1)
    for kind, reduction, w, ls in itertools.product(("index", "prob"), REDUCTIONS,
                                                    (None, weight), (0.0, 0.2)):
        target = index if kind == "index" else prob.clone().requires_grad_()
        ident = f"cross_entropy-{kind}-{reduction}-{'no' * (w is None)}weight-ls{ls}"
        yield (ident, *_ce(reduction=reduction, label_smoothing=ls),
               (_randn(gen, 5, C), target, w))
    ignore = torch.tensor([0, -100, 1, 2, -100])
    for reduction, w in itertools.product(REDUCTIONS, (None, weight)):
        ident = f"cross_entropy-ignore_index-{reduction}-{'no' * (w is None)}weight"
        yield (ident, *_ce(reduction=reduction, label_smoothing=0.1),
               (_randn(gen, 5, C), ignore, w))
    yield "cross_entropy-unbatched", *_ce(), (_randn(gen, C), torch.tensor(2))
    kdim = torch.randint(0, C, (2, 3, 2), generator=gen)
    for reduction in ("mean", "none"):
        yield (f"cross_entropy-kdim-index-{reduction}", *_ce(reduction=reduction),
               (_randn(gen, 2, C, 3, 2), kdim))
    kdim_prob = _randn(gen, 2, C, 3, grad=False).softmax(1).requires_grad_()
    yield "cross_entropy-kdim-prob-mean", *_ce(), (_randn(gen, 2, C, 3), kdim_prob)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases of :func:`function_cases`; print a table; return 1 on any failure."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_mlp.testing",
        description="Run check_function (gradcheck, gradgradcheck, parity with torch) on every "
        "case of torch_mlp's Function matrix; exit 1 if any case fails.")
    parser.add_argument("-k", metavar="PATTERN", default="",
                        help="run only the cases whose id contains PATTERN, case-insensitive "
                        "(default: every case)")
    parser.add_argument("--list", action="store_true", help="print the case ids and exit")
    parser.add_argument("--exhaustive", action="store_true",
                        help="compare every Jacobian entry instead of random projections "
                        "(fast_mode=False) (default: off)")
    args = parser.parse_args(argv)
    cases = [c for c in function_cases() if args.k.lower() in c[0].lower()]
    if not cases:
        parser.error(f"no case id contains {args.k!r}; --list prints them")
    if args.list:
        print("\n".join(ident for ident, *_ in cases))
        return 0
    width = max(len(ident) for ident, *_ in cases)
    print(f"{'case':<{width}}  result  fp32 parity  fp64 parity")
    failed = 0
    for ident, custom, reference, inputs in cases:
        res = check_function(custom, reference, *inputs, name=ident, raise_on_failure=False,
                             fast_mode=not args.exhaustive)
        print(f"{ident:<{width}}  {'FAIL' if res.failures else 'pass':<6}  "
              f"{res.parity_max_err.get('torch.float32', 0.0):11.1e}  "
              f"{res.parity_max_err.get('torch.float64', 0.0):11.1e}", flush=True)
        for message in res.failures:
            print(textwrap.indent(message, "    "))
        failed += bool(res.failures)
    print(f"\n{len(cases) - failed}/{len(cases)} passed" + (f"; {failed} FAILED" * bool(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):  # `| head` ends the run quietly, as it does other CLI tools
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
