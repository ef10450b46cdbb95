"""skorch: NeuralNetClassifier with torch_mlp.MLP and torch_mlp.CrossEntropyLoss trains as with
torch.nn's, and predict_proba gives probabilities (skorch applies softmax only for a criterion
that is an nn.CrossEntropyLoss, which torch_mlp's is)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import torch_mlp

pytestmark = pytest.mark.integration


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 20)).astype(np.float32)
    y = ((X[:, 0] > 0).astype(np.int64) + 2 * (X[:, 1] > 0)).astype(np.int64)
    return X, y


def _fit(module: nn.Module, criterion: type[nn.Module]):
    skorch = pytest.importorskip("skorch")
    net = skorch.NeuralNetClassifier(module, criterion=criterion, max_epochs=5, lr=0.1,
                                     batch_size=32, train_split=None, verbose=0)
    return net.fit(*_data())


def test_skorch_classifier_trains_like_native_and_gives_probabilities() -> None:
    torch.manual_seed(0)
    ours = torch_mlp.MLP(20, 32, 4)
    native = torch_mlp.convert(ours.__class__(20, 32, 4), to_native=True)
    native.load_state_dict(ours.state_dict())
    torch.manual_seed(1)  # skorch shuffles the batches: the same order for both
    net = _fit(ours, torch_mlp.CrossEntropyLoss)
    torch.manual_seed(1)
    reference = _fit(native, nn.CrossEntropyLoss)
    assert type(net.criterion_) is torch_mlp.CrossEntropyLoss
    np.testing.assert_allclose(net.history[:, "train_loss"], reference.history[:, "train_loss"],
                               rtol=1e-5)
    X, _ = _data()
    proba = net.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-5)
    assert proba.min() >= 0
    np.testing.assert_allclose(proba, reference.predict_proba(X), rtol=1e-4, atol=1e-6)


class _LossNotACrossEntropyLoss(nn.Module):
    """torch_mlp's cross-entropy in a module that is not an nn.CrossEntropyLoss."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch_mlp.functional.cross_entropy(input, target)


def test_predict_proba_gives_logits_for_a_loss_that_is_not_a_cross_entropy_loss() -> None:
    # What the subclass design prevents: skorch then returns raw logits, rows not summing to 1.
    torch.manual_seed(0)
    net = _fit(torch_mlp.MLP(20, 32, 4), _LossNotACrossEntropyLoss)
    X, _ = _data()
    sums = net.predict_proba(X).sum(axis=1)
    assert not np.allclose(sums, 1.0, atol=1e-3)
