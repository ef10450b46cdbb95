"""torch_mlp: an MLP whose backward passes are derived by hand and checked against autograd.

Swap ``torch.nn`` for ``torch_mlp`` and the same model trains with the hand-derived
``torch.autograd.Function`` s in :mod:`torch_mlp.functional`.
"""

import importlib
from typing import Any

from . import functional, verify
from ._dispatch import use_native
from .modules import MLP, CrossEntropyLoss, Linear, ReLU, convert

__all__ = ["MLP", "CrossEntropyLoss", "Linear", "ReLU", "convert", "functional", "testing",
           "use_native", "verify"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # testing is imported on first use, so `python -m torch_mlp.testing` runs it only once.
    if name == "testing":
        return importlib.import_module(".testing", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
