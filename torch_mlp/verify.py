"""Check the hand-derived gradients against native autograd, live, inside any training loop.

After ``loss.backward()``, :func:`check` recomputes the step's loss and gradients twice and
compares them with the ``.grad`` s already there ("ours"): natively (under
:func:`torch_mlp.use_native`, in the step's dtype and autocast), which ours should match up to
rounding, and natively in float64, nearly exact, which measures native's own rounding error::

    def compute_loss(model, x, y):  # computes with the model it is given
        return F.cross_entropy(model(x), y) + F.l2_penalty(weights(model), 1e-4)

    loss = compute_loss(model, x, y)
    loss.backward()
    torch_mlp.verify.check(model, compute_loss, x, y, loss=loss)  # raises VerifyError if off
    opt.step()

Both passes run ``loss_fn(copy, *inputs)`` on a ``copy.deepcopy`` of the model (of
``model.module`` under DDP; shared parts stay shared), so the model, its buffers and the RNG
streams stay as they were whatever ``loss_fn`` does; it must compute with the model it is given.
Floating tensors among ``inputs`` (also inside lists, tuples, namedtuples, mappings and
dataclasses) are cast to float64 for the float64 pass; any other floating tensor the loss reads
must belong to the model. A loss that draws random numbers (dropout in training mode) or changes
state it reads (spectral_norm in training mode) is refused: no comparison could be sound.

Per parameter, max|ours − native| ≤ rtol·max|native| + K·max|native − float64|: native's own
error on this very batch, since near convergence a gradient is a small difference of large terms
that no fixed relative tolerance allows for. Under autocast that error holds the forward's
rounding to bfloat16 or float16 and can be as large as the gradient: a whole gradient off by
less passes (in a 784-256-10 MLP up to ×2 did), while in float32 1e-5 of it fails.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._dispatch import use_native

__all__ = ["VERIFY_K", "VERIFY_RTOL", "Report", "Row", "Verifier", "VerifyError", "check"]

# rtol: torch.testing's default for the compared tensor's dtype; K: see the module docstring.
VERIFY_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1.3e-6,
    torch.bfloat16: 1.6e-2,
    torch.float16: 1e-3,
}
VERIFY_K = 10.0


class VerifyError(AssertionError):
    """Ours differs from native autograd beyond tolerance; ``.report`` has every number."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Row:
    """One compared quantity: a parameter's gradient, or (name ``"loss"``) the loss value.

    Gradient: ``abs`` = max|ours − native|, ``tol`` = rtol·max|native| + K·native_err. Loss:
    ``abs`` = |ours − float64|, ``tol`` = rtol·|float64| + max(K·native_err, floor), the floor
    being the rounding the loss's dtype allows, u·√n·|float64| (n: the largest numel among
    parameters and inputs; u: the unit roundoff). ``used`` = abs / tol (over 1: failed)."""

    name: str
    abs: float
    rel: float  # abs / max|native| (loss: / |float64|)
    tol: float
    ours_err: float  # max|ours − float64|
    native_err: float  # max|native − float64|
    ratio: float  # ours·native / native·native: ours ≈ ratio × native

    @property
    def used(self) -> float:
        return self.abs / self.tol if self.tol > 0 else (0.0 if self.abs == 0 else math.inf)


