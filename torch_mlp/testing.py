"""Gradient checks for your own CI: ``check_function`` and ``python -m torch_mlp.testing``.

``check_function(custom, reference, *inputs)`` puts a custom op (typically a function that
calls your ``torch.autograd.Function``) through three checks:

1. **gradcheck** — its backward against central finite differences, in float64;
2. **gradgradcheck** — its double backward, the same way;
3. **parity** — its outputs and gradients against ``reference`` (the native op) on the same
   inputs, in float32 and float64, with ``torch.testing.assert_close`` tolerances.

Real and complex inputs and outputs are both checked; a complex tensor is differentiated as
its real and imaginary parts, so a missing conjugate in a backward is caught.

It returns a :class:`CheckResult` with the largest error seen in each check, or raises
:class:`GradientCheckError` naming the Function, the check that failed and where.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import numbers
import reprlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError  # torch.autograd.gradcheck is the function

__all__ = ["CheckResult", "GradientCheckError", "check_function", "function_cases", "main"]

# Parity tolerances by dtype: assert_close's own defaults for float32 / float64.
PARITY_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1.3e-6),
}
_REPORT_LINES = 3  # Jacobian entries / probes quoted in a failure message
_PROBE_ROUNDS = 2  # random projections per input in fast mode


class GradientCheckError(AssertionError):
    """A gradient check failed; the message names the Function, the check and the error."""


@dataclass
class CheckResult:
    """The largest error each check saw (absolute, in the check's own dtype).

    With ``fast_mode=True`` the gradcheck / gradgradcheck errors are the largest
    ``|uᵀ(J_analytical − J_numerical)v|`` over random unit vectors ``u``, ``v`` (one ``v`` per
    input); with ``fast_mode=False`` they are the largest Jacobian entry error.
    """

    name: str = ""
    gradcheck_max_err: float = 0.0  # analytical vs numerical Jacobian, float64
    gradgradcheck_max_err: float = 0.0  # the same for the Jacobian of the backward
    parity_max_err: dict[str, float] = field(default_factory=dict)  # dtype -> max |ours − ref|
    failures: list[str] = field(default_factory=list)  # one message per failed check

    @property
    def max_err(self) -> float:
        return max(self.gradcheck_max_err, self.gradgradcheck_max_err,
                   *self.parity_max_err.values(), 0.0)


def _describe(fn: Callable[..., Any]) -> str:
    """The Function's class for ``SomeFunction.apply``, else the qualified name (and, for a
    lambda, where it was defined), so that a failure names what the user wrote."""
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
    """Floating tensors cast to ``dtype``, complex ones to its complex counterpart (fresh
    leaves, requires_grad kept); other arguments as they are."""
    complex_dtype = torch.promote_types(dtype, torch.complex64)  # float64 -> complex128
    out = []
    for t in inputs:
        if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()):
            to = complex_dtype if t.is_complex() else dtype
            out.append(t.detach().to(to).requires_grad_(t.requires_grad))
        else:
            out.append(t)
    return out


def _as_tuple(out: Any) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _diff_positions(inputs: Sequence[Any]) -> list[int]:
    """Where ``inputs`` holds a tensor that requires grad."""
    return [k for k, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]


def _diff_inputs(inputs: Sequence[Any]) -> list[Tensor]:
    return [inputs[k] for k in _diff_positions(inputs)]


def _real(t: Tensor) -> Tensor:
    """A complex tensor as its (..., 2) real view (writes go through); a real one as it is."""
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def _index(shape: Sequence[int], flat: int, is_complex: bool = False) -> str:
    """``[i, j]`` (``.real`` / ``.imag`` for complex) of entry ``flat`` of a real view."""
    part = ""
    if is_complex:
        part, flat = (".imag" if flat % 2 else ".real"), flat // 2
    idx = []
    for n in reversed(shape):
        idx.append(flat % n)
        flat //= n
    return ("[" + ", ".join(map(str, reversed(idx))) + "]" if idx else "") + part


def _diff_outputs(fn: Callable[..., Any], inputs: Sequence[Any]) -> tuple[list[int], list[Tensor]]:
    outs = _as_tuple(fn(*inputs))
    ids = [k for k, o in enumerate(outs) if isinstance(o, Tensor) and o.requires_grad]
    return ids, [outs[k] for k in ids]


def _perturbed(inputs: Sequence[Any], pos: int, delta: Tensor) -> list[Any]:
    """``inputs`` with ``inputs[pos]``'s real view shifted by ``delta`` (flat or same shape)."""
    args = list(inputs)
    t = args[pos].detach().resolve_conj().clone(memory_format=torch.contiguous_format)  # view(-1)
    _real(t).view(-1).add_(delta.reshape(-1))
    args[pos] = t.requires_grad_()
    return args


