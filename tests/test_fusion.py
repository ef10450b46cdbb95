"""MLP's fused Linear → ReLU path: when it runs, and that it changes nothing but the speed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_mlp


def _last_hidden_node(model: torch_mlp.MLP, x: torch.Tensor) -> str:
    """The backward node that produced the last Linear's input: the last hidden layer's."""
    return type(model(x).grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize("batch", [1, 4])
def test_small_pairs_are_fused(batch: int) -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, [5, 3], 2)
    assert _last_hidden_node(model, torch.randn(batch, 6)).startswith("_LinearReLUFunction")


def test_large_pairs_are_not_fused() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, 5, 2)
    rows = torch_mlp.MLP.FUSE_MAX_ELEMENTS // 5 + 1
    assert _last_hidden_node(model, torch.randn(rows, 6)).startswith("_ReLUFunction")


def test_hooks_turn_fusion_off_and_see_every_module() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, 5, 2)
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        assert _last_hidden_node(model, torch.randn(3, 6)).startswith("_ReLUFunction")
    finally:
        handle.remove()
    assert seen == ["ReLU"]


@pytest.mark.parametrize("rows", [3, torch_mlp.MLP.FUSE_MAX_ELEMENTS // 8 + 1],
                         ids=["fused", "unfused"])
def test_fused_and_unfused_match_native(rows: int) -> None:
    torch.manual_seed(0)
    ours = torch_mlp.MLP(6, [8, 4], 3, dtype=torch.float64)
    native = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(),
                           nn.Linear(4, 3)).double()
    native.load_state_dict(ours.state_dict())
    x = torch.randn(rows, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (rows,))
    for model in (ours, native):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for a, b in zip(ours.parameters(), native.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ours(x), native(x))
