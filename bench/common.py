"""Shared pieces of the benchmark: interleaved timing, machine info, tables, the two models."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

import torch_mlp

T = TypeVar("T")

# The benchmark grid: MLP 784-H-10, hidden sizes × batch sizes.
D_IN, N_CLASSES = 784, 10
HIDDEN = (256, 1024, 4096)
BATCH = (1, 32, 128, 1024)


@dataclass
class Settings:
    """How hard to time: warm-up calls, interleaved rounds, and the length of one measurement."""

    device: torch.device
    warmup: int = 5
    rounds: int = 21  # interleaved (A, B) pairs; odd, so the median is one of them
    min_time_s: float = 0.05  # one measurement repeats the call until it takes at least this
    compile: bool = False
    # "wall": time.perf_counter. "cpu": time.process_time, the CPU time of this process: on a
    # machine shared with other work it does not count the time other processes hold the cores
    # (meaningful with --threads 1, where no idle worker thread spins; CPU device only).
    clock: str = "wall"

    @classmethod
    def make(cls, quick: bool, device: str, compile: bool = False, clock: str = "wall"
             ) -> Settings:
        dev = torch.device(device)
        if quick:
            return cls(dev, warmup=1, rounds=3, min_time_s=0.002, compile=compile, clock=clock)
        return cls(dev, compile=compile, clock=clock)

    @property
    def timer(self) -> Callable[[], float]:
        return time.process_time if self.clock == "cpu" else time.perf_counter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate(fn: Callable[[], Any], device: torch.device, min_time_s: float) -> int:
    """Calls per measurement so that one measurement lasts at least ``min_time_s``."""
    n = 1
    while True:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_time_s or n >= 1 << 16:
            return n
        n = max(n * 2, int(n * min_time_s / max(dt, 1e-9) * 1.2))


def round_robin(fns: Sequence[Callable[[], Any]], s: Settings,
                measure: Callable[[int, Callable[[], Any], int], T]) -> list[list[T]]:
    """Run several callables in one process, round-robin A, B, (C,) A, B, ... after a warm-up.

    Each turn is ``measure(k, fn, n)`` for callable k, which calls ``fn`` ``n`` times back to
    back (``n`` calibrated once per callable) and returns what it measured. Returns one list
    per callable, entry r of each taken in round r, so entries with the same index are
    neighbours in time (a pair, for two callables). The garbage collector is off while timing,
    as in ``timeit``.
    """
    for fn in fns:
        for _ in range(s.warmup):
            fn()
    sync(s.device)
    ns = [_calibrate(fn, s.device, s.min_time_s) for fn in fns]
    out: list[list[T]] = [[] for _ in fns]
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(s.rounds):
            for k, (fn, n) in enumerate(zip(fns, ns)):
                out[k].append(measure(k, fn, n))
    finally:
        if gc_was_enabled:
            gc.enable()
    return out


def interleaved(fns: Sequence[Callable[[], Any]], s: Settings) -> list[list[float]]:
    """:func:`round_robin` with each turn timed as a whole: seconds per call, per round."""
    timer = s.timer

    def timed(_k: int, fn: Callable[[], Any], n: int) -> float:
        sync(s.device)
        t0 = timer()
        for _ in range(n):
            fn()
        sync(s.device)
        return (timer() - t0) / n

    return round_robin(fns, s, timed)


def compare(custom: list[float], native: list[float]) -> dict[str, float]:
    """Medians and the custom/native ratio: median, min and max over the interleaved pairs."""
    ratios = [a / b for a, b in zip(custom, native)]
    return {
        "custom_ms": statistics.median(custom) * 1e3,
        "native_ms": statistics.median(native) * 1e3,
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "pairs": len(ratios),
    }


# --------------------------------------------------------------------------------------------
# The GEMMs of a training step, alone
# --------------------------------------------------------------------------------------------
def gemm_flops(sizes: list[int], batch: int) -> int:
    """FLOPs of the GEMMs one training step runs for an MLP of layer ``sizes`` at ``batch`` rows.

    Per layer (in, out): the forward product and dL/dweight, 2·batch·in·out each, and
    dL/dinput (the same count) for every layer but the first.
    """
    total = 0
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        total += (2 if k == 0 else 3) * 2 * batch * n_in * n_out
    return total


def gemm_call(sizes: list[int], batch: int, device: str) -> Callable[[], None]:
    """The step's GEMMs at ``batch`` rows on random operands, as the layers run them: the
    forward torch.addmm, dL/dweight and (above the first layer) dL/dinput as torch.mm."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dev)

    layers = [(r(batch, i), r(o, i), r(o), r(batch, o)) for i, o in zip(sizes[:-1], sizes[1:])]

    def call() -> None:
        for k, (x, w, b, g) in enumerate(layers):
            torch.addmm(b, x, w.t())  # forward
            g.t().mm(x)  # dL/dweight
            if k:
                g.mm(w)  # dL/dinput

    return call


# --------------------------------------------------------------------------------------------
# The two models of the training step, with identical parameters
# --------------------------------------------------------------------------------------------
def make_models(hidden: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    custom = torch_mlp.MLP(D_IN, hidden, N_CLASSES, device=device)
    native = nn.Sequential(nn.Linear(D_IN, hidden), nn.ReLU(), nn.Linear(hidden, N_CLASSES))
    native.to(device).load_state_dict(custom.state_dict())
    return custom, native


def make_batch(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, D_IN, generator=gen).to(device)
    y = torch.randint(0, N_CLASSES, (batch,), generator=gen).to(device)
    return x, y


def make_step(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, compile: bool = False
) -> Callable[[], None]:
    """One training step: zero_grad, forward, loss, backward, SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(x), y)

    fwd = torch.compile(forward_loss, dynamic=False) if compile else forward_loss

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        fwd(x, y).backward()
        opt.step()

    return step


# --------------------------------------------------------------------------------------------
# Machine and load
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def steady_malloc() -> str:
    """Keep glibc's freed memory in the process (no trimming, no per-tensor mmap) for both
    implementations alike; returns what the allocator does now, for the results.

    With glibc's defaults a freed heap top above its (dynamic) trim threshold goes back to the
    OS and the next step takes it back page by page: 0 to 250 page faults a step at H = 1024,
    B = 128, from round to round, by which tensors happen to sit at the heap's top. That is up
    to a tenth of a step, and belongs to neither implementation (docs/performance.md).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default (not glibc)"
    # M_TRIM_THRESHOLD (-1): trim only above 1 GiB free; M_MMAP_THRESHOLD (-3): its maximum.
    if mallopt(-1, 1 << 30) != 1 or mallopt(-3, 32 << 20) != 1:  # ints: 1 GiB, 32 MiB
        return "default (mallopt refused)"
    return "glibc, no trim, mmap above 32 MiB"


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; ``columns`` are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            cells.append("–" if v is None else format(v, spec) if spec else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def spread(r: dict[str, Any]) -> str:
    return f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}"