def _jacobian_exhaustive(
    fn: Callable[..., Any], inputs: Sequence[Any], in_names: Sequence[str],
    out_names: Sequence[str], atol: float, eps: float = 1e-6,
) -> tuple[float, list[str]]:
    """max |J_analytical − J_numerical| over every entry, and the entries that differ most.

    J is the Jacobian of the outputs' real views w.r.t. the inputs' real views. Cost: one
    backward per output entry and two calls of ``fn`` per input entry; memory O(N_out · N_in).
    """
    diff_pos = _diff_positions(inputs)
    diff = [inputs[k] for k in diff_pos]
    out_ids, outs = _diff_outputs(fn, inputs)
    cols = [(p, j) for p in diff_pos for j in range(_real(inputs[p]).numel())]
    found: list[tuple[float, str]] = []
    worst = 0.0
    analytics = []
    for o in outs:
        flat = _real(o).reshape(-1)
        analytic = torch.zeros(flat.numel(), len(cols), dtype=torch.float64)
        for i in range(flat.numel()):
            grads = torch.autograd.grad(flat[i], diff, retain_graph=True, allow_unused=True,
                                        materialize_grads=True)
            analytic[i] = torch.cat([_real(g).reshape(-1) for g in grads]).detach()
        analytics.append(analytic)
    numerics = [torch.zeros_like(a) for a in analytics]
    # Two calls of fn per input entry, read for every output at once (none if all are empty).
    for c, (p, j) in enumerate(cols if any(a.numel() for a in analytics) else ()):
        step = torch.zeros(_real(inputs[p]).numel(), dtype=torch.float64)
        step[j] = eps
        plus = _as_tuple(fn(*_perturbed(inputs, p, step)))
        minus = _as_tuple(fn(*_perturbed(inputs, p, -step)))
        for k, numeric in zip(out_ids, numerics):
            numeric[:, c] = (_real(plus[k].detach())
                             - _real(minus[k].detach())).reshape(-1) / (2 * eps)
    for k, o, analytic, numeric in zip(out_ids, outs, analytics, numerics):
        err = (analytic - numeric).abs()
        if not err.numel():
            continue
        worst = max(worst, err.max().item())
        top = err.reshape(-1).topk(min(_REPORT_LINES, err.numel()))
        for e, f in zip(top.values.tolist(), top.indices.tolist()):
            i, c = divmod(f, len(cols))
            p, j = cols[c]
            found.append((e, f"d {out_names[k]}{_index(o.shape, i, o.is_complex())} / "
                             f"d {in_names[p]}{_index(inputs[p].shape, j, inputs[p].is_complex())}"
                             f": analytical {analytic[i, c].item():.6g}, "
                             f"numerical {numeric[i, c].item():.6g}"))
    found.sort(key=lambda x: -x[0])
    return worst, [text for e, text in found[:_REPORT_LINES] if e > atol]


def _jacobian_probes(
    fn: Callable[..., Any], inputs: Sequence[Any], in_names: Sequence[str],
    gen: torch.Generator, atol: float, rtol: float = 1e-3, eps: float = 1e-6,
) -> tuple[float, list[str]]:
    """max |uᵀ(J_analytical − J_numerical)v| over random unit vectors, and the probes that
    fail: ``atol`` scaled by Σu · Σv (the bound an entrywise ``atol`` puts on the projection,
    as torch's fast mode does), plus ``rtol`` · |numerical|.

    Each round draws ``u`` over the outputs' real views and one ``v`` per input: non-negative in
    the first round, like torch's, so that an error repeated along a row or column adds up;
    signed in the second, so that an error whose rows sum to zero (a softmax's) does not cancel.
    A round is one backward and 1 + 2 · (number of differentiable inputs) calls of ``fn``,
    whatever the sizes.
    """
    diff_pos = _diff_positions(inputs)

    found: list[tuple[float, float, str]] = []
    for r in range(_PROBE_ROUNDS):
        unit = functools.partial(_unit, gen=gen, signed=r > 0)

        out_ids, outs = _diff_outputs(fn, inputs)
        us = [unit(o) for o in outs]
        u_sum = sum(u.abs().sum().item() for u in us)

        def reduce(outs: Sequence[Tensor], us: list[Tensor] = us) -> Tensor:
            # uᵀ · outputs, real whatever the dtype, so that one backward gives uᵀJ.
            return sum((_real(o) * u).sum() for o, u in zip(outs, us))  # type: ignore[return-value]

        if not outs:
            break
        grads = torch.autograd.grad(reduce(outs), [inputs[p] for p in diff_pos],
                                    allow_unused=True, materialize_grads=True)
        for p, g in zip(diff_pos, grads):
            v = unit(inputs[p])
            analytical = (_real(g) * v).sum().item()
            plus = reduce([_as_tuple(fn(*_perturbed(inputs, p, eps * v)))[k] for k in out_ids])
            minus = reduce([_as_tuple(fn(*_perturbed(inputs, p, -eps * v)))[k] for k in out_ids])
            numerical = ((plus - minus) / (2 * eps)).item()
            tol = atol * u_sum * v.abs().sum().item() + rtol * abs(numerical)
            found.append((abs(analytical - numerical), tol,
                          f"uᵀJv for {in_names[p]} along a random direction: "
                          f"analytical {analytical:.6g}, numerical {numerical:.6g}"))
    found.sort(key=lambda x: -x[0])
    worst = found[0][0] if found else 0.0
    return worst, [text for e, tol, text in found if e > tol][:_REPORT_LINES]


