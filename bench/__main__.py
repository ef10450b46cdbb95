"""``python -m bench [--quick] [--device D] [--compile] [--only SECTION ...] [--output PATH]``.

Results go to ``bench/results/latest.json`` (ignored by git), so a run never rewrites the
tracked reference ``bench/results.json``; ``--save-reference`` writes that one instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import e2e, floor, memory, ops, roofline, split, step
from .common import BATCH, HIDDEN, Settings, load, machine_info, steady_malloc

SECTIONS = ("step", "split", "floor", "ops", "memory", "roofline", "e2e")
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(BENCH_DIR, "results", "latest.json")  # in .gitignore
REFERENCE_OUT = os.path.join(BENCH_DIR, "results.json")  # tracked: the documented run


def _shape(text: str) -> tuple[int, int]:
    try:
        return split.parse_shape(text)
    except ValueError as e:  # argparse then names the option and exits with status 2
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:  # argparse then names the option and exits with status 2
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _device(text: str) -> str:
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:k], got {text!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device here")
    return text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="few, short repetitions: a smoke run, not a measurement (default: off)")
    p.add_argument("--device", default="cpu", type=_device,
                   help="cpu or cuda[:k] (default: cpu)")
    p.add_argument("--compile", action="store_true",
                   help="also time the step under torch.compile (default: off)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   metavar="SECTION", help=f"sections to run, of {', '.join(SECTIONS)} "
                   "(default: all)")
    p.add_argument("--hidden", type=_positive, nargs="+", default=list(HIDDEN),
                   help=f"hidden sizes H (default: {' '.join(map(str, HIDDEN))})")
    p.add_argument("--batch", type=_positive, nargs="+", default=list(BATCH),
                   help=f"batch sizes B (default: {' '.join(map(str, BATCH))})")
    p.add_argument("--split", nargs="+", type=_shape, default=list(split.DEFAULT_SHAPES),
                   metavar="HxB", help="shapes of the split section (default: "
                   + " ".join(f"{h}x{b}" for h, b in split.DEFAULT_SHAPES) + ")")
    p.add_argument("--floor", type=_positive, nargs="+", default=[1024, 1, 128], metavar="H B",
                   help="the floor section's hidden size, then its batch sizes (default: 1024 "
                   "1 128)")
    p.add_argument("--floor-runs", type=_positive, default=6, metavar="N",
                   help="the floor section's runs per step, alternating (default: 6)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, steadier on a shared "
                   "machine, use with --threads 1 (default: wall)")
    p.add_argument("--malloc", choices=("steady", "default"), default="steady",
                   help="steady: glibc keeps freed memory (no trim, no per-tensor mmap), so "
                   "page faults do not blur the ratios; default: glibc as it comes "
                   "(default: steady)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--output", "--out", dest="out", default=None, metavar="PATH",
                       help="results file (default: bench/results/latest.json, not tracked)")
    where.add_argument("--save-reference", action="store_true",
                       help="write the tracked reference bench/results.json (default: off)")
    args = p.parse_args(argv)
    if len(args.floor) < 2:
        p.error("--floor takes a hidden size, then one or more batch sizes")
    args.out = output_path(args.out, args.save_reference)
    return args


def output_path(out: str | None, save_reference: bool) -> str:
    """Where results go: ``out`` if given, the tracked reference on request, else latest.json."""
    if out is not None:
        return out
    return REFERENCE_OUT if save_reference else DEFAULT_OUT


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    allocator = steady_malloc() if args.malloc == "steady" else "default"
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings.make(args.quick, args.device, clock=args.clock)
    results: dict[str, Any] = {
        "machine": machine_info(s.device),
        "load_start": load(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"quick": args.quick, "warmup": s.warmup, "rounds": s.rounds,
                     "min_time_s": s.min_time_s, "hidden": args.hidden, "batch": args.batch,
                     "split": args.split, "floor": args.floor, "floor_runs": args.floor_runs,
                     "sections": args.only, "compile": args.compile,
                     "clock": args.clock, "malloc": allocator},
    }
    m = results["machine"]
    print(f"# torch_mlp vs torch.nn — {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
          f"{m['threads']} threads, device {m['device']}"
          + (f" ({m['gpu']})" if "gpu" in m else "") + f"; malloc {allocator}; "
          f"load {results['load_start']}",
          flush=True)
    text = []
    if "step" in args.only:
        print("## training step", flush=True)
        results["step"] = step.run(s, args.hidden, args.batch)
        text.append(("Training step (forward, loss, backward, SGD step)",
                     step.render(results["step"])))
        if args.compile:
            sc = Settings.make(args.quick, args.device, compile=True, clock=args.clock)
            results["step_compiled"] = step.run(sc, args.hidden, args.batch)
            step.add_speedup(results["step_compiled"], results["step"])
            text.append(("Training step, torch.compile", step.render(results["step_compiled"])))
    if "split" in args.only:
        print("## where the time goes: model and loss swapped one at a time", flush=True)
        results["split"] = split.run(s, args.split)
        text.append(("Where the time goes: each phase, with the model and the loss swapped "
                     "one at a time", split.render(results["split"])))
    if "floor" in args.only:
        print("## the floor: bare custom Functions beside torch_mlp", flush=True)
        results["floor"] = floor.run(s, args.floor[0], args.floor[1:],
                                     1 if args.quick else args.floor_runs)
        text.append(("The floor: a step of bare custom Functions beside torch_mlp's, each "
                     "against torch.nn", floor.render(results["floor"])))
    if "ops" in args.only:
        print("## per-op forward + backward", flush=True)
        results["ops"] = ops.run(s, args.quick)
        text.append(("Per-op forward + backward", ops.render(results["ops"])))
        results["tax"] = ops.run_tax(s)
        text.append(("Per-call Python tax (one forward call, 1×8 input, one thread)",
                     ops.render_tax(results["tax"])))
    if "memory" in args.only:
        print("## memory", flush=True)
        results["memory"] = memory.run(s.device, args.hidden, args.batch)
        text.append(("Memory of one training step", memory.render(results["memory"])))
    if "roofline" in args.only:
        print("## roofline", flush=True)
        results["roofline"] = roofline.run(s, args.hidden, args.batch)
        text.append(("Roofline: the step against its GEMMs alone",
                     roofline.render(results["roofline"])))
    if "e2e" in args.only:
        print("## end to end", flush=True)
        results["e2e"] = e2e.run(args.quick, args.device)
        if results["e2e"]:
            text.append(("End to end: seconds per MNIST epoch", e2e.render(results["e2e"])))
    results["load_end"] = load()
    print()
    for title, body in text:
        print(f"### {title}\n\n{body}\n")
    print(f"load average (1, 5, 15 min): start {results['load_start']}, end {results['load_end']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
