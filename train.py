#!/usr/bin/env python
"""Train an MLP on MNIST with torch_mlp's hand-derived backward passes, checked against native
autograd while it trains (torch_mlp.verify every --verify-every steps; see verify.png).

    python train.py                          # the default run (make train)
    python train.py --native                 # the same network: torch.nn + native autograd
    python train.py --limit 2000 --epochs 2  # a smoke run on 2000 training images
    python train.py --resume runs/<run>/checkpoint.pt
    torchrun --nproc_per_node=2 train.py     # DDP; --batch-size stays the global batch

Flags: ``python train.py --help``; in depth: docs/training.md. This file is the model, the
loss and the loop; the command line, checks, checkpoints, DDP and plots are torch_mlp/training.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Ctrl-C while torch loads (seconds): run_cli's one line and status 130 here too
    import torch
    import torch.nn.functional as TF
    from torch import Tensor, nn

    import torch_mlp
    import torch_mlp.verify
    from torch_mlp import functional as MF
    from torch_mlp.data import MNISTTensors, shuffled_batches
    from torch_mlp.training import checkpoint as ckpt
    from torch_mlp.training import config, resources
    from torch_mlp.training.distributed import Dist, init_distributed
    from torch_mlp.training.errors import NonFiniteLossError, VerifyError, run_cli
    from torch_mlp.training.guards import LossWatch
    from torch_mlp.training.messages import diverged, progress_bar, verify_one_line
    from torch_mlp.training.metrics import keep_max_verify_errors, run_result, write_metrics_csv
    from torch_mlp.training.plots import write_plots
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("train.py: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

IN_FEATURES, NUM_CLASSES = 784, 10
EVAL_BATCH = 2000
# The fastest optimizer implementation measured here (docs/performance.md): fused kernels on
# cpu and cuda, else foreach.
FUSED_DEVICES = ("cpu", "cuda")


# ------------------------------------------------------------------------------ model, loss
def layer_sizes(hidden: Sequence[int]) -> list[int]:
    return [IN_FEATURES, *hidden, NUM_CLASSES]


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
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = EVAL_BATCH,
             dd: Dist | None = None) -> dict[str, float]:
    """Mean cross-entropy (no smoothing, no L2) and accuracy of ``model`` on (x, y). Under
    DDP (``dd``) each process takes every world_size-th sample and the sums are added up."""
    dd = dd or Dist()
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)  # Σ cross-entropy, Σ correct
    try:
        shard = slice(dd.rank, None, dd.world_size)
        for xb, yb in zip(x[shard].split(batch_size), y[shard].split(batch_size)):
            logits = model(xb).float()
            sums[0] += TF.cross_entropy(logits, yb, reduction="sum")
            sums[1] += (logits.argmax(-1) == yb).sum()
    finally:
        model.train(was_training)
    loss_sum, correct = dd.all_reduce(sums).tolist()
    return {"loss": loss_sum / max(len(y), 1), "acc": correct / max(len(y), 1)}


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
    # The weight matrices the L2 term penalises, gathered once: restoring a checkpoint and
    # wrapping in DDP keep the very parameter tensors.
    weights: list[Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.weights = _linear_weights(self.module)

    def say(self, *a: Any, **k: Any) -> None:
        if self.dd.is_main:
            print(*a, **k)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if self.amp_dtype is None else torch.autocast(
            self.device.type, dtype=self.amp_dtype)


def make_optimizer(args: argparse.Namespace, module: nn.Module, total_steps: int,
                   device: torch.device) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer (fused or foreach, see FUSED_DEVICES) and the per-step lr schedule."""
    impl = {"fused" if device.type in FUSED_DEVICES else "foreach": True}
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


