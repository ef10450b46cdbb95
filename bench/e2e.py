"""(5) End to end: seconds per MNIST epoch of train.py, torch_mlp against ``--native``, and
against a conventional pytorch/examples-style loop (a DataLoader over
``torchvision.datasets.MNIST`` with ``ToTensor``/``Normalize``, batch 64, the same MLP).

train.py's epochs run in this process through ``torch_mlp.training.main`` (its
``train_seconds``: the training loop alone, without the evaluation), interleaved custom, native,
custom, native, ... with ``--verify-every 0`` (the gradient check against a native twin is a
feature of the run, not of the step). The DataLoader loop is far slower, so it is timed over
``batches`` batches and scaled to a whole epoch (60000 images), once after each custom/native
pair: each of its times has a train.py epoch as its neighbour in time (the VM's speed drifts
over minutes), and the speedup is the median over those neighbours.

The training part of an epoch is also set against its roofline: the FLOPs of the GEMMs an
epoch runs (per layer the forward product, dL/dweight and, above the first layer, dL/dinput;
the first layer's dL/dx is not needed, x being data) divided by the rate ``torch.mm`` and
``torch.addmm`` reach on those very shapes, timed in the same process right after each
custom/native pair (the VM's GEMM rate drifts by tens of percent over minutes, so each epoch is
set against a rate measured next to it). ``roofline_pct`` is that ideal time as a percentage
of the measured training seconds: the median over the pairs, with its min and max.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import torch_mlp

from .common import Settings, gemm_call, gemm_flops, interleaved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN = 60000


def train_epoch_seconds(train: Any, data: Any, native: bool, limit: int | None, out: str,
                        device: str) -> float:
    argv = ["--epochs", "1", "--verify-every", "0", "--quiet", "--out", out,
            "--device", device]
    if native:
        argv.append("--native")
    if limit:
        argv += ["--limit", str(limit)]
    with contextlib.redirect_stdout(io.StringIO()):  # train.py's own epoch lines
        result = train.main(argv, data=data)
    return float(result["history"][-1]["train_seconds"])


def dataloader_epoch_seconds(data_dir: str, batches: int, device: str) -> tuple[float, int]:
    """The pytorch/examples mnist loop with the same MLP; seconds for ``batches`` batches."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    import torch_mlp

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(data_dir, train=True, download=False, transform=tf)
    loader = DataLoader(ds, batch_size=64, shuffle=True)
    torch.manual_seed(0)
    model = torch_mlp.MLP(784, 1024, 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch_mlp.CrossEntropyLoss()
    model.train()
    seen = 0
    t0 = time.perf_counter()
    for k, (x, y) in enumerate(loader):
        if k == batches:
            break
        x, y = x.to(device).flatten(1), y.to(device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        seen += len(y)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, seen


def epoch_gemm_flops(sizes: list[int], n: int, batch: int) -> int:
    """FLOPs of an epoch's GEMMs: ``n // batch`` full batches and one of the remainder."""
    full, rest = divmod(n, batch)
    return full * gemm_flops(sizes, batch) + (gemm_flops(sizes, rest) if rest else 0)


def gemm_rate(sizes: list[int], batch: int, device: str, quick: bool) -> Callable[[], float]:
    """A measurement of the FLOP/s of the step's GEMMs at ``batch`` rows (torch.addmm forward,
    torch.mm backward): each call times them anew (about half a second) and returns the rate."""
    dev = torch.device(device)
    call = gemm_call(sizes, batch, device)
    settings = Settings(dev, warmup=1 if quick else 3, rounds=3 if quick else 7,
                        min_time_s=0.002 if quick else 0.05)

    def measure() -> float:
        (times,) = interleaved([call], settings)
        return gemm_flops(sizes, batch) / statistics.median(times)

    return measure


# The step budget: train.py's default step with one part taken away at a time.
BUDGET = (
    ("GEMMs alone", None),
    ("train.py's step", {}),
    ("without the L2 term", {"l2": 0.0}),
    ("without L2 and label smoothing", {"l2": 0.0, "label_smoothing": 0.0}),
    ("... and without optimizer.step()", {"l2": 0.0, "label_smoothing": 0.0, "opt_step": False}),
)


def step_budget(train: Any, data: Any, sizes: list[int], batch: int, device: str, quick: bool,
                native: bool = False) -> tuple[dict[str, float], list[float]]:
    """Milliseconds per training step of train.py's default configuration (its model, loss,
    fused optimizer and batch gather), and of the same step with the L2 term, the label
    smoothing and the optimizer step taken away one after another, beside the step's GEMMs
    alone: interleaved, after a warm-up. What lies between the first two rows and the GEMMs
    is what stands between an epoch and its roofline.

    Returns the median milliseconds per row, and the GEMMs' share of train.py's step in %,
    round by round: the two are timed next to each other, so this share is the steady
    estimate of the step's roofline on a machine whose speed drifts."""
    from torch_mlp.data import shuffled_batches
    from torch_mlp.training.config import DEFAULTS, parse_args

    dev = torch.device(device)
    args = parse_args(["--native"] if native else [])
    args.lr = 1e-3  # small steps: the weights stay where training keeps them
    torch.manual_seed(0)
    model = train.build_model(DEFAULTS["hidden"], native).to(dev)
    opt, _ = train.make_optimizer(args, model, 1, dev)
    n = 4 if quick else 20  # steps per measurement
    idx = shuffled_batches(len(data.y_train), batch, torch.Generator().manual_seed(0),
                           device=dev)[:n]
    gemms = gemm_call(sizes, batch, device)

    def steps(l2: float = DEFAULTS["l2"], label_smoothing: float = DEFAULTS["label_smoothing"],
              opt_step: bool = True) -> Callable[[], None]:
        step_args = argparse.Namespace(**{**vars(args), "l2": l2,
                                          "label_smoothing": label_smoothing})

        def call() -> None:
            for i in idx:
                x, y = data.x_train.index_select(0, i), data.y_train.index_select(0, i)
                with torch_mlp.use_native(native):  # as the trainer runs --native's loss
                    loss, _ = train.forward(model, x, y, step_args)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if opt_step:
                    opt.step()
        return call

    def gemm_steps() -> None:
        for _ in idx:
            gemms()

    fns = [gemm_steps if kw is None else steps(**kw) for _, kw in BUDGET]
    settings = Settings(dev, warmup=1 if quick else 2, rounds=3 if quick else 9,
                        min_time_s=0.002 if quick else 0.2)
    times = interleaved(fns, settings)
    share = [100 * g / t for g, t in zip(times[0], times[1])]
    return {name: 1e3 * statistics.median(t) / n for (name, _), t in zip(BUDGET, times)}, share


def run(quick: bool, device: str = "cpu") -> list[dict[str, Any]]:
    import torch_mlp.training as train
    from torch_mlp.data import load_mnist

    data_dir = os.path.join(ROOT, "data")
    data = load_mnist(data_dir, device=device)
    limit = 2048 if quick else None
    pairs = 1 if quick else 5
    batches = 20 if quick else 100  # DataLoader batches after each pair
    n = limit or N_TRAIN
    scale = N_TRAIN / n
    custom: list[float] = []
    native: list[float] = []
    loop: list[float] = []
    rates: list[float] = []  # GEMM FLOP/s, measured after each custom/native pair
    loop_images = 0
    from torch_mlp.training.config import DEFAULTS
    sizes, batch = [784, *DEFAULTS["hidden"], 10], DEFAULTS["batch_size"]
    flops = epoch_gemm_flops(sizes, n, batch)
    rate_now = gemm_rate(sizes, batch, device, quick)
    with tempfile.TemporaryDirectory() as tmp:
        # One untimed short run of each first: lazy initialisation is not an epoch's cost.
        for nat in (False, True):
            train_epoch_seconds(train, data, nat, 512, os.path.join(tmp, f"w{nat}"), device)
        for k in range(pairs):
            for nat, into in ((False, custom), (True, native)):
                out = os.path.join(tmp, f"{k}{nat}")
                into.append(train_epoch_seconds(train, data, nat, limit, out, device))
                print(f"  e2e train.py{' --native' if nat else ''}: {into[-1]:.2f} s for "
                      f"{n} images", flush=True)
            rates.append(rate_now())
            print(f"  e2e roofline: {flops / 1e9:.1f} GFLOP of GEMMs per {n} images at "
                  f"{rates[-1] / 1e9:.1f} GFLOP/s = {flops / rates[-1]:.2f} s: "
                  f"{100 * flops / rates[-1] / custom[-1]:.0f}% of this pair's torch_mlp epoch, "
                  f"{100 * flops / rates[-1] / native[-1]:.0f}% of its --native one", flush=True)
            secs, seen = dataloader_epoch_seconds(data_dir, batches, device)
            loop.append(secs * N_TRAIN / seen)
            loop_images += seen
            print(f"  e2e DataLoader loop: {secs:.2f} s for {seen} images -> {loop[-1]:.1f} "
                  "s/epoch", flush=True)
    budget, share = {}, {}
    for kind in ("custom", "native"):
        budget[kind], share[kind] = step_budget(train, data, sizes, batch, device, quick,
                                                kind == "native")
        print(f"  e2e step budget ({kind}): "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in budget[kind].items())
              + f"; GEMMs {statistics.median(share[kind]):.0f}% of the step", flush=True)
    ratios = [a / b for a, b in zip(custom, native)]
    pct = [100 * flops / r / c for r, c in zip(rates, custom)]
    pct_native = [100 * flops / r / c for r, c in zip(rates, native)]
    rows: list[dict[str, Any]] = [{
        "what": "train.py (torch_mlp) vs train.py --native",
        "custom_s_per_epoch": statistics.median(custom) * scale,
        "native_s_per_epoch": statistics.median(native) * scale,
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "pairs": len(ratios), "images_timed": n,
        "sizes": sizes, "batch_size": batch,
        "gemm_gflop_per_epoch": flops * scale / 1e9,
        "gemm_gflops": statistics.median(rates) / 1e9,
        "gemm_gflops_min": min(rates) / 1e9, "gemm_gflops_max": max(rates) / 1e9,
        "roofline_s_per_epoch": flops * scale / statistics.median(rates),
        "roofline_pct": statistics.median(pct), "roofline_pct_min": min(pct),
        "roofline_pct_max": max(pct), "roofline_pct_native": statistics.median(pct_native),
        "step_budget_ms": budget,
        "step_gemm_pct": statistics.median(share["custom"]),
        "step_gemm_pct_min": min(share["custom"]), "step_gemm_pct_max": max(share["custom"]),
        "step_gemm_pct_native": statistics.median(share["native"]),
    }]
    speedups = [d / (c * scale) for d, c in zip(loop, custom)]
    rows.append({
        "what": "DataLoader loop (ToTensor/Normalize, batch 64) vs train.py (torch_mlp)",
        "dataloader_s_per_epoch": statistics.median(loop),
        "custom_s_per_epoch": rows[0]["custom_s_per_epoch"],
        "speedup": statistics.median(speedups), "speedup_min": min(speedups),
        "speedup_max": max(speedups), "pairs": len(speedups),
        "images_timed": loop_images,
    })
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    a, b = rows
    return "\n".join([
        "| loop | s / epoch | vs train.py (torch_mlp) |",
        "|---|---:|---:|",
        f"| train.py (torch_mlp) | {a['custom_s_per_epoch']:.1f} | 1.00 |",
        f"| train.py --native | {a['native_s_per_epoch']:.1f} | "
        f"{1 / a['ratio']:.2f} (torch_mlp/native {a['ratio']:.3f}, "
        f"{a['ratio_min']:.2f}–{a['ratio_max']:.2f}) |",
        f"| DataLoader loop, batch 64 | {b['dataloader_s_per_epoch']:.1f} | "
        f"{b['speedup']:.1f}× slower ({b['speedup_min']:.1f}–{b['speedup_max']:.1f}) |",
        "",
        f"Roofline of the training part of an epoch (MLP {'-'.join(map(str, a['sizes']))}, "
        f"batch {a['batch_size']}): {a['gemm_gflop_per_epoch']:.1f} GFLOP of GEMMs at "
        f"{a['gemm_gflops']:.1f} GFLOP/s ({a['gemm_gflops_min']:.1f}–"
        f"{a['gemm_gflops_max']:.1f}; torch.mm on the same shapes, after each pair) = "
        f"{a['roofline_s_per_epoch']:.2f} s. Set against the epoch next to each rate: "
        f"{a['roofline_pct']:.0f}% ({a['roofline_pct_min']:.0f}–{a['roofline_pct_max']:.0f}%) "
        f"of train.py's measured {a['custom_s_per_epoch']:.2f} s, "
        f"{a['roofline_pct_native']:.0f}% of --native's.",
        "",
        "Where a step's time goes (ms per step, interleaved, one batch of "
        f"{a['batch_size']}). The GEMMs are {a['step_gemm_pct']:.0f}% "
        f"({a['step_gemm_pct_min']:.0f}–{a['step_gemm_pct_max']:.0f}% over the rounds) of "
        f"train.py's step, {a['step_gemm_pct_native']:.0f}% of --native's: timed next to each "
        "other, a steadier figure than the epoch's above.",
        "",
        "| step | torch_mlp | --native |",
        "|---|---:|---:|",
        *(f"| {name} | {a['step_budget_ms']['custom'][name]:.2f} | "
          f"{a['step_budget_ms']['native'][name]:.2f} |" for name, _ in BUDGET),
    ])
