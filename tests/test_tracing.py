"""torch.fx, torchvision's feature extraction, torch.export and torch.jit.script on torch_mlp
models, and cross_entropy's positional parameters, as torch.nn's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn.functional as TF
from torch import nn

import torch_mlp
from torch_mlp import functional as F


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(model(x).square().sum(), list(model.parameters())))


def _assert_same(traced: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    torch.testing.assert_close(traced(x), model(x))
    for a, b in zip(_grads(traced, x), _grads(model, x)):
        torch.testing.assert_close(a, b)


def test_fx_symbolic_trace_of_mlp_gives_same_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, [8, 5], 3)
    traced = torch.fx.symbolic_trace(model)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets == [F.linear, F.relu, F.linear, F.relu, F.linear]  # wrappers are leaves
    _assert_same(traced, model, torch.randn(4, 6))
    out = traced(torch.randn(4, 6))
    assert "Function" in type(out.grad_fn).__name__  # still the hand-derived backward


def test_fx_symbolic_trace_of_sequential_of_torch_mlp_modules() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(torch_mlp.Linear(6, 7), torch_mlp.ReLU(), torch_mlp.Linear(7, 2))
    traced = torch.fx.symbolic_trace(model)
    _assert_same(traced, model, torch.randn(5, 6))


def test_fx_trace_of_a_loss_with_cross_entropy_and_l2() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, 8, 3)

    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.ce = model, torch_mlp.CrossEntropyLoss()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.ce(self.model(x), y) + self.model.l2_penalty(0.1)

    loss = Loss()
    traced = torch.fx.symbolic_trace(loss)
    x, y = torch.randn(4, 6), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(traced(x, y), loss(x, y))


@pytest.mark.parametrize("leaf", [False, True], ids=["traced-through", "leaf-modules"])
def test_create_feature_extractor_on_converted_torchvision_mlp(leaf: bool) -> None:
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    torch.manual_seed(0)
    native = torchvision.ops.MLP(6, [8, 4])
    model = torch_mlp.convert(torchvision.ops.MLP(6, [8, 4]))
    model.load_state_dict(native.state_dict())
    # Traced through, a torch_mlp module's node is named after its wrapper call ("1.relu");
    # as leaf modules, the nodes carry the native names ("1").
    kwargs = {"leaf_modules": [torch_mlp.Linear, torch_mlp.ReLU]} if leaf else {}
    names = ("1", "3") if leaf else ("1.relu", "3.linear")
    assert set(names) <= set(get_graph_node_names(model, tracer_kwargs=kwargs)[0])
    ours = create_feature_extractor(model, return_nodes=dict(zip(names, ("hidden", "out"))),
                                    tracer_kwargs=kwargs)
    ref = create_feature_extractor(native, return_nodes={"1": "hidden", "3": "out"})
    x = torch.randn(5, 6)
    got, want = ours(x), ref(x)
    for k in ("hidden", "out"):
        torch.testing.assert_close(got[k], want[k])
    ga = torch.autograd.grad(got["out"].sum(), list(ours.parameters()))
    gb = torch.autograd.grad(want["out"].sum(), list(ref.parameters()))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_export_with_dynamic_batch_runs_batch_3_and_17() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(6, [8, 5], 3)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, (torch.randn(4, 6),), dynamic_shapes={"input": {0: batch}})
    for n in (3, 17):
        x = torch.randn(n, 6)
        torch.testing.assert_close(ep.module()(x), model(x))


def test_a_non_strict_export_trains_as_the_native_one() -> None:
    # torch.export's default (strict=False) keeps the hand-derived backward: the exported
    # module's parameters get native's gradients. (Strict export runs custom Functions without
    # grad: docs/compatibility.md.)
    torch.manual_seed(0)
    model = torch_mlp.MLP(3, 4, 2)
    native = torch_mlp.convert(copy.deepcopy(model), to_native=True)
    x = torch.randn(5, 3)
    grads = []
    for m in (model, native):
        program = torch.export.export(m, (x,), strict=False).module()
        program(x).square().sum().backward()
        grads.append({k: p.grad for k, p in program.named_parameters()})
    assert grads[0].keys() == grads[1].keys() == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)


@pytest.mark.parametrize("module", [torch_mlp.Linear(3, 2), torch_mlp.ReLU(),
                                    torch_mlp.CrossEntropyLoss(), torch_mlp.MLP(3, 4, 2)],
                         ids=["Linear", "ReLU", "CrossEntropyLoss", "MLP"])
def test_jit_script_fails_loudly_and_the_native_twin_scripts(module: nn.Module) -> None:
    # TorchScript cannot compile a Python autograd.Function: it must fail, never run silently.
    with pytest.warns(FutureWarning), pytest.raises(RuntimeError):
        torch.jit.script(module)
    native = torch_mlp.convert(copy.deepcopy(module), to_native=True)
    with pytest.warns(FutureWarning):
        scripted = torch.jit.script(native)
    if isinstance(module, torch_mlp.CrossEntropyLoss):
        args: tuple[torch.Tensor, ...] = (torch.randn(4, 3), torch.tensor([0, 2, 1, 1]))
    else:
        args = (torch.randn(4, 3),)
    torch.testing.assert_close(scripted(*args), module(*args))


def test_jit_trace_under_use_native_saves_and_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = torch_mlp.MLP(6, [5], 2), torch.randn(3, 6)
    with torch_mlp.use_native():
        traced = torch.jit.trace(model, x)
    traced.save(tmp_path / "mlp.pt")
    reloaded = torch.jit.load(tmp_path / "mlp.pt")
    torch.testing.assert_close(reloaded(x), model(x))


# --------------------------------------------------------------------------------------------
# cross_entropy / CrossEntropyLoss: torch.nn's positional parameters, deprecated pair included
# --------------------------------------------------------------------------------------------
def _ce_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 1, 0])
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    return z, y, w


@pytest.mark.parametrize("args", [
    (None, None, 1, None, "sum", 0.0),
    (None, None, -100, None, "none", 0.1),
    ("w", None, 3, None, "mean", 0.2),
], ids=["ignore-sum", "none-smoothing", "weight-ignore-mean-smoothing"])
def test_cross_entropy_positional_parameters_follow_torch(args) -> None:
    z, y, w = _ce_inputs()
    args = tuple(w if a == "w" else a for a in args)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours, ref = F.cross_entropy(za, y, *args), TF.cross_entropy(zb, y, *args)
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(za.grad, zb.grad)


@pytest.mark.parametrize("size_average, reduce", [(False, None), (None, False), (True, True)])
def test_cross_entropy_deprecated_size_average_reduce_as_torch(size_average, reduce) -> None:
    z, y, _ = _ce_inputs()
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        ours = F.cross_entropy(z, y, None, size_average, -100, reduce)
    with pytest.warns(UserWarning):
        ref = TF.cross_entropy(z, y, None, size_average, -100, reduce)
    torch.testing.assert_close(ours, ref)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        ours = F.cross_entropy(z, y, size_average=size_average, reduce=reduce)
    torch.testing.assert_close(ours, ref)


def test_cross_entropy_loss_positional_init_follows_torch() -> None:
    z, y, w = _ce_inputs()
    args = (w, None, 2, None, "sum", 0.1)
    torch.testing.assert_close(torch_mlp.CrossEntropyLoss(*args)(z, y),
                               nn.CrossEntropyLoss(*args)(z, y))
    with pytest.warns(UserWarning, match="size_average and reduce"):
        ours = torch_mlp.CrossEntropyLoss(None, False)
    assert ours.reduction == nn.CrossEntropyLoss(None, False).reduction == "sum"
