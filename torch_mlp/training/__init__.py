"""The reusable parts of train.py: the command line and config.json (config), the checks a
run passes before it trains (resources), checkpoints (checkpoint), DDP setup and teardown
(distributed), the NaN/inf stop (guards), metrics.csv and the run's result (metrics), the
pictures (plots), the exceptions and the CLI's one-line errors (errors), and what a run prints
besides its epoch lines (messages).

Nothing here imports train.py; train.py is the loop, these are the parts around it.
"""

from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, restore, save_checkpoint
from .distributed import Dist, init_distributed
from .errors import CheckpointError, NonFiniteLossError, TrainingError, VerifyError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "Dist",
    "NonFiniteLossError",
    "TrainingError",
    "VerifyError",
    "init_distributed",
    "load_checkpoint",
    "restore",
    "save_checkpoint",
]
