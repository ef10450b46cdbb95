#!/usr/bin/env python
"""Train an MLP on MNIST with torch_mlp's hand-derived backward passes, checked against native
autograd while it trains.

Examples::

    python train.py                                  # the default run (make train)
    python train.py --hidden 512 256 --epochs 5      # two hidden layers
    python train.py --native                         # the same network with torch.nn + autograd
    python train.py --limit 2000 --epochs 2          # a smoke run on 2000 training images
    python train.py --resume runs/<run>/checkpoint.pt
    torchrun --nproc_per_node=2 train.py             # DistributedDataParallel, 2 processes

Every ``--verify-every`` steps (default: the first step of every epoch) torch_mlp.verify
compares the gradients the optimizer is about to use with native autograd's and float64's on
the same batch; a difference beyond tolerance stops the run. verify.png shows both errors.

Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel.
``--batch-size`` is the GLOBAL batch: each of the W processes takes batch-size/W samples of
it, so a DDP run follows the same trajectory as one process, up to float rounding. Only rank 0
prints and writes. The command line, checkpoints, DDP plumbing and plots are in
torch_mlp.training; this file is the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import Tensor, nn

import torch_mlp
import torch_mlp.verify
from torch_mlp import functional as MF
from torch_mlp.data import MNISTTensors, atomic_write, load_mnist, prepare_mnist, shuffled_batches
from torch_mlp.training.checkpoint import (
    first_line,
    load_checkpoint,
    make_checkpoint,
    restore,
    save_checkpoint,
)
from torch_mlp.training.config import (  # noqa: F401  (DEFAULTS, LR_DEFAULTS: re-exported)
    DEFAULTS,
    LR_DEFAULTS,
    build_parser,
    merge_resume_args,
    out_problem,
    parse_args,
    resolve_device,
)
from torch_mlp.training.distributed import Dist
from torch_mlp.training.distributed import init_distributed as _init_distributed
from torch_mlp.training.errors import (
    CheckpointError,
    NonFiniteLossError,
    TrainingError,
    VerifyError,
)
from torch_mlp.training.metrics import VERIFY_ERR_PREFIXES, write_metrics_csv
from torch_mlp.training.plots import write_curves, write_verify, write_weights

IN_FEATURES, NUM_CLASSES = 784, 10
EVAL_BATCH = 2000
# The fastest optimizer implementation measured here (docs/performance.md): fused kernels on
# cpu and cuda, else foreach.
FUSED_DEVICES = ("cpu", "cuda")


# ------------------------------------------------------------------------------ model, loss
def build_model(hidden: Sequence[int], native: bool = False) -> nn.Module:
    """MLP 784-hidden-10 from torch_mlp's modules, or (``native``) the very same network, same
    initial values, made of torch.nn modules."""
    model = torch_mlp.MLP(IN_FEATURES, list(hidden), NUM_CLASSES)
    return nn.Sequential(*torch_mlp.convert(model, to_native=True)) if native else model


def _linear_weights(model: nn.Module) -> list[Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, torch_mlp.Linear))]


def native_loss(logits: Tensor, y: Tensor, weights: Sequence[Tensor], l2: float,
                label_smoothing: float) -> Tensor:
    """F.cross_entropy + ½λΣ‖W‖², all in native autograd."""
    loss = TF.cross_entropy(logits, y, label_smoothing=label_smoothing)
    return loss + 0.5 * l2 * sum(w.square().sum() for w in weights) if l2 > 0 else loss


def custom_loss(logits: Tensor, y: Tensor, weights: Sequence[Tensor], l2: float,
                label_smoothing: float) -> Tensor:
    """torch_mlp's cross_entropy + l2_penalty: the hand-derived backward passes."""
    loss = MF.cross_entropy(logits, y, label_smoothing=label_smoothing)
    return loss + MF.l2_penalty(list(weights), l2) if l2 > 0 else loss


def forward_loss(model: nn.Module, weights: list[Tensor], x: Tensor, y: Tensor, l2: float,
                 label_smoothing: float, native: bool) -> tuple[Tensor, Tensor]:
    """The training step's forward: (loss, logits (B, 10))."""
    logits = model(x)
    loss_fn = native_loss if native else custom_loss
    return loss_fn(logits, y, weights, l2, label_smoothing), logits


