"""torch_mlp.use_native(): every wrapper and module runs the native torch op inside the block."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as TF

import torch_mlp
from torch_mlp import functional as F


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(4, 5, generator=g, requires_grad=True),
        "w": torch.randn(3, 5, generator=g, requires_grad=True),
        "b": torch.randn(3, generator=g, requires_grad=True),
        "y": torch.randint(0, 3, (4,), generator=g),
    }


def _calls(t: dict[str, torch.Tensor]) -> dict[str, object]:
    x, w, b, y = t["x"], t["w"], t["b"], t["y"]
    return {
        "linear": lambda: F.linear(x, w, b),
        "relu": lambda: F.relu(x * 1),
        "cross_entropy": lambda: F.cross_entropy(x @ w.t(), y, label_smoothing=0.1),
        "l2_penalty": lambda: F.l2_penalty([w, b], 0.3),
    }


# The native op each wrapper is, as the name of the grad_fn it leaves.
_NATIVE_GRAD_FN = {
    "linear": "AddmmBackward0",
    "relu": "ReluBackward0",
    "cross_entropy": "AddBackward0",  # label smoothing: (1 - eps) nll + eps smooth, natively
    "l2_penalty": "MulBackward0",
}


@pytest.mark.parametrize("name", sorted(_NATIVE_GRAD_FN))
def test_use_native_runs_the_native_op_with_equal_values(name: str) -> None:
    t = _inputs()
    call = _calls(t)[name]
    ours = call()
    assert "Function" in type(ours.grad_fn).__name__  # a hand-derived torch_mlp Function
    with torch_mlp.use_native():
        native = call()
    assert type(native.grad_fn).__name__ == _NATIVE_GRAD_FN[name]
    torch.testing.assert_close(native, ours)
    after = call()
    assert "Function" in type(after.grad_fn).__name__  # switched back on exit


def test_use_native_l2_penalty_is_the_native_formula() -> None:
    t = _inputs()
    w, b = t["w"], t["b"]
    with torch_mlp.use_native():
        got = F.l2_penalty([w, b], 0.3)
    torch.testing.assert_close(got, 0.5 * 0.3 * (w.square().sum() + b.square().sum()))


def test_use_native_modules_and_mlp_match_native_gradients() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(5, [7, 6], 3)
    loss_fn = torch_mlp.CrossEntropyLoss()
    t = _inputs()
    x, y = t["x"].detach(), t["y"]
    loss = loss_fn(model(x), y)
    assert "Function" in type(loss.grad_fn).__name__
    ours = torch.autograd.grad(loss, list(model.parameters()))
    with torch_mlp.use_native():
        native_loss = loss_fn(model(x), y)
        names = set()
        stack = [native_loss.grad_fn]
        while stack:  # every node of the graph is a native one
            node = stack.pop()
            if node is not None:
                names.add(type(node).__name__)
                stack.extend(n for n, _ in node.next_functions)
        assert not any("Function" in n for n in names), names
        native = torch.autograd.grad(native_loss, list(model.parameters()))
    torch.testing.assert_close(native_loss, loss)
    for a, b in zip(native, ours):
        torch.testing.assert_close(a, b)


def test_use_native_is_reentrant_and_can_be_switched_off_inside() -> None:
    t = _inputs()
    x, w = t["x"], t["w"]
    with torch_mlp.use_native():
        with torch_mlp.use_native():
            assert type(F.linear(x, w).grad_fn).__name__ == "MmBackward0"
        assert type(F.linear(x, w).grad_fn).__name__ == "MmBackward0"  # still native
        with torch_mlp.use_native(False):
            assert "Function" in type(F.linear(x, w).grad_fn).__name__
        assert type(F.linear(x, w).grad_fn).__name__ == "MmBackward0"
    assert "Function" in type(F.linear(x, w).grad_fn).__name__


def test_use_native_restores_after_an_exception() -> None:
    t = _inputs()
    with pytest.raises(KeyError), torch_mlp.use_native():
        raise KeyError("boom")
    assert "Function" in type(F.linear(t["x"], t["w"]).grad_fn).__name__


def test_use_native_is_per_thread() -> None:
    t = _inputs()
    seen: list[str] = []

    def other() -> None:
        seen.append(type(F.linear(t["x"], t["w"]).grad_fn).__name__)

    with torch_mlp.use_native():
        th = threading.Thread(target=other)
        th.start()
        th.join()
    assert "Function" in seen[0]  # another thread does not see this thread's switch


def test_use_native_refuses_a_non_bool() -> None:
    with (pytest.raises(TypeError, match="use_native: enabled must be a bool"),
          torch_mlp.use_native("yes")):  # type: ignore[arg-type]
        pass


def test_use_native_relu_inplace_keeps_the_inplace_effect() -> None:
    u = torch.randn(6, generator=torch.Generator().manual_seed(1))
    expected = TF.relu(u)
    with torch_mlp.use_native():
        out = F.relu(u, inplace=True)
    assert out is u
    torch.testing.assert_close(u, expected)


def test_checkpoint_recomputes_under_the_setting_its_context_fn_gives() -> None:
    # torch.utils.checkpoint recomputes in backward, under the setting active there: across a
    # use_native() boundary that is the other implementation, which torch's metadata check
    # refuses; the documented context_fn makes the recompute take the forward's setting.
    from torch.utils.checkpoint import CheckpointError, checkpoint

    torch.manual_seed(0)
    model, x = torch_mlp.MLP(6, [5], 3), torch.randn(4, 6)
    with torch_mlp.use_native():
        out = checkpoint(model, x, use_reentrant=False)
    with pytest.raises(CheckpointError, match="different metadata"):
        out.sum().backward()
    model.zero_grad()
    with torch_mlp.use_native():
        out = checkpoint(model, x, use_reentrant=False,
                         context_fn=lambda: (torch_mlp.use_native(), torch_mlp.use_native()))
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch_mlp.use_native():
        model(x).sum().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_compiled_code_follows_use_native_entered_around_the_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A ReLU backward made wrong on purpose tells the two implementations apart: the compiled
    # model runs it outside the block, native's inside, and again the hand-derived one after.
    from torch_mlp.functions import ReLUFunction

    real = ReLUFunction.backward
    monkeypatch.setattr(ReLUFunction, "backward", staticmethod(lambda ctx, g: 2 * real(ctx, g)))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = torch_mlp.MLP(6, [5], 3), torch.randn(4, 6)
    compiled = torch.compile(model, backend="eager")

    def first_layer_grad(m: torch.nn.Module) -> torch.Tensor:
        model.zero_grad()
        m(x).square().sum().backward()
        return model[0].weight.grad.clone()

    with torch_mlp.use_native():
        native = first_layer_grad(model)
    assert not torch.allclose(first_layer_grad(compiled), native)  # compiled outside first
    with torch_mlp.use_native():
        torch.testing.assert_close(first_layer_grad(compiled), native)
    assert not torch.allclose(first_layer_grad(compiled), native)
    torch._dynamo.reset()
