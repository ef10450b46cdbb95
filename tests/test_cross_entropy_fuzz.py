"""torch_mlp.functional.cross_entropy against torch.nn.functional.cross_entropy over its options.

Every combination of input layout, target kind, class weight, ignore_index, label smoothing,
reduction and dtype: where native refuses, ours refuses too; where native accepts, ours gives
native's value and input gradient (NaN where native has NaN). The fast run takes a fixed sample
of the grid; the whole grid is marked slow.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from torch import Tensor

from torch_mlp import functional as F

C, N, D1, D2 = 3, 4, 2, 3

# name -> (input shape, index-target shape); a probability target has the input's shape.
LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "unbatched": ((C,), ()),
    "unbatched-target1": ((C,), (1,)),
    "2d": ((N, C), (N,)),
    "3d": ((N, C, D1), (N, D1)),
    "4d": ((N, C, D1, D2), (N, D1, D2)),
    "zero-n": ((0, C), (0,)),
    "zero-n-3d": ((0, C, D1), (0, D1)),
    "zero-c": ((N, 0), (N,)),
    "zero-c-3d": ((N, 0, D1), (N, D1)),
}
TARGETS = ["index", "prob"]
WEIGHTS = ["none", "weight"]
IGNORES = {"default": -100, "class": 1, "out-of-range": C + 4}
SMOOTHINGS = [0.0, 0.1]
REDUCTIONS = ["none", "mean", "sum"]
DTYPES = {"float32": torch.float32, "float64": torch.float64}

GRID = list(itertools.product(LAYOUTS, TARGETS, WEIGHTS, IGNORES, SMOOTHINGS, REDUCTIONS, DTYPES))
GRID_IDS = ["-".join(str(part) for part in combo) for combo in GRID]
# A fixed sample for the fast run, the same on every machine.
FAST = sorted(random.Random(0).sample(range(len(GRID)), 60))


def _inputs(combo: tuple[Any, ...], seed: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
    layout, target_kind, weight_kind, ignore, smoothing, reduction, dtype_name = combo
    dtype = DTYPES[dtype_name]
    in_shape, t_shape = LAYOUTS[layout]
    classes = in_shape[0] if len(in_shape) == 1 else in_shape[1]
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(in_shape, dtype=dtype, generator=gen)
    ignore_index = IGNORES[ignore]
    if target_kind == "prob":
        dim = 0 if len(in_shape) == 1 else 1
        t = torch.softmax(torch.randn(in_shape, dtype=dtype, generator=gen), dim)
    else:
        t = torch.randint(0, max(classes, 1), t_shape, generator=gen)
        # Every third position holds ignore_index; with no classes, every position must.
        flat = t.view(-1)
        flat[::3] = ignore_index
        if classes == 0:
            flat.fill_(ignore_index)
    kw: dict[str, Any] = {
        "ignore_index": ignore_index, "label_smoothing": smoothing, "reduction": reduction,
    }
    if weight_kind == "weight":
        kw["weight"] = torch.rand(classes, dtype=dtype, generator=gen) + 0.5
    return z, t, kw


class _Refused:
    """Which pass refused (forward or backward), and with what."""

    def __init__(self, stage: str, error: Exception) -> None:
        self.stage, self.error = stage, error

    def __str__(self) -> str:
        return f"{self.stage}: {self.error!r}"


def _run(fn: Any, z: Tensor, t: Tensor, kw: dict[str, Any], g_seed: int
         ) -> tuple[Tensor, Tensor] | _Refused:
    z = z.clone().requires_grad_()
    try:
        out = fn(z, t.clone(), **kw)
    except Exception as e:  # the refusal itself is what is compared
        return _Refused("forward", e)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(g_seed))
    try:
        (grad,) = torch.autograd.grad(out, z, g)
    except Exception as e:
        return _Refused("backward", e)
    return out.detach(), grad


def _check(index: int) -> None:
    combo = GRID[index]
    z, t, kw = _inputs(combo, seed=index)
    ref = _run(TF.cross_entropy, z, t, kw, g_seed=index)
    ours = _run(F.cross_entropy, z, t, kw, g_seed=index)
    if isinstance(ref, _Refused) and ref.stage == "backward" and combo[0] == "unbatched-target1":
        # Native takes a (1,) target for a (C) input in forward, but its backward then fails
        # on the shapes (a native bug); ours gives that target's gradient as for the () target.
        native_value = TF.cross_entropy(z, t, **kw).detach()  # its forward alone works
        ref = _run(TF.cross_entropy, z, t.reshape(()), kw, g_seed=index)
        assert not isinstance(ref, _Refused)
        torch.testing.assert_close(native_value, ref[0], equal_nan=True)
    if isinstance(ref, _Refused):
        assert isinstance(ours, _Refused), f"native refuses ({ref}), ours accepts"
        # Ours is an instance of native's type (a ValueError of ours is a RuntimeError too),
        # so that code catching native's catches ours.
        assert isinstance(ours.error, type(ref.error)), f"native: {ref}, ours: {ours}"
        return
    if combo[0].startswith("zero-c"):
        # Zero classes: nothing to derive; refused by name rather than imitated.
        assert isinstance(ours, _Refused) and "C ≥ 1 classes" in str(ours.error)
        return
    assert not isinstance(ours, _Refused), f"native accepts, ours refuses ({ours})"
    (out, grad), (ref_out, ref_grad) = ours, ref
    assert out.dtype == ref_out.dtype
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, equal_nan=True)
    assert grad.shape == ref_grad.shape
    torch.testing.assert_close(grad, ref_grad, equal_nan=True)


@pytest.mark.parametrize("index", FAST, ids=[GRID_IDS[i] for i in FAST])
def test_cross_entropy_matches_native_on_a_sample_of_the_grid(index):
    _check(index)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(GRID)), ids=GRID_IDS)
def test_cross_entropy_matches_native_on_the_whole_grid(index):
    _check(index)


def test_the_grid_covers_refusals_and_acceptances():
    # The fuzz is only meaningful if native both accepts and refuses somewhere in the sample.
    refused = 0
    for index in FAST:
        z, t, kw = _inputs(GRID[index], seed=index)
        refused += isinstance(_run(TF.cross_entropy, z, t, kw, g_seed=index), _Refused)
    assert 0 < refused < len(FAST)