def verified_loss(model: nn.Module, x: Tensor, y: Tensor, l2: float,
                  label_smoothing: float) -> Tensor:
    """forward_loss's loss as torch_mlp.verify re-runs it (native, float64): the weights are
    read from ``model`` at the call, so verify's float64 copies are the ones penalised."""
    return custom_loss(model(x), y, _linear_weights(model), l2, label_smoothing)


@torch.no_grad()
def _eval_sums(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = EVAL_BATCH) -> Tensor:
    """[Σ cross-entropy, number correct] over (x, y), as a float64 tensor on x's device."""
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = model(xb).float()
        sums[0] += TF.cross_entropy(logits, yb, reduction="sum")
        sums[1] += (logits.argmax(-1) == yb).sum()
    return sums


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = EVAL_BATCH
             ) -> dict[str, float]:
    """Mean cross-entropy (no smoothing, no L2) and accuracy of ``model`` on (x, y)."""
    was_training = model.training
    model.eval()
    try:
        loss_sum, correct = _eval_sums(model, x, y, batch_size).tolist()
    finally:
        model.train(was_training)
    n = max(len(y), 1)
    return {"loss": loss_sum / n, "acc": correct / n}


# ------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """Everything one run works with; ``step``, ``history`` and ``last_good`` advance."""

    args: argparse.Namespace
    dd: Dist
    device: torch.device
    out: Path
    data: MNISTTensors  # on the device, --limit applied
    module: nn.Module  # the MLP; ``model`` is it, or its DDP wrapper
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    verify_every: int
    shuffle: torch.Generator
    step_fn: Any = forward_loss
    start_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_good: tuple[Path, int] | None = None  # the checkpoint a divergence falls back to

    def say(self, *a: Any, **k: Any) -> None:
        if self.dd.is_main:
            print(*a, **k)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def diverged(self) -> str:
        lr = ("start a new run with a lower --lr (--resume keeps the checkpoint's)"
              if self.args.resume is not None else "try a lower --lr")
        if self.last_good is None:
            return f"training diverged; {lr}. Stopped; no checkpoint was written."
        path, epoch = self.last_good
        return (f"training diverged; {lr}. Stopped; the last good checkpoint, {path} (after "
                f"epoch {epoch}), is kept.")


