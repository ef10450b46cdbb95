"""torch_mlp.verify: the live check of hand-derived gradients against native autograd."""

from __future__ import annotations

import math
import re
from collections import UserDict, namedtuple
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ddp_worker import free_port
from torch import Tensor, nn

import torch_mlp
from torch_mlp import functional as F
from torch_mlp import verify
from torch_mlp.functions import L2PenaltyFunction, LinearFunction

torchvision = pytest.importorskip("torchvision")


def _readme_example() -> str:
    """The README's verify example, the python block that calls torch_mlp.verify.check."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    (block,) = [b for b in blocks if "torch_mlp.verify.check(" in b]
    return block


def _weights(model: nn.Module) -> list[Tensor]:
    """The weight matrices: torch_mlp.Linear's, or _Custom's w1, w2."""
    return [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1][0] == "w"]


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y) + F.l2_penalty(_weights(model), 1e-3)


def _converted() -> nn.Module:
    return torch_mlp.convert(torchvision.ops.MLP(20, [32, 16, 5]))


def _batch(n: int = 32) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 20), torch.randint(0, 5, (n,))


class _Custom(nn.Module):
    """A user's own model on torch_mlp.functional."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 20) / 5)
        self.b1 = nn.Parameter(torch.zeros(32))
        self.w2 = nn.Parameter(torch.randn(5, 32) / 6)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2)


