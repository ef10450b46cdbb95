"""docs/extending.md's "Add your own op" example runs, and its op passes check_function."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import torch_mlp
from torch_mlp.testing import check_function

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def _run_doc(monkeypatch) -> dict:
    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    monkeypatch.setitem(torch_mlp.modules.TWINS, nn.Sigmoid, None)  # restored after the test
    namespace: dict = {"__name__": "extending_example"}
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_extending_example_op_passes_check_function(monkeypatch) -> None:
    ns = _run_doc(monkeypatch)
    result = ns["result"]
    assert result.failures == []
    u = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert check_function(ns["sigmoid"], torch.sigmoid, u).failures == []
    out = ns["sigmoid"](u)
    assert type(out.grad_fn).__name__ == "_SigmoidFunctionEagerBackward"  # hand-derived
    with torch_mlp.use_native():
        assert type(ns["sigmoid"](u).grad_fn).__name__ == "SigmoidBackward0"
    back = torch_mlp.convert(ns["model"], to_native=True)
    assert type(back[1]) is nn.Sigmoid


def test_extending_example_catches_a_wrong_backward(monkeypatch) -> None:
    # The check the doc relies on can fail: a backward without the (1 - s) factor is caught.
    ns = _run_doc(monkeypatch)
    fn = ns["SigmoidFunction"]

    def wrong(ctx, g):
        (s,) = ctx.saved_tensors
        return g * s

    monkeypatch.setattr(fn, "backward", staticmethod(wrong))
    u = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    result = check_function(fn.apply, torch.sigmoid, u, raise_on_failure=False)
    assert result.failures


def test_extending_example_traces_with_fx(monkeypatch) -> None:
    ns = _run_doc(monkeypatch)
    model = nn.Sequential(torch_mlp.Linear(3, 2), ns["Sigmoid"]())
    traced = torch.fx.symbolic_trace(model)
    assert ns["sigmoid"] in [n.target for n in traced.graph.nodes]
    x = torch.randn(4, 3)
    torch.testing.assert_close(traced(x), model(x))


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