def make_optimizer(args: argparse.Namespace, module: nn.Module, total_steps: int,
                   device: torch.device) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer (fused or foreach, see FUSED_DEVICES) and the per-step lr schedule."""
    impl = {"fused": True} if device.type in FUSED_DEVICES else {"foreach": True}
    if args.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            module.parameters(), lr=args.lr, momentum=args.momentum,
            nesterov=args.nesterov and args.momentum > 0, **impl)
    else:
        optimizer = torch.optim.Adam(module.parameters(), lr=args.lr,
                                     betas=(args.momentum, 0.999), **impl)
    if args.schedule == "onecycle":  # momentum is not cycled: --momentum means what it says
        return optimizer, torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=total_steps, cycle_momentum=False)
    if args.schedule == "cosine":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return optimizer, None


def _memory_available(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, IndexError):  # Linux: free + reclaimable
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _memory_problem(args: argparse.Namespace, device: torch.device) -> str | None:
    """Whether parameters, gradients, optimizer state and a batch's activations (float32)
    fit in the memory available, as a message if not."""
    sizes = [IN_FEATURES, *args.hidden, NUM_CLASSES]
    params = sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))
    state = 2 if args.optimizer == "adam" else int(args.momentum > 0)
    need = 4 * (params * (2 + state) + 3 * max(args.batch_size, EVAL_BATCH) * sum(sizes))
    free = _memory_available(device)
    if free is None or need <= free:
        return None
    return (f"--hidden {' '.join(map(str, args.hidden))}: the model needs at least "
            f"{need / 2**30:,.1f} GiB (parameters, gradients, optimizer state, activations), "
            f"and {device} has {free / 2**30:,.1f} GiB available")


def _check_out(args: argparse.Namespace, dd: Dist, device: torch.device) -> Path:
    """The run directory, checked (not created yet: a data error must leave none behind)."""
    if args.out is None:
        args.out = str(Path(args.resume).parent if args.resume is not None
                       else Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    out = Path(args.out)
    problem = _memory_problem(args, device)
    if problem:
        raise TrainingError(problem)
    if dd.is_main:
        problem = out_problem(out)
        if problem:
            raise TrainingError(f"--out {out}: {problem}")
        ck = out / "checkpoint.pt"
        if ck.exists() and (args.resume is None or Path(args.resume).resolve() != ck.resolve()):
            raise TrainingError(f"{out} already holds a checkpoint.pt of another run: continue "
                                f"it with --resume {ck}, or choose another --out")
    return out


def _load_data(args: argparse.Namespace, dd: Dist, device: torch.device, out: Path,
               data: MNISTTensors | None) -> MNISTTensors:
    """MNIST on the device (rank 0 unpacks or checks it first), then the run directory."""
    if data is None:
        try:
            if dd.is_main:
                prepare_mnist(args.data_dir, log=not args.quiet)
            dd.barrier()
            data = load_mnist(args.data_dir, device)
        except OSError as e:
            raise TrainingError(f"--data-dir {args.data_dir}: cannot read MNIST there "
                                f"({first_line(e)})") from e
    if dd.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"--out {out}: cannot create it ({first_line(e)})") from e
    n = args.limit
    return MNISTTensors(data.x_train[:n].to(device), data.y_train[:n].to(device),
                        data.x_test.to(device), data.y_test.to(device))


def _steps_per_epoch(args: argparse.Namespace, dd: Dist, n_train: int) -> int:
    if args.batch_size % dd.world_size:
        raise TrainingError(f"--batch-size {args.batch_size} must be divisible by the number "
                            f"of processes ({dd.world_size})")
    steps = math.ceil((n_train - n_train % dd.world_size) / args.batch_size)
    if steps == 0:
        raise TrainingError(
            f"--limit {args.limit}: {n_train} training image(s) give no step over "
            f"{dd.world_size} processes (each takes an equal share); use --limit >= "
            f"{dd.world_size}")
    return steps


def setup(args: argparse.Namespace, dd: Dist, data: MNISTTensors | None) -> Run:
    """Check the flags against the machine, load the data, build the model and optimizer, and
    restore the checkpoint of --resume."""
    device = resolve_device(args.device, dd.local_rank)
    ck = None
    if args.resume is not None:
        ck = load_checkpoint(args.resume, map_location=device)
        merge_resume_args(args, ck, args.resume)
        sizes = [IN_FEATURES, *args.hidden, NUM_CLASSES]
        if list(ck["sizes"]) != sizes:
            raise CheckpointError(
                f"checkpoint {args.resume} holds an MLP {'-'.join(map(str, ck['sizes']))}, "
                f"this run builds {'-'.join(map(str, sizes))}: another architecture")
    out = _check_out(args, dd, device)
    data = _load_data(args, dd, device, out, data)
    steps = _steps_per_epoch(args, dd, len(data.y_train))
    # --native has no hand-derived part: native against native would check nothing.
    verify_every = 0 if args.native else steps if args.verify_every is None else args.verify_every
    amp_dtype = None
    if args.amp:
        amp_dtype = {"cpu": torch.bfloat16, "cuda": torch.float16}.get(device.type)
        if amp_dtype is None:
            raise TrainingError(f"--amp supports cpu and cuda, not {device.type}")
    torch.manual_seed(args.seed)
    module = build_model(args.hidden, args.native).to(device)
    optimizer, scheduler = make_optimizer(args, module, steps * args.epochs, device)
    run = Run(args, dd, device, out, data, module, module, optimizer, scheduler,
              torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None, amp_dtype,
              steps, verify_every, torch.Generator().manual_seed(args.seed))
    if ck is not None:
        restore(ck, args.resume, model=module, optimizer=optimizer, scheduler=scheduler,
                scaler=run.scaler, shuffle=run.shuffle, device=device)
        run.start_epoch, run.step = int(ck["epoch"]), int(ck["step"])
        run.history = list(ck.get("history", []))
        run.last_good = (Path(args.resume), run.start_epoch)
        run.say(f"resuming {args.resume} after epoch {run.start_epoch} (step {run.step})")
    if dd.enabled:
        run.model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:  # under DDP, DDPOptimizer splits the graph at buckets: no fullgraph
        run.step_fn = torch.compile(forward_loss, fullgraph=not dd.enabled)
    return run


def write_config(run: Run) -> None:
    """config.json: the flags and what they resolved to; and the run's one-line header."""
    n_params = sum(p.numel() for p in run.module.parameters())
    sizes = [IN_FEATURES, *run.args.hidden, NUM_CLASSES]
    config = {
        **{k: v for k, v in vars(run.args).items() if k != "explicit"},
        "resolved": {
            "device": str(run.device), "world_size": run.dd.world_size,
            "steps_per_epoch": run.steps_per_epoch, "verify_every": run.verify_every,
            "train_size": len(run.data.y_train), "test_size": len(run.data.y_test),
            "sizes": sizes, "parameters": n_params, "amp_dtype": str(run.amp_dtype),
            "optimizer_impl": "fused" if run.device.type in FUSED_DEVICES else "foreach",
            "torch": str(torch.__version__),
        },
    }
    if run.dd.is_main:
        atomic_write(run.out / "config.json",
                     lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    kind = "torch.nn + native autograd" if run.args.native else "torch_mlp (hand-derived backward)"
    ddp = f" x{run.dd.world_size} processes (DDP)" if run.dd.enabled else ""
    run.say(f"MLP {'-'.join(map(str, sizes))} ({n_params:,} parameters), {kind}, on "
            f"{run.device}{ddp}; {len(run.data.y_train)} training images, "
            f"{run.steps_per_epoch} steps/epoch; run dir {run.out}")


# ------------------------------------------------------------------------------ one epoch
def _one_line(err: torch_mlp.verify.VerifyError) -> str:
    """The verdict's first line and every row's numbers, on one line (one CLI error line)."""
    head = str(err).splitlines()[0].removeprefix("verify: ")
    rows = "; ".join(f"{r.name}: abs {r.abs:.2e} rel {r.rel:.2e} tol {r.tol:.2e}"
                     for r in err.report.rows)
    return f"{head} All: {rows}."


def verify_step(run: Run, verifier: torch_mlp.verify.Verifier, errors: dict[str, float],
                x: Tensor, y: Tensor, loss: Tensor) -> None:
    """Check this step's .grads; keep each parameter's max error (ours, native) vs float64."""
    try:
        report = verifier.check(verified_loss, x, y, run.args.l2, run.args.label_smoothing,
                                loss=loss.detach())
    except torch_mlp.verify.VerifyError as e:
        raise VerifyError(f"--verify-every: at step {run.step}: {_one_line(e)}", e.report) from e
    for row in report.rows[1:]:  # rows[0] is the loss value
        for prefix, err in zip(VERIFY_ERR_PREFIXES, (row.ours_err, row.native_err)):
            errors[prefix + row.name] = max(errors.get(prefix + row.name, 0.0), err)


def train_step(run: Run, x: Tensor, y: Tensor, verifier: torch_mlp.verify.Verifier | None,
               errors: dict[str, float]) -> tuple[Tensor, Tensor]:
    """One optimizer step on (x, y); with a ``verifier``, the .grads are checked between
    backward and step (:func:`verify_step`)."""
    args = run.args
    with run.autocast():
        loss, logits = run.step_fn(run.model, _linear_weights(run.module), x, y, args.l2,
                                   args.label_smoothing, args.native)
    run.optimizer.zero_grad(set_to_none=True)
    (loss if run.scaler is None else run.scaler.scale(loss)).backward()
    if verifier is not None:
        verify_step(run, verifier, errors, x, y, loss)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    if run.scheduler is not None:
        run.scheduler.step()
    return loss.detach(), logits.detach()


def check_finite(run: Run, window: list[Tensor], epoch: int, batch: int) -> float:
    """Stop, naming the first step whose loss is not finite (all processes together); else
    return the window's last loss."""
    losses = torch.stack(window).float()
    bad = (~torch.isfinite(losses)).float()
    if run.dd.enabled:
        run.dd.all_reduce(bad, dist.ReduceOp.MAX)
    if bad.any():
        first = int(bad.argmax())
        raise NonFiniteLossError(
            f"loss is {losses[first].item()} at step {run.step - len(window) + first} (epoch "
            f"{epoch}, batch {batch - len(window) + 1 + first}): training diverged; "
            f"{run_lower_lr(run)}. Stopped; {run_kept(run)}.")
    return losses[-1].item()


def run_lower_lr(run: Run) -> str:  # --resume keeps the checkpoint's flags: advise what works
    if run.args.resume is not None:
        return "start a new run with a lower --lr (--resume keeps the checkpoint's)"
    return "try a lower --lr"


def run_kept(run: Run) -> str:
    if run.last_good is None:
        return "no checkpoint was written"
    path, epoch = run.last_good
    return f"the last good checkpoint, {path} (after epoch {epoch}), is kept"


def _progress_bar(run: Run, epoch: int, total: int) -> Any:
    if not run.dd.is_main or run.args.quiet:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return None
    return tqdm(total=total, unit="img", unit_scale=True, leave=False, mininterval=0.5,
                desc=f"epoch {epoch}/{run.args.epochs}", dynamic_ncols=True)


def train_one_epoch(run: Run, epoch: int) -> tuple[dict[str, Any], torch_mlp.verify.Verifier]:
    """One pass over the (shuffled) training set; returns the epoch's training metrics."""
    args, dd, n = run.args, run.dd, len(run.data.y_train)
    t0 = time.perf_counter()
    run.model.train()
    verifier = torch_mlp.verify.Verifier(run.model, scaler=run.scaler, optimizer=run.optimizer,
                                         autocast=run.amp_dtype or False)
    errors: dict[str, float] = {}
    running = torch.zeros(3, dtype=torch.float64, device=run.device)  # Σ loss·n, Σ correct, n
    # NaN/inf check: every step on CPU (free); on an accelerator or under DDP every few steps
    # (a sync), naming the first bad step of the window all the same.
    check_every = 1 if run.device.type == "cpu" and not dd.enabled else 10
    window: list[Tensor] = []
    bar = _progress_bar(run, epoch, n - n % dd.world_size)
    batches = shuffled_batches(n, args.batch_size, run.shuffle, rank=dd.rank,
                               world_size=dd.world_size, device=run.device)
    for b, idx in enumerate(batches):
        x, y = run.data.x_train[idx], run.data.y_train[idx]  # (b, 784), (b,)
        check = run.verify_every and run.step % run.verify_every == 0
        loss, logits = train_step(run, x, y, verifier if check else None, errors)
        running[0] += loss * len(y)
        running[1] += (logits.argmax(-1) == y).sum()
        running[2] += len(y)
        window.append(loss)
        run.step += 1
        if len(window) == check_every or b == len(batches) - 1:
            last = check_finite(run, window, epoch, b)
            window.clear()
            if bar is not None:
                bar.set_postfix(loss=f"{last:.4f}", refresh=False)
        if bar is not None:
            bar.update(len(y) * dd.world_size)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    loss_sum, correct, seen = dd.all_reduce(running).tolist()
    return {"epoch": epoch, "step": run.step, "lr": run.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / seen, "train_acc": correct / seen,
            "train_seconds": seconds, "samples_per_s": seen / seconds,
            "verify_checks": verifier.checks, "verify_max_rel_diff": verifier.max_rel,
            "verify_tolerance_used": verifier.max_used, "verify_seconds": verifier.seconds,
            **errors}, verifier


# ------------------------------------------------------------------------------ epochs, outputs
def end_epoch(run: Run, row: dict[str, Any], t0: float) -> None:
    """Evaluate on the test set, refuse non-finite weights, save the checkpoint and metrics."""
    dd, data, epoch = run.dd, run.data, row["epoch"]
    run.model.eval()
    test = dd.all_reduce(_eval_sums(run.module, data.x_test[dd.rank::dd.world_size],
                                    data.y_test[dd.rank::dd.world_size]))
    row["test_loss"] = test[0].item() / len(data.y_test)
    row["test_acc"] = test[1].item() / len(data.y_test)
    row["seconds"] = time.perf_counter() - t0  # training + evaluation
    # An epoch that ends on non-finite weights or test loss is no good checkpoint.
    finite = torch.tensor([float(math.isfinite(row["test_loss"]) and all(
        bool(torch.isfinite(p).all()) for p in run.module.parameters()))], device=run.device)
    if dd.all_reduce(finite, dist.ReduceOp.MIN).item() < 1:
        raise NonFiniteLossError(
            f"after epoch {epoch} (step {run.step}) the weights or the test loss "
            f"({row['test_loss']}) are not finite: training diverged; {run_lower_lr(run)}. "
            f"This epoch is not saved; {run_kept(run)}.")
    run.history.append(row)
    if dd.is_main:
        save_checkpoint(run.out / "checkpoint.pt", make_checkpoint(
            epoch=epoch, step=run.step, sizes=[IN_FEATURES, *run.args.hidden, NUM_CLASSES],
            model=run.module, optimizer=run.optimizer, scheduler=run.scheduler,
            scaler=run.scaler, shuffle=run.shuffle, device=run.device, history=run.history,
            args={k: v for k, v in vars(run.args).items() if k != "explicit"}))
    run.last_good = (run.out / "checkpoint.pt", epoch)
    if dd.is_main:
        write_metrics_csv(run.out / "metrics.csv", run.history)


def write_outputs(run: Run) -> None:
    """weights.png, curves.png and (when anything was verified) verify.png, by rank 0."""
    if not run.dd.is_main or "train_loss" not in run.history[-1]:
        return
    write_weights(run.out / "weights.png", _linear_weights(run.module)[0])
    try:
        write_curves(run.out / "curves.png", run.history)
        if any(k.startswith(VERIFY_ERR_PREFIXES) for h in run.history for k in h):
            write_verify(run.out / "verify.png", run.history)
    except ImportError as e:
        run.say(f"warning: no curves.png or verify.png ({e}); pip install matplotlib")


def fit(run: Run, t_start: float) -> dict[str, Any]:
    """The epochs from where the run stands to --epochs; returns the final metrics."""
    write_config(run)
    for epoch in range(run.start_epoch + 1, run.args.epochs + 1):
        t0 = time.perf_counter()
        row, verifier = train_one_epoch(run, epoch)
        end_epoch(run, row, t0)
        run.say(f"epoch {epoch:>2}/{run.args.epochs}  train loss {row['train_loss']:.4f} acc "
                f"{100 * row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} acc "
                f"{100 * row['test_acc']:.2f}%  {row['seconds']:.1f} s "
                f"({row['samples_per_s']:,.0f} img/s)  {verifier.summary()}", flush=True)
    if not run.history:  # resumed a finished run: report what it reached
        m = evaluate(run.module, run.data.x_test, run.data.y_test)
        run.history = [{"epoch": run.start_epoch, "test_loss": m["loss"], "test_acc": m["acc"]}]
    write_outputs(run)
    train_time = sum(h.get("seconds", 0.0) for h in run.history)
    verify_time = sum(h.get("verify_seconds", 0.0) for h in run.history)
    result = {**run.history[-1], "out": str(run.out), "history": run.history,
              "wall_seconds": time.perf_counter() - t_start,
              "verify_overhead": verify_time / train_time if train_time else 0.0}
    if "train_loss" in run.history[-1]:
        run.say(f"done: test accuracy {100 * result['test_acc']:.2f}% after {result['epoch']} "
                f"epochs, {result['wall_seconds']:.1f} s in train(); verify took "
                f"{100 * result['verify_overhead']:.2f}% of the epochs' time; outputs in "
                f"{run.out}")
    return result


def train(args: argparse.Namespace, data: MNISTTensors | None = None) -> dict[str, Any]:
    """One whole run, from :func:`parse_args`'s namespace; returns the final metrics.

    ``data`` lets a caller pass MNIST already loaded (on the run's device). A
    KeyboardInterrupt leaves with ``checkpoint`` set: the path to resume from, or None.
    """
    t_start = time.perf_counter()
    dd = _init_distributed(args.device)
    try:
        result = fit(setup(args, dd, data), t_start)
    except KeyboardInterrupt as e:
        dd.close(failed=True)
        ck = Path(args.out) / "checkpoint.pt" if args.out is not None else None
        if ck is None or not ck.is_file():  # none written yet: the one resumed from, if any
            ck = Path(args.resume) if args.resume is not None else None
        e.checkpoint = str(ck) if ck is not None else None  # type: ignore[attr-defined]
        raise
    except BaseException:
        dd.close(failed=True)  # no barrier: the other processes may never reach it
        raise
    dd.close()
    return result


def main(argv: Sequence[str] | None = None, *, data: MNISTTensors | None = None
         ) -> dict[str, Any]:
    """Parse ``argv`` (default: sys.argv[1:]), train, and return the final metrics: the last
    epoch's row of metrics.csv plus ``out``, ``wall_seconds``, ``verify_overhead`` and
    ``history``. ``data``: MNIST already loaded (tests, notebooks); default: load it."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return train(args, data)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    from torch_mlp.data import MNISTIntegrityError

    try:
        main()
    except (TrainingError, MNISTIntegrityError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        ck_path = getattr(err, "checkpoint", None)
        print("train.py: interrupted; " + (f"continue with --resume {ck_path}" if ck_path else
              "no checkpoint was written yet, so start the run again"), file=sys.stderr)
        sys.exit(130)