def _unit(t: Tensor, gen: torch.Generator, signed: bool) -> Tensor:
    """A random unit vector shaped like ``t``'s real view, non-negative unless ``signed``."""
    draw = torch.randn if signed else torch.rand
    v = draw(_real(t).shape, dtype=torch.float64, generator=gen)
    return v / v.norm().clamp_min(1e-300)


def _first_order(fn: Callable[..., Any], n_inputs: int) -> Callable[..., tuple[Tensor, ...]]:
    """inputs + grad_outputs ↦ the gradients of ``fn`` w.r.t. its differentiable inputs."""

    def grads(*args: Any) -> tuple[Tensor, ...]:
        inputs, grad_outputs = args[:n_inputs], args[n_inputs:]
        outs = [o for o in _as_tuple(fn(*inputs)) if o.requires_grad]
        return torch.autograd.grad(outs, _diff_inputs(inputs), grad_outputs, create_graph=True,
                                   allow_unused=True, materialize_grads=True)

    return grads


def _torch_check(check: Callable[..., bool], *args: Any, **kwargs: Any) -> str | None:
    """None when torch's gradcheck / gradgradcheck passes, else the first line of its report."""
    try:
        check(*args, raise_exception=True, **kwargs)
    except GradcheckError as e:
        return str(e).splitlines()[0].rstrip(",")
    return None


def _finite_difference_checks(
    custom: Callable[..., Any], x64: list[Any], result: CheckResult, fail: Callable[[str], None],
    *, gradgrad: bool, fast_mode: bool, fd_atol: float, seed: int,
) -> None:
    """Checks 1 and 2: torch's verdict, and our own measure of the error with where it is."""
    gen = torch.Generator().manual_seed(seed)
    mode = "fast_mode" if fast_mode else "exhaustive"
    in_names = [f"input[{k}]" for k in range(len(x64))]

    def measure(fn: Callable[..., Any], inputs: list[Any], names: list[str],
                out_names: list[str]) -> tuple[float, list[str]]:
        if fast_mode:
            return _jacobian_probes(fn, inputs, names, gen, fd_atol)
        return _jacobian_exhaustive(fn, inputs, names, out_names, fd_atol)

    def report(check: str, err: float, why: str, where: list[str]) -> None:
        hint = "" if not fast_mode else "; fast_mode=False gives the Jacobian entries"
        fail(f"{check} failed: max |analytical − numerical| = {err:.3g} "
             f"(atol {fd_atol:g}, {mode}); {why}"
             + "".join(f"\n    {line}" for line in where) + (hint if where else ""))

    out_ids, outs = _diff_outputs(custom, x64)
    result.gradcheck_max_err, where = measure(
        custom, x64, in_names, [f"output[{k}]" for k in range(max(out_ids, default=0) + 1)])
    # torch's fast mode re-runs its slow mode to word a failure: ours is seen first instead.
    why = ("Jacobian mismatch in a random projection" if fast_mode and where else
           _torch_check(torch.autograd.gradcheck, custom, x64, atol=fd_atol,
                        fast_mode=fast_mode))
    if why is not None:
        report("gradcheck", result.gradcheck_max_err, why, where)
    if not gradgrad:
        return
    g_out = [torch.randn(o.shape, dtype=o.dtype, generator=gen).requires_grad_() for o in outs]
    diff_pos = _diff_positions(x64)
    hint = ("has no double backward (a @once_differentiable backward, or one built from "
            "detached tensors); pass gradgrad=False to check first order only")
    # Such a backward's gradients either do not require grad or end in autograd's Error node.
    first_order = _first_order(custom, len(x64))
    first = first_order(*x64, *g_out)
    if not any(g.requires_grad and type(g.grad_fn).__name__ != "Error" for g in first):
        fail(f"gradgradcheck cannot run: the backward {hint}")
        return
    try:
        result.gradgradcheck_max_err, where = measure(
            first_order, [*x64, *g_out],
            in_names + [f"grad_output[{k}]" for k in out_ids],
            [f"grad {in_names[p]}" for p in diff_pos])
        why = ("Jacobian mismatch in a random projection" if fast_mode and where else
               _torch_check(torch.autograd.gradgradcheck, custom, x64, g_out, atol=fd_atol,
                            fast_mode=fast_mode))
    except RuntimeError as e:
        if "once_differentiable" not in str(e):
            raise
        fail(f"gradgradcheck cannot run: the backward {hint}")
        return
    if why is not None:
        report("gradgradcheck", result.gradgradcheck_max_err, why, where)