def _step(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    loss = _loss(model, x, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def test_converted_torchvision_mlp_trains_with_verify_every_step() -> None:
    model = _converted()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    verifier = verify.Verifier(model)
    for _ in range(5):
        x, y = _batch()
        loss = _step(model, x, y)
        report = verifier.check(_loss, x, y, loss=loss)
        assert report.ok
        opt.step()
    assert verifier.checks == 5 and verifier.skipped == 0
    assert 0 < verifier.max_used <= 1 and 0 < verifier.max_rel < 1e-4
    assert verifier.summary().startswith("verify ok (5 checks")


def test_loss_recomputed_when_not_given() -> None:
    model = _Custom()
    x, y = _batch()
    _step(model, x, y)
    report = verify.check(model, _loss, x, y)  # the loss value recomputed, with ours
    assert report.ok and [r.name for r in report.rows] == ["loss", "w1", "b1", "w2"]


def test_a_loss_fn_reading_the_model_from_its_closure_is_refused() -> None:
    model = _Custom()
    x, y = _batch()

    def loss_fn(_m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        # The L2 term reads `model` from the closure, not the model check() hands in.
        return F.cross_entropy(_m(x), y) + F.l2_penalty([model.w1, model.w2], 1e-2)

    loss = loss_fn(model, x, y)
    loss.backward()
    with pytest.raises(ValueError, match=r"loss_fn computes with w\d of the model in its closure"):
        verify.check(model, loss_fn, x, y, loss=loss)


def test_report_fields() -> None:
    model = _converted()
    x, y = _batch()
    loss = _step(model, x, y)
    report = verify.check(model, _loss, x, y, loss=loss)
    assert report.dtype == torch.float32 and report.rtol == verify.VERIFY_RTOL[torch.float32]
    assert report.k == verify.VERIFY_K and not report.skipped and report.loss_floor > 0
    for r in report.rows:
        assert r.abs <= r.tol and 0 <= r.used <= 1 and r.native_err > 0, r
        assert math.isclose(r.used, r.abs / r.tol)
    grad = next(r for r in report.rows if r.name == "0.weight")
    assert grad.rel < 1e-5 and grad.ours_err < 1e-5
    assert report.worst is max(report.rows, key=lambda r: r.used)
    assert report.used_all == report.worst.used
    text = str(report)
    assert "ok" in text.splitlines()[0] and all(r.name in text for r in report.rows)


def test_wrong_weight_gradient_is_caught_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    backward = LinearFunction.backward

    def wrong(ctx: object, g: Tensor) -> tuple[Tensor | None, ...]:
        gx, gw, gb = backward(ctx, g)
        return gx, None if gw is None else gw * 1.01, gb  # dL/dweight 1% off

    model = _Custom()
    x, y = _batch()
    monkeypatch.setattr(LinearFunction, "backward", staticmethod(wrong))
    loss = _step(model, x, y)
    with pytest.raises(verify.VerifyError, match=r"the gradient of w\d differs from native"):
        verify.check(model, _loss, x, y, loss=loss)
    report = verify.check(model, _loss, x, y, loss=loss, raise_on_failure=False)
    assert not report.ok and report.worst.name in ("w1", "w2") and report.worst.used > 100
    assert {r.name for r in report.rows if r.used > 1} == {"w1", "w2"}  # b1 is right
    assert "FAILED" in str(report)


def test_one_gradient_entry_1_percent_off_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    backward = LinearFunction.backward

    def wrong(ctx: object, g: Tensor) -> tuple[Tensor | None, ...]:
        gx, gw, gb = backward(ctx, g)
        flat = gw.reshape(-1)
        flat[flat.abs().argmax()] *= 1.01  # one entry of dL/dweight 1% off
        return gx, gw, gb

    model = _converted()
    x, y = _batch()
    monkeypatch.setattr(LinearFunction, "backward", staticmethod(wrong))
    loss = _step(model, x, y)
    with pytest.raises(verify.VerifyError, match=r"the gradient of \d\.weight differs.*: the "
                                                 r"backward of an op that uses \d\.weight, or "
                                                 r"of one after it, is wrong\.") as caught:
        verify.check(model, _loss, x, y, loss=loss)
    assert {r.name for r in caught.value.report.rows if r.used > 1} == \
        {"0.weight", "3.weight", "6.weight"}


def test_wrong_loss_value_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    forward = L2PenaltyFunction.forward
    monkeypatch.setattr(L2PenaltyFunction, "forward",
                        staticmethod(lambda lam, *w: 1.01 * forward(lam, *w)))
    model = _converted()
    x, y = _batch()
    loss = _step(model, x, y)
    with pytest.raises(verify.VerifyError, match=r"the loss value differs.*every gradient is "
                                                 r"within tolerance"):
        verify.check(model, _loss, x, y, loss=loss)


def test_a_step_whose_gradients_are_scaled_by_a_power_of_two_gets_a_hint() -> None:
    # A skipped zero_grad (the same step's backward twice) or a GradScaler left out: every
    # gradient exactly 2**j times native's is a loop's mistake more likely than a derivation's.
    torch.manual_seed(0)
    model = _converted()
    x, y = _batch()
    loss = _loss(model, x, y)
    loss.backward(retain_graph=True)
    loss.backward()  # zero_grad() forgotten
    with pytest.raises(verify.VerifyError, match=r"Every failing gradient is exactly 2× native's: "
                                                 r"was zero_grad\(\) skipped, or a GradScaler's "
                                                 r"scale not passed as scaler=\?\n"):
        verify.check(model, _loss, x, y, loss=loss)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y, loss = _scaled_step(model, scaler)
    with pytest.raises(verify.VerifyError, match=r"exactly 1024× native's"):
        verify.check(model, _loss, x, y, loss=loss)  # scaler= not passed
    assert verify.check(model, _loss, x, y, loss=loss, scaler=scaler,
                        optimizer=torch.optim.SGD(model.parameters())).ok
    # A real bug, off by 1% rather than a power of two, gets no such hint.
    model.zero_grad()
    _loss(model, x, y).backward()
    model[0].weight.grad.mul_(1.01)
    with pytest.raises(verify.VerifyError) as caught:
        verify.check(model, _loss, x, y, loss=loss)
    assert "exactly" not in str(caught.value) and "inputs" not in str(caught.value)


def test_the_wrong_batch_gets_a_hint() -> None:
    torch.manual_seed(0)
    model = _converted()
    x, y = _batch()
    loss = _step(model, x, y)
    with pytest.raises(verify.VerifyError, match=r"The (loss|gradients) differs? too: were these "
                                                 r"the step's inputs\?\n"):
        verify.check(model, _loss, *_batch(), loss=loss)  # the next batch, not this step's


@pytest.fixture
def one_thread() -> Iterator[None]:
    # One thread: float32 sums in a fixed order, and no oversubscribed cores at this size.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mnist_sized_step() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A 784-256-10 MLP, batch 256, cross-entropy + L2 (λ large enough for the L2 term to
    weigh): the step's (model, x, y, loss), the gradients in .grad."""
    torch.manual_seed(0)
    model = torch_mlp.convert(torchvision.ops.MLP(784, [256, 10]))
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    loss = _mnist_loss(model, x, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return model, x, y, loss.detach()


def _mnist_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    weights = [m.weight for m in model.modules() if isinstance(m, torch_mlp.Linear)]
    return F.cross_entropy(model(x), y) + F.l2_penalty(weights, 0.1)


def test_loss_value_in_another_summation_order_passes(one_thread: None) -> None:
    model, x, y, loss = _mnist_sized_step()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch_mlp.Linear)]
    with torch.no_grad():
        terms = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        flat = torch.cat([w.reshape(-1) for w in weights])
        # The same loss in float32, summed in other orders: the cross-entropy terms reversed
        # or permuted, ΣW² as one dot, permuted, or as a sequential (cumulative) sum.
        variants = {
            "reversed terms, dot": terms.flip(0).sum() / 256 + 0.05 * flat.dot(flat),
            "permuted": terms[torch.randperm(256)].mean()
            + 0.05 * flat[torch.randperm(flat.numel())].square().sum(),
            "sequential": terms.cumsum(0)[-1] / 256 + 0.05 * flat.square().cumsum(0)[-1],
        }
    assert any(v != loss for v in variants.values())  # some order does round otherwise
    for what, ours in variants.items():
        assert ours.dtype == torch.float32
        report = verify.check(model, _mnist_loss, x, y, loss=ours, raise_on_failure=False)
        assert report.rows[0].used < 1, (what, str(report))


def test_loss_value_off_by_1e_3_is_caught_at_mnist_size(one_thread: None) -> None:
    # The floor allows any summation order, yet not a genuinely wrong value.
    model, x, y, loss = _mnist_sized_step()
    with pytest.raises(verify.VerifyError, match=r"the loss value differs.*every gradient is "
                                                 r"within tolerance") as caught:
        verify.check(model, _mnist_loss, x, y, loss=loss * (1 + 1e-3))
    report = caught.value.report
    assert report.rows[0].used > 3  # by a margin: the floor stays far below 1e-3 of the loss
    assert 0 < report.loss_floor < 1e-3 * loss.item() / 3



def test_gradscaler_with_bfloat16_autocast() -> None:
    model = _converted()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    verifier = verify.Verifier(model, scaler=scaler, optimizer=opt)
    for _ in range(3):
        x, y = _batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, x, y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            report = verifier.check(_loss, x, y, loss=loss.detach())  # autocast read at the call
        assert report.ok and report.dtype == torch.bfloat16, str(report)
        assert report.autocast_from == "the autocast at the call"
        scaler.step(opt)
        scaler.update()
    assert verifier.checks == 3


def test_gradscaler_needs_the_optimizer() -> None:
    with pytest.raises(ValueError, match="scaler needs optimizer"):
        verify.Verifier(_converted(), scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("kwargs", [{"rtol": -1.0}, {"rtol": float("nan")}, {"k": float("inf")},
                                    {"k": "2"}, {"rtol": torch.tensor(1e-3)}])
def test_a_bad_tolerance_is_refused_by_name_not_blamed_on_the_model(kwargs: dict) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"^verify: {name} must be a finite number"):
        verify.check(_converted(), lambda m: m(torch.ones(1, 20)).sum(), **kwargs)


def _scaled_step(model: nn.Module, scaler: torch.amp.GradScaler) -> tuple[Tensor, Tensor, Tensor]:
    x, y = _batch()
    loss = _loss(model, x, y)
    model.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    return x, y, loss


def test_gradscaler_whose_optimizer_holds_some_parameters() -> None:
    # The optimizer trains the first layer only: unscale_ leaves the others' grads scaled.
    model = _converted()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y, loss = _scaled_step(model, scaler)
    report = verify.check(model, _loss, x, y, loss=loss, scaler=scaler, optimizer=opt)
    assert report.ok and len(report.rows) == 7, str(report)
    scaler.step(opt)
    scaler.update()
    # A real error in a parameter outside the optimizer is still caught.
    x, y, loss = _scaled_step(model, scaler)
    model[3].weight.grad.view(-1)[model[3].weight.grad.abs().argmax()] *= 1.01
    with pytest.raises(verify.VerifyError, match=r"gradient of 3\.weight differs"):
        verify.check(model, _loss, x, y, loss=loss, scaler=scaler, optimizer=opt)


def test_gradscaler_with_another_optimizer_that_unscaled_is_named() -> None:
    model = _converted()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    rest = torch.optim.SGD([p for m in (model[3], model[6]) for p in m.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y, loss = _scaled_step(model, scaler)
    scaler.unscale_(rest)  # the loop unscaled the rest through their own optimizer
    with pytest.raises(verify.VerifyError, match=r"\d\.\w+ is not in the optimizer, so check\(\) "
                                                 r"took its gradient as still scaled by the "
                                                 r"GradScaler"):
        verify.check(model, _loss, x, y, loss=loss, scaler=scaler, optimizer=opt)


def test_non_finite_step_is_skipped_and_counted() -> None:
    model = _converted()
    x, y = _batch()
    x[0, 0] = math.inf
    loss = _step(model, x, y)
    verifier = verify.Verifier(model)
    report = verifier.check(_loss, x, y, loss=loss)
    assert report.skipped and report.ok and report.worst is None
    x2, y2 = _batch()
    loss = _step(model, x2, y2)
    assert verifier.check(_loss, x2, y2, loss=loss).ok
    assert (verifier.checks, verifier.skipped) == (1, 1)
    assert "1 skipped" in verifier.summary()


# ---- the user's model is never touched --------------------------------------------------------
def _state(model: nn.Module) -> list[tuple[str, int, type, torch.dtype, Tensor]]:
    """Every parameter and buffer, under every name it has: (name, id, type, dtype, values)."""
    return [(n, id(t), type(t), t.dtype, t.detach().clone())
            for n, t in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]]


def _same(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    return len(a) == len(b) and all(x[:4] == y[:4] and torch.equal(x[4], y[4])
                                    for x, y in zip(a, b))


def _shared_model() -> nn.Module:
    """A submodule reachable by two paths, a weight tied across modules, BatchNorm in training
    mode (whose running stats each forward updates)."""
    lin = torch_mlp.Linear(20, 20)
    model = nn.Sequential(lin, torch_mlp.ReLU(), lin, nn.BatchNorm1d(20), torch_mlp.Linear(20, 20),
                          torch_mlp.ReLU(), torch_mlp.Linear(20, 5))
    model[4].weight = lin.weight
    return model


def test_check_leaves_the_model_and_rng_as_they_were() -> None:
    model = _shared_model()
    x, y = _batch()
    loss = _step(model, x, y)
    before, rng = _state(model), torch.get_rng_state()
    report = verify.check(model, _loss, x, y, loss=loss)
    assert report.ok and [r.name for r in report.rows][:3] == ["loss", "0.weight", "0.bias"]
    assert _same(before, _state(model))  # the very Parameters, float32, values, BN stats
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state()
        verify.check(model, _loss, x, y, loss=loss)
        assert torch.equal(cuda, torch.cuda.get_rng_state())
    # The comparison above sees a swapped parameter, as functional_call's swap left one.
    model[0].weight = nn.Parameter(model[0].weight.detach().double())
    assert not _same(before, _state(model))


def test_a_loss_fn_that_edits_parameters_is_refused_and_the_model_untouched() -> None:
    model = _converted()
    x, y = _batch()

    def shrinking(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            m[0].weight.mul_(0.9)
        return _loss(m, x, y)

    loss = shrinking(model, x, y)
    model.zero_grad()
    loss.backward()
    before = _state(model)
    with pytest.raises(ValueError, match=r"loss_fn changes the model's 0\.weight as it runs"):
        verify.check(model, shrinking, x, y, loss=loss)
    assert _same(before, _state(model))  # not scaled by 0.9 again
    shrinking(model, x, y)  # the same edit on the model itself is seen
    assert not _same(before, _state(model))


def test_spectral_norm_in_training_mode_is_refused_naming_its_buffers() -> None:
    model = nn.Sequential(nn.utils.spectral_norm(torch_mlp.Linear(20, 16)), torch_mlp.ReLU(),
                          torch_mlp.Linear(16, 5))
    x, y = _batch()
    loss = _step(model, x, y)
    with pytest.raises(ValueError, match=r"changes the model's 0\.weight_u, 0\.weight_v as it "
                                         r"runs, and the loss depends on it .*spectral_norm"):
        verify.check(model, _loss, x, y, loss=loss)
    model.eval()  # no power iteration: checked
    loss = _step(model, x, y)
    assert verify.check(model, _loss, x, y, loss=loss).ok


def test_parametrized_spectral_norm_in_training_mode_is_refused_whatever_the_seed() -> None:
    # Its power iteration may converge, so that the loss re-run bitwise equal: still refused.
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    for seed in range(10):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(10, 16)),
                              nn.ReLU(), nn.Linear(16, 3))
        loss = _ce(model, x, y)
        loss.backward()
        with pytest.raises(ValueError, match=r"changes the model's 0\.parametrizations\.weight"
                                             r"\.0\._u, 0\.parametrizations\.weight\.0\._v as"):
            verify.check(model, _ce, x, y, loss=loss)


def test_bad_use_gets_clear_errors() -> None:
    model = _converted()
    x, y = _batch()
    with pytest.raises(ValueError, match=r"no parameter has a \.grad"):
        verify.check(model, _loss, x, y)
    _step(model, x, y)
    # A floating tensor from the closure cannot be cast to float64.
    with pytest.raises(RuntimeError, match=r"must come through check\(\)'s inputs"):
        verify.check(model, lambda m: _loss(m, x, y))
    dropout = nn.Sequential(torch_mlp.Linear(20, 5), nn.Dropout(0.5))
    dropout(x).sum().backward()
    with pytest.raises(ValueError, match="loss_fn draws random numbers"):
        verify.check(dropout, lambda m, x: m(x).sum(), x)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        verify.check(model, _loss, x, y)


@pytest.mark.parametrize(("args", "error", "match"), [
    (lambda m, x, y: (m.state_dict(), _loss, x, y), TypeError,
     r"model must be an nn\.Module, got OrderedDict"),
    (lambda m, x, y: (m, _loss(m, x, y), x, y), TypeError,
     r"loss_fn must be callable as loss_fn\(model, \*inputs\), got Tensor"),
    (lambda m, x, y: (m, lambda m, x, y: 1.0, x, y), TypeError,
     r"loss_fn must return the loss as a one-element Tensor, got float"),
    (lambda m, x, y: (m, lambda m, x, y: F.cross_entropy(m(x), y, reduction="none"), x, y),
     TypeError, r"one-element Tensor, got torch\.Size\(\[32\]\)"),
], ids=["model", "loss_fn not callable", "float loss", "non-scalar loss"])
def test_bad_arguments_are_named(args: Any, error: type, match: str) -> None:
    torch.manual_seed(0)
    model = _converted()
    x, y = _batch()
    loss = _step(model, x, y)
    with pytest.raises(error, match=match):
        verify.check(*args(model, x, y), loss=loss)
    with pytest.raises(error, match=match):
        verify.check(*args(model, x, y))  # the loss recomputed: the same error


def test_check_under_no_grad() -> None:
    # A loop that runs its checks inside torch.no_grad() (as evaluation code does).
    torch.manual_seed(0)
    model = _converted()
    x, y = _batch()
    loss = _step(model, x, y)
    with torch.no_grad():
        assert verify.check(model, _loss, x, y, loss=loss).ok
        assert verify.check(model, _loss, x, y).ok
        model[0].weight.grad.mul_(1.01)
        assert not verify.check(model, _loss, x, y, loss=loss, raise_on_failure=False).ok


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_script_module_inside_the_model_is_refused_by_name() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(torch.jit.script(nn.Sequential(nn.Linear(20, 16), nn.ReLU())),
                          torch_mlp.Linear(16, 5))
    x, y = _batch()
    loss = _ce(model, x, y)
    loss.backward()
    with pytest.raises(TypeError, match=r"cannot copy the torch\.jit\.ScriptModule in the model "
                                        r"\(RecursiveScriptModule\): check the module before "
                                        r"torch\.jit\.script"):
        verify.check(model, _ce, x, y, loss=loss)


def test_meta_and_sparse_tensors_are_refused_by_name() -> None:
    meta = torch_mlp.Linear(20, 5, device="meta")
    x = torch.randn(4, 20, device="meta")
    meta(x).sum().backward()
    with pytest.raises(ValueError, match=r"parameter weight is a meta tensor"):
        verify.check(meta, lambda m, x: m(x).sum(), x)
    model = _converted()
    x, y = _batch()
    _step(model, x, y)
    with pytest.raises(ValueError, match=r"input 0 is sparse \(torch.sparse_coo\)"):
        verify.check(model, _loss, x.to_sparse(), y)
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"the \.grad of weight is sparse"):
        verify.check(emb, lambda m, i: m(i).sum(), torch.tensor([1, 2]))


Batch = namedtuple("Batch", "x y")


@dataclass
class DataBatch:
    x: Tensor
    y: Tensor


@pytest.mark.parametrize("wrap", [Batch, DataBatch, lambda x, y: {"x": x, "y": y},
                                  lambda x, y: UserDict(x=x, y=y)],
                         ids=["namedtuple", "dataclass", "dict", "UserDict"])
def test_structured_inputs_are_cast(wrap: Any) -> None:
    model = _converted()
    batch = wrap(*_batch())

    def loss_fn(m: nn.Module, b: Any) -> Tensor:
        x, y = (b["x"], b["y"]) if isinstance(b, Mapping) else (b.x, b.y)
        return _loss(m, x, y)

    loss = loss_fn(model, batch)
    loss.backward()
    report = verify.check(model, loss_fn, batch, loss=loss)
    assert report.ok and report.rows[1].ours_err < 1e-5  # float64 against float64, not float32


def test_readme_example(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(_readme_example(), "README example", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("verify vs native autograd (torch.float32") == 3
    assert "FAILED" not in out


# ---- DDP: two gloo processes ------------------------------------------------------------------
def _ddp_worker(rank: int, port: int, results: object) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.manual_seed(0)  # the same parameters on both ranks
        model = nn.parallel.DistributedDataParallel(_Custom())
        torch.manual_seed(1 + rank)  # a different batch on each
        x, y = _batch(16)
        # DDP's own forward and backward: .grad holds the mean over the two ranks.
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        report = verify.check(model, lambda m, x, y: F.cross_entropy(m(x), y), x, y, loss=loss)
        verdicts = [report.ok]
        # Off on rank 1 only: both ranks must fail (the all-reduced gradient is off).
        for p in model.parameters():
            p.grad = p.grad * (1.01 if rank == 1 else 1.0)
        bad = verify.check(model, lambda m, x, y: F.cross_entropy(m(x), y), x, y, loss=loss,
                           raise_on_failure=False)
        verdicts.append(bad.ok)
        results.put((rank, verdicts))  # type: ignore[attr-defined]
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~40 s on 2 busy cores
def test_ddp_two_processes_reach_the_same_verdict() -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.spawn(_ddp_worker, args=(free_port(), results), nprocs=2, join=True)
    got = dict(results.get(timeout=30) for _ in range(2))
    assert got == {0: [True, False], 1: [True, False]}


# ---- a loss that draws random numbers -------------------------------------------------------
class _Noise(nn.Module):
    """Noise injection: x + σ·N(0, 1) in training mode."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.1 * torch.randn_like(x) if self.training else x


class _FunctionalDropout(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.dropout(x, 0.5, training=True)


def _random_model(kind: str) -> nn.Module:
    middle = {"stochastic depth": torchvision.ops.StochasticDepth(0.5, "row"),
              "F.dropout": _FunctionalDropout(), "noise": _Noise()}[kind]
    return nn.Sequential(torch_mlp.Linear(5, 16), torch_mlp.ReLU(), middle,
                         torch_mlp.Linear(16, 3))


def _ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("kind", ["stochastic depth", "F.dropout", "noise"])
def test_a_loss_that_draws_random_numbers_is_refused(kind: str) -> None:
    # Ours drew its mask at the step, from a state no longer there: nothing to compare with.
    # Negated gradients must never pass: the check refuses, whatever the seed.
    for seed in range(10):
        torch.manual_seed(seed)
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        model = _random_model(kind)
        loss = _ce(model, x, y)
        loss.backward()
        for p in model.parameters():
            p.grad.mul_(-1)
        rng = torch.get_rng_state()
        with pytest.raises(ValueError, match=r"loss_fn draws random numbers.*eval\(\)"):
            verify.check(model, _ce, x, y, loss=loss, raise_on_failure=False)
        assert torch.equal(rng, torch.get_rng_state())


def test_the_same_model_in_eval_mode_is_checked() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for kind in ("stochastic depth", "noise"):
        model = _random_model(kind).eval()
        loss = _ce(model, x, y)
        loss.backward()
        assert verify.check(model, _ce, x, y, loss=loss).ok
        for p in model.parameters():
            p.grad.mul_(-1)
        assert not verify.check(model, _ce, x, y, loss=loss, raise_on_failure=False).ok


def test_frozen_first_layer_fine_tuning() -> None:
    torch.manual_seed(0)
    model = _converted()
    for p in model[0].parameters():  # the first Linear frozen: fine-tuning the rest
        p.requires_grad_(False)
    x, y = _batch()
    loss = _step(model, x, y)
    report = verify.check(model, _loss, x, y, loss=loss)
    assert report.ok and "0.weight" not in [r.name for r in report.rows]
    assert [r.name for r in report.rows][:2] == ["loss", "3.weight"]
    model[3].weight.grad[0, 0] *= 1.01
    assert not verify.check(model, _loss, x, y, loss=loss, raise_on_failure=False).ok


def test_class_weight_of_a_submodule_loss_is_cast() -> None:
    # A CrossEntropyLoss(weight=...) held by the model: its buffer goes to float64 too.
    torch.manual_seed(0)
    model = _Custom()
    model.criterion = nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5)
    x, y = _batch()

    def loss_fn(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return m.criterion(m(x), y)

    loss = loss_fn(model, x, y)
    loss.backward()
    assert verify.check(model, loss_fn, x, y, loss=loss).ok
    held = nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5)  # in the closure: cannot be cast
    with pytest.raises(RuntimeError, match=r"CrossEntropyLoss\(weight=\.\.\.\)"):
        verify.check(model, lambda m, x, y: held(m(x), y), x, y, loss=loss)


# ---- bfloat16 autocast -----------------------------------------------------------------------
def _amp_step(model: nn.Module, n_in: int, n_out: int, dtype: torch.dtype = torch.bfloat16
              ) -> tuple[Tensor, Tensor, Tensor]:
    """A step as PyTorch's AMP recipe runs it: the forward under autocast (float32: none),
    backward outside. Returns (x, y, loss) with the loss's autograd graph."""
    x, y = torch.randn(32, n_in), torch.randint(0, n_out, (32,))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = _amp_loss(model, x, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return x, y, loss


def _amp_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1) + \
        model.l2_penalty(2e-4)


def test_bf16_autocast_correct_steps_pass() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(20, [16], 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    verifier = verify.Verifier(model, autocast=torch.bfloat16)
    for _ in range(5):
        x, y, loss = _amp_step(model, 20, 5)
        report = verifier.check(_amp_loss, x, y, loss=loss.detach())
        assert report.dtype == torch.bfloat16 and report.worst.used < 0.5, str(report)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_read_from_the_loss_value_outside_the_block(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(20, [16], 5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for as_given in (lambda t: t, Tensor.detach, Tensor.item):  # with its graph or without
        x, y, loss = _amp_step(model, 20, 5, dtype)
        report = verify.check(model, _amp_loss, x, y, loss=as_given(loss))  # outside the block
        assert report.ok and report.dtype == dtype, str(report)
        assert report.autocast_from == "the loss's value"
        opt.step()
    # A float32 step's loss says: no autocast.
    x, y = _batch(32)
    loss = _step(model, x, y)
    report = verify.check(model, _loss, x, y, loss=loss)
    assert report.ok and report.dtype == torch.float32


class _FakeQuant(nn.Module):
    """A float32 model that rounds one activation to bfloat16 on purpose: no autocast."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch_mlp.Linear(20, 32), torch_mlp.Linear(32, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        return self.b(h.to(torch.bfloat16).to(h.dtype))


def test_an_explicit_bfloat16_cast_is_not_taken_for_autocast() -> None:
    # A bfloat16 tensor in the loss's graph is no sign of autocast: checked as the float32 step
    # it is, a doubled gradient is caught (a bfloat16 tolerance would let it pass).
    torch.manual_seed(0)
    model = _FakeQuant()
    x, y = _batch()
    loss = _ce(model, x, y)
    loss.backward()
    report = verify.check(model, _ce, x, y, loss=loss)
    assert report.ok and report.dtype == torch.float32
    assert report.autocast_from == "the loss's value"
    model.a.weight.grad.mul_(2)
    with pytest.raises(verify.VerifyError, match=r"the gradient of a\.weight differs"):
        verify.check(model, _ce, x, y, loss=loss)


def test_autocast_that_cannot_be_told_is_named_not_blamed_on_a_backward() -> None:
    # No loss to reproduce (or one that no autocast reproduces), checked outside the block:
    # check() cannot know the step ran under autocast, and says so, naming the argument.
    torch.manual_seed(0)
    model = torch_mlp.MLP(20, [16], 5)
    x, y, loss = _amp_step(model, 20, 5)
    for given in (None, loss * 1.03):
        with pytest.raises(verify.VerifyError, match=r": check\(\) could not tell whether the step "
                                                     r"ran under autocast: pass autocast=<its "
                                                     r"dtype> \(False: none\); if it still fails"):
            verify.check(model, _amp_loss, x, y, loss=given)
    assert verify.check(model, _amp_loss, x, y, autocast=torch.bfloat16).ok


def test_bf16_autocast_wrong_loss_value_is_caught() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(20, [16], 5)
    x, y, loss = _amp_step(model, 20, 5)
    for off in (1.14, 1.03):
        with pytest.raises(verify.VerifyError, match=r"the loss value differs.*every gradient "
                                                     r"is within tolerance") as caught:
            verify.check(model, _amp_loss, x, y, loss=loss * off, autocast=torch.bfloat16)
        assert caught.value.report.rows[0].used > 1.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_whole_gradient_off_is_caught_beyond_native_error_only(dtype: torch.dtype) -> None:
    # The tolerance is K times native's own error, which under autocast holds the forward's
    # rounding: a whole gradient off by more fails, by less passes (the documented limit).
    torch.manual_seed(0)
    model = torch_mlp.MLP(20, [16], 5)
    x, y, loss = _amp_step(model, 20, 5, dtype)
    report = verify.check(model, _amp_loss, x, y, loss=loss)
    assert report.dtype == dtype
    grad = model[0].weight.grad
    threshold = report.rows[1].tol / grad.abs().max().item()  # relative, for 0.weight
    for factor, caught in ((1 + threshold / 2, False), (1 + 2 * threshold, True)):
        saved = grad.clone()
        grad.mul_(factor)
        report = verify.check(model, _amp_loss, x, y, loss=loss, raise_on_failure=False)
        assert report.ok is not caught, str(report)
        assert report.worst.name == "0.weight" and 0.3 < report.worst.used < 3
        grad.copy_(saved)
    if dtype == torch.bfloat16:  # in this small MLP, a doubled gradient is caught
        grad.mul_(2)
        assert not verify.check(model, _amp_loss, x, y, loss=loss, raise_on_failure=False).ok


def test_bf16_autocast_one_weight_gradient_entry_5_percent_off_is_caught() -> None:
    torch.manual_seed(0)
    model = torch_mlp.MLP(20, [16], 5)
    x, y, loss = _amp_step(model, 20, 5)
    grad = model[0].weight.grad.view(-1)
    grad[grad.abs().argmax()] *= 1.05
    with pytest.raises(verify.VerifyError, match=r"the gradient of 0\.weight differs.*: the "
                                                 r"backward of an op that uses 0\.weight, or "
                                                 r"of one after it, is wrong"):
        verify.check(model, _amp_loss, x, y, loss=loss)


def test_bf16_autocast_wrong_backward_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    backward = LinearFunction.backward

    def wrong(ctx: object, g: Tensor) -> tuple[Tensor | None, ...]:
        gx, gw, gb = backward(ctx, g)
        return gx, gw, None if gb is None else gb * 1.1  # dL/dbias 10% off

    torch.manual_seed(0)
    model = torch_mlp.MLP(20, [16], 5)
    monkeypatch.setattr(LinearFunction, "backward", staticmethod(wrong))
    x, y, loss = _amp_step(model, 20, 5)
    with pytest.raises(verify.VerifyError, match=r"the backward of an op that uses \d\.bias, or "
                                                 r"of one after it, is wrong"):
        verify.check(model, _amp_loss, x, y, loss=loss)
