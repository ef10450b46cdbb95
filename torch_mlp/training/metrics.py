"""metrics.csv: one row per epoch, written atomically after each epoch."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import atomic_write

__all__ = ["METRIC_FIELDS", "VERIFY_ERR_PREFIXES", "keep_max_verify_errors", "metric_fields",
           "run_result", "write_metrics_csv"]

METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                 "seconds", "train_seconds", "samples_per_s", "verify_checks",
                 "verify_max_rel_diff", "verify_tolerance_used", "verify_seconds")
# Per parameter, the max over the epoch's checks of max|g − g_float64| for ours and native's.
VERIFY_ERR_PREFIXES = ("verify_ours_err_", "verify_native_err_")


def keep_max_verify_errors(errors: dict[str, float], rows: Sequence[Any]) -> None:
    """Update ``errors`` with each parameter's max error (ours, native) against float64, from
    a :class:`torch_mlp.verify.Report`'s ``rows`` (``rows[0]``, the loss value, has none)."""
    for row in rows[1:]:
        for prefix, err in zip(VERIFY_ERR_PREFIXES, (row.ours_err, row.native_err)):
            errors[prefix + row.name] = max(errors.get(prefix + row.name, 0.0), err)


def run_result(history: list[dict[str, Any]], out: str | os.PathLike[str],
               wall_seconds: float) -> dict[str, Any]:
    """A finished run's metrics: the last row of ``history`` plus ``out``, ``history``,
    ``wall_seconds`` and ``verify_overhead`` (verify's share of the epochs' seconds)."""
    train_time = sum(h.get("seconds", 0.0) for h in history)
    verify_time = sum(h.get("verify_seconds", 0.0) for h in history)
    return {**history[-1], "out": str(out), "history": history, "wall_seconds": wall_seconds,
            "verify_overhead": verify_time / train_time if train_time else 0.0}


def metric_fields(history: Sequence[dict[str, Any]]) -> list[str]:
    """METRIC_FIELDS, then the per-parameter verify columns in the order they first appear."""
    fields = list(METRIC_FIELDS)
    for row in history:
        fields += [k for k in row if k.startswith(VERIFY_ERR_PREFIXES) and k not in fields]
    return fields


def write_metrics_csv(path: str | os.PathLike[str], history: Sequence[dict[str, Any]]) -> None:
    """Write ``history`` (one dict per epoch) as CSV; a missing value is an empty cell."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=metric_fields(history), extrasaction="ignore")
            w.writeheader()
            w.writerows(history)

    atomic_write(Path(path), write)
