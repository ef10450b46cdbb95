"""torch.export, torch.jit.trace and dynamic quantization, as docs/compatibility.md writes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torch_mlp

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit is deprecated
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # and torch.ao too


def test_export_recipe_runs_every_batch_size(run_recipe, tmp_path: Path) -> None:
    ns = run_recipe("torch.export, with a dynamic batch")
    model, exported = ns["model"], ns["exported"]
    program = torch.export.load(tmp_path / "mlp.pt2").module()
    for n in (2, 33):
        x = torch.randn(n, 784)
        torch.testing.assert_close(program(x), model(x))
    targets = {node.target for node in exported.graph.nodes}
    assert torch.ops.aten.relu.default in targets and torch.ops.aten.addmm.default in targets


def test_jit_trace_recipe_saves_and_reloads(run_recipe, tmp_path: Path) -> None:
    ns = run_recipe("torch.jit.trace: trace under `use_native()`")
    reloaded = torch.jit.load(tmp_path / "mlp_traced.pt")
    for n in (1, 20):
        x = torch.randn(n, 784)
        torch.testing.assert_close(reloaded(x), ns["model"](x))
    assert "PythonOp" not in str(reloaded.inlined_graph)


def test_a_trace_of_the_hand_derived_functions_cannot_be_saved(tmp_path: Path) -> None:
    # Why the recipe traces under use_native(): outside it the trace keeps the Functions as
    # Python calls, which TorchScript cannot save.
    model = torch_mlp.MLP(6, 5, 2)
    traced = torch.jit.trace(model, torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="Could not export Python function call"):
        traced.save(tmp_path / "mlp.pt")


def test_quantization_recipe_quantizes_every_linear(run_recipe) -> None:
    ns = run_recipe("Dynamic quantization")
    model, quantized = ns["model"], ns["quantized"]
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    assert [type(m) for m in quantized] == [dynamic_linear, nn.ReLU, dynamic_linear]
    assert [type(m) for m in model] == [torch_mlp.Linear, torch_mlp.ReLU, torch_mlp.Linear]
    x = torch.randn(16, 784)
    # int8 weights: close to the float model, not equal to it.
    torch.testing.assert_close(quantized(x), model(x), rtol=0, atol=0.05)


def test_quantize_dynamic_leaves_a_twin_in_float() -> None:
    # Why the recipe converts to native first: quantize_dynamic swaps exact types only.
    model = torch_mlp.MLP(6, 5, 2)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert [type(m) for m in quantized] == [torch_mlp.Linear, torch_mlp.ReLU, torch_mlp.Linear]