def _parity_error(a: Tensor, b: Tensor) -> Tensor:
    """|a − b| with NaN = NaN and inf = inf counted equal (as assert_close does) and any other
    NaN counted as infinitely far."""
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, 0.0, (a - b).abs()).nan_to_num(nan=math.inf)


def _parity(
    custom: Callable[..., Any], reference: Callable[..., Any], inputs: Sequence[Any],
    result: CheckResult, fail: Callable[[str], None], *, dtype: torch.dtype,
    tol: tuple[float, float], seed: int,
) -> bool:
    """Check 3 in one dtype: outputs, and every input gradient for a random upstream gradient.
    False when the outputs do not line up (their number or structure), which no dtype changes."""
    rtol, atol = tol
    a_in, b_in = _cast(inputs, dtype), _cast(inputs, dtype)
    a_raw, b_raw = custom(*a_in), reference(*b_in)
    a_out, b_out = _returned(a_raw, "custom"), _returned(b_raw, "reference")
    mismatch = _output_mismatch(a_raw, b_raw)
    if mismatch is not None:
        result.parity_max_err[str(dtype)] = math.inf
        fail(f"parity with the reference failed: {mismatch}")
        return False
    gen = torch.Generator().manual_seed(seed)
    pairs: list[tuple[str, Tensor, Tensor]] = [
        (f"output[{k}]", a, b) for k, (a, b) in enumerate(zip(a_out, b_out))
    ]
    diffs = [(a, b) for a, b in zip(a_out, b_out) if a.requires_grad]
    if diffs:
        g = [torch.randn(a.shape, dtype=a.dtype, generator=gen) for a, _ in diffs]
        ga = torch.autograd.grad([a for a, _ in diffs], _diff_inputs(a_in), g,
                                 allow_unused=True, materialize_grads=True)
        gb = torch.autograd.grad([b for _, b in diffs], _diff_inputs(b_in), g,
                                 allow_unused=True, materialize_grads=True)
        diff_pos = _diff_positions(a_in)
        pairs += [(f"grad[{k}]", a, b) for k, a, b in zip(diff_pos, ga, gb)]
    worst = 0.0
    for what, a, b in pairs:
        a, b = a.detach(), b.detach()
        if a.shape != b.shape:
            result.parity_max_err[str(dtype)] = math.inf
            fail(f"parity with the reference failed in {dtype} on {what}: shape "
                 f"{tuple(a.shape)} (ours) vs {tuple(b.shape)} (reference)")
            return True
        err = _parity_error(a, b)
        worst = max(worst, err.max().item() if err.numel() else 0.0)
        close = torch.isclose(a, b.to(a.dtype), rtol=rtol, atol=atol, equal_nan=True)
        if a.dtype != b.dtype or not bool(close.all()):
            result.parity_max_err[str(dtype)] = worst
            flat = int(err.reshape(-1).argmax()) if err.numel() else 0
            at = _index(a.shape, flat)
            fail(f"parity with the reference failed in {dtype} on {what}: "
                 f"max |ours − reference| = {err.max().item():.3g} "
                 f"(rtol {rtol:g}, atol {atol:g}), at {what}{at}: "
                 f"ours {a.reshape(-1)[flat].item():.6g}, "
                 f"reference {b.reshape(-1)[flat].item():.6g}; "
                 f"{int((~close).sum())} / {close.numel()} entries differ"
                 + (f"; dtype {a.dtype} (ours) vs {b.dtype} (reference)"
                    if a.dtype != b.dtype else ""))
            return True
    result.parity_max_err[str(dtype)] = worst
    return True