def setup(args: argparse.Namespace, dd: Dist, data: MNISTTensors | None) -> Run:
    """Check the flags against the machine, load the data, build the model and optimizer, and
    restore the checkpoint of --resume."""
    device = config.resolve_device(args.device, dd.local_rank)
    ck = None
    if args.resume is not None:
        ck = ckpt.load_checkpoint(args.resume, map_location=device)
        config.merge_resume_args(args, ck, args.resume)
        ckpt.check_sizes(ck, args.resume, layer_sizes(args.hidden))
    resources.check_memory(args, device, layer_sizes(args.hidden), EVAL_BATCH)
    out = resources.check_out(args, dd)
    data = resources.load_data(args, dd, device, out, data)
    steps = resources.steps_per_epoch(args, dd, len(data.y_train))
    # --native has no hand-derived part: native against native would check nothing.
    verify_every = 0 if args.native else steps if args.verify_every is None else args.verify_every
    dtype = resources.amp_dtype(args.amp, device)
    torch.manual_seed(args.seed)
    module = build_model(args.hidden, args.native).to(device)
    optimizer, scheduler = make_optimizer(args, module, steps * args.epochs, device)
    run = Run(args, dd, device, out, data, module, module, optimizer, scheduler,
              torch.amp.GradScaler("cuda") if dtype == torch.float16 else None, dtype,
              steps, verify_every, torch.Generator().manual_seed(args.seed))
    if ck is not None:
        run.start_epoch, run.step, run.history = ckpt.restore(
            ck, args.resume, model=module, optimizer=optimizer, scheduler=scheduler,
            scaler=run.scaler, shuffle=run.shuffle, device=device)
        run.last_good = (Path(args.resume), run.start_epoch)
        run.say(f"resuming {args.resume} after epoch {run.start_epoch} (step {run.step})")
    if dd.enabled:
        run.model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:  # under DDP, DDPOptimizer splits the graph at buckets: no fullgraph
        run.step_fn = torch.compile(forward_loss, fullgraph=not dd.enabled)
    return run


def describe(run: Run) -> None:
    """config.json (the flags and what they resolved to) and the run's header line."""
    sizes, n_params = layer_sizes(run.args.hidden), sum(p.numel() for p in run.module.parameters())
    if run.dd.is_main:
        config.write_config(
            run.out / "config.json", run.args, device=str(run.device),
            world_size=run.dd.world_size, steps_per_epoch=run.steps_per_epoch,
            verify_every=run.verify_every, train_size=len(run.data.y_train),
            test_size=len(run.data.y_test), sizes=sizes, parameters=n_params,
            amp_dtype=str(run.amp_dtype),
            optimizer_impl="fused" if run.optimizer.defaults.get("fused") else "foreach")
    kind = "torch.nn + native autograd" if run.args.native else "torch_mlp (hand-derived backward)"
    ddp = f" x{run.dd.world_size} processes (DDP)" if run.dd.enabled else ""
    run.say(f"MLP {'-'.join(map(str, sizes))} ({n_params:,} parameters), {kind}, on "
            f"{run.device}{ddp}; {len(run.data.y_train)} training images, "
            f"{run.steps_per_epoch} steps/epoch; run dir {run.out}")


# ------------------------------------------------------------------------------ one epoch
def verify_step(run: Run, verifier: torch_mlp.verify.Verifier, errors: dict[str, float],
                x: Tensor, y: Tensor, loss: Tensor) -> None:
    """Check this step's .grads; keep each parameter's max error (ours, native) vs float64."""
    try:
        report = verifier.check(verified_loss, x, y, run.args.l2, run.args.label_smoothing,
                                loss=loss.detach())
    except torch_mlp.verify.VerifyError as e:
        msg = f"--verify-every: at step {run.step}: {verify_one_line(e)}"
        raise VerifyError(msg, e.report) from e
    keep_max_verify_errors(errors, report.rows)