@dataclass
class Report:
    """One check's numbers. ``rows``: the loss first, then every compared parameter."""

    rows: list[Row] = field(default_factory=list)
    dtype: torch.dtype | None = None  # the compute dtype: autocast's, else the parameters'
    rtol: float = 0.0  # the gradients' (that of their dtype)
    k: float = VERIFY_K
    loss_floor: float = 0.0
    skipped: bool = False  # a non-finite step: nothing compared
    used_all: float = 0.0  # worst `used` over all rows (under DDP: over all processes)
    autocast_from: str = ""  # where the step's autocast was learnt; "" if check() could not tell

    @property
    def ok(self) -> bool:
        return self.skipped or self.used_all <= 1  # `<=`: NaN is not ok

    @property
    def worst(self) -> Row | None:
        """The row closest to (or furthest past) its tolerance; None when skipped."""
        return max(self.rows, key=lambda r: math.inf if math.isnan(r.used) else r.used,
                   default=None)

    def __str__(self) -> str:
        if self.skipped:
            return "verify: step skipped (non-finite loss or gradients)"
        w = max([len("name"), *(len(r.name) for r in self.rows)])
        lines = [f"verify vs native autograd ({self.dtype}, tol = {self.rtol:.1e}·max|native| + "
                 f"{self.k:g}·native's error vs float64): {'ok' if self.ok else 'FAILED'}",
                 f"{'name':<{w}}  {'abs diff':>9}  {'rel diff':>9}  {'tol':>9}  {'used':>6}  "
                 f"{'ours err':>9}  {'nat. err':>9}"]
        for r in self.rows:
            lines.append(f"{r.name:<{w}}  {r.abs:9.2e}  {r.rel:9.2e}  {r.tol:9.2e}  "
                         f"{100 * r.used:5.0f}%  {r.ours_err:9.2e}  {r.native_err:9.2e}")
        return "\n".join(lines)


