"""Train an MLP on MNIST with torch_mlp's hand-derived backward passes, checked against native
autograd as it trains (``--help``, docs/training.md); flags, checkpoints, plots: submodules."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import Tensor, nn

import torch_mlp
import torch_mlp.verify
from torch_mlp import data as mnist
from torch_mlp import functional as MF
from torch_mlp.training import config, plots, rundir
from torch_mlp.training.config import TrainingError


# ------------------------------------------------------------------------------ model, loss
def build_model(hidden: list[int], native: bool = False) -> nn.Module:
    """MLP 784-hidden-10 of torch_mlp's modules, or (``native``) the same one of torch.nn's."""
    model = torch_mlp.MLP(784, list(hidden), 10)
    return torch_mlp.convert(model, to_native=True) if native else model


def forward(model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace
            ) -> tuple[Tensor, Tensor]:
    """The step's forward (what --compile compiles): (loss, logits (B, 10)); ½λΣ‖W‖² is taken
    over the weights of ``model`` at the call, so verify's float64 copies are the ones penalised."""
    logits = model(x)
    loss = MF.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
    if args.l2 > 0:
        weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
        loss = loss + MF.l2_penalty(weights, args.l2)
    return loss, logits


# ------------------------------------------------------------------------------ set-up
@dataclass(kw_only=True)
class Run:
    """What one run works with; ``step``, ``history`` and ``last_good`` advance."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    out: Path
    data: mnist.MNISTTensors  # on the device, --limit applied
    images: int  # per epoch, over all processes
    steps: int  # per epoch
    module: nn.Module  # the MLP; ``model`` is it, or its DDP wrapper
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler  # enabled for float16 autocast only
    amp_dtype: torch.dtype | None
    forward: Callable[..., tuple[Tensor, Tensor]] = forward
    shuffle: torch.Generator
    step: int = 0
    history: list[dict[str, Any]]
    last_good: tuple[Path, int] | None = None  # the checkpoint a stopped run leaves

    def say(self, *a: Any) -> None:
        if self.rank == 0 and not self.args.quiet:
            print(*a, flush=True)

    def kept(self) -> str:
        if self.last_good is None:
            return "no checkpoint was written"
        return f"the checkpoint of epoch {self.last_good[1]}, {self.last_good[0]}, is kept"


def on_rank0(rank: int, world: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 alone; a refusal there is raised on every process: all exit cleanly."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (TrainingError, mnist.MNISTIntegrityError, OSError) as e:
            error = e
    said = [error and str(error)]
    if world > 1:
        dist.broadcast_object_list(said, src=0)
    if error is not None:
        raise error
    if said[0] is not None:
        raise TrainingError(said[0])
    return result


def load_data(args: argparse.Namespace, data: mnist.MNISTTensors | None, device: torch.device,
              rank: int = 0, world: int = 1) -> mnist.MNISTTensors:
    """MNIST on ``device``, --limit applied; rank 0 unpacks it first, unless ``data`` is given."""
    if data is None:
        try:
            on_rank0(rank, world, lambda: mnist.prepare_mnist(args.data_dir, log=not args.quiet))
            data = mnist.load_mnist(args.data_dir, device)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise TrainingError(f"--data-dir {args.data_dir}: cannot read MNIST there "
                                f"({e.strerror or e}{where})") from None
    n = args.limit
    return mnist.MNISTTensors(data.x_train[:n].to(device), data.y_train[:n].to(device),
                              data.x_test.to(device), data.y_test.to(device))


def images_per_epoch(args: argparse.Namespace, n_train: int, world: int,
                     ck: dict[str, Any] | None) -> int:
    """Every process takes an equal share of each global batch, so the last n_train % world
    images are left out; a resume must take the images its run took (the same schedule)."""
    images = n_train - n_train % world
    if args.batch_size % world or images == 0:
        raise TrainingError(f"--batch-size {args.batch_size}, --limit {args.limit}: each of the "
                            f"{world} processes takes an equal share of every batch: --batch-size "
                            f"must be a multiple of {world}, and --limit at least {world}")
    if ck is not None and ck["images_per_epoch"] != images:
        raise TrainingError(
            f"--resume {args.resume}: over {world} process(es) an epoch would take {images} "
            f"images, its run took {ck['images_per_epoch']} over {ck['world_size']}: resume it "
            f"over {ck['world_size']} process(es), so that its schedule stays the same")
    return images


def make_optimizer(args: argparse.Namespace, module: nn.Module, total_steps: int,
                   device: torch.device) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer (fused kernels: the fastest, docs/performance.md) and its schedule."""
    impl = {"fused" if device.type in ("cpu", "cuda") else "foreach": True}
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


