"""MLP's fused paths (whole network, Linear → ReLU pair, none): when each runs, and that they
change nothing but the speed and the backward's peak memory, by a bounded amount."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_mlp

FUSE = torch_mlp.MLP.FUSE_MAX_ELEMENTS


def _path(model: torch_mlp.MLP, x: torch.Tensor) -> str:
    """Which path ran: 'whole' (one MLPFunction), 'pair' (LinearReLUFunction under the last
    Linear) or 'modules' (a separate ReLUFunction there)."""
    node = model(x).grad_fn
    name = type(node).__name__
    if name.startswith("_MLPFunction"):
        return "whole"
    below = type(node.next_functions[0][0]).__name__  # what produced the last Linear's input
    if below.startswith("_LinearReLUFunction"):
        return "pair"
    assert below.startswith("_ReLUFunction"), below
    return "modules"


@pytest.mark.parametrize("batch", [1, 4])
def test_small_networks_run_as_one_function(batch: int) -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, [5, 3], 2)
    assert _path(model, torch.randn(batch, 6)) == "whole"


def test_the_whole_network_limit_is_rows_times_all_hidden_features() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, [5, 3], 2)  # Σ hidden = 8
    rows = FUSE // 8
    assert _path(model, torch.randn(rows, 6)) == "whole"
    assert _path(model, torch.randn(rows + 1, 6)) == "pair"  # each pair still small enough


def test_large_pairs_are_not_fused() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, 5, 2)
    assert _path(model, torch.randn(FUSE // 2 // 5, 6)) == "whole"
    assert _path(model, torch.randn(FUSE // 5 + 1, 6)) == "modules"


def test_leading_dims_count_as_rows() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, 5, 2)
    assert _path(model, torch.randn(2, FUSE // 10, 6)) == "whole"
    assert _path(model, torch.randn(2, FUSE // 5, 6)) == "modules"


def test_hooks_turn_fusion_off_and_see_every_module() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, 5, 2)
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        assert _path(model, torch.randn(3, 6)) == "modules"
    finally:
        handle.remove()
    assert seen == ["ReLU"]
    assert _path(model, torch.randn(3, 6)) == "whole"


def test_a_hook_on_one_layer_keeps_the_other_pairs_fused() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, [5, 3], 2)
    handle = model[0].register_forward_pre_hook(lambda m, i: None)
    try:
        # the first pair runs module by module; the second (under the last Linear) is fused
        assert _path(model, torch.randn(3, 6)) == "pair"
    finally:
        handle.remove()


def test_a_changed_layer_turns_whole_fusion_off_and_runs() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, [5, 3], 2)
    native = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.ReLU(),
                           nn.Linear(3, 2))
    native.load_state_dict(model.state_dict())
    model[1] = nn.Tanh()
    x = torch.randn(4, 6)
    assert _path(model, x) == "pair"
    torch.testing.assert_close(model(x), native(x))


@pytest.mark.parametrize("rows", [3, FUSE // 12 + 1, FUSE // 4 + 1],
                         ids=["whole", "pair", "modules"])
def test_every_path_matches_native(rows: int) -> None:
    torch.manual_seed(0)
    ours = torch_mlp.MLP(6, [8, 4], 3, dtype=torch.float64)
    native = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(),
                           nn.Linear(4, 3)).double()
    native.load_state_dict(ours.state_dict())
    x = torch.randn(rows, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (rows,))
    expected_path = {3: "whole", FUSE // 12 + 1: "pair", FUSE // 4 + 1: "modules"}[rows]
    assert _path(ours, x) == expected_path
    for model in (ours, native):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for a, b in zip(ours.parameters(), native.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(ours(x), native(x))


def test_whole_network_input_gradient_and_no_bias_match_native() -> None:
    torch.manual_seed(0)
    ours = torch_mlp.MLP(6, [8, 4], 3, bias=False, dtype=torch.float64)
    native = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False),
                           nn.ReLU(), nn.Linear(4, 3, bias=False)).double()
    native.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert _path(ours, xa) == "whole"
    ours(xa).square().sum().backward()
    native(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for a, b in zip(ours.parameters(), native.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def _saved(model: nn.Module, x: torch.Tensor) -> set[int]:
    """Storages (by data pointer) that the forward saves for backward."""
    ptrs: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return ptrs


def test_whole_network_saves_what_native_saves_or_less() -> None:
    torch.manual_seed(0)
    ours = torch_mlp.MLP(6, [8, 4], 3)
    native = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(),
                           nn.Linear(4, 3))
    native.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6)
    assert _path(ours, x) == "whole"
    # x, the weights W_2 and W_3 (W_1 is not needed: x wants no gradient), h_1 and h_2
    assert len(_saved(ours, x)) == len(_saved(native, x)) == 5


def test_whole_network_backward_overwrites_no_incoming_or_saved_tensor() -> None:
    # The hidden gradients are computed in place only in tensors the backward made itself:
    # a second backward (retain_graph) and a use of h_k's own gradient still give native's.
    torch.manual_seed(0)
    ours = torch_mlp.MLP(6, [8, 4], 3, dtype=torch.float64)
    native = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(),
                           nn.Linear(4, 3)).double()
    native.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, dtype=torch.float64)
    g = torch.randn(5, 3, dtype=torch.float64)
    la, lb = ours(x), native(x)
    for _ in range(2):
        ga = torch.autograd.grad(la, list(ours.parameters()), g, retain_graph=True)
        gb = torch.autograd.grad(lb, list(native.parameters()), g, retain_graph=True)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("eager", [True, False], ids=["eager-twin", "setup-context"])
def test_hidden_outputs_gradients_add_in_like_native(eager: bool) -> None:
    # MLPFunction returns every h_k; a loss that uses them sends their gradients back into the
    # same backward, where they add to the dL/dh_k from above.
    from torch_mlp import functional as F

    fn = F._EAGER[F.MLPFunction] if eager else F.MLPFunction
    torch.manual_seed(0)
    t = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
         for s in ((5, 6), (8, 6), (8,), (4, 8), (4,), (3, 4), (3,))]
    x, w1, b1, w2, b2, w3, b3 = t
    z, h1, h2 = fn.apply(*t)
    loss = z.square().sum() + h1.square().sum() + (h2 * 3).sum()
    ours = torch.autograd.grad(loss, t)
    nh1 = torch.relu(x @ w1.t() + b1)
    nh2 = torch.relu(nh1 @ w2.t() + b2)
    nz = nh2 @ w3.t() + b3
    ref = torch.autograd.grad(nz.square().sum() + nh1.square().sum() + (nh2 * 3).sum(), t)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
