"""metrics.csv: one row per epoch, written atomically after each epoch."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import atomic_write

__all__ = ["METRIC_FIELDS", "VERIFY_ERR_PREFIXES", "metric_fields", "write_metrics_csv"]

METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                 "seconds", "train_seconds", "samples_per_s", "verify_checks",
                 "verify_max_rel_diff", "verify_tolerance_used", "verify_seconds")
# Per parameter, the max over the epoch's checks of max|g − g_float64| for ours and native's.
VERIFY_ERR_PREFIXES = ("verify_ours_err_", "verify_native_err_")


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
