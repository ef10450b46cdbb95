"""Which optimizer implementation train.py should use: for-loop, foreach or fused SGD/Adam.

Times 200 training steps of the default MLP (784-1024-10, batch 256, torch_mlp's Functions)
per implementation, at 1 and 2 threads, in interleaved rounds, and prints the medians of the
whole step and of optimizer.step() alone. Run by hand: python -m bench.optimizer_impl
"""

from __future__ import annotations

import statistics
import time

import torch

import torch_mlp
from torch_mlp import functional as MF

IMPLS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def run(opt_name: str, impl: dict[str, bool], steps: int = 200) -> tuple[float, float]:
    """(ms per whole step, ms per optimizer.step()) over ``steps`` steps."""
    torch.manual_seed(0)
    model = torch_mlp.MLP(784, [1024], 10)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9,
                                                     nesterov=True, **impl)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **impl)
    in_step = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = MF.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        in_step += time.perf_counter() - t1
    return 1e3 * (time.perf_counter() - t0) / steps, 1e3 * in_step / steps


def main(repeats: int = 3) -> None:
    print(f"torch {torch.__version__}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for opt_name in ("sgd", "adam"):
            times: dict[str, list[tuple[float, float]]] = {k: [] for k in IMPLS}
            run(opt_name, IMPLS["foreach"], steps=20)  # warm-up
            for _ in range(repeats):  # interleaved: a load change hits every variant alike
                for name, impl in IMPLS.items():
                    times[name].append(run(opt_name, impl))
            for name, ts in times.items():
                step = statistics.median(t[0] for t in ts)
                opt = statistics.median(t[1] for t in ts)
                print(f"threads={threads} {opt_name:4} {name:8}: step {step:7.2f} ms, "
                      f"optimizer.step {opt:6.3f} ms (median of {repeats})", flush=True)


if __name__ == "__main__":
    main()
