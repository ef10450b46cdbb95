"""Gradient checks for your own CI: ``check_function`` and ``python -m torch_mlp.testing``.

``check_function(custom, reference, *inputs)`` puts a custom op (typically a function that
calls your ``torch.autograd.Function``) through three checks:

1. **gradcheck** — its backward against central finite differences, in float64;
2. **gradgradcheck** — its double backward, the same way;
3. **parity** — its outputs and gradients against ``reference`` (the native op) on the same
   inputs, in float32 and float64, with ``torch.testing.assert_close`` tolerances.

It returns a :class:`CheckResult` with the largest error seen in each check, or raises
:class:`GradientCheckError` naming the check that failed and by how much.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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


class GradientCheckError(AssertionError):
    """A gradient check failed; the message names the check and the size of the error."""


@dataclass
class CheckResult:
    """The largest error each check saw (absolute, in the check's own dtype)."""

    name: str = ""
    gradcheck_max_err: float = 0.0  # |analytical − numerical| Jacobian entries, float64
    gradgradcheck_max_err: float = 0.0  # the same for the Jacobian of the backward
    parity_max_err: dict[str, float] = field(default_factory=dict)  # dtype -> max |ours − ref|

    @property
    def max_err(self) -> float:
        return max(self.gradcheck_max_err, self.gradgradcheck_max_err,
                   *self.parity_max_err.values(), 0.0)


def _cast(inputs: Sequence[Any], dtype: torch.dtype) -> list[Any]:
    """Floating tensors cast to ``dtype`` (fresh leaves, requires_grad kept); others as they are."""
    out = []
    for t in inputs:
        if isinstance(t, Tensor) and t.is_floating_point():
            out.append(t.detach().to(dtype).requires_grad_(t.requires_grad))
        else:
            out.append(t)
    return out


def _as_tuple(out: Any) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _diff_inputs(inputs: Sequence[Any]) -> list[Tensor]:
    return [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]


def _jacobian_error(fn: Callable[..., Any], inputs: Sequence[Any], eps: float = 1e-6) -> float:
    """max |J_analytical − J_numerical| for ``fn`` at ``inputs`` (float64 tensors).

    J_analytical comes from the function's backward (one vector-Jacobian product per output
    entry); J_numerical from central differences, one input entry at a time.
    """
    diff_pos = [k for k, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    diff = [inputs[k] for k in diff_pos]
    all_outs = _as_tuple(fn(*inputs))
    out_ids = [k for k, o in enumerate(all_outs) if o.requires_grad]
    analytic = []  # one (out numel, total input numel) Jacobian per differentiable output
    for k in out_ids:
        flat = all_outs[k].reshape(-1)
        rows = []
        for i in range(flat.numel()):
            grads = torch.autograd.grad(flat[i], diff, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1)
                                   for g, t in zip(grads, diff)]).detach())
        analytic.append(torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.float64))

    def evaluate(pos: int, j: int, delta: float) -> list[Tensor]:
        args = list(inputs)
        t = args[pos].detach().clone(memory_format=torch.contiguous_format)  # view(-1) below
        t.view(-1)[j] += delta
        args[pos] = t.requires_grad_()
        outs = _as_tuple(fn(*args))
        return [outs[k].detach().reshape(-1).double() for k in out_ids]

    worst, col = 0.0, 0
    for pos in diff_pos:
        for j in range(inputs[pos].numel()):
            plus, minus = evaluate(pos, j, eps), evaluate(pos, j, -eps)
            for jac, p, m in zip(analytic, plus, minus):
                if p.numel():
                    worst = max(worst, (jac[:, col] - (p - m) / (2 * eps)).abs().max().item())
            col += 1
    return worst


def _first_order(fn: Callable[..., Any], n_inputs: int) -> Callable[..., tuple[Tensor, ...]]:
    """inputs + grad_outputs ↦ the gradients of ``fn`` w.r.t. its differentiable inputs."""

    def grads(*args: Any) -> tuple[Tensor, ...]:
        inputs, grad_outputs = args[:n_inputs], args[n_inputs:]
        outs = [o for o in _as_tuple(fn(*inputs)) if o.requires_grad]
        return torch.autograd.grad(outs, _diff_inputs(inputs), grad_outputs, create_graph=True,
                                   allow_unused=True, materialize_grads=True)

    return grads


