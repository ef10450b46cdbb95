"""The reusable parts of train.py: command line (config), checkpoints, DDP setup and teardown
(distributed), metrics.csv (metrics) and the run's pictures (plots).

Nothing here imports train.py; train.py is the loop, these are the parts around it.
"""

from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, restore, save_checkpoint
from .distributed import Dist, all_mean, init_distributed
from .errors import CheckpointError, NonFiniteLossError, TrainingError, VerifyError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "Dist",
    "NonFiniteLossError",
    "TrainingError",
    "VerifyError",
    "all_mean",
    "init_distributed",
    "load_checkpoint",
    "restore",
    "save_checkpoint",
]
