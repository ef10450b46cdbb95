"""Check the hand-derived gradients against native autograd, live, inside any training loop.

After ``loss.backward()``, :func:`check` runs the step's loss twice more and compares with the
``.grad`` s already there ("ours"):

* under :func:`torch_mlp.use_native`, in the training dtype and autocast state: native
  autograd's gradients ("native"), which ours should match up to rounding;
* under ``use_native()`` with the parameters, floating buffers and floating inputs in float64
  and autocast off: the same math nearly exact, which measures native's own rounding error.

Example (a plain PyTorch loop)::

    def compute_loss(model, x, y):
        return F.cross_entropy(model(x), y) + F.l2_penalty(weights(model), 1e-4)

    loss = compute_loss(model, x, y)
    opt.zero_grad()
    loss.backward()
    if step % 100 == 0:
        torch_mlp.verify.check(model, compute_loss, x, y, loss=loss)  # raises VerifyError if off
    opt.step()

Why ``check(model, loss_fn, *inputs)`` with ``loss_fn(model, *inputs)``, rather than a closure
without arguments: the float64 pass needs the inputs in float64, and tensors a closure captured
cannot be converted from outside. So the inputs come as arguments: floating tensors among them
(also inside lists, tuples and dicts) are cast to float64 for that pass, the rest (integer
targets, numbers) passes as is. The parameters are swapped for float64 copies on the module
object itself (``torch.func.functional_call``) for the length of the call, so a ``loss_fn`` that
reads ``model`` from its closure (e.g. for an L2 term) sees them too; only the floating tensors
it reads must come through ``inputs`` or belong to the model (a ``CrossEntropyLoss(weight=...)``
held by ``loss_fn``'s closure cannot be cast: make it a submodule of the model, or pass the weight
through ``inputs``). Frozen parameters are cast too, and not compared. Under DDP, ``loss_fn``
receives the wrapped module (``model.module``): call that, not the DDP wrapper, whose forward
prepares a gradient all-reduce.

For a loop that checks many steps, :class:`Verifier` keeps the GradScaler, autocast and
tolerance settings and counts checks and skipped (non-finite) steps; ``summary()`` tells.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._dispatch import use_native

__all__ = ["VERIFY_K", "VERIFY_RTOL", "Report", "Row", "Verifier", "VerifyError", "check"]

# The tolerance. For each parameter's gradient, with g_ours and g_native computed in the
# training dtype and g_64 the same math in float64:
#
#     max|g_ours − g_native| ≤ rtol · max|g_native| + K · max|g_native − g_64|
#
# rtol is that of the compared tensor's dtype (torch.testing's defaults): under autocast a float32
# parameter's .grad is float32, and the bfloat16 rounding of the matmuls inside shows in the second
# term, measured, rather than in a blanket bfloat16 rtol. The second term is native autograd's own
# rounding error on this very batch, times K. It is needed: near convergence a gradient is a small
# difference of large terms (p − q, all the more with label smoothing), so any fixed relative
# tolerance fails in the end while both implementations merely round differently. Measured on MNIST
# (CPU, 320 checks over a 20-epoch run): our error against float64 stayed within 3× native's, while
# max|g_ours − g_native| / max|g_native| grew from 2e-7 to 1.1e-5. A real bug, such as a dropped
# 1/N, is off by about the gradient itself, ~1e5× the tolerance.
VERIFY_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1.3e-6,
    torch.bfloat16: 1.6e-2,
    torch.float16: 1e-3,
}
VERIFY_K = 10.0
# The loss VALUE is one scalar, so native's rounding error on it is a single draw that can be ~0 by
# luck (a sum rounded in another order, e.g. ½λ·W·W against ½λ·ΣW², may then look wrong). Its
# tolerance, rtol·|loss_64| + K·max(|loss_native − loss_64|, floor), has a floor: the rounding error
# the compute dtypes allow in this loss, measured by running the float64 pass again with every aten
# op's result perturbed at random by the rounding of the dtype that op ran in during the native pass
# (Monte Carlo arithmetic, u = eps/2; under autocast the matmuls' low dtype, float32 for
# log_softmax, nll_loss, sums, ...), LOSS_FLOOR_DRAWS times. An op that rounds once gets result +
# u·δ·|result|, |δ| ≤ 1. A reduction (sum, mean, mm, addmm, log_softmax's sum of exps, nll_loss's
# mean, ...) rounds at each of its n additions, in an order that is the implementation's choice:
# another order is as right, and its error is a random walk of the partial sums, ~u·√n·S with S the
# same reduction of the terms' absolute values (u·n·S is the worst case, which no real order
# approaches and which would hide genuine errors). So it gets result + u·δ·√n·S; K covers the rest.
# Ops not modelled (e.g. convolutions) round once.
LOSS_FLOOR_DRAWS = 2

class VerifyError(AssertionError):
    """Ours differs from native autograd beyond tolerance; ``.report`` has every number."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Row:
    """One compared quantity: a parameter's gradient, or (name ``"loss"``) the loss value.

    For a gradient, ``abs`` is max|ours − native| and ``tol`` = rtol·max|native| +
    K·native_err; for the loss, ``abs`` is |ours − float64| and ``tol`` = rtol·|float64| +
    K·max(native_err, floor). ``used`` = abs / tol (over 1: out of tolerance)."""

    name: str
    abs: float
    rel: float  # abs / max|native| (loss: / |float64|)
    tol: float
    used: float
    ours_err: float  # max|ours − float64|
    native_err: float  # max|native − float64|


