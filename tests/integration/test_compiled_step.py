"""A whole training step compiled as one graph, exactly as docs/compatibility.md writes it."""

from __future__ import annotations

import pytest
import torch

import torch_mlp

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                       reason="tracing autograd.grad into the graph needs torch >= 2.11"),
]
RECIPE = "A whole training step as one compiled graph"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Dynamo caches per code object: the recipe compiles afresh and leaves nothing behind.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_recipe_matches_the_eager_native_step(run_recipe, monkeypatch) -> None:
    compiled = run_recipe(RECIPE)
    # The same recipe again, each step run eagerly by torch.nn's ops and native autograd.
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    with torch_mlp.use_native():
        native = run_recipe(RECIPE)
    assert all(b.abs().sum() > 0 for b in compiled["momentum_buffers"]), "no step was taken"
    torch.testing.assert_close(compiled["loss"], native["loss"])
    for (name, p), q in zip(compiled["model"].named_parameters(), native["params"]):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}")


def test_the_recipe_step_is_one_graph_without_breaks(run_recipe, monkeypatch) -> None:
    # fullgraph=True already refuses a break; explain() says so in numbers, and shows that
    # without trace_autograd_ops the same step does break (why the recipe turns it on).
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    ns = run_recipe(RECIPE)
    step, x, y = ns["train_step"], ns["x"], ns["y"]
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explained = torch._dynamo.explain(step)(x, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=False):
        assert torch._dynamo.explain(step)(x, y).graph_break_count >= 1