def check_function(
    custom: Callable[..., Any],
    reference: Callable[..., Any] | None,
    *inputs: Any,
    name: str = "",
    gradgrad: bool = True,
    fast_mode: bool = True,
    parity_dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
    fd_atol: float = 1e-5,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> CheckResult:
    """Check ``custom``'s gradients three ways; see the module docstring.

    Cost: with ``fast_mode=True`` (the default) gradcheck and gradgradcheck compare random
    projections ``uᵀJv`` of the Jacobians (torch's ``fast_mode``), so ``custom`` is called
    O(number of input and output tensors) times, about 20-40 calls for a Linear, whatever the
    tensor sizes, and memory stays O(size of the inputs and outputs). ``fast_mode=False``
    builds every Jacobian entry: O(N_in + N_out) calls of ``custom`` and O(N_in · N_out) memory,
    N being the number of (real) entries, e.g. minutes and GBs for a (64, 128) Linear; use it on
    small inputs, where it quotes the Jacobian entries that differ most.

    Args:
        custom: the function under test, e.g. ``MyFunction.apply``.
        reference: a native function with the same signature, or None to skip parity.
        inputs: its arguments. Floating and complex tensors with ``requires_grad=True`` are
            differentiated; other arguments (integer targets, Python values) are passed as they are.
        name: the label in results and messages; defaults to the Function's name.
        gradgrad: also check double backward (False for a ``once_differentiable`` backward).
        fast_mode: random projections instead of whole Jacobians; see Cost above.
        parity_dtypes: the dtypes of the parity check (complex inputs take the complex twin).
        tolerances: ``{dtype: (rtol, atol)}`` for parity; defaults to :data:`PARITY_TOL`.
        fd_atol: the finite-difference checks' absolute tolerance (float64).
        seed: seeds the random upstream gradients and projections.
        raise_on_failure: raise :class:`GradientCheckError` on the first failed check; with
            False, failures are returned in the result (``result.failures``).

    Returns:
        A :class:`CheckResult`; its ``failures`` list is empty when every check passed.

    Raises:
        TypeError / ValueError: a misused argument, or ``custom`` / ``reference`` returning
            something other than a Tensor or a tuple of Tensors.
    """
    _check_options(custom, reference, name=name, gradgrad=gradgrad, fast_mode=fast_mode,
                   fd_atol=fd_atol, seed=seed, raise_on_failure=raise_on_failure)
    tol = {**PARITY_TOL, **_checked_tolerances(tolerances)}
    _check_parity_dtypes(parity_dtypes if reference is not None else (), tol)
    result, fail = _recorder(custom, name, raise_on_failure)
    x64 = _cast(inputs, torch.float64)
    _check_inputs(inputs, x64)
    if _differentiable(custom, x64, fail):
        _finite_difference_checks(custom, x64, result, fail, gradgrad=gradgrad,
                                  fast_mode=fast_mode, fd_atol=fd_atol, seed=seed)
    for dtype in parity_dtypes if reference is not None else ():
        if not _parity(custom, reference, inputs, result, fail, dtype=dtype, tol=tol[dtype],
                       seed=seed):
            break  # outputs that do not line up do not in any dtype: one message is enough
    return result


def _differentiable(
    custom: Callable[..., Any], x64: Sequence[Any], fail: Callable[[str], None]
) -> bool:
    """Whether ``custom``'s outputs are Tensors of which one requires grad: TypeError /
    ValueError when they cannot be checked at all, a gradcheck failure when they are detached."""
    outs = _returned(custom(*x64), "custom")
    if not any(o.is_floating_point() or o.is_complex() for o in outs):
        raise ValueError("check_function: custom returns no floating-point or complex output "
                         f"(dtypes: {', '.join(str(o.dtype) for o in outs)}); nothing to check")
    if not any(o.requires_grad for o in outs):
        fail("gradcheck failed: no output of custom requires grad, although its inputs do; "
             "its result is detached from them (.detach(), torch.no_grad, or a value computed "
             "outside the autograd.Function)")
        return False
    return True


def _recorder(
    custom: Callable[..., Any], name: str, raise_on_failure: bool
) -> tuple[CheckResult, Callable[[str], None]]:
    """An empty result, and the ``fail(msg)`` that records a failed check in it (and raises
    :class:`GradientCheckError` naming the Function, when ``raise_on_failure``)."""
    described = _describe(custom)
    result = CheckResult(name=name or described)
    label = described if not name or name == described else f"{name} ({described})"

    def fail(msg: str) -> None:
        result.failures.append(msg)
        if raise_on_failure:
            raise GradientCheckError(f"{label}: {msg}")

    return result, fail


def _describe_value(v: Any) -> str:
    """``None``, or ``a float (1.0)``: the type and a short repr, for error messages."""
    if v is None:
        return "None"
    kind = type(v).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    if isinstance(v, (numbers.Number, str)):
        return f"{article} {kind} ({reprlib.repr(v)})"
    return f"{article} {kind}"


def _returned(out: Any, role: str) -> tuple[Tensor, ...]:
    """``out`` as a tuple of Tensors; TypeError naming ``role`` (custom / reference) when it
    is anything else, since every check differentiates or compares tensors."""
    expected = "expected a Tensor or a tuple of Tensors"
    if isinstance(out, Tensor):
        return (out,)
    if not isinstance(out, tuple):
        hint = ", not a tuple" if isinstance(out, list) else ""
        raise TypeError(f"check_function: {role} returned {_describe_value(out)}{hint}; "
                        f"{expected}")
    if not out:
        raise TypeError(f"check_function: {role} returned an empty tuple; {expected}")
    for k, o in enumerate(out):
        if not isinstance(o, Tensor):
            raise TypeError(f"check_function: {role} returned a tuple whose element {k} is "
                            f"{_describe_value(o)}; {expected}")
    return out


def _structure(out: Any) -> str:
    n = len(out) if isinstance(out, tuple) else 1
    return f"a tuple of {n} Tensor{'s' * (n != 1)}" if isinstance(out, tuple) else "a Tensor"


def _output_mismatch(a: Any, b: Any) -> str | None:
    """How custom's return value ``a`` and the reference's ``b`` fail to line up, or None."""
    na = len(a) if isinstance(a, tuple) else 1
    nb = len(b) if isinstance(b, tuple) else 1
    if na != nb:
        return f"custom returns {na} output{'s' * (na != 1)}, the reference {nb}"
    if isinstance(a, tuple) != isinstance(b, tuple):
        return f"custom returns {_structure(a)}, the reference {_structure(b)}"
    return None


def _check_options(
    custom: Any, reference: Any, *, name: Any, gradgrad: Any, fast_mode: Any, fd_atol: Any,
    seed: Any, raise_on_failure: Any,
) -> None:
    """TypeError / ValueError naming the first of check_function's scalar arguments that is
    misused, before any of them reaches torch's own, less telling, checks."""
    if not callable(custom):
        raise TypeError(f"check_function: custom must be callable, got {type(custom).__name__}")
    if reference is not None and not callable(reference):
        raise TypeError("check_function: reference must be callable or None, got "
                        f"{type(reference).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"check_function: name must be a str, got {type(name).__name__}")
    for arg, value in (("gradgrad", gradgrad), ("fast_mode", fast_mode),
                       ("raise_on_failure", raise_on_failure)):
        if not isinstance(value, bool):
            raise TypeError(f"check_function: {arg} must be a bool, got {type(value).__name__}")
    if not _is_real(fd_atol):
        raise TypeError(f"check_function: fd_atol must be a number, got {type(fd_atol).__name__}")
    if not (math.isfinite(fd_atol) and fd_atol >= 0):
        raise ValueError(f"check_function: fd_atol must be finite and non-negative, got {fd_atol}")
    _check_seed(seed, "check_function")


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def _check_seed(seed: Any, where: str) -> None:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"{where}: seed must be an int, got {type(seed).__name__}")
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"{where}: seed must be in [-2**63, 2**64 - 1], got {seed}")