class Verifier:
    """Checks steps of one model against native autograd; counts checks and skipped steps.

    Args:
        model: the model whose ``.grad`` s are checked, or a ``DistributedDataParallel`` wrapping
            one (native and float64 gradients are then averaged over the processes, as ours).
        scaler: the loop's ``torch.amp.GradScaler``: ``check`` calls ``scaler.unscale_(optimizer)``
            (fine if the loop did), divides the gradients of parameters the optimizer does not
            hold by ``scaler.get_scale()``, and skips a step with non-finite gradients.
        optimizer: the optimizer the scaler unscales (needed with ``scaler``).
        autocast: the step's autocast dtype, or ``False``; ``None``: the autocast at the call,
            else whichever of none, bfloat16 and float16 reproduces ``loss=`` (none if ``loss``
            is omitted or none clearly does).
        rtol: overrides ``VERIFY_RTOL`` of each compared tensor's dtype.
        k: the multiple of native's own rounding error allowed (``VERIFY_K``).
        raise_on_failure: raise :class:`VerifyError` when out of tolerance, else return.
    """

    def __init__(self, model: nn.Module, *, scaler: torch.amp.GradScaler | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 autocast: torch.dtype | bool | None = None, rtol: float | None = None,
                 k: float = VERIFY_K, raise_on_failure: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"verify: model must be an nn.Module, got {type(model).__name__}")
        if scaler is not None and optimizer is None:
            raise ValueError("verify: scaler needs optimizer, to unscale the gradients with "
                             "scaler.unscale_(optimizer) before comparing them")
        for name, value in (("rtol", 0.0 if rtol is None else rtol), ("k", k)):
            if not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"verify: {name} must be a finite number ≥ 0, got {value!r}")
        self.model, self.scaler, self.optimizer = model, scaler, optimizer
        self.autocast, self.rtol, self.k = autocast, rtol, k
        self.raise_on_failure = raise_on_failure
        self.checks = self.skipped = 0
        self.max_rel = 0.0  # max |g_ours − g_native| / max |g_native| over parameters and checks
        self.max_used = 0.0  # max abs diff / tolerance, over rows and checks
        self.seconds = 0.0

    def summary(self) -> str:
        """One line: how many checks, the worst relative difference and tolerance used."""
        if self.checks == 0 and self.skipped == 0:
            return "verify: no checks"
        skipped = f", {self.skipped} skipped (non-finite loss or gradients)" if self.skipped else ""
        return (f"verify ok ({self.checks} check{'s' * (self.checks != 1)}, max rel diff "
                f"{self.max_rel:.1e}, {100 * self.max_used:.0f}% of tolerance, "
                f"{self.seconds:.2f} s){skipped}")

    def check(self, loss_fn: Callable[..., Tensor], *inputs: Any,
              loss: Tensor | float | None = None) -> Report:
        """Compare the ``.grad`` s and the loss value with native autograd's and float64's.

        ``loss_fn(model, *inputs) -> Tensor`` computes the step's loss with the model it is
        given; ``loss`` is the (unscaled) loss the step computed, recomputed if omitted. Raises
        :class:`VerifyError` if out of tolerance."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("verify: check() was called under torch.inference_mode(), where "
                               "no gradient can be computed; call it outside that block")
        if not callable(loss_fn):
            raise TypeError(f"verify: loss_fn must be callable as loss_fn(model, *inputs), got "
                            f"{type(loss_fn).__name__}")
        t0 = time.perf_counter()
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        inner, group = (self.model.module, self.model.process_group) if ddp else (self.model, None)
        named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
        _refuse_unsupported(named, inputs)
        if all(p.grad is None for _, p in named):
            raise ValueError("verify: no parameter has a .grad: call loss.backward() first")
        ours, outside = self._ours(named)
        device = named[0][1].device
        cuda = sorted({p.device.index or 0 for _, p in named if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            ac, source = self._step_autocast(loss_fn, inputs, inner, loss)
            if loss is None:  # recomputed with ours
                loss = _run(loss_fn, inputs, inner, _clone, ac, native=False)[2]
            if self._skip(loss, ours, device, group):
                self.skipped += 1
                return Report(skipped=True, dtype=ac or named[0][1].dtype, autocast_from=source)
            scale = 1.0 if self.scaler is None else float(self.scaler.get_scale())
            rng = _rng_states(cuda)
            twin, native_l, native = _pass(loss_fn, inputs, inner, named, _clone, ac, scale)
            _refuse_incomparable(loss_fn, inputs, inner, twin, native_l, ac, rng, cuda)
            try:
                *_, exact_l, exact = _pass(loss_fn, inputs, inner, named, _to64, None, 1.0)
            except RuntimeError as e:
                raise RuntimeError(
                    f"verify: loss_fn failed in the float64 pass ({e}). Floating tensors must come "
                    f"through check()'s inputs or belong to the model: one in loss_fn's closure, "
                    f"e.g. a CrossEntropyLoss(weight=...), is not cast") from e
        if group is not None:  # DDP averaged ours over the processes; do the same here
            native, exact = _all_mean(native, group), _all_mean(exact, group)
        # The loss's floor: u·√n·|loss| for a sum of n terms rounded in any order (u = eps / 2).
        n_max = max(t.numel() for t in [*inner.parameters(), *_tensors(inputs)])
        u = max(torch.finfo(native_l.dtype).eps / 2 * math.sqrt(n_max),
                torch.finfo(ac).eps / 2 if ac else 0.0)
        report = Report(dtype=ac or named[0][1].dtype, rtol=self._rtol(ours[0].dtype), k=self.k,
                        loss_floor=u * abs(exact_l.item()), autocast_from=source)
        report.rows = [_loss_row(loss, native_l, exact_l, self._rtol(native_l.dtype), self.k,
                                 report.loss_floor)]
        report.rows += [_grad_row(n, g, gn, ge, self._rtol(g.dtype), self.k)
                        for (n, _), g, gn, ge in zip(named, ours, native, exact)]
        return self._verdict(report, outside, device, group, t0)

    def _ours(self, named: list[tuple[str, Tensor]]) -> tuple[list[Tensor], set[str]]:
        """The .grads, unscaled; and the names of those the optimizer does not hold, which
        ``scaler.unscale_(optimizer)`` leaves scaled (so divided by the scale here)."""
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for _, p in named]
        if self.scaler is None:
            return grads, set()
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError as e:  # the loop unscaled already (e.g. to clip): fine
            if "already been called" not in str(e):
                raise
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        outside = {n for n, p in named if id(p) not in held}
        scale = float(self.scaler.get_scale())
        return [g / scale if n in outside else g for (n, _), g in zip(named, grads)], outside

    def _step_autocast(self, loss_fn: Callable[..., Tensor], inputs: tuple[Any, ...],
                       model: nn.Module, loss: Any) -> tuple[torch.dtype | None, str]:
        """The step's autocast dtype (None: none) and where it was learnt ("": unknown)."""
        device_type = next(model.parameters()).device.type
        if self.autocast is not None:
            return self.autocast or None, "autocast="
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type), "the autocast at the call"
        if loss is None:
            return None, ""
        # Native reproduces the step's loss under its autocast only (a bf16 op may be a cast).
        step, off = float(torch.as_tensor(loss).detach()), {}
        for dtype in (None, torch.bfloat16, torch.float16):
            off[dtype] = abs(_run(loss_fn, inputs, model, _clone, dtype)[2].item() - step)
            if off[None] == 0:  # bitwise: no autocast, no need to try the others
                return None, "the loss's value"
        best, second = sorted(off, key=lambda d: off[d])[:2]  # stable: a tie goes to None
        return (best, "the loss's value") if off[best] <= off[second] / 2 else (None, "")

    def _rtol(self, dtype: torch.dtype) -> float:
        return VERIFY_RTOL[dtype.to_real()] if self.rtol is None else self.rtol

    def _skip(self, loss: Any, ours: list[Tensor], device: torch.device, group: Any) -> bool:
        """A non-finite loss, or (with a scaler) non-finite gradients: no verdict on the
        backward. Under DDP, one process's skip is everyone's."""
        finite = torch.as_tensor(loss).isfinite().all().reshape(1).to(device, torch.float64)
        if self.scaler is not None:
            finite = finite * torch.stack([torch.isfinite(g).all() for g in ours]).all()
        if group is not None:
            dist.all_reduce(finite, dist.ReduceOp.MIN, group=group)
        return bool(finite.item() < 1)

    def _verdict(self, report: Report, outside: set[str], device: torch.device, group: Any,
                 t0: float) -> Report:
        """The worst row over every process; counts the check; raises if out of tolerance."""
        rows = report.rows
        worst = torch.tensor([max(r.used for r in rows), max(r.rel for r in rows[1:])],
                             dtype=torch.float64, device=device).nan_to_num(math.inf)
        if group is not None:  # every process must reach the same verdict
            dist.all_reduce(worst, dist.ReduceOp.MAX, group=group)
        report.used_all, rel = worst.tolist()
        self.checks += 1
        self.seconds += time.perf_counter() - t0
        self.max_used = max(self.max_used, report.used_all)
        self.max_rel = max(self.max_rel, rel)
        if not report.ok and self.raise_on_failure:
            raise VerifyError(_failure(report, outside), report)
        return report


