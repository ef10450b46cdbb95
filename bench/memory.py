"""(3) Memory of one training step: bytes saved for backward, and the step's peak.

Saved for backward: every tensor that autograd keeps for the backward pass goes through
``torch.autograd.graph.saved_tensors_hooks``' pack hook during the forward. A tensor saved twice
(ReLU's output is also the next Linear's input) is one block of memory, so the count is by
storage (``untyped_storage().data_ptr()``), each storage counted once at its full size; the naive
sum of every saved tensor's bytes is reported beside it. ``activations`` leaves out the storages
of the parameters and the batch, which exist whether or not anything is saved.

Peak: on CPU, the rise of the process's resident set (VmHWM after resetting it through
``/proc/self/clear_refs``, minus VmRSS before) over one step, in a child process whose malloc
returns every block above 64 KiB to the system at once (``MALLOC_MMAP_THRESHOLD_``), so the
resident set follows the live tensors. On CUDA, ``torch.cuda.max_memory_allocated`` minus the
memory allocated before the step.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any

import torch
from torch import nn

import torch_mlp

from .common import make_batch, make_models, make_step, table

MiB = 2**20


def saved_bytes(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
                ) -> dict[str, int]:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    leaves = {p.untyped_storage().data_ptr() for p in model.parameters()}
    leaves |= {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    storages: dict[tuple[int, int], int] = {}
    for t in saved:
        st = t.untyped_storage()
        key = (st.data_ptr(), id(st) if st.data_ptr() == 0 else 0)
        storages[key] = st.nbytes()
    del loss
    return {
        "tensors": len(saved),
        "naive": sum(t.numel() * t.element_size() for t in saved),
        "unique": sum(storages.values()),
        "activations": sum(n for (ptr, _), n in storages.items() if ptr not in leaves),
    }


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def step_peak(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes by which one training step raises the memory in use, at its highest."""
    step = make_step(model, loss_fn, x, y)
    step()  # warm-up: lazy initialisation inside torch is not the step's memory
    for p in model.parameters():
        p.grad = None
    gc.collect()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        step()
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - base
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    step()
    return (_rss_kib("VmHWM") - base) * 1024


def _peaks(hidden: list[int], batch: list[int], device: torch.device) -> dict[str, int]:
    out = {}
    for H in hidden:
        for B in batch:
            for impl in ("custom", "native"):
                custom, native = make_models(H, device)
                x, y = make_batch(B, device)
                if impl == "custom":
                    out[f"{H},{B},{impl}"] = step_peak(custom, torch_mlp.CrossEntropyLoss(), x, y)
                else:
                    out[f"{H},{B},{impl}"] = step_peak(native, nn.CrossEntropyLoss(), x, y)
                del custom, native, x, y
                gc.collect()
    return out


def _peaks_in_child(hidden: list[int], batch: list[int]) -> dict[str, int] | None:
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, "-m", "bench.memory", json.dumps([hidden, batch])]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        print(f"  peak RSS child failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(device: torch.device, hidden: list[int], batch: list[int]) -> list[dict[str, Any]]:
    peaks = _peaks(hidden, batch, device) if device.type == "cuda" else _peaks_in_child(
        hidden, batch)
    rows = []
    for H in hidden:
        custom, native = make_models(H, device)
        for B in batch:
            x, y = make_batch(B, device)
            a = saved_bytes(custom, torch_mlp.CrossEntropyLoss(), x, y)
            b = saved_bytes(native, nn.CrossEntropyLoss(), x, y)
            row: dict[str, Any] = {"H": H, "B": B}
            for k in a:
                row[f"saved_{k}_custom"] = a[k]
                row[f"saved_{k}_native"] = b[k]
            row["saved_ratio"] = a["unique"] / b["unique"]
            if peaks is not None:
                row["peak_custom"] = peaks[f"{H},{B},custom"]
                row["peak_native"] = peaks[f"{H},{B},native"]
            rows.append(row)
            print(f"  memory H={H:<5} B={B:<5} saved (unique) custom {a['unique'] / MiB:8.3f} "
                  f"MiB native {b['unique'] / MiB:8.3f} MiB; activations custom "
                  f"{a['activations'] / MiB:8.3f} native {b['activations'] / MiB:8.3f} MiB"
                  + ("" if peaks is None else
                     f"; peak custom {row['peak_custom'] / MiB:7.2f} native "
                     f"{row['peak_native'] / MiB:7.2f} MiB"), flush=True)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    view = []
    for r in rows:
        v = {"H": r["H"], "B": r["B"]}
        for k in ("unique", "activations", "naive"):
            v[f"{k}_c"] = r[f"saved_{k}_custom"] / MiB
            v[f"{k}_n"] = r[f"saved_{k}_native"] / MiB
        v["tensors"] = f"{r['saved_tensors_custom']} / {r['saved_tensors_native']}"
        if "peak_custom" in r:
            v["peak_c"] = r["peak_custom"] / MiB
            v["peak_n"] = r["peak_native"] / MiB
        view.append(v)
    return table(view, [
        ("H", "H", ""), ("B", "B", ""),
        ("unique_c", "saved MiB torch_mlp", ".3f"), ("unique_n", "saved MiB torch.nn", ".3f"),
        ("activations_c", "activations torch_mlp", ".3f"),
        ("activations_n", "activations torch.nn", ".3f"),
        ("naive_c", "naive sum torch_mlp", ".3f"), ("naive_n", "naive sum torch.nn", ".3f"),
        ("tensors", "saved tensors", ""),
        ("peak_c", "step peak MiB torch_mlp", ".2f"), ("peak_n", "step peak MiB torch.nn", ".2f"),
    ])


if __name__ == "__main__":  # the child process of _peaks_in_child
    hidden, batch = json.loads(sys.argv[1])
    print(json.dumps(_peaks(hidden, batch, torch.device("cpu"))))
