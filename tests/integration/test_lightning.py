"""PyTorch Lightning: a LightningModule built on torch_mlp trains with Trainer in fp32 and in
bf16-mixed, and torch_mlp.verify checks every step from a callback, with no extra arguments."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torch_mlp
from torch_mlp.functions import LinearFunction

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
BATCHES = 4


def compute_loss(module, x, y):
    return module.loss_fn(module(x), y)


def _fit(precision: str, tmp_path) -> tuple[list, list[torch.dtype]]:
    """Trainer.fit for one epoch; returns verify's reports and the first Linear's output dtypes."""
    pl = pytest.importorskip("pytorch_lightning")

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch_mlp.MLP(20, 32, 4)
            self.loss_fn = torch_mlp.CrossEntropyLoss()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return compute_loss(self, *batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class VerifyGradients(pl.Callback):
        """After backward, before the optimizer step: the gradients of this very batch."""

        def __init__(self) -> None:
            self.reports: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

        def on_before_backward(self, trainer, pl_module, loss):
            self.loss = loss

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.reports.append(
                torch_mlp.verify.check(pl_module, compute_loss, *self.batch, loss=self.loss))

    torch.manual_seed(0)
    x, y = torch.randn(16 * BATCHES, 20), torch.randint(0, 4, (16 * BATCHES,))
    model, callback = Classifier(), VerifyGradients()
    dtypes: list[torch.dtype] = []
    model.net[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", precision=precision,
                         callbacks=[callback], default_root_dir=tmp_path, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    return callback.reports, dtypes


@pytest.mark.parametrize(("precision", "dtype"), [("32-true", torch.float32),
                                                  ("bf16-mixed", torch.bfloat16)])
def test_lightning_fit_with_verify_in_a_callback(tmp_path, precision: str,
                                                 dtype: torch.dtype) -> None:
    reports, dtypes = _fit(precision, tmp_path)
    assert len(reports) == BATCHES and all(r.ok for r in reports)
    assert dtypes[0] == dtype  # the training forward ran in the precision asked for


def test_lightning_verify_callback_catches_a_wrong_backward(tmp_path, monkeypatch) -> None:
    # The callback can fail: a Linear backward that doubles dL/dweight stops Trainer.fit.
    backward = LinearFunction.backward

    def doubled(ctx, g):
        grads = list(backward(ctx, g))
        grads[1] = None if grads[1] is None else 2 * grads[1]
        return tuple(grads)

    monkeypatch.setattr(LinearFunction, "backward", staticmethod(doubled))
    with pytest.raises(torch_mlp.verify.VerifyError, match=r"net\.\d\.weight"):
        _fit("32-true", tmp_path)