def check(model: nn.Module, loss_fn: Callable[..., Tensor], *inputs: Any,
          loss: Tensor | float | None = None, scaler: torch.amp.GradScaler | None = None,
          optimizer: torch.optim.Optimizer | None = None,
          autocast: torch.dtype | bool | None = None, rtol: float | None = None,
          k: float = VERIFY_K, raise_on_failure: bool = True) -> Report:
    """Check one step, after ``loss.backward()`` and before ``optimizer.step()``:
    ``Verifier(model, ...).check(loss_fn, *inputs, loss=loss)``."""
    return Verifier(model, scaler=scaler, optimizer=optimizer, autocast=autocast, rtol=rtol,
                    k=k, raise_on_failure=raise_on_failure).check(loss_fn, *inputs, loss=loss)


def _run(loss_fn: Callable[..., Tensor], inputs: tuple[Any, ...], model: nn.Module,
         cast: Callable[[Tensor], Tensor], ac: torch.dtype | None, native: bool = True,
         grad: bool = False) -> tuple[nn.Module, dict[int, Any], Tensor]:
    """``loss_fn`` on copies of the model and inputs, tensors ``cast(t)``, under autocast ``ac``,
    native (else ours), with a graph if ``grad``: the copy, its memo (:func:`_copy`), the loss."""
    twin, memo = _copy(model, cast)
    with (torch.set_grad_enabled(grad), use_native(native),
          _autocast(next(model.parameters()).device.type, ac)):
        loss = loss_fn(twin, *_map(cast, inputs))
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"verify: loss_fn must return the loss as a one-element Tensor, got "
                        f"{getattr(loss, 'shape', type(loss).__name__)}")
    return twin, memo, loss