def setup(args: argparse.Namespace, data: mnist.MNISTTensors | None, rank: int, world: int,
          local_rank: int) -> Run:
    """Resume's flags, the data, the model and optimizer, with the checkpoint put back."""
    device = config.resolve_device(args.device, local_rank)
    ck = None if args.resume is None else rundir.load_checkpoint(args.resume)
    if ck is not None:
        config.merge_resume_args(args, ck["args"], args.resume)
        if args.threads:  # the checkpoint's, unless given
            torch.set_num_threads(args.threads)
    data = load_data(args, data, device, rank, world)
    images = images_per_epoch(args, len(data.y_train), world, ck)
    steps = math.ceil(images / args.batch_size)
    torch.manual_seed(args.seed)
    try:
        module = build_model(args.hidden, args.native).to(device)
    except RuntimeError as e:  # the allocator's, torch.OutOfMemoryError included
        raise TrainingError(f"--hidden {' '.join(map(str, args.hidden))}: this model does not "
                            f"fit on {device} ({str(e).splitlines()[0]})") from None
    optimizer, scheduler = make_optimizer(args, module, steps * args.epochs, device)
    amp_dtype = {"cpu": torch.bfloat16, "cuda": torch.float16}[device.type] if args.amp else None
    run = Run(args=args, rank=rank, world=world, device=device, out=Path(args.out), data=data,
              images=images, steps=steps, module=module, model=module, optimizer=optimizer,
              scheduler=scheduler, amp_dtype=amp_dtype, history=[],
              scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
              shuffle=torch.Generator().manual_seed(args.seed))
    if ck is not None:  # a resumed CPU run is bit-identical to an uninterrupted one
        module.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ck["scheduler"])
        run.scaler.load_state_dict(ck["scaler"])
        run.shuffle.set_state(ck["shuffle"])  # the only random numbers a step draws
        run.step, run.history = ck["step"], ck["history"]
        run.last_good = (Path(args.resume), ck["epoch"])
    if world > 1:
        run.model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:  # under DDP, DDPOptimizer splits the graph at buckets: no fullgraph
        run.forward = torch.compile(forward, fullgraph=world == 1)
    return run


# ------------------------------------------------------------------------------ one epoch
def advice(args: argparse.Namespace) -> str:
    """What to change after a divergence: the flag furthest from the setting the defaults were
    tested at (--lr or --l2 above it, --batch-size below), if more than 4× off; else --lr."""
    ratios = {"--lr": args.lr / config.LR_DEFAULTS[args.optimizer],
              "--l2": args.l2 / config.DEFAULTS["l2"],
              "--batch-size": config.DEFAULTS["batch_size"] / args.batch_size}
    flag = max(ratios, key=ratios.__getitem__) if max(ratios.values()) > 4 else "--lr"
    value = {"--lr": args.lr, "--l2": args.l2, "--batch-size": args.batch_size}[flag]
    change = "raise" if flag == "--batch-size" else "lower"
    again = "start a new run (--resume keeps the checkpoint's flags) and " if args.resume else ""
    return f"training diverged: {again}{change} {flag} (now {value})"


