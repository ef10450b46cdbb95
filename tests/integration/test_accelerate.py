"""accelerate: Accelerator(cpu=True, mixed_precision="bf16") trains torch_mlp as it trains the
same model in torch.nn, and torch_mlp.verify checks each step inside the loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torch_mlp

pytestmark = pytest.mark.integration


def _train(model: torch.nn.Module, loss_fn: torch.nn.Module, verify: bool):
    """A plain accelerate loop, one epoch; returns the model, verify's reports and the dtype
    the first Linear computed in."""
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 20, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer, loader = accelerator.prepare(
        model, optimizer, DataLoader(TensorDataset(x, y), batch_size=16))
    dtypes: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    reports = []
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(xb), yb)
        accelerator.backward(loss)
        if verify:
            reports.append(torch_mlp.verify.check(
                model, lambda m, a, b: loss_fn(m(a), b), xb, yb, loss=loss))
        optimizer.step()
    return model, reports, dtypes


def test_accelerate_bf16_trains_like_native_and_verifies() -> None:
    torch.manual_seed(0)
    ours = torch_mlp.MLP(20, 32, 4)
    native = torch_mlp.convert(copy.deepcopy(ours), to_native=True)
    ours, reports, dtypes = _train(ours, torch_mlp.CrossEntropyLoss(), verify=True)
    native, _, _ = _train(native, torch.nn.CrossEntropyLoss(), verify=False)
    assert dtypes[0] == torch.bfloat16  # accelerate's autocast reached the twins
    assert len(reports) == 4 and all(r.ok for r in reports)
    assert type(ours[0]) is torch_mlp.Linear and type(native[0]) is torch.nn.Linear
    for (name, p), q in zip(ours.named_parameters(), native.parameters()):
        # The same bfloat16 products in both, so the same float32 parameters up to rounding.
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}")
