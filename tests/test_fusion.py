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


# --------------------------------------------------------------------------------------------
# functional.mlp: the whole network as one Function (opt-in; MLP itself does not use it)
# --------------------------------------------------------------------------------------------
def _params(model: torch_mlp.MLP) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    return [m.weight for m in model.linears()], [m.bias for m in model.linears()]


@pytest.mark.parametrize("bias", [True, False])
def test_functional_mlp_matches_native_module_by_module(bias: bool) -> None:
    torch.manual_seed(0)
    ours = torch_mlp.MLP(6, [8, 4], 3, bias=bias, dtype=torch.float64)
    native = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.ReLU(), nn.Linear(8, 4, bias=bias),
                           nn.ReLU(), nn.Linear(4, 3, bias=bias)).double()
    native.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = torch_mlp.functional.mlp(xa, *_params(ours))
    assert type(out.grad_fn).__name__.startswith("_MLPFunction")
    out.square().sum().backward()
    native(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for a, b in zip(ours.parameters(), native.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_functional_mlp_saves_what_native_saves() -> None:
    torch.manual_seed(0)
    ours = torch_mlp.MLP(6, [8, 4], 3)
    native = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(),
                           nn.Linear(4, 3))
    x = torch.randn(5, 6)
    ptrs: list[set[int]] = [set(), set()]
    for k, run in enumerate((lambda: torch_mlp.functional.mlp(x, *_params(ours)),
                             lambda: native(x))):
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, k=k: ptrs[k].add(t.untyped_storage().data_ptr()) or t, lambda t: t):
            run()
    # x, W_2 and W_3 (W_1 is not needed: x wants no gradient), h_1 and h_2
    assert len(ptrs[0]) == len(ptrs[1]) == 5


def test_functional_mlp_backward_overwrites_no_incoming_or_saved_tensor() -> None:
    # dL/du is written over dL/dh only in tensors the backward made itself: a second backward
    # through the same graph (retain_graph) still gives native's gradients.
    torch.manual_seed(0)
    ours = torch_mlp.MLP(6, [8, 4], 3, dtype=torch.float64)
    native = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(),
                           nn.Linear(4, 3)).double()
    native.load_state_dict(ours.state_dict())
    x = torch.randn(5, 6, dtype=torch.float64)
    g = torch.randn(5, 3, dtype=torch.float64)
    la, lb = torch_mlp.functional.mlp(x, *_params(ours)), native(x)
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


@pytest.mark.parametrize("call, match", [
    (lambda x, w: torch_mlp.functional.mlp(x, []), "at least one weight"),
    (lambda x, w: torch_mlp.functional.mlp(x, [w], [None, None]), "one bias"),
    (lambda x, w: torch_mlp.functional.mlp(x, [w, w]), r"weights\[0\]'s out_features \(5\)"),
    (lambda x, w: torch_mlp.functional.mlp(x, [w.t()]), r"input's last dimension \(6\)"),
    (lambda x, w: torch_mlp.functional.mlp(x, [w], [torch.zeros(4)]), r"biases\[0\] of shape"),
    (lambda x, w: torch_mlp.functional.mlp(x, [w[0]]), r"weights\[0\] to be 2-D"),
    (lambda x, w: torch_mlp.functional.mlp(x.double(), [w]), "same dtype"),
], ids=["none", "bias-count", "chain", "input", "bias-shape", "1-d", "dtype"])
def test_functional_mlp_bad_input_raises_clear_error(call, match) -> None:
    x, w = torch.randn(3, 6), torch.randn(5, 6)
    with pytest.raises((ValueError, RuntimeError), match=match):
        call(x, w)
