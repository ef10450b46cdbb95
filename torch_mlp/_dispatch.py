"""Which implementation a functional wrapper runs: the hand-derived Function or the native op.

``use_native()`` switches every wrapper (and so every module) to the native torch op, e.g. to
compare a model against its native twin without rebuilding it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["native_enabled", "use_native"]

# A ContextVar: per thread and per asyncio task, and each `with` restores what it found.
_NATIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("torch_mlp_native", default=False)


def native_enabled() -> bool:
    """Whether the wrappers run the native torch ops (inside ``use_native()``)."""
    return _NATIVE.get()


@contextlib.contextmanager
def use_native(enabled: bool = True) -> Iterator[None]:
    """Run torch_mlp's wrappers and modules on the native torch ops inside the block.

    Under it, ``linear``, ``relu``, ``linear_relu``, ``cross_entropy`` and ``l2_penalty`` (and
    the modules that call them) compute with ``torch.nn.functional``'s ops, whose backward is
    autograd's, instead of the hand-derived Functions. Re-entrant, per thread (a ContextVar);
    ``use_native(False)`` switches back to the hand-derived Functions for an inner block.

    Examples::

        >>> with torch_mlp.use_native():
        ...     reference = model(x)  # native ops, native autograd
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"use_native: enabled must be a bool, got {type(enabled).__name__}")
    token = _NATIVE.set(enabled)
    try:
        yield
    finally:
        _NATIVE.reset(token)