def _checked_tolerances(tolerances: Any) -> dict[torch.dtype, tuple[float, float]]:
    """``tolerances`` as a dict of (rtol, atol); TypeError / ValueError naming the entry that is
    not a pair of finite non-negative numbers."""
    if tolerances is None:
        return {}
    if not isinstance(tolerances, Mapping):
        raise TypeError("check_function: tolerances must be a dict {dtype: (rtol, atol)}, got "
                        f"{type(tolerances).__name__}")
    out = {}
    for dtype, pair in tolerances.items():
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"check_function: tolerances' keys must be torch.dtype, got "
                            f"{dtype!r}")
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(_is_real, pair))):
            raise TypeError(f"check_function: tolerances[{dtype}] must be an (rtol, atol) pair "
                            f"of numbers, e.g. {{{dtype}: (1e-3, 1e-5)}}; got {pair!r}")
        if not all(math.isfinite(v) and v >= 0 for v in pair):
            raise ValueError(f"check_function: tolerances[{dtype}] must be non-negative and "
                             f"finite, got {tuple(pair)!r}")
        out[dtype] = (float(pair[0]), float(pair[1]))
    return out


def _check_parity_dtypes(
    parity_dtypes: Any, tol: dict[torch.dtype, tuple[float, float]]
) -> None:
    """TypeError / ValueError unless every parity dtype is a real floating dtype with a
    tolerance (complex inputs take the complex twin of each by themselves)."""
    if isinstance(parity_dtypes, torch.dtype):
        raise TypeError("check_function: parity_dtypes must be a sequence of torch.dtype, got "
                        f"{parity_dtypes}; pass ({parity_dtypes},)")
    if not (isinstance(parity_dtypes, Sequence)
            and all(isinstance(d, torch.dtype) for d in parity_dtypes)):
        raise TypeError("check_function: parity_dtypes must be a sequence of torch.dtype, got "
                        f"{reprlib.repr(parity_dtypes)}")
    for dtype in parity_dtypes:
        if not dtype.is_floating_point:
            raise ValueError("check_function: parity_dtypes must be real floating-point "
                             f"dtypes, got {dtype}")
        if dtype not in tol:
            raise ValueError(f"check_function: no parity tolerance for {dtype}; pass "
                             f"tolerances={{{dtype}: (rtol, atol)}}")


def _check_inputs(inputs: Sequence[Any], x64: Sequence[Any]) -> None:
    """ValueError when no input requires grad, pointing at tensors hidden inside containers
    (only top-level tensor arguments are differentiated)."""
    if _diff_inputs(x64):
        return
    hint = ""
    for k, v in enumerate(inputs):
        items = v.values() if isinstance(v, Mapping) else v if isinstance(v, (list, tuple)) else ()
        if any(isinstance(t, Tensor) and t.requires_grad for t in items):
            hint = (f"; input[{k}] is a {type(v).__name__} holding tensors that require grad; "
                    "pass them as separate arguments")
            break
    raise ValueError(f"check_function: no input requires grad; nothing to check{hint}")


# --------------------------------------------------------------------------------------------
# torch_mlp's own matrix
# --------------------------------------------------------------------------------------------
Case = tuple[str, Callable[..., Any], Callable[..., Any] | None, tuple[Any, ...]]