def verify_step(run: Run, verifier: torch_mlp.verify.Verifier, row: dict[str, Any], x: Tensor,
                y: Tensor, loss: Tensor) -> None:
    """Check this step's .grads (torch_mlp.verify) and keep the worst numbers of the epoch."""
    t0 = time.perf_counter()
    try:
        report = verifier.check(lambda m, x, y: forward(m, x, y, run.args)[0], x, y,
                                loss=loss.detach())
    except torch_mlp.verify.VerifyError as e:
        raise TrainingError(f"--verify-every: at step {run.step}: {e}") from e
    row["verify_checks"] += 1
    row["verify_seconds"] += time.perf_counter() - t0
    for r in report.rows:
        row["verify_tolerance_used"] = max(row["verify_tolerance_used"], r.used)
        if r.name != "loss":
            for who, err in (("ours", r.ours_err), ("native", r.native_err)):
                key = f"verify_{who}_err_{r.name}"
                row[key] = max(row.get(key, 0.0), err)


def train(run: Run, epoch: int) -> dict[str, Any]:
    """One epoch over the shuffled training set; returns the epoch's row of metrics.csv."""
    args, t0 = run.args, time.perf_counter()
    run.model.train()
    verifier = torch_mlp.verify.Verifier(run.model, scaler=run.scaler, optimizer=run.optimizer,
                                         autocast=run.amp_dtype or False)
    # --native has no hand-derived part: native against native would check nothing.
    every = 0 if args.native else run.steps if args.verify_every is None else args.verify_every
    checks = {"verify_checks": 0, "verify_seconds": 0.0, "verify_tolerance_used": 0.0}
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)  # Σ loss·n, Σ correct, n
    batches = mnist.shuffled_batches(len(run.data.y_train), args.batch_size, run.shuffle,
                                     rank=run.rank, world_size=run.world, device=run.device)
    for b, idx in enumerate(batches):
        # index_select, not x_train[idx]: the same rows, gathered ~5x faster on CPU
        x, y = run.data.x_train.index_select(0, idx), run.data.y_train.index_select(0, idx)
        autocast = torch.autocast(run.device.type, dtype=run.amp_dtype,
                                  enabled=run.amp_dtype is not None)
        with autocast, torch_mlp.use_native(args.native):
            loss, logits = run.forward(run.model, x, y, args)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if every and run.step % every == 0:
            verify_step(run, verifier, checks, x, y, loss)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.scheduler is not None:
            run.scheduler.step()
        sums[0] += loss.detach() * len(y)
        sums[1] += (logits.argmax(-1) == y).sum()
        sums[2] += len(y)
        run.step += 1
        if run.step % 10 == 0 or b == len(batches) - 1:  # NaN/inf: a sync, on every process
            bad = (~torch.isfinite(sums[:1])).double()
            if run.world > 1:
                dist.all_reduce(bad)
            if bad.item():
                raise TrainingError(f"the training loss became nan or inf by step {run.step - 1} "
                                    f"(epoch {epoch}): {advice(args)}; {run.kept()}")
    seconds = time.perf_counter() - t0
    if run.world > 1:
        dist.all_reduce(sums)
    loss_sum, correct, seen = sums.tolist()
    return {"epoch": epoch, "step": run.step, "lr": run.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / seen, "train_acc": correct / seen, "train_seconds": seconds,
            "samples_per_s": seen / seconds, **checks}


# ------------------------------------------------------------------- evaluation, then the epochs
@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 2000) -> Tensor:
    model.eval()
    return torch.cat([model(xb).float() for xb in x.split(batch_size)])


def evaluate(run: Run) -> tuple[float, float]:
    """Test cross-entropy (no smoothing, no L2) and accuracy, the same on every process."""
    logits = predict(run.module, run.data.x_test)
    loss = TF.cross_entropy(logits, run.data.y_test).item()
    return loss, (logits.argmax(-1) == run.data.y_test).sum().item() / len(logits)


def save_epoch(run: Run) -> None:
    """metrics.csv, then (no Ctrl-C leaves it ahead of them) checkpoint.pt, to resume from."""
    kept = run.kept() + ("; then continue with --resume" if run.last_good else "; start again")
    rundir.write_metrics(run.out / "metrics.csv", run.history, kept)
    rundir.save_checkpoint(run.out / "checkpoint.pt", {
        "epoch": run.history[-1]["epoch"], "step": run.step, "model": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": None if run.scheduler is None else run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "history": run.history, "world_size": run.world,
        "images_per_epoch": run.images,
        "shuffle": run.shuffle.get_state(),
        "args": {k: v for k, v in vars(run.args).items() if k != "explicit"}}, kept)