def train_step(run: Run, x: Tensor, y: Tensor, verifier: torch_mlp.verify.Verifier | None,
               errors: dict[str, float]) -> tuple[Tensor, Tensor]:
    """One optimizer step on (x, y); with a ``verifier``, the .grads are checked between
    backward and step (:func:`verify_step`)."""
    args = run.args
    with run.autocast():
        loss, logits = run.step_fn(run.model, run.weights, x, y, args.l2,
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
    watch = LossWatch(dd, 1 if run.device.type == "cpu" and not dd.enabled else 10,
                      diverged(args.resume is not None, run.last_good))
    bar = progress_bar(dd.is_main and not args.quiet, n - n % dd.world_size,
                       f"epoch {epoch}/{args.epochs}")
    batches = shuffled_batches(n, args.batch_size, run.shuffle, rank=dd.rank,
                               world_size=dd.world_size, device=run.device)
    for b, idx in enumerate(batches):
        # index_select, not x_train[idx]: the same rows, gathered ~5x faster on CPU
        x, y = run.data.x_train.index_select(0, idx), run.data.y_train.index_select(0, idx)
        check = run.verify_every and run.step % run.verify_every == 0
        loss, logits = train_step(run, x, y, verifier if check else None, errors)
        running[0] += loss * len(y)
        running[1] += (logits.argmax(-1) == y).sum()
        running[2] += len(y)
        last = watch.add(loss, run.step, epoch, b, last=b == len(batches) - 1)
        run.step += 1
        if last is not None:
            bar.set_postfix(loss=f"{last:.4f}", refresh=False)
        bar.update(len(y) * dd.world_size)
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
    test = evaluate(run.module, data.x_test, data.y_test, dd=dd)
    row["test_loss"], row["test_acc"] = test["loss"], test["acc"]
    row["seconds"] = time.perf_counter() - t0  # training + evaluation
    # An epoch that ends on non-finite weights or test loss is no good checkpoint.
    finite = torch.tensor([float(math.isfinite(row["test_loss"]) and all(
        bool(torch.isfinite(p).all()) for p in run.module.parameters()))], device=run.device)
    if dd.all_reduce(finite, torch.distributed.ReduceOp.MIN).item() < 1:
        raise NonFiniteLossError(
            f"after epoch {epoch} (step {run.step}) the weights or the test loss "
            f"({row['test_loss']}) are not finite: "
            f"{diverged(run.args.resume is not None, run.last_good, 'This epoch is not saved')}")
    run.history.append(row)
    if dd.is_main:
        ckpt.save_checkpoint(run.out / "checkpoint.pt", ckpt.make_checkpoint(
            epoch=epoch, step=run.step, sizes=layer_sizes(run.args.hidden),
            model=run.module, optimizer=run.optimizer, scheduler=run.scheduler,
            scaler=run.scaler, shuffle=run.shuffle, device=run.device, history=run.history,
            args=config.flag_values(run.args)))
    run.last_good = (run.out / "checkpoint.pt", epoch)
    if dd.is_main:
        write_metrics_csv(run.out / "metrics.csv", run.history)


def fit(run: Run, t_start: float) -> dict[str, Any]:
    """The epochs from where the run stands to --epochs; returns the final metrics."""
    describe(run)
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
    if run.dd.is_main and "train_loss" in run.history[-1]:
        warning = write_plots(run.out, run.history, run.weights[0])
        if warning:
            run.say(warning)
    result = run_result(run.history, run.out, time.perf_counter() - t_start)
    if "train_loss" in run.history[-1]:
        run.say(f"done: test accuracy {100 * result['test_acc']:.2f}% after {result['epoch']} "
                f"epochs, {result['wall_seconds']:.1f} s in train(); verify took "
                f"{100 * result['verify_overhead']:.2f}% of the epochs' time; outputs in "
                f"{run.out}")
    return result


def train(args: argparse.Namespace, data: MNISTTensors | None = None) -> dict[str, Any]:
    """One whole run, from :func:`config.parse_args`'s namespace; returns the final metrics.

    ``data`` lets a caller pass MNIST already loaded (on the run's device). A
    KeyboardInterrupt leaves with ``checkpoint`` set: the path to resume from, or None.
    """
    t_start = time.perf_counter()
    dd = init_distributed(args.device)
    try:
        with dd.closing():  # barrier, then destroy the group; after a failure destroy only
            return fit(setup(args, dd, data), t_start)
    except KeyboardInterrupt as e:
        e.checkpoint = ckpt.checkpoint_to_resume(args.out, args.resume)  # type: ignore[attr-defined]
        raise


def main(argv: Sequence[str] | None = None, *, data: MNISTTensors | None = None
         ) -> dict[str, Any]:
    """Parse ``argv`` (default: sys.argv[1:]), train, and return the final metrics: the last
    epoch's row of metrics.csv plus ``out``, ``wall_seconds``, ``verify_overhead`` and
    ``history``. ``data``: MNIST already loaded (tests, notebooks); default: load it."""
    args = config.parse_args(argv)
    with resources.num_threads(args.threads):
        return train(args, data)


if __name__ == "__main__":
    run_cli(main)