def _pass(loss_fn: Callable[..., Tensor], inputs: tuple[Any, ...], model: nn.Module,
          named: list[tuple[str, Tensor]], cast: Callable[[Tensor], Tensor],
          ac: torch.dtype | None, scale: float) -> tuple[nn.Module, Tensor, list[Tensor]]:
    """:func:`_run` with native autograd, the loss scaled as ours was (float16 underflows alike):
    the copy, the loss, and the gradients of the parameters ``named``."""
    twin, memo, loss = _run(loss_fn, inputs, model, cast, ac, grad=True)
    params = [p for _, p in named]
    grads = torch.autograd.grad(loss, [*(memo[id(p)] for p in params), *params],
                                torch.full_like(loss, scale), allow_unused=True)
    for (n, _), g in zip(named, grads[len(params):]):
        if g is not None:  # a gradient for the model's own parameter, not the copy's
            raise ValueError(f"verify: loss_fn computes with {n} of the model in its closure: "
                             f"compute the loss with the model it is given (check() passes a copy)")
    return twin, loss, [torch.zeros_like(p) if g is None else g / scale
                        for p, g in zip(params, grads)]


def _refuse_incomparable(loss_fn: Callable[..., Tensor], inputs: tuple[Any, ...],
                         model: nn.Module, twin: nn.Module, loss: Tensor,
                         ac: torch.dtype | None, rng: list[Tensor], cuda: list[int]) -> None:
    """After the native pass: refuse a loss_fn that drew random numbers or changed state its
    value depends on; ours came from a step whose state is gone."""
    if not all(map(torch.equal, rng, _rng_states(cuda))):
        raise ValueError("verify: loss_fn draws random numbers (dropout, stochastic depth, "
                         "noise) from a state the step left: check a step run in eval() mode")
    state = dict([*twin.named_parameters(), *twin.named_buffers()])
    changed = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if not torch.equal(t, state[n])]
    if changed:  # harmless if the loss does not read it (BatchNorm's running stats): shift, rerun
        with torch.no_grad(), use_native(), _autocast(loss.device.type, ac):
            for n in changed:
                state[n].copy_(state[n] + 1)
            again = loss_fn(twin, *_map(_clone, inputs))
        if not torch.equal(again, loss.detach()):
            raise ValueError(f"verify: loss_fn changes the model's {', '.join(changed)} as it "
                             f"runs, and the loss depends on it (e.g. spectral_norm in training "
                             f"mode), so the step's state is gone: check a step run in eval() mode")


def _copy(model: nn.Module, cast: Callable[[Tensor], Tensor]) -> tuple[nn.Module, dict[int, Any]]:
    """``copy.deepcopy(model)`` whose parameters, buffers and tensor attributes are fresh
    ``cast(t)``; returns it and the memo (id of the model's tensor → the copy's)."""
    memo: dict[int, Any] = {id(p): nn.Parameter(cast(p), p.requires_grad)
                            for p in model.parameters()}
    for m in model.modules():
        if isinstance(m, torch.jit.ScriptModule):  # deepcopy would not copy its parameters
            raise TypeError(f"verify: check() cannot copy the torch.jit.ScriptModule in the model "
                            f"({type(m).__name__}): check the module before torch.jit.script")
        # Tensor attributes too: e.g. spectral_norm's `weight`, which deepcopy refuses to copy.
        for t in [*m.buffers(recurse=False), *(v for v in vars(m).values() if torch.is_tensor(v))]:
            if id(t) not in memo:
                memo[id(t)] = cast(t)
    try:
        return copy.deepcopy(model, memo), memo
    except Exception as e:  # e.g. an attribute holding a lock or an open file
        raise TypeError(f"verify: check() computes on copies of the model, and copy.deepcopy "
                        f"failed on it: {e}") from e


def _clone(t: Tensor) -> Tensor:
    return t.detach().clone()


def _to64(t: Tensor) -> Tensor:
    """A float64 (complex: complex128) copy of a floating tensor; others copied as they are."""
    to = torch.complex128 if t.is_complex() else torch.float64 if t.is_floating_point() else None
    return t.detach().to(to or t.dtype, copy=True)