def check_function(
    custom: Callable[..., Any],
    reference: Callable[..., Any] | None,
    *inputs: Any,
    name: str = "",
    gradgrad: bool = True,
    parity_dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
    fd_atol: float = 1e-5,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> CheckResult:
    """Check ``custom``'s gradients three ways; see the module docstring.

    Args:
        custom: the function under test, e.g. ``lambda x, w: MyFunction.apply(x, w)``.
        reference: a native function with the same signature, or None to skip parity.
        inputs: its arguments. Floating tensors with ``requires_grad=True`` are differentiated;
            other arguments (integer targets, Python values) are passed as they are.
        gradgrad: also check double backward.
        parity_dtypes: the dtypes of the parity check.
        tolerances: ``{dtype: (rtol, atol)}`` for parity; defaults to :data:`PARITY_TOL`.
        fd_atol: the finite-difference checks' absolute tolerance (float64).
        seed: seeds the random upstream gradients.
        raise_on_failure: raise :class:`GradientCheckError` on the first failed check; with
            False, failures are returned in the result (``result.failures``).

    Returns:
        A :class:`CheckResult`; its ``failures`` list is empty when every check passed.
    """
    tol = {**PARITY_TOL, **(tolerances or {})}
    label = name or getattr(custom, "__name__", "custom")
    result = CheckResult(name=label)
    result.failures = []  # type: ignore[attr-defined]

    def fail(msg: str) -> None:
        result.failures.append(msg)  # type: ignore[attr-defined]
        if raise_on_failure:
            raise GradientCheckError(f"{label}: {msg}")

    x64 = _cast(inputs, torch.float64)
    if not _diff_inputs(x64):
        raise ValueError("check_function: no input requires grad; nothing to check")

    # 1. gradcheck: torch's verdict, and the size of the worst Jacobian error.
    try:
        torch.autograd.gradcheck(custom, x64, atol=fd_atol, raise_exception=True)
        ok = True
    except GradcheckError as e:  # pragma: no branch
        ok, why = False, str(e).splitlines()[0]
    result.gradcheck_max_err = _jacobian_error(custom, x64)
    if not ok:
        fail(f"gradcheck failed: max |analytical − numerical| = "
             f"{result.gradcheck_max_err:.3g} (atol {fd_atol:g}); {why}")

    # 2. gradgradcheck: the same on the backward itself, against random upstream gradients.
    if gradgrad:
        gen = torch.Generator().manual_seed(seed)
        outs = [o for o in _as_tuple(custom(*x64)) if o.requires_grad]
        g_out = [torch.randn(o.shape, dtype=o.dtype, generator=gen).requires_grad_()
                 for o in outs]
        try:
            torch.autograd.gradgradcheck(custom, x64, g_out, atol=fd_atol, raise_exception=True)
            ok = True
        except GradcheckError as e:
            ok, why = False, str(e).splitlines()[0]
        result.gradgradcheck_max_err = _jacobian_error(_first_order(custom, len(x64)),
                                                       [*x64, *g_out])
        if not ok:
            fail(f"gradgradcheck failed: max |analytical − numerical| = "
                 f"{result.gradgradcheck_max_err:.3g} (atol {fd_atol:g}); {why}")

    # 3. parity with the native reference: outputs and every input gradient.
    if reference is not None:
        for dtype in parity_dtypes:
            rtol, atol = tol[dtype]
            a_in, b_in = _cast(inputs, dtype), _cast(inputs, dtype)
            a_out, b_out = _as_tuple(custom(*a_in)), _as_tuple(reference(*b_in))
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
                pairs += [(f"grad[{k}]", a, b) for k, (a, b) in enumerate(zip(ga, gb))]
            worst = 0.0
            for what, a, b in pairs:
                err = (a.detach() - b.detach()).abs().nan_to_num(0.0)
                worst = max(worst, err.max().item() if err.numel() else 0.0)
                try:
                    torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol,
                                               equal_nan=True)
                except AssertionError as e:
                    result.parity_max_err[str(dtype)] = worst
                    fail(f"parity with the reference failed in {dtype} on {what}: "
                         f"max |ours − reference| = {err.max().item():.3g} "
                         f"(rtol {rtol:g}, atol {atol:g}). {str(e).splitlines()[0]}")
                    break
            result.parity_max_err[str(dtype)] = worst
    return result


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
    from . import functional as F  # the package's Functions; testing is importable on its own

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, grad: bool = True) -> Tensor:
        t = torch.randn(*shape, dtype=torch.float64, generator=gen)
        return t.to(device, dtype).requires_grad_(grad)

    # Linear: with and without bias, 1-D, 2-D and leading-dim inputs.
    for shape in [(4,), (3, 4), (2, 3, 4)]:
        for bias in (True, False):
            ident = f"linear-x{'x'.join(map(str, shape))}-{'bias' if bias else 'nobias'}"
            args = (randn(*shape), randn(5, 4)) + ((randn(5),) if bias else ())
            yield ident, F.linear, TF.linear, args

    # ReLU, away from the kink: |u| >= 0.1.
    u = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    u = (u + 0.1 * u.sign()).to(device, dtype).requires_grad_()
    yield "relu", F.relu, TF.relu, (u,)

    # Cross-entropy: index and probability targets × reduction × weight × label smoothing,
    # plus ignore_index, unbatched and k-dimensional inputs.
    C = 4
    weight = (torch.rand(C, dtype=torch.float64, generator=gen) + 0.5).to(device, dtype)
    index_t = torch.tensor([0, 3, 1, 2, 3], device=device)
    prob_t = torch.softmax(torch.randn(5, C, dtype=torch.float64, generator=gen), 1)
    prob_t = prob_t.to(device, dtype)
    # The class weight travels as an input (not a closure), so the parity check casts it too.
    for kind in ("index", "prob"):
        for reduction in ("mean", "sum", "none"):
            for w in (None, weight):
                for ls in (0.0, 0.2):
                    target = index_t if kind == "index" else prob_t.clone().requires_grad_()
                    ident = (f"cross_entropy-{kind}-{reduction}-"
                             f"{'weight' if w is not None else 'noweight'}-ls{ls}")

                    def ours(z, t, w, r=reduction, ls=ls):
                        return F.cross_entropy(z, t, w, reduction=r, label_smoothing=ls)

                    def ref(z, t, w, r=reduction, ls=ls):
                        return TF.cross_entropy(z, t, w, reduction=r, label_smoothing=ls)

                    yield ident, ours, ref, (randn(5, C), target, w)
    ignore_t = torch.tensor([0, -100, 1, 2, -100], device=device)
    for reduction in ("mean", "sum", "none"):
        for w in (None, weight):
            ident = (f"cross_entropy-ignore_index-{reduction}-"
                     f"{'weight' if w is not None else 'noweight'}")

            def ours(z, w, r=reduction):
                return F.cross_entropy(z, ignore_t, w, reduction=r, label_smoothing=0.1)

            def ref(z, w, r=reduction):
                return TF.cross_entropy(z, ignore_t, w, reduction=r, label_smoothing=0.1)

            yield ident, ours, ref, (randn(5, C), w)
    unbatched_t = torch.tensor(2, device=device)
    yield ("cross_entropy-unbatched", lambda z: F.cross_entropy(z, unbatched_t),
           lambda z: TF.cross_entropy(z, unbatched_t), (randn(C),))
    kdim_t = torch.randint(0, C, (2, 3, 2), generator=gen).to(device)
    for reduction in ("mean", "none"):
        yield (f"cross_entropy-kdim-index-{reduction}",
               lambda z, r=reduction: F.cross_entropy(z, kdim_t, reduction=r),
               lambda z, r=reduction: TF.cross_entropy(z, kdim_t, reduction=r),
               (randn(2, C, 3, 2),))
    kdim_p = torch.softmax(torch.randn(2, C, 3, dtype=torch.float64, generator=gen), 1)
    kdim_p = kdim_p.to(device, dtype)
    yield ("cross_entropy-kdim-prob-mean", F.cross_entropy, TF.cross_entropy,
           (randn(2, C, 3), kdim_p.requires_grad_()))

    # L2 penalty: no native twin; the reference is the formula ½λΣ‖W‖² under native autograd.
    for lam in (0.0, 0.3):
        yield (f"l2_penalty-lam{lam}",
               lambda a, b, lam=lam: F.l2_penalty([a, b], lam),
               lambda a, b, lam=lam: 0.5 * lam * (a.square().sum() + b.square().sum()),
               (randn(3, 4), randn(2, 3)))

    # Fused Linear + ReLU, against native linear then relu. Its own generator (the cases above
    # keep their values); inputs redrawn until every u = x·Wᵀ + b is 0.1 away from the kink.
    gen_lr = torch.Generator().manual_seed(seed + 1)
    for shape in [(3, 4), (2, 3, 4)]:
        for bias in (True, False):
            while True:
                x, w, b = (torch.randn(*s, dtype=torch.float64, generator=gen_lr)
                           for s in (shape, (5, 4), (5,)))
                if bias and (x @ w.t() + b).abs().min() >= 0.1:
                    break
                if not bias and (x @ w.t()).abs().min() >= 0.1:
                    b = None
                    break
            args = tuple(t.to(device, dtype).requires_grad_() for t in (x, w, b) if t is not None)
            yield (f"linear_relu-x{'x'.join(map(str, shape))}-{'bias' if bias else 'nobias'}",
                   F.linear_relu, lambda *a: TF.relu(TF.linear(*a)), args)

    # The whole MLP in one Function (three layers, the middle one without bias), against native
    # linear / relu / linear / relu / linear; every hidden pre-activation 0.1 from the kink.
    gen_mlp = torch.Generator().manual_seed(seed + 2)

    def mlp_ref(x, w1, b1, w2, w3, b3):
        return TF.linear(TF.relu(TF.linear(TF.relu(TF.linear(x, w1, b1)), w2)), w3, b3)

    def mlp_ours(x, w1, b1, w2, w3, b3):
        return F.mlp(x, [w1, w2, w3], [b1, None, b3])

    for shape in [(3, 4), (2, 3, 4)]:
        while True:
            t = [torch.randn(*s, dtype=torch.float64, generator=gen_mlp)
                 for s in (shape, (5, 4), (5,), (3, 5), (2, 3), (2,))]
            u1 = TF.linear(t[0], t[1], t[2])
            u2 = TF.linear(u1.relu(), t[3])
            if min(u1.abs().min(), u2.abs().min()) >= 0.1:
                break
        args = tuple(a.to(device, dtype).requires_grad_() for a in t)
        yield f"mlp-x{'x'.join(map(str, shape))}", mlp_ours, mlp_ref, args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every case of :func:`function_cases`; print a table; return 1 on any failure."""
    rows = []
    for ident, custom, reference, inputs in function_cases():
        res = check_function(custom, reference, *inputs, name=ident, raise_on_failure=False)
        rows.append((ident, res))
    width = max(len(r[0]) for r in rows)
    header = (f"{'case':<{width}}  {'result':<6}  {'gradcheck':>9}  {'gradgrad':>9}  "
              f"{'fp32 parity':>11}  {'fp64 parity':>11}")
    print(header)
    print("-" * len(header))
    for ident, res in rows:
        status = "FAIL" if res.failures else "pass"  # type: ignore[attr-defined]
        print(f"{ident:<{width}}  {status:<6}  {res.gradcheck_max_err:9.1e}  "
              f"{res.gradgradcheck_max_err:9.1e}  "
              f"{res.parity_max_err.get('torch.float32', 0.0):11.1e}  "
              f"{res.parity_max_err.get('torch.float64', 0.0):11.1e}")
        for msg in res.failures:  # type: ignore[attr-defined]
            print(f"    {msg}")
    failed = sum(bool(res.failures) for _, res in rows)  # type: ignore[attr-defined]
    print(f"\n{len(rows) - failed}/{len(rows)} passed"
          + ("" if not failed else f"; {failed} FAILED"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