def function_cases(
    seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
) -> Iterator[Case]:
    """Every Function × option combination the project checks: (id, custom, reference, inputs).

    Inputs are small floating tensors of ``dtype`` (float64, what gradcheck needs, by default)
    on ``device``, drawn in float64 on the CPU from ``seed`` so that every device and dtype
    starts from the same values; ReLU inputs are kept away from the kink at 0, where the finite
    difference straddles two slopes.
    """
    _check_seed(seed, "function_cases")
    draw = _Draw(torch.Generator().manual_seed(seed), device, dtype)
    yield from _linear_cases(draw)
    yield from _relu_cases(draw)
    yield from _cross_entropy_cases(draw)
    yield from _l2_cases(draw)
    # Its own generator, so that the cases above keep their values whatever it draws.
    gen = torch.Generator().manual_seed((seed + 1) % 2**64)  # 2**64 - 1 wraps to 0
    yield from _linear_relu_cases(_Draw(gen, device, dtype))


_CLASSES = 4  # the cross-entropy cases' number of classes


@dataclass
class _Draw:
    """The cases' random inputs: drawn in float64 on the CPU from ``gen``, in a fixed order
    (so a case's values do not depend on the device or dtype), then placed on the cases'."""

    gen: torch.Generator
    device: torch.device | str
    dtype: torch.dtype

    def randn(self, *shape: int, grad: bool = True) -> Tensor:
        return self.place(self.raw(*shape)).requires_grad_(grad)

    def raw(self, *shape: int) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=self.gen)

    def place(self, t: Tensor) -> Tensor:
        return t.to(self.device, self.dtype)


def _shape_bias_id(prefix: str, shape: Sequence[int], bias: bool) -> str:
    return f"{prefix}-x{'x'.join(map(str, shape))}-{'bias' if bias else 'nobias'}"


def _linear_cases(draw: _Draw) -> Iterator[Case]:
    """Linear: with and without bias, 1-D, 2-D and leading-dim inputs."""
    from . import functional as F  # the package's Functions; testing is importable on its own

    for shape in [(4,), (3, 4), (2, 3, 4)]:
        for bias in (True, False):
            args = (draw.randn(*shape), draw.randn(5, 4)) + ((draw.randn(5),) if bias else ())
            yield _shape_bias_id("linear", shape, bias), F.linear, TF.linear, args


def _relu_cases(draw: _Draw) -> Iterator[Case]:
    """ReLU, away from the kink: |u| >= 0.1."""
    from . import functional as F

    u = draw.raw(3, 5)
    yield "relu", F.relu, TF.relu, (draw.place(u + 0.1 * u.sign()).requires_grad_(),)


def _cross_entropy_cases(draw: _Draw) -> Iterator[Case]:
    """Cross-entropy: index and probability targets × reduction × weight × label smoothing,
    plus ignore_index, unbatched and k-dimensional inputs."""
    weight = draw.place(torch.rand(_CLASSES, dtype=torch.float64, generator=draw.gen) + 0.5)
    yield from _cross_entropy_target_cases(draw, weight)
    yield from _cross_entropy_ignore_index_cases(draw, weight)
    yield from _cross_entropy_shape_cases(draw)


def _weight_id(w: Tensor | None) -> str:
    return "weight" if w is not None else "noweight"


def _cross_entropy_target_cases(draw: _Draw, weight: Tensor) -> Iterator[Case]:
    """Index and probability targets × reduction × weight × label smoothing."""
    from . import functional as F

    index_t = torch.tensor([0, 3, 1, 2, 3], device=draw.device)
    prob_t = draw.place(torch.softmax(draw.raw(5, _CLASSES), 1))
    # The class weight travels as an input (not a closure), so the parity check casts it too.
    for kind, reduction, w, ls in itertools.product(
        ("index", "prob"), ("mean", "sum", "none"), (None, weight), (0.0, 0.2)
    ):
        target = index_t if kind == "index" else prob_t.clone().requires_grad_()
        ident = f"cross_entropy-{kind}-{reduction}-{_weight_id(w)}-ls{ls}"

        def ours(z, t, w, r=reduction, ls=ls):
            return F.cross_entropy(z, t, w, reduction=r, label_smoothing=ls)

        def ref(z, t, w, r=reduction, ls=ls):
            return TF.cross_entropy(z, t, w, reduction=r, label_smoothing=ls)

        yield ident, ours, ref, (draw.randn(5, _CLASSES), target, w)


def _cross_entropy_ignore_index_cases(draw: _Draw, weight: Tensor) -> Iterator[Case]:
    """ignore_index (the default -100) × reduction × weight, with label smoothing."""
    from . import functional as F

    ignore_t = torch.tensor([0, -100, 1, 2, -100], device=draw.device)
    for reduction, w in itertools.product(("mean", "sum", "none"), (None, weight)):

        def ours(z, w, r=reduction):
            return F.cross_entropy(z, ignore_t, w, reduction=r, label_smoothing=0.1)

        def ref(z, w, r=reduction):
            return TF.cross_entropy(z, ignore_t, w, reduction=r, label_smoothing=0.1)

        yield (f"cross_entropy-ignore_index-{reduction}-{_weight_id(w)}", ours, ref,
               (draw.randn(5, _CLASSES), w))