def end_epoch(run: Run, row: dict[str, Any], t0: float) -> None:
    """Evaluate on the test set, then save the metrics and the checkpoint (rank 0)."""
    row["test_loss"], row["test_acc"] = evaluate(run)
    row["seconds"] = time.perf_counter() - t0  # training + evaluation
    if not math.isfinite(row["test_loss"]):  # no good checkpoint
        raise TrainingError(f"the test loss is {row['test_loss']} after epoch {row['epoch']}: "
                            f"{advice(run.args)}; this epoch is not saved, {run.kept()}")
    run.history.append(row)
    on_rank0(run.rank, run.world, lambda: save_epoch(run))
    run.last_good = (run.out / "checkpoint.pt", row["epoch"])
    checked = f"verify ok ({row['verify_checks']} checks, worst {row['verify_tolerance_used']:.0%}"\
        " of tolerance)" if row["verify_checks"] else ""
    run.say(f"epoch {row['epoch']:>2}/{run.args.epochs}  train loss {row['train_loss']:.4f} acc "
            f"{row['train_acc']:.2%}  test loss {row['test_loss']:.4f} acc {row['test_acc']:.2%}"
            f"  {row['seconds']:.1f} s ({row['samples_per_s']:,.0f} img/s)  {checked}")


def fit(run: Run) -> dict[str, Any]:
    """config.json, the epochs from where the run stands to --epochs, then the outputs."""
    args, t_start = run.args, time.perf_counter()
    sizes = "-".join(map(str, [784, *args.hidden, 10]))
    flags = {k: v for k, v in vars(args).items() if k != "explicit"}
    text = json.dumps({**flags, "resolved": {  # config.json: the flags and what they resolved to
        "device": str(run.device), "world_size": run.world, "images_per_epoch": run.images,
        "steps_per_epoch": run.steps, "sizes": sizes, "amp_dtype": str(run.amp_dtype),
        "torch": torch.__version__}}, indent=2)
    on_rank0(run.rank, run.world, lambda: rundir.write(
        run.out / "config.json", lambda tmp: tmp.write_text(text + "\n"), "nothing else"))
    kind = "torch.nn + native autograd" if args.native else "torch_mlp (hand-derived backward)"
    ddp = f" x{run.world} processes (DDP)" if run.world > 1 else ""
    run.say(f"MLP {sizes}, {kind}, on {run.device}{ddp}; {run.steps} steps of "
            f"{args.batch_size} per epoch; run dir {run.out}" +
            (f"; resuming after epoch {run.last_good[1]}" if run.last_good else ""))
    for epoch in range(len(run.history) + 1, args.epochs + 1):
        t0 = time.perf_counter()
        end_epoch(run, train(run, epoch), t0)
    # The whole history's metrics.csv, plots and (if not here yet) checkpoint.pt, also on a resume
    kept = f"{run.kept()}; --resume it to write the outputs again"
    on_rank0(run.rank, run.world, lambda: rundir.write_metrics(run.out / "metrics.csv", run.history,
             kept) if (run.out / "checkpoint.pt").is_file() else save_epoch(run))
    warning = on_rank0(run.rank, run.world, lambda: plots.write_plots(
        run.out, run.history, run.module[0].weight, kept))
    if warning:
        run.say(warning)
    last, seconds = run.history[-1], time.perf_counter() - t_start
    run.say(f"done: test accuracy {last['test_acc']:.2%} after epoch {last['epoch']}, "
            f"{seconds:.1f} s; outputs in {run.out}")
    return {**last, "out": str(run.out), "history": run.history, "wall_seconds": seconds}


# ------------------------------------------------------------------------------ --evaluate
def class_report(logits: Tensor, y: Tensor) -> dict[str, Any]:
    """Accuracy, per-class precision and recall (None for a class never predicted, or never
    there) and the confusion matrix (rows: the true class, columns: the predicted one)."""
    k = logits.shape[-1]
    confusion = torch.bincount(y * k + logits.argmax(-1), minlength=k * k).reshape(k, k)
    hits, predicted, there = confusion.diag().tolist(), confusion.sum(0), confusion.sum(1)
    return {"accuracy": sum(hits) / len(y),
            "precision": [h / n if n else None for h, n in zip(hits, predicted.tolist())],
            "recall": [h / n if n else None for h, n in zip(hits, there.tolist())],
            "confusion": confusion.tolist()}