@dataclass
class Report:
    """One check's numbers. ``rows``: the loss first (when compared), then every parameter."""

    rows: list[Row] = field(default_factory=list)
    dtype: torch.dtype | None = None  # the compute dtype the tolerance is for
    rtol: float = 0.0  # the gradients' (that of their dtype)
    loss_rtol: float = 0.0  # the loss value's (that of its dtype)
    k: float = VERIFY_K
    loss_floor: float = 0.0
    skipped: bool = False  # a non-finite step: nothing compared
    used_all: float = 0.0  # worst `used` over all rows (under DDP: over all processes)

    @property
    def ok(self) -> bool:
        return self.skipped or self.used_all <= 1  # `<=`: NaN is not ok

    @property
    def worst(self) -> Row | None:
        """The row closest to (or furthest past) its tolerance; None when skipped."""
        if not self.rows:
            return None
        return max(self.rows, key=lambda r: math.inf if math.isnan(r.used) else r.used)

    def __str__(self) -> str:
        if self.skipped:
            return "verify: step skipped (non-finite loss or gradients)"
        w = max([len("name"), *(len(r.name) for r in self.rows)])
        head = (f"verify vs native autograd ({self.dtype}, tol = {self.rtol:.1e}·max|native| + "
                f"{self.k:g}·native's error vs float64): {'ok' if self.ok else 'FAILED'}")
        cols = f"{'name':<{w}}  {'abs diff':>9}  {'rel diff':>9}  {'tol':>9}  {'used':>6}  " \
               f"{'ours err':>9}  {'nat. err':>9}"
        lines = [head, cols]
        for r in self.rows:
            lines.append(f"{r.name:<{w}}  {r.abs:9.2e}  {r.rel:9.2e}  {r.tol:9.2e}  "
                         f"{100 * r.used:5.0f}%  {r.ours_err:9.2e}  {r.native_err:9.2e}")
        return "\n".join(lines)


