"""Hyper-parameter sweep that chose train.py's defaults (README: "How the defaults were chosen").

Trains torch_mlp.MLP on the bundled MNIST with each configuration and 3 seeds, in several worker
processes, and writes one JSON line per run. Accuracy does not depend on the device, so the sweep
may run on a GPU; the CPU wall-time budget (90 s) is enforced by choosing epochs × width × batch
from CPU epoch times measured separately.

    python tools/sweep_defaults.py --out sweep.jsonl [--workers 6] [--device cuda]
    python tools/sweep_defaults.py --grid cpu --workers 1 --device cpu \
        --out sweep_cpu.jsonl [--resume]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import multiprocessing as mp
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import torch_mlp
from torch_mlp.functional import cross_entropy

RAW = Path(__file__).resolve().parents[1] / "torch_mlp" / "_mnist"


def load(device: str):
    def idx(name: str) -> np.ndarray:
        with gzip.open(RAW / f"{name}.gz") as f:
            data = f.read()
        ndim = data[3]
        dims = np.frombuffer(data, ">i4", ndim, 4)
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)

    def x(name):
        t = torch.from_numpy(idx(name).copy()).float().div_(255).reshape(-1, 784)
        return ((t - 0.1307) / 0.3081).to(device)

    def y(name):
        return torch.from_numpy(idx(name).astype(np.int64)).to(device)

    return (x("train-images-idx3-ubyte"), y("train-labels-idx1-ubyte"),
            x("t10k-images-idx3-ubyte"), y("t10k-labels-idx1-ubyte"))


def run(cfg: dict, data, device: str) -> dict:
    Xtr, Ytr, Xte, Yte = data
    torch.manual_seed(cfg["seed"])
    model = torch_mlp.MLP(784, cfg["hidden"], 10).to(device)
    steps_per_epoch = math.ceil(len(Xtr) / cfg["batch"])
    total = steps_per_epoch * cfg["epochs"]
    if cfg["opt"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    if cfg["sched"] == "onecycle":
        # torch's default one-cycle, which also cycles momentum (train.py keeps it fixed).
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    gen = torch.Generator(device="cpu").manual_seed(cfg["seed"])
    t0 = time.time()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(Xtr), generator=gen).to(device)
        for i in range(0, len(Xtr), cfg["batch"]):
            idx = perm[i:i + cfg["batch"]]
            loss = cross_entropy(model(Xtr[idx]), Ytr[idx], label_smoothing=cfg["ls"])
            if cfg["l2"]:
                loss = loss + model.l2_penalty(cfg["l2"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc = (model(Xte).argmax(1) == Yte).float().mean().item()
    return {**cfg, "test_acc": acc, "seconds": time.time() - t0, **provenance(device)}


def provenance(device: str) -> dict:
    """Where and when a row was measured: device, torch version, UTC date and git commit."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=RAW.parents[1], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"device": name or platform.machine(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit}


def worker(args):
    cfgs, device, out = args
    torch.set_num_threads(2)
    data = load(device)
    rows = []
    for cfg in cfgs:
        row = run(cfg, data, device)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    return rows


def grid(name: str = "wide") -> list[dict]:
    """``wide``: the first round (run on a lent GPU). ``cpu``: the second round, run on a
    2-core CPU, of cheaper schedules (bigger batches, fewer epochs) that fit 90 s with margin."""
    g = []

    def add(hidden, batch, epochs, opt, sched, lrs, lss, l2s):
        for lr, ls, l2 in itertools.product(lrs, lss, l2s):
            g.append(dict(hidden=hidden, batch=batch, epochs=epochs, opt=opt, sched=sched,
                          lr=lr, ls=ls, l2=l2))

    if name == "cpu":
        add([1024], 256, 16, "sgd", "onecycle", [0.2, 0.4], [0.1], [2e-4])
        add([1024], 512, 20, "sgd", "onecycle", [0.8], [0.1], [2e-4])
        add([1024], 128, 12, "sgd", "onecycle", [0.2], [0.1], [2e-4])
        add([1024], 512, 16, "sgd", "onecycle", [0.8], [0.1], [2e-4])
        add([1024], 256, 13, "sgd", "onecycle", [0.4], [0.1], [2e-4])
        return [{**c, "seed": s} for c in g for s in (0, 1, 2)]
    add([1024], 128, 15, "sgd", "onecycle", [0.05, 0.1, 0.2], [0.0, 0.1], [0.0, 5e-5, 2e-4])
    add([1024], 256, 24, "sgd", "onecycle", [0.1, 0.2, 0.4], [0.1], [5e-5, 2e-4])
    add([2048], 256, 11, "sgd", "onecycle", [0.1, 0.2], [0.1], [5e-5])
    add([800], 128, 20, "sgd", "onecycle", [0.1], [0.1], [5e-5])
    add([1024, 1024], 256, 14, "sgd", "onecycle", [0.1, 0.2], [0.1], [5e-5])
    add([1024], 128, 15, "adam", "onecycle", [1e-3, 2e-3], [0.1], [0.0, 5e-5])
    add([1024], 128, 15, "adam", "cosine", [1e-3], [0.1], [5e-5])
    return [{**c, "seed": s} for c in g for s in (0, 1, 2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="sweep.jsonl")
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", choices=("wide", "cpu"), default="wide")
    p.add_argument("--resume", action="store_true",
                   help="keep --out's rows and run only the configurations it lacks")
    a = p.parse_args()
    cfgs = grid(a.grid)
    if a.resume and Path(a.out).exists():
        done = [json.loads(line) for line in Path(a.out).read_text().splitlines() if line]
        seen = {json.dumps({k: r[k] for k in cfgs[0]}, sort_keys=True) for r in done}
        cfgs = [c for c in cfgs if json.dumps(c, sort_keys=True) not in seen]
    else:
        Path(a.out).write_text("")
    chunks = [cfgs[k::a.workers] for k in range(a.workers)]
    with mp.get_context("spawn").Pool(a.workers) as pool:
        pool.map(worker, [(c, a.device, a.out) for c in chunks])
    rows = [json.loads(line) for line in Path(a.out).read_text().splitlines() if line]
    key = lambda r: json.dumps({k: v for k, v in r.items()  # noqa: E731
                                if k not in ("seed", "test_acc", "seconds")})
    rows.sort(key=key)
    print(f"{'config':<110} {'mean':>6} {'min':>6}")
    for k, grp in itertools.groupby(rows, key=key):
        accs = [r["test_acc"] * 100 for r in grp]
        print(f"{k:<110} {np.mean(accs):6.2f} {min(accs):6.2f}")


if __name__ == "__main__":
    main()