def _cross_entropy_shape_cases(draw: _Draw) -> Iterator[Case]:
    """Unbatched and k-dimensional inputs."""
    from . import functional as F

    unbatched_t = torch.tensor(2, device=draw.device)
    yield ("cross_entropy-unbatched", lambda z: F.cross_entropy(z, unbatched_t),
           lambda z: TF.cross_entropy(z, unbatched_t), (draw.randn(_CLASSES),))
    kdim_t = torch.randint(0, _CLASSES, (2, 3, 2), generator=draw.gen).to(draw.device)
    for reduction in ("mean", "none"):
        yield (f"cross_entropy-kdim-index-{reduction}",
               lambda z, r=reduction: F.cross_entropy(z, kdim_t, reduction=r),
               lambda z, r=reduction: TF.cross_entropy(z, kdim_t, reduction=r),
               (draw.randn(2, _CLASSES, 3, 2),))
    kdim_p = draw.place(torch.softmax(draw.raw(2, _CLASSES, 3), 1))
    yield ("cross_entropy-kdim-prob-mean", F.cross_entropy, TF.cross_entropy,
           (draw.randn(2, _CLASSES, 3), kdim_p.requires_grad_()))


def _l2_cases(draw: _Draw) -> Iterator[Case]:
    """L2 penalty: no native twin; the reference is the formula ½λΣ‖W‖² under native autograd."""
    from . import functional as F

    for lam in (0.0, 0.3):
        yield (f"l2_penalty-lam{lam}",
               lambda a, b, lam=lam: F.l2_penalty([a, b], lam),
               lambda a, b, lam=lam: 0.5 * lam * (a.square().sum() + b.square().sum()),
               (draw.randn(3, 4), draw.randn(2, 3)))


def _linear_relu_cases(draw: _Draw) -> Iterator[Case]:
    """Fused Linear + ReLU, against native linear then relu."""
    from . import functional as F

    for shape in [(3, 4), (2, 3, 4)]:
        for bias in (True, False):
            args = tuple(draw.place(t).requires_grad_()
                         for t in _away_from_kink(draw, shape, bias))
            yield (_shape_bias_id("linear_relu", shape, bias),
                   F.linear_relu, lambda *a: TF.relu(TF.linear(*a)), args)


def _away_from_kink(draw: _Draw, shape: Sequence[int], bias: bool) -> list[Tensor]:
    """x, W (and b): redrawn until every u = x·Wᵀ (+ b) is 0.1 away from ReLU's kink."""
    while True:
        x, w, b = (draw.raw(*s) for s in (shape, (5, 4), (5,)))  # b drawn even when unused
        u = x @ w.t() + b if bias else x @ w.t()
        if u.abs().min() >= 0.1:
            return [x, w, b] if bias else [x, w]


def _cli_seed(text: str) -> int:
    """--seed: an integer torch.manual_seed takes; argparse turns the error into exit 2."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1, got {text!r}")
    return seed


def _parser() -> argparse.ArgumentParser:
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
                        "(fast_mode=False; about 6x slower) (default: off)")
    parser.add_argument("--seed", type=_cli_seed, default=0,
                        help="input seed, 0 to 2**64 - 1 (default: 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases of :func:`function_cases`; print a table; return 1 on any failure."""
    parser = _parser()
    args = parser.parse_args(argv)
    cases = [c for c in function_cases(seed=args.seed) if args.k.lower() in c[0].lower()]
    if not cases:
        parser.error(f"no case id contains {args.k!r}; --list prints them")
    if args.list:
        print("\n".join(ident for ident, *_ in cases))
        return 0
    rows = []
    for ident, custom, reference, inputs in cases:
        res = check_function(custom, reference, *inputs, name=ident, raise_on_failure=False,
                             fast_mode=not args.exhaustive)
        rows.append((ident, res))
    width = max(len(r[0]) for r in rows)
    header = (f"{'case':<{width}}  {'result':<6}  {'gradcheck':>9}  {'gradgrad':>9}  "
              f"{'fp32 parity':>11}  {'fp64 parity':>11}")
    print(header)
    print("-" * len(header))
    for ident, res in rows:
        print(f"{ident:<{width}}  {'FAIL' if res.failures else 'pass':<6}  "
              f"{res.gradcheck_max_err:9.1e}  {res.gradgradcheck_max_err:9.1e}  "
              f"{res.parity_max_err.get('torch.float32', 0.0):11.1e}  "
              f"{res.parity_max_err.get('torch.float64', 0.0):11.1e}")
        for msg in res.failures:
            print(f"    {msg}")
    failed = sum(bool(res.failures) for _, res in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} passed"
          + ("" if not failed else f"; {failed} FAILED"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