class _Bound(nn.Module):
    """loss_fn(model, *inputs) as a module, so functional_call swaps the parameters for
    everything loss_fn reaches through the model, not only for model.forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *inputs: Any) -> Tensor:
        return self.loss_fn(self.model, *inputs)


def _rounded(func: Any, out: Any) -> Tensor | None:
    """The floating result of an op that rounds, else None (views, in-place and exact ops)."""
    if func._schema.is_mutable or func.is_view or func.overloadpacket in _EXACT:
        return None
    first = out[0] if isinstance(out, tuple) and out else out  # nll_loss: (loss, weight)
    return first if isinstance(first, Tensor) and first.is_floating_point() else None


class _DtypeRecorder(TorchDispatchMode):
    """Records (op, result dtype) of every op that rounds: under autocast, the dtype each op
    really ran in (matmuls in the low dtype, log_softmax, nll_loss and sums in float32, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = _rounded(func, out)
        if first is not None:
            self.ops.append((func, first.dtype))
        return out


class _RoundingNoise(TorchDispatchMode):
    """Every floating aten result plus u·δ·spread, δ uniform in [-1, 1] per element: the
    rounding of a dtype with unit roundoff u, simulated in float64. ``spread`` is |result| for
    an op that rounds once, √n·S for a reduction of n terms per element (S: the same reduction
    of the terms' absolute values); exact, view and in-place ops are left alone. u is that of
    the dtype the op ran in, in the native pass (``ran_in``, matched by op in order), else that
    of ``dtype``. ``spreads`` is shared by the draws: the n-th op's spread is computed in the
    first draw only (the draws' values differ by rounding, which does not matter to a scale;
    it halves the cost)."""

    def __init__(self, dtype: torch.dtype, ran_in: list[tuple[Any, torch.dtype]], seed: int,
                 spreads: list[tuple[Any, Tensor]]) -> None:
        super().__init__()
        self.u = torch.finfo(dtype).eps / 2
        self.ran_in, self.next = ran_in, 0
        self.seed = seed
        self.spreads = spreads
        self.calls = 0

    def _u(self, func: Any) -> float:
        # The native pass has more ops (autocast's casts, left out as exact), never others:
        # look a few ahead for this op; not found, the compute dtype's u.
        for j in range(self.next, min(self.next + 8, len(self.ran_in))):
            if self.ran_in[j][0] is func:
                self.next = j + 1
                return torch.finfo(self.ran_in[j][1]).eps / 2
        return self.u

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        first = _rounded(func, out)
        if first is None or first.dtype != torch.float64:
            return out
        u = self._u(func)
        i, self.calls = self.calls, self.calls + 1
        if i < len(self.spreads) and self.spreads[i][0] is func \
                and self.spreads[i][1].shape == first.shape:
            spread = self.spreads[i][1]
        else:
            spread = _spread(func, args, kwargs, first)
            del self.spreads[i:]
            self.spreads.append((func, spread))
        self.seed += 1
        gen = torch.Generator(device=first.device).manual_seed(self.seed)
        noise = torch.rand(first.shape, generator=gen, dtype=first.dtype, device=first.device)
        noisy = first + u * (2 * noise - 1) * spread
        return (noisy, *out[1:]) if isinstance(out, tuple) else noisy


_aten = torch.ops.aten
# Results that are exact (copies, selections, sign changes, constants): no rounding.
_EXACT = {_aten.clone, _aten._to_copy, _aten.copy, _aten.alias, _aten.lift_fresh_copy,
          _aten._unsafe_view, _aten.cat, _aten.stack, _aten.index, _aten.index_select,
          _aten.gather, _aten.neg, _aten.abs, _aten.relu, _aten.where, _aten.masked_fill,
          _aten.constant_pad_nd, _aten.zeros, _aten.ones, _aten.full, _aten.zeros_like,
          _aten.ones_like, _aten.full_like, _aten.empty, _aten.empty_like,
          _aten.empty_strided, _aten.scalar_tensor}
_SUMS = {_aten.sum, _aten.nansum, _aten.mean}
_PRODUCTS = {_aten.mm, _aten.bmm, _aten.dot, _aten.vdot, _aten.mv}
_ADD_PRODUCTS = {_aten.addmm, _aten.addmv, _aten.baddbmm, _aten.addbmm}
_NLL = {_aten.nll_loss_forward, _aten.nll_loss2d_forward}
# Loss kernels whose terms are >= 0, so that S = |result|.
_NONNEG_LOSSES = {_aten.mse_loss, _aten.smooth_l1_loss, _aten.huber_loss,
                  _aten.binary_cross_entropy, _aten.binary_cross_entropy_with_logits,
                  _aten.soft_margin_loss}


def _bound_args(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    schema = func._schema.arguments
    bound = {a.name: a.default_value for a in schema if a.has_default_value()}
    bound.update(zip((a.name for a in schema), args))
    return {**bound, **kwargs}


def _spread(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor) -> Tensor:
    """The scale of the rounding error of ``out``: |out| for one rounding, √n·S for a
    reduction of n terms per output element whose absolute values reduce to S."""
    op = func.overloadpacket
    per = max(out.numel(), 1)
    if op in _SUMS:
        n = args[0].numel() / per
        return math.sqrt(max(n, 1)) * func(args[0].abs(), *args[1:], **kwargs).abs()
    if op in _PRODUCTS:
        return math.sqrt(args[0].shape[-1]) * func(args[0].abs(), args[1].abs())
    if op in _ADD_PRODUCTS:
        a = _bound_args(func, args, kwargs)
        s = func(args[0].abs(), args[1].abs(), args[2].abs(), beta=abs(a["beta"]),
                 alpha=abs(a["alpha"]))
        return math.sqrt(args[1].shape[-1] + 1) * s
    if op is _aten._log_softmax:  # x − lse: lse's sum of exps has relative error ~u·√C
        x, dim = args[0], args[1]
        return out.abs() + (x - out).abs() + math.sqrt(x.shape[dim] if x.dim() else 1)
    if op is _aten._softmax:
        x, dim = args[0], args[1]
        return out.abs() * (1 + math.sqrt(x.shape[dim] if x.dim() else 1))
    if op is _aten.logsumexp:
        return out.abs() + math.sqrt(max(args[0].numel() / per, 1))
    if op in _NLL:
        a = _bound_args(func, args, kwargs)
        if a["reduction"] == 0:  # "none": each element picks one term
            return out.abs()
        w = a["weight"]
        s = func(-args[0].abs(), args[1], None if w is None else w.abs(), a["reduction"],
                 a["ignore_index"])[0]
        return math.sqrt(max(args[1].numel(), 1)) * s.abs()
    if op in _NONNEG_LOSSES:
        if _bound_args(func, args, kwargs)["reduction"] == 0:
            return out.abs()
        return math.sqrt(max(args[0].numel() / per, 1)) * out.abs()
    if op is _aten.linalg_vector_norm:  # (Σ|x|^p)^(1/p): relative error ≤ that of the sum
        return math.sqrt(max(args[0].numel() / per, 1)) * out.abs()
    return out.abs()


def _to64(obj: Any) -> Any:
    """Floating tensors (also in lists, tuples, dicts) as float64, complex as complex128."""
    if isinstance(obj, Tensor):
        if obj.is_complex():
            return obj.detach().to(torch.complex128)
        return obj.detach().double() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to64(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to64(v) for k, v in obj.items()}
    return obj


class _Rng:
    """The CPU and CUDA RNG states at creation; ``restore()`` sets them back."""

    def __init__(self, cuda: list[int]) -> None:
        self.cuda = cuda
        self.cpu = torch.get_rng_state()
        self.states = [torch.cuda.get_rng_state(d) for d in cuda]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.cuda, self.states):
            torch.cuda.set_rng_state(s, d)


@contextlib.contextmanager
def _untouched(module: nn.Module, params: list[Tensor]) -> Iterator[_Rng]:
    """Leave the buffers (BatchNorm's running stats) and the RNG streams as they were, so a
    checked run trains exactly as an unchecked one; yields the RNG state at entry."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            yield _Rng(cuda)
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)


def _no_autocast(device_type: str) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for dt in {device_type, "cpu"}:
        stack.enter_context(torch.autocast(dt, enabled=False))
    return stack


def _scalar(loss: Any, what: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, Tensor) else ""
        raise TypeError(f"verify: loss_fn must return a one-element Tensor, got "
                        f"{type(loss).__name__}{shape} ({what})")
    return loss.reshape(())


class Verifier:
    """Checks steps of one model against native autograd; counts checks and skipped steps.

    Args:
        model: the model whose ``.grad`` s are checked (an ``nn.Module``, or a
            ``DistributedDataParallel`` wrapping one: then the all-reduced gradients are
            compared with native and float64 gradients averaged the same way, and every process
            reaches the same verdict).
        scaler: the ``torch.amp.GradScaler`` of the loop, if any; ``check`` unscales the
            gradients first (through ``optimizer``, which is then required), and skips a step
            whose gradients are non-finite (an overflow the scaler skips too).
        optimizer: the optimizer the scaler unscales (needed with ``scaler``).
        autocast: the autocast dtype of the step for the native pass; ``None``: autocast as it
            is where ``check`` is called; ``False``: none.
        rtol: overrides ``VERIFY_RTOL`` of each compared tensor's dtype (a float32 ``.grad``
            under bfloat16 autocast: float32's; the matmuls' rounding shows in the K term).
        k: the multiple of native's own rounding error allowed (``VERIFY_K``).
        raise_on_failure: raise :class:`VerifyError` when out of tolerance (else return the
            failing report).
    """

    def __init__(self, model: nn.Module, *, scaler: torch.amp.GradScaler | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 autocast: torch.dtype | bool | None = None, rtol: float | None = None,
                 k: float = VERIFY_K, raise_on_failure: bool = True) -> None:
        _check_arguments(model, scaler, optimizer, autocast, rtol, k, raise_on_failure)
        self.model, self.scaler, self.optimizer = model, scaler, optimizer
        self.autocast, self.rtol, self.k = autocast, rtol, k
        self.raise_on_failure = raise_on_failure
        self.checks = 0
        self.skipped = 0
        self.max_rel = 0.0  # max |g_ours − g_native| / max |g_native| over parameters and checks
        self.max_used = 0.0  # max abs diff / tolerance, over rows and checks
        self.seconds = 0.0
        self.last: Report | None = None

    def summary(self) -> str:
        """One line: how many checks, the worst relative difference and tolerance used."""
        if self.checks == 0 and self.skipped == 0:
            return "verify: no checks"
        s = (f"verify ok ({self.checks} check{'s' * (self.checks != 1)}, max rel diff "
             f"{self.max_rel:.1e}, {100 * self.max_used:.0f}% of tolerance, "
             f"{self.seconds:.2f} s)")
        return s + (f", {self.skipped} skipped (non-finite loss or gradients)"
                    if self.skipped else "")

    # ------------------------------------------------------------------------------------------
    def _ddp(self) -> tuple[nn.Module, Any]:
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.module, self.model.process_group
        return self.model, None

    def _autocast(self, device_type: str) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()  # as it is at the call
        if self.autocast is False:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self.autocast)

    def _compute_dtype(self, device_type: str, param_dtype: torch.dtype) -> torch.dtype:
        if isinstance(self.autocast, torch.dtype):
            return self.autocast
        if self.autocast is None and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return param_dtype.to_real()

    def _rtol(self, dtype: torch.dtype) -> float:
        # The dtype of the compared tensor itself (a float32 .grad, a float32 loss under
        # autocast), not the autocast dtype: rounding in the low-precision ops inside shows
        # in native's own error, which the K term allows, so a bfloat16 rtol on top would
        # only hide errors of a few percent.
        if self.rtol is not None:
            return self.rtol
        rtol = VERIFY_RTOL.get(dtype.to_real())
        if rtol is None:
            raise ValueError(f"verify: no tolerance for {dtype}; pass rtol=")
        return rtol

    def _unscale(self) -> None:
        if self.scaler is None:
            return
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError as e:  # the loop unscaled already (e.g. to clip): fine
            if "already been called" not in str(e):
                raise

    def check(self, loss_fn: Callable[..., Tensor], *inputs: Any,
              loss: Tensor | None = None) -> Report:
        """Compare the ``.grad`` s (and the loss value) with native autograd's and float64's.

        Args:
            loss_fn: ``loss_fn(model, *inputs) -> Tensor``, the step's loss, computed exactly as
                the step computed it (the ``.grad`` s must hold its gradient, nothing more).
            *inputs: the tensors (and other arguments) the loss reads; see the module docstring.
            loss: the loss value the step computed (unscaled); if omitted, it is recomputed.

        Returns a :class:`Report`; raises :class:`VerifyError` if out of tolerance (unless
        ``raise_on_failure=False``).
        """
        _check_call(loss_fn, loss)
        t0 = time.perf_counter()
        inner, group = self._ddp()
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("verify: the model has no parameters that require grad")
        _refuse_dropout(inner)
        names, params = [n for n, _ in named], [p for _, p in named]
        if all(p.grad is None for p in params):
            raise ValueError("verify: no parameter has a .grad: call loss.backward() before "
                             "check()")
        self._unscale()
        ours = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]
        device_type = params[0].device.type
        dtype = self._compute_dtype(device_type, params[0].dtype)
        rtol = self._rtol(ours[0].dtype)

        with _untouched(inner, params) as rng:
            if loss is None:
                with torch.no_grad(), self._autocast(device_type):
                    loss = _scalar(loss_fn(inner, *inputs), "ours")
            if self._skip(loss, ours, params[0].device, group):
                self.skipped += 1
                self.seconds += time.perf_counter() - t0
                self.last = Report(skipped=True, dtype=dtype, rtol=rtol, k=self.k)
                return self.last
            rng.restore()  # native and float64 draw alike, should the loss draw at all
            native_l, native = self._native(loss_fn, inputs, inner, params, device_type)
            ran_in = self._refuse_random(loss_fn, inputs, inner, native_l, device_type, group)
            rng.restore()
            exact_l, exact, floor = self._exact(loss_fn, inputs, inner, named, device_type,
                                                dtype, ran_in)
        if group is not None:  # DDP averaged ours over the processes; do the same here
            native, exact = _all_mean(native, group), _all_mean(exact, group)
        loss_rtol = self._rtol(native_l.dtype)
        rows = [_loss_row(loss, native_l, exact_l, loss_rtol, self.k, floor)]
        rows += [_grad_row(n, g, gn, ge, self._rtol(g.dtype), self.k)
                 for n, g, gn, ge in zip(names, ours, native, exact)]
        report = Report(rows=rows, dtype=dtype, rtol=rtol, k=self.k, loss_floor=floor,
                        loss_rtol=loss_rtol)
        return self._verdict(report, params[0].device, group, t0)

    def _verdict(self, report: Report, device: torch.device, group: Any, t0: float) -> Report:
        """The worst row over every process; counts the check; raises if out of tolerance."""
        rows = report.rows
        worst = torch.tensor([max(r.used for r in rows), max(r.rel for r in rows[1:])],
                             dtype=torch.float64, device=device)
        worst = torch.nan_to_num(worst, nan=math.inf)
        if group is not None:  # every process must reach the same verdict
            dist.all_reduce(worst, dist.ReduceOp.MAX, group=group)
        report.used_all, rel = worst.tolist()
        self.checks += 1
        self.seconds += time.perf_counter() - t0
        self.last = report
        self.max_used = max(self.max_used, report.used_all)
        self.max_rel = max(self.max_rel, rel)
        if not report.ok and self.raise_on_failure:
            raise VerifyError(_failure(report), report)
        return report

    def _skip(self, loss: Tensor, ours: list[Tensor], device: torch.device, group: Any) -> bool:
        """A non-finite loss, or (with a scaler) non-finite gradients: no verdict on the
        backward. Under DDP, one process's skip is everyone's."""
        finite = torch.isfinite(loss.detach()).to(device, torch.float64).reshape(1)
        if self.scaler is not None:
            finite = finite * torch.stack([torch.isfinite(g).all() for g in ours]).all()
        if group is not None:
            dist.all_reduce(finite, dist.ReduceOp.MIN, group=group)
        return bool(finite.item() < 1)

    def _native(self, loss_fn: Callable[..., Tensor], inputs: tuple[Any, ...], inner: nn.Module,
                params: list[Tensor], device_type: str) -> tuple[Tensor, list[Tensor]]:
        # Scaled as ours was, so that float16 underflows alike.
        scale = 1.0 if self.scaler is None else float(self.scaler.get_scale())
        with torch.enable_grad(), use_native(), self._autocast(device_type):
            native_l = _scalar(loss_fn(inner, *inputs), "native pass")
        grads = torch.autograd.grad(native_l * scale, params, allow_unused=True)
        return native_l.detach(), [torch.zeros_like(p) if g is None else g / scale
                                   for p, g in zip(params, grads)]

    def _refuse_random(self, loss_fn: Callable[..., Tensor], inputs: tuple[Any, ...],
                       inner: nn.Module, native_l: Tensor, device_type: str, group: Any
                       ) -> list[tuple[Any, torch.dtype]]:
        """Run the native forward again, from the RNG state the native pass left (another
        one, if the loss drew from it): a loss that depends on the RNG (dropout, stochastic
        depth, noise) drew ours from a state long gone, so no comparison can be sound. Returns
        the dtype each op ran in (for the loss floor)."""
        with torch.enable_grad(), use_native(), self._autocast(device_type), \
                _DtypeRecorder() as recorder:
            again = _scalar(loss_fn(inner, *inputs), "native pass").detach()
        a, b = float(native_l), float(again)
        differs = torch.tensor([0.0 if a == b or (math.isnan(a) and math.isnan(b)) else 1.0],
                               device=native_l.device)
        if group is not None:  # every process refuses, or none
            dist.all_reduce(differs, dist.ReduceOp.MAX, group=group)
        if differs.item() > 0:
            random = [n or "the model" for n, m in inner.named_modules()
                      if m.training and type(m).__name__.endswith(_RANDOM_MODULES)]
            raise ValueError(
                f"verify: loss_fn is not deterministic: two native forwards in a row gave "
                f"{a!r} then {b!r}. It draws random numbers (dropout, stochastic depth, noise; "
                f"{', '.join(random) if random else 'in loss_fn or a module'}) or runs "
                f"non-deterministic kernels, so the gradients of the step, drawn from an RNG "
                f"state no longer there, cannot be checked. Run the checked step (loss, "
                f"backward and check) with the randomness off, e.g. with the model in eval() "
                f"mode")
        return recorder.ops

    def _exact(self, loss_fn: Callable[..., Tensor], inputs: tuple[Any, ...], inner: nn.Module,
               named: list[tuple[str, Tensor]], device_type: str, dtype: torch.dtype,
               ran_in: list[tuple[Any, torch.dtype]]) -> tuple[Tensor, list[Tensor], float]:
        bound = _Bound(inner, loss_fn)
        # Every parameter in float64, frozen ones too (else a float32 weight meets a float64
        # activation); only those compared require grad.
        p64 = {f"model.{n}": _to64(p).requires_grad_() for n, p in named}
        frozen = {f"model.{n}": _to64(p) for n, p in inner.named_parameters()
                  if f"model.{n}" not in p64}
        b64 = {f"model.{n}": _to64(b).clone() for n, b in inner.named_buffers()}
        state, x64 = {**p64, **frozen, **b64}, _to64(inputs)
        try:
            with torch.enable_grad(), use_native(), _no_autocast(device_type):
                exact_l = _scalar(torch.func.functional_call(bound, state, x64),
                                  "float64 pass")
                exact = torch.autograd.grad(exact_l, list(p64.values()), allow_unused=True)
                floor = 0.0
                with torch.no_grad():
                    spreads: list[tuple[Any, Tensor]] = []
                    for seed in range(LOSS_FLOOR_DRAWS):
                        with _RoundingNoise(dtype, ran_in, seed * 1_000_003, spreads):
                            noisy = torch.func.functional_call(bound, state, x64)
                        floor = max(floor, abs(float(noisy) - float(exact_l)))
        except RuntimeError as e:
            raise RuntimeError(
                f"verify: loss_fn failed in the float64 pass ({e}). Every floating tensor the "
                f"loss reads must come through check()'s inputs, which are cast to float64, or "
                f"be a parameter or buffer of the model, not come from loss_fn's closure (e.g. "
                f"a CrossEntropyLoss(weight=...): make it a submodule of the model, or pass "
                f"the weight through inputs)") from e
        return exact_l.detach(), [torch.zeros_like(p) if g is None else g
                                  for p, g in zip(p64.values(), exact)], floor


def check(model: nn.Module, loss_fn: Callable[..., Tensor], *inputs: Any,
          loss: Tensor | None = None, scaler: torch.amp.GradScaler | None = None,
          optimizer: torch.optim.Optimizer | None = None,
          autocast: torch.dtype | bool | None = None, rtol: float | None = None,
          k: float = VERIFY_K, raise_on_failure: bool = True) -> Report:
    """Check one step: ``Verifier(model, ...).check(loss_fn, *inputs, loss=loss)``.

    Call it after ``loss.backward()`` and before ``optimizer.step()``; ``loss_fn(model,
    *inputs)`` must compute the loss whose gradient is in the ``.grad`` s. Arguments as
    :class:`Verifier` and :meth:`Verifier.check`.

    Examples::

        >>> loss = compute_loss(model, x, y)
        >>> loss.backward()
        >>> print(torch_mlp.verify.check(model, compute_loss, x, y, loss=loss))
    """
    return Verifier(model, scaler=scaler, optimizer=optimizer, autocast=autocast, rtol=rtol,
                    k=k, raise_on_failure=raise_on_failure).check(loss_fn, *inputs, loss=loss)


def _number(value: Any, name: str, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"verify: {name} must be a number{' or None' * optional}, got "
                        f"{type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"verify: {name} must be a finite number >= 0, got {value}")


def _check_arguments(model: Any, scaler: Any, optimizer: Any, autocast: Any, rtol: Any,
                     k: Any, raise_on_failure: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"verify: model must be an nn.Module, got {type(model).__name__}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"verify: scaler must be a torch.amp.GradScaler or None, got "
                        f"{type(scaler).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"verify: optimizer must be a torch.optim.Optimizer or None, got "
                        f"{type(optimizer).__name__}")
    if scaler is not None and optimizer is None:
        raise ValueError("verify: scaler needs optimizer, to unscale the gradients with "
                         "scaler.unscale_(optimizer) before comparing them")
    if autocast is True or not (autocast is None or autocast is False
                                or isinstance(autocast, torch.dtype)):
        raise TypeError(f"verify: autocast must be a torch.dtype, None or False, got "
                        f"{autocast!r}")
    _number(rtol, "rtol", optional=True)
    _number(k, "k", optional=False)
    if not isinstance(raise_on_failure, bool):
        raise TypeError(f"verify: raise_on_failure must be a bool, got "
                        f"{type(raise_on_failure).__name__}")


def _check_call(loss_fn: Any, loss: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"verify: loss_fn must be callable (loss_fn(model, *inputs)), got "
                        f"{type(loss_fn).__name__}")
    if loss is not None and not isinstance(loss, Tensor):
        raise TypeError(f"verify: loss must be a Tensor or None, got {type(loss).__name__}")
    if loss is not None and loss.numel() != 1:
        raise ValueError(f"verify: loss must be a one-element Tensor, got shape "
                         f"{list(loss.shape)}")


# Class names of modules that draw random numbers in training mode, named in the refusal.
_RANDOM_MODULES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "StochasticDepth",
                   "DropPath", "DropBlock2d", "DropBlock3d", "GaussianNoise")


def _refuse_dropout(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"verify: {name or 'the model'} is a {type(m).__name__} in training mode: each "
                f"pass would draw another mask, so the gradients cannot be compared; check in "
                f"eval() mode or with p=0")


def _all_mean(tensors: list[Tensor], group: Any) -> list[Tensor]:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    return [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _used(diff: float, tol: float) -> float:
    return diff / tol if tol > 0 else (0.0 if diff == 0 else math.inf)


def _grad_row(name: str, ours: Tensor, native: Tensor, exact: Tensor, rtol: float, k: float
              ) -> Row:
    ours, native, exact = (t.detach().to(exact.dtype) for t in (ours, native, exact))
    diff = (ours - native).abs().max().item() if ours.numel() else 0.0
    scale = native.abs().max().item() if native.numel() else 0.0
    native_err = (native - exact).abs().max().item() if native.numel() else 0.0
    ours_err = (ours - exact).abs().max().item() if ours.numel() else 0.0
    tol = rtol * scale + k * native_err
    return Row(name, diff, diff / scale if scale > 0 else diff, tol, _used(diff, tol), ours_err,
               native_err)


def _loss_row(ours: Tensor, native: Tensor, exact: Tensor, rtol: float, k: float, floor: float
              ) -> Row:
    ours_v, native_v, exact_v = (float(t.detach().double()) for t in (ours, native, exact))
    diff = abs(ours_v - exact_v)
    native_err = abs(native_v - exact_v)
    tol = rtol * abs(exact_v) + k * max(native_err, floor)
    return Row("loss", diff, diff / abs(exact_v) if exact_v else diff, tol, _used(diff, tol),
               diff, native_err)


def _failure(report: Report) -> str:
    r = report.worst
    if r is None or not (r.used > 1 or math.isnan(r.used)):
        return (f"verify: another process's gradients differ from native autograd's beyond "
                f"tolerance ({100 * report.used_all:.0f}% of it); this process's are within.\n"
                f"{report}")
    if r.name == "loss":
        grads_ok = all(row.used <= 1 for row in report.rows[1:])
        return (f"verify: the loss value differs from the float64 loss: abs diff {r.abs:.3e} "
                f"(rel {r.rel:.3e}) > tolerance {r.tol:.3e} = {report.loss_rtol:.1e}·|loss| + "
                f"{report.k:g}·max(native's own error {r.native_err:.2e}, {report.dtype} "
                f"rounding {report.loss_floor:.2e}): the forward (value) of the loss is wrong"
                f"{'; every gradient is within tolerance' if grads_ok else ''}.\n{report}")
    return (f"verify: the gradient of {r.name} differs from native autograd's: max abs diff "
            f"{r.abs:.3e} (max rel diff {r.rel:.3e}) > tolerance {r.tol:.3e} = "
            f"{report.rtol:.1e}·max|native| + {report.k:g}·native's own error "
            f"{r.native_err:.2e} ({report.dtype}); ours is {r.ours_err:.2e} from float64. "
            f"A backward is wrong for {r.name}.\n{report}")