def evaluate_checkpoint(args: argparse.Namespace, data: mnist.MNISTTensors | None
                        ) -> dict[str, Any]:
    """The checkpoint's model on the test set: evaluation.json and its pictures; returns it."""
    ck = rundir.load_checkpoint(args.evaluate)
    model = build_model(ck["args"]["hidden"], ck["args"]["native"])
    model.load_state_dict(ck["model"])
    data = load_data(args, data, torch.device("cpu"))
    logits = predict(model, data.x_test)
    report = {"epoch": ck["epoch"], **class_report(logits, data.y_test)}
    out, kept = Path(args.out), "the checkpoint is kept"
    name = "--out" if "out" in args.explicit else "the checkpoint's folder"
    with rundir.take(out, args.evaluate, name):  # not while a run writes there
        rundir.write(out / "evaluation.json",
                     lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"), kept)
        warning = plots.write_evaluation(out, report["confusion"], logits, data, kept)
    if not args.quiet:
        print(f"test accuracy {report['accuracy']:.2%} after epoch {ck['epoch']}; written in "
              f"{out}: " + (warning or "evaluation.json, confusion.png and mistakes.png"))
    return report


# ------------------------------------------------------------------------------ main
def run(args: argparse.Namespace, data: mnist.MNISTTensors | None = None) -> dict[str, Any]:
    """Join torchrun's process group (if any), set the threads, train or --evaluate, leave."""
    threads, world = torch.get_num_threads(), int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = 0, int(os.environ.get("LOCAL_RANK", "0"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if world > 1:
        cuda = config.resolve_device(args.device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if cuda else "gloo")
        rank = dist.get_rank()
    try:
        if args.evaluate is not None:  # under torchrun: one process reads and writes
            return on_rank0(rank, world, lambda: evaluate_checkpoint(args, data))
        r = setup(args, data, rank, world, local_rank)
        # The run directory is this run's alone until it ends: rank 0 holds its lock.
        with on_rank0(rank, world, lambda: rundir.take(r.out, args.resume)) or \
                contextlib.nullcontext():
            try:
                result = fit(r)
            except BaseException:
                if rank == 0 and not (r.out / "checkpoint.pt").is_file():  # nothing to resume:
                    for path in r.out.iterdir():  # all here is this run's; the command can rerun
                        path.unlink()
                raise
        if world > 1:
            dist.barrier()  # no process leaves while another still writes
        return result
    finally:
        if world > 1:
            dist.destroy_process_group()
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None, *, data: mnist.MNISTTensors | None = None
         ) -> dict[str, Any]:
    """``run(parse_args(argv), data)``: the last epoch's row with ``out``, or the evaluation."""
    return run(config.parse_args(argv), data)


def _stop(signum: int, _: Any) -> None:
    raise KeyboardInterrupt(signum)  # SIGTERM as Ctrl-C: the atomic writes clean up, then 143


def cli() -> None:
    """The command: an error is one line (status 1), Ctrl-C or SIGTERM says what to resume."""
    args, prog = config.parse_args(), os.path.basename(sys.argv[0])
    say = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for every process
    signal.signal(signal.SIGTERM, _stop)
    try:
        run(args)
    except (TrainingError, mnist.MNISTIntegrityError) as e:
        if say:
            print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        with contextlib.suppress(KeyboardInterrupt):  # a second one while leaving: quiet
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            ck = Path(args.out, "checkpoint.pt")
            ck = ck if ck.is_file() else args.resume
            then = "" if args.evaluate else f"; continue with --resume {ck}" if ck else \
                "; no checkpoint was written, start the run again"
            if say:
                print(f"{prog}: interrupted{then}", file=sys.stderr)
        sys.exit(128 + (e.args[0] if e.args else signal.SIGINT))


if __name__ == "__main__":
    cli()
