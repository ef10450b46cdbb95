"""Which implementation a functional wrapper runs: the native op (``use_native``) or a variant
of the hand-derived Function (``apply``).

``use_native()`` switches every wrapper (and so every module) to the native torch op, e.g. to
compare a model against its native twin without rebuilding it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.autograd import Function

__all__ = ["Variants", "apply", "native_enabled", "use_native", "variants"]

# Whether a torch.func transform (vmap, grad, jvp, ...) is running: picks the Function variant.
transforms_active = torch._C._are_functorch_transforms_active

# A ContextVar: per thread and per asyncio task, and each `with` restores what it found.
_NATIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("torch_mlp_native", default=False)


def native_enabled() -> bool:
    """Whether the wrappers run the native torch ops (inside ``use_native()``)."""
    return _NATIVE.get()


@contextlib.contextmanager
def use_native(enabled: bool = True) -> Iterator[None]:
    """Run torch_mlp's wrappers and modules on the native torch ops inside the block.

    Under it, ``linear``, ``relu``, ``cross_entropy`` and ``l2_penalty`` (and
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


# --------------------------------------------------------------------------------------------
# The variant of a Function that a call runs
# --------------------------------------------------------------------------------------------
# Why this exists: autograd.Function.apply binds the arguments to a setup_context-style forward
# with inspect.signature on every call (cost: docs/performance.md), which a ctx-first forward
# does not pay (pytorch/pytorch#189573). Once torch fixes that, delete the eager variant.
class Variants(NamedTuple):
    """The three forms of one hand-derived Function; the derivation is written once, in
    ``original``, and the other two inherit its backward (and, for eager, its jvp).

    original: forward + setup_context, what torch.func transforms (vmap, grad, jvp) need.
    eager: the same in the ctx-first style, for plain eager calls (see the comment above).
    compiled: without jvp, for torch.compile: Dynamo graph-breaks on a Function that defines
        jvp when an input requires grad ("Unsupported custom jvp"), so fullgraph=True would fail.
    """

    original: type[Function]
    eager: type[Function]
    compiled: type[Function]


def _derive(cls: type[Function], suffix: str, body: dict[str, object]) -> type[Function]:
    return type(f"_{cls.__name__}{suffix}", (cls,), {
        "__doc__": f"{cls.__name__} as torch_mlp._dispatch.Variants.{suffix.lower()}.",
        "__module__": cls.__module__, **body})


def variants(cls: type[Function]) -> Variants:
    """The :class:`Variants` of ``cls``, a Function in the setup_context style (forward
    without ctx, then setup_context), with ``backward`` and optionally ``jvp``."""

    def forward(ctx, *args):
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output

    eager = _derive(cls, "Eager", {
        "forward": staticmethod(forward),
        # autograd.Function's own placeholder: apply takes the ctx-first path.
        "setup_context": staticmethod(Function.setup_context),
        "generate_vmap_rule": False,
    })
    return Variants(cls, eager, _derive(cls, "NoJvp", {"jvp": staticmethod(Function.jvp)}))


def apply(fn: Variants, *args: Any) -> Any:
    """``fn.original.apply(*args)`` through the variant that fits the caller: the eager variant
    in plain eager code, the original under a torch.func transform, the jvp-less variant under
    torch.compile. Every torch_mlp wrapper calls its Function through this, with the
    :class:`Variants` it holds from :func:`variants` (Dynamo traces a lookup through a
    Function class with a graph break, but not the fields of a tuple passed in).

    torch.compile around a torch.func transform that runs these Functions is refused: there
    Dynamo mis-traces custom Functions and can return wrong gradients without a word
    (pytorch/pytorch#193279). Without ``fullgraph=True`` the error is a graph break, and the
    call then runs in eager mode, correctly.
    """
    if not torch.compiler.is_compiling():  # True under torch.compile and torch.export
        return (fn.original if transforms_active() else fn.eager).apply(*args)
    if transforms_active():
        raise RuntimeError(
            "torch_mlp: a hand-derived Function under a torch.func transform inside "
            "torch.compile or torch.export is not supported (Dynamo mis-traces custom "
            "autograd.Functions there and can return wrong gradients, pytorch/pytorch#193279); "
            "run the torch.func transform uncompiled, or compile without fullgraph=True so "
            "that this call falls back to eager"
        )
    return fn.compiled.apply(*args)