def _map(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """``fn`` on every tensor in obj, also in lists, tuples, namedtuples, mappings, dataclasses."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map(fn, getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_map(fn, o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(fn, o) for o in obj)
    if isinstance(obj, Mapping):  # dict, UserDict (e.g. Hugging Face's BatchEncoding), ...
        items = {k: _map(fn, v) for k, v in obj.items()}
        return items if isinstance(obj, dict) else type(obj)(items)
    return obj


def _tensors(obj: Any) -> list[Tensor]:
    found: list[Tensor] = []
    _map(found.append, obj)
    return found


def _refuse_unsupported(named: list[tuple[str, Tensor]], inputs: tuple[Any, ...]) -> None:
    """Meta and sparse tensors: one clear error rather than a failure deep inside a pass."""
    tensors = [(f"parameter {n}", p) for n, p in named]
    tensors += [(f"the .grad of {n}", p.grad) for n, p in named if p.grad is not None]
    tensors += [(f"input {i}", t) for i, x in enumerate(inputs) for t in _tensors(x)]
    for what, t in tensors:
        if t.is_meta or t.layout != torch.strided:
            raise ValueError(f"verify: {what} is {'a meta tensor' if t.is_meta else 'sparse'} "
                             f"({t.layout}): check() compares dense tensors with values")


def _autocast(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def _rng_states(cuda: list[int]) -> list[Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in cuda)]


def _all_mean(tensors: list[Tensor], group: Any) -> list[Tensor]:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    return [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _grad_row(name: str, ours: Tensor, native: Tensor, exact: Tensor, rtol: float, k: float
              ) -> Row:
    ours, native = ours.to(exact.dtype), native.to(exact.dtype)
    diff, scale, ours_err, native_err = (t.abs().max().item() if t.numel() else 0.0 for t in
                                         (ours - native, native, ours - exact, native - exact))
    tol = rtol * scale + k * native_err
    ratio = (ours * native).sum() / (native * native).sum()
    return Row(name, diff, diff / scale if scale > 0 else diff, tol, ours_err, native_err,
               ratio.item())


def _loss_row(ours: Any, native: Tensor, exact: Tensor, rtol: float, k: float, floor: float
              ) -> Row:
    ours_v, native_v, exact_v = (float(torch.as_tensor(t).detach()) for t in (ours, native, exact))
    diff, native_err = abs(ours_v - exact_v), abs(native_v - exact_v)
    tol = rtol * abs(exact_v) + max(k * native_err, floor)
    return Row("loss", diff, diff / abs(exact_v) if exact_v else diff, tol, diff, native_err,
               ours_v / native_v if native_v else math.nan)


def _failure(report: Report, outside: set[str]) -> str:
    r = report.worst
    if r is None or r.used <= 1:  # NaN is not <= 1
        return (f"verify: another process's gradients differ from native autograd's beyond "
                f"tolerance ({100 * report.used_all:.0f}% of it); this one's are within.\n{report}")
    what, blame = ((f"the gradient of {r.name} differs from native autograd's",
                    f"the backward of an op that uses {r.name}, or of one after it, is wrong")
                   if r.name != "loss" else ("the loss value differs from the float64 loss",
                                             "the loss's forward is wrong, or loss= is not "
                                             "the loss of these inputs"))
    loss_bad, *grads_bad = [not row.used <= 1 for row in report.rows]
    if not report.autocast_from and any(grads_bad):  # gradients within: autocast matters not
        blame = (f"check() could not tell whether the step ran under autocast: pass "
                 f"autocast=<its dtype> (False: none); if it still fails, {blame}")
    elif r.name in outside:
        blame = (f"{r.name} is not in the optimizer, so check() took its gradient as still scaled "
                 f"by the GradScaler: if the loop unscaled it already, that is why; else {blame}")
    ratios = [row.ratio for row, bad in zip(report.rows[1:], grads_bad) if bad]
    j = round(math.log2(ratios[0])) if ratios and 0 < ratios[0] < math.inf else 0
    if j and all(abs(x / 2.0**j - 1) < 1e-2 for x in ratios):  # a scale, not a derivation's bug
        blame += (f". Every failing gradient is exactly {2.0**j:g}× native's: was zero_grad() "
                  f"skipped, or a GradScaler's scale not passed as scaler=?")
    if loss_bad:
        blame += (f". The {'gradients differ' if r.name == 'loss' else 'loss differs'} too: were "
                  f"these the step's inputs?" if any(grads_bad) else
                  "; every gradient is within tolerance")
    return (f"verify: {what}: max abs diff {r.abs:.3e} (rel {r.rel:.3e}) > tolerance {r.tol:.3e} "
            f"({report.dtype}): {blame}{'' if blame.endswith('?') else '.'}\n{report}")

