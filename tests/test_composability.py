"""torch_mlp composes like the native ops: forward-mode AD, torch.func, torch.compile,
autocast and GradScaler, every available device and dtype, and clear errors where a use is not
supported.

Each test runs torch_mlp and its native twin (``nn.Sequential`` of ``nn.Linear`` / ``nn.ReLU``,
``F.cross_entropy``, the ½λΣW² formula) on the same inputs and parameters and compares them.
Devices: cpu always, cuda and mps when present (``DEVICES``); the CUDA half of this file is what
``tests/run_cuda_checks.sh`` runs on a GPU machine. The DDP test lives with train.py's tests.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.autograd.gradcheck import GradcheckError
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import torch_mlp
from torch_mlp import functional as F
from torch_mlp.testing import function_cases

# --------------------------------------------------------------------------------------------
# Devices, dtypes and tolerances
# --------------------------------------------------------------------------------------------
DEVICES = [
    "cpu",
    *(["cuda"] if torch.cuda.is_available() else []),
    *(["mps"] if torch.backends.mps.is_available() else []),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _supports(device: str, dtype: torch.dtype) -> bool:
    """Whether ``device`` runs a matmul in ``dtype`` (MPS has no float64; old CPUs no fp16)."""
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        return bool((a @ a).sum().item() == 8)
    except (RuntimeError, TypeError):
        return False


def _autocast_supports(device: str, dtype: torch.dtype) -> bool:
    """Whether autocast on ``device`` computes a matmul in ``dtype``."""
    try:
        a = torch.ones(2, 2, device=device)
        with torch.autocast(device, dtype=dtype):
            return (a @ a).dtype == dtype
    except (RuntimeError, TypeError, ValueError):
        return False


DEVICE_DTYPES = [
    pytest.param(d, t, id=f"{d}-{_name(t)}") for d in DEVICES for t in DTYPES if _supports(d, t)
]
FLOAT64_DEVICES = [d for d in DEVICES if _supports(d, torch.float64)]
AMP_CASES = [
    pytest.param(d, t, id=f"{d}-{_name(t)}")
    for d in DEVICES
    for t in (torch.bfloat16, torch.float16)
    if _autocast_supports(d, t)
]

# Parity of torch_mlp against native in the same dtype: (rtol, atol per unit of scale), where
# scale = max |native| of the tensor compared (at least 1e-6). Both sides evaluate the same formula;
# what differs is where each rounds (ours: an explicit shifted log-sum-exp, gather, mm; native:
# fused kernels that may accumulate in float32), so a few units of the dtype's eps at the
# tensor's scale are rounding, while a wrong formula is off by O(1).
TOL: dict[torch.dtype, tuple[float, float]] = {
    # Double rounding differences are ~1e-15; 1e-10 is still tight enough to catch a constant
    # rounded to float32 on the way (eps/C was, once: a 2e-9 error).
    torch.float64: (1e-10, 1e-10),
    # assert_close's float32 rtol; measured worst difference 3e-7 of scale.
    torch.float32: (1.3e-6, 1e-6),
    # bfloat16 eps = 2^-7 = 7.8e-3: rtol 2 eps (assert_close's default), atol 4 eps;
    # measured worst difference 2 eps of scale (a label-smoothed, summed, weighted loss).
    torch.bfloat16: (1.6e-2, 3.1e-2),
    # float16 eps = 2^-10 = 9.8e-4: rtol 2 eps, atol 4 eps; measured worst 1.4 eps of scale.
    torch.float16: (2e-3, 3.9e-3),
}


def assert_parity(ours: Any, native: Any, dtype: torch.dtype, what: str = "") -> None:
    """assert_close with TOL[dtype], atol scaled by the native tensor's magnitude."""
    if isinstance(ours, dict):
        for k in native:
            assert_parity(ours[k], native[k], dtype, f"{what}[{k}]")
        return
    if isinstance(ours, (tuple, list)):
        for k, (a, b) in enumerate(zip(ours, native, strict=True)):
            assert_parity(a, b, dtype, f"{what}[{k}]")
        return
    rtol, atol = TOL[dtype]
    scale = max(1e-6, native.detach().abs().max().item()) if native.numel() else 1.0
    torch.testing.assert_close(ours.detach(), native.detach(), rtol=rtol, atol=atol * scale,
                               equal_nan=True, msg=lambda m: f"{what} ({_name(dtype)}): {m}")


CASES = list(function_cases())
CASE_IDS = [c[0] for c in CASES]


def _cases_on(device: str, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    return {c[0]: c for c in function_cases(device=device, dtype=dtype)}


def _diff(inputs: Any) -> list[Tensor]:
    return [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]


# --------------------------------------------------------------------------------------------
# The MLP and its native twin
# --------------------------------------------------------------------------------------------
LAM = 0.1  # λ of ½λΣW²


def make_models(D: int = 3, H: int = 5, K: int = 4, device: str = "cpu",
                dtype: torch.dtype = torch.float64, inplace: bool = False
                ) -> tuple[nn.Module, nn.Module]:
    """torch_mlp.MLP and ``nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)`` with one parameter set."""
    ours = torch_mlp.MLP(D, [H], K, device=device, dtype=dtype)
    if inplace:
        ours[1] = torch_mlp.ReLU(inplace=True)
    native = nn.Sequential(nn.Linear(D, H), nn.ReLU(inplace=inplace), nn.Linear(H, K))
    native = native.to(device, dtype)
    native.load_state_dict(ours.state_dict())
    return ours, native


def ours_l2(weights: list[Tensor]) -> Tensor:
    return F.l2_penalty(weights, LAM)


def native_l2(weights: list[Tensor]) -> Tensor:
    return 0.5 * LAM * sum(w.square().sum() for w in weights)


def loss_of(model: nn.Module, ce: Callable[..., Tensor], l2: Callable[..., Tensor]
            ) -> Callable[..., Tensor]:
    """The derivation's total loss as a function of (params, x, y), for torch.func."""

    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        z = functional_call(model, params, (x,))
        return ce(z, y) + l2([params["0.weight"], params["2.weight"]])

    return loss


def data(N: int = 4, D: int = 3, K: int = 4, device: str = "cpu",
         dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    return torch.randn(N, D, device=device, dtype=dtype), torch.randint(0, K, (N,), device=device)


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------------------------
# 1. Forward-mode AD: each Function's jvp, checked as gradcheck checks a backward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", FLOAT64_DEVICES)
@pytest.mark.parametrize("ident", CASE_IDS)
def test_gradcheck_forward_ad_and_batched(ident, device):
    # check_forward_ad: jvp against finite differences; check_batched_grad and
    # check_batched_forward_grad: backward and jvp under vmap (generate_vmap_rule) against loops.
    # fast_mode compares random projections uᵀJv instead of whole Jacobians (a wrong entry
    # still shows, with probability 1); tests/test_functional.py runs the slow, entry-by-entry
    # reverse-mode checks on the same matrix.
    _, custom, _, inputs = _cases_on(device)[ident]
    assert torch.autograd.gradcheck(
        custom, inputs, check_forward_ad=True, check_batched_grad=True,
        check_batched_forward_grad=True, atol=1e-5, fast_mode=True,
    )


@pytest.mark.parametrize("device", FLOAT64_DEVICES)
@pytest.mark.parametrize("ident", CASE_IDS)
def test_gradgradcheck_forward_over_reverse(ident, device):
    # check_fwd_over_rev: forward-mode AD through the hand-written backward (what hessian and
    # jacfwd(jacrev) use), against finite differences of that backward.
    _, custom, _, inputs = _cases_on(device)[ident]
    assert torch.autograd.gradgradcheck(
        custom, inputs, check_fwd_over_rev=True, check_batched_grad=True, atol=1e-5,
        fast_mode=True,
    )


class _WrongJvpLinear(F.LinearFunction):
    """LinearFunction with the bias term of its jvp dropped: a forward-mode bug to be caught."""

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        return F.LinearFunction.jvp(ctx, x_t, weight_t, None)


def test_forward_ad_check_catches_a_wrong_jvp():
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in [(3, 4), (2, 4),
                                                                                  (2,)])
    assert torch.autograd.gradcheck(_WrongJvpLinear.apply, (x, w, b))  # backward is right
    with pytest.raises(GradcheckError, match="forward"):
        torch.autograd.gradcheck(_WrongJvpLinear.apply, (x, w, b), check_forward_ad=True,
                                 fast_mode=True)


# --------------------------------------------------------------------------------------------
# 2. torch.func on the whole loss: transforms w.r.t. inputs and parameters, per-sample grads
# --------------------------------------------------------------------------------------------
TRANSFORMS = ["jvp", "jacfwd", "jacrev", "hessian"]


def _apply(name: str, f: Callable[[Any], Tensor], primal: Any) -> Any:
    if name == "jvp":
        gen = torch.Generator().manual_seed(1)
        tangent = torch.utils._pytree.tree_map(
            lambda p: torch.randn(p.shape, dtype=p.dtype, generator=gen).to(p.device), primal)
        return jvp(f, (primal,), (tangent,))
    return {"jacfwd": jacfwd, "jacrev": jacrev, "hessian": hessian}[name](f)(primal)


@pytest.mark.parametrize("device", FLOAT64_DEVICES)
@pytest.mark.parametrize("wrt", ["inputs", "params"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_torch_func_transforms_of_the_mlp_loss_match_native(transform, wrt, device):
    ours_m, native_m = make_models(device=device)
    x, y = data(device=device)
    p = params_of(ours_m)
    results = []
    for model, ce, l2 in [(ours_m, F.cross_entropy, ours_l2),
                          (native_m, TF.cross_entropy, native_l2)]:
        loss = loss_of(model, ce, l2)
        if wrt == "inputs":
            results.append(_apply(transform, lambda x, loss=loss: loss(p, x, y), x))
        else:
            results.append(_apply(transform, lambda q, loss=loss: loss(q, x, y), p))
    assert_parity(results[0], results[1], torch.float64, f"{transform} w.r.t. {wrt}")


@pytest.mark.parametrize("device", FLOAT64_DEVICES)
def test_per_sample_gradients_vmap_grad_match_native(device):
    ours_m, native_m = make_models(device=device)
    x, y = data(N=6, device=device)
    p = params_of(ours_m)
    grads = []
    for model, ce, l2 in [(ours_m, F.cross_entropy, ours_l2),
                          (native_m, TF.cross_entropy, native_l2)]:
        loss = loss_of(model, ce, l2)

        def one(q, xi, yi, loss=loss):  # one sample as a batch of one
            return loss(q, xi.unsqueeze(0), yi.unsqueeze(0))

        grads.append(vmap(grad(one), in_dims=(None, 0, 0))(p, x, y))
    assert all(g.shape[0] == 6 for g in grads[0].values())
    assert_parity(grads[0], grads[1], torch.float64, "per-sample grad")
    # ...and each row is that sample's own gradient, not the batch's.
    g0 = torch.autograd.grad(F.cross_entropy(ours_m(x[:1]), y[:1]) + ours_m.l2_penalty(LAM),
                             list(ours_m.parameters()))
    for k, name in enumerate(p):
        torch.testing.assert_close(grads[0][name][0], g0[k])


def test_jacrev_and_jvp_wrt_probability_targets_match_native():
    z = torch.randn(4, 3, dtype=torch.float64)
    t = torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1)
    for kw in ({}, {"label_smoothing": 0.2}, {"reduction": "none"}):
        ours = jacrev(lambda t, kw=kw: F.cross_entropy(z, t, **kw))(t)
        native = jacrev(lambda t, kw=kw: TF.cross_entropy(z, t, **kw))(t)
        assert_parity(ours, native, torch.float64, f"jacrev target {kw}")
        tt = torch.randn_like(t)
        ours = jvp(lambda t, kw=kw: F.cross_entropy(z, t, **kw), (t,), (tt,))
        native = jvp(lambda t, kw=kw: TF.cross_entropy(z, t, **kw), (t,), (tt,))
        assert_parity(ours, native, torch.float64, f"jvp target {kw}")


RELU_TRANSFORMS: dict[str, Callable[[Callable[[Tensor], Tensor], Tensor], Any]] = {
    "vmap": lambda f, u: vmap(lambda v: f(v * 1))(u),
    "grad": lambda f, u: grad(lambda v: f(v * 1).square().sum())(u[0]),
    "jacrev": lambda f, u: jacrev(lambda v: f(v * 1))(u[0]),
    "jacfwd": lambda f, u: jacfwd(lambda v: f(v * 1))(u[0]),
    "vmap-grad": lambda f, u: vmap(grad(lambda v: f(v * 1).square().sum()))(u),
    "hessian": lambda f, u: hessian(lambda v: f(v * 1).pow(3).sum())(u[0]),
}


@pytest.mark.parametrize("transform", list(RELU_TRANSFORMS))
def test_inplace_relu_under_torch_func_matches_native(transform):
    # vmap refuses a Function that saves an input returned as-is; relu(inplace=True) then runs
    # out of place and copies into its input, so the result is native's.
    u = torch.randn(3, 5, dtype=torch.float64)
    u = u + 0.1 * u.sign()  # away from the kink
    ours = RELU_TRANSFORMS[transform](lambda v: F.relu(v, inplace=True), u)
    native = RELU_TRANSFORMS[transform](lambda v: TF.relu(v, inplace=True), u)
    assert_parity(ours, native, torch.float64, transform)


def test_vmap_inplace_relu_overwrites_its_input_like_native():
    u = torch.randn(3, 5)
    ours_u, native_u = u.clone(), u.clone()
    vmap(lambda v: F.relu(v, inplace=True))(ours_u)
    vmap(lambda v: TF.relu(v, inplace=True))(native_u)
    torch.testing.assert_close(ours_u, native_u)


@pytest.mark.parametrize("shape", [(4, 3), (2, 4, 3), (3,)], ids=["2d", "3d", "1d"])
def test_inplace_relu_after_linear_trains_like_native(shape):
    # Linear's output used to be a view (mm(...).reshape), which autograd forbids a custom
    # Function's caller to modify in place: ReLU(inplace=True) after Linear raised.
    ours_m, native_m = make_models(dtype=torch.float32, inplace=True)
    x = torch.randn(*shape)
    ours_m(x).sum().backward()
    native_m(x).sum().backward()
    for (k, p), q in zip(ours_m.named_parameters(), native_m.parameters()):
        assert_parity(p.grad, q.grad, torch.float32, k)


# --------------------------------------------------------------------------------------------
# 3. torch.compile: one graph, no breaks, the hand-derived backward inside, eager's results
# --------------------------------------------------------------------------------------------
requires_trace_autograd = pytest.mark.skipif(
    not hasattr(torch._dynamo.config, "trace_autograd_ops"),
    reason="tracing loss.backward() into the graph needs torch >= 2.11 (trace_autograd_ops)",
)


@pytest.fixture
def dynamo_reset():
    # Dynamo caches per code object: each test compiles afresh and leaves nothing behind.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_compile_model_and_loss_have_no_graph_breaks(device, dynamo_reset):
    model, _ = make_models(6, 8, 3, device=device, dtype=torch.float32)
    x, y = data(5, 6, 3, device=device, dtype=torch.float32)

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y) + model.l2_penalty(LAM)

    explained = torch._dynamo.explain(loss_fn)(x, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_graph_break_check_can_fail(dynamo_reset):
    # The original Functions define jvp, which Dynamo refuses to trace when an input requires
    # grad: called directly they break the graph, which is why the wrappers use jvp-less twins.
    x, w = torch.randn(5, 6), torch.randn(3, 6, requires_grad=True)

    def f(x):
        return F.LinearFunction.apply(x, w, None).sum()

    assert torch._dynamo.explain(f)(x).graph_break_count >= 1
    torch._dynamo.reset()
    with pytest.raises(Exception, match="jvp"):
        torch.compile(f, backend="eager", fullgraph=True)(x)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_matches_eager(device, dynamo_reset):
    model, _ = make_models(6, 8, 3, device=device, dtype=torch.float32)
    eager = copy.deepcopy(model)
    x, y = data(5, 6, 3, device=device, dtype=torch.float32)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    z, z_ref = compiled(x), eager(x)
    assert_parity(z, z_ref, torch.float32, "logits")
    (F.cross_entropy(z, y) + model.l2_penalty(LAM)).backward()
    (F.cross_entropy(z_ref, y) + eager.l2_penalty(LAM)).backward()
    for (k, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_parity(p.grad, q.grad, torch.float32, k)


def test_compiled_graph_runs_the_hand_derived_backward(monkeypatch, dynamo_reset):
    # If AOTAutograd differentiated the forward's ops itself, a broken backward would go
    # unnoticed under compile. Doubling the twin's backward doubles the compiled gradients.
    twin = torch_mlp.functional._LINEAR.compiled  # the variant torch.compile runs

    def doubled(ctx, g):  # 2 gᵀx, for the only input that requires grad here
        x, _ = ctx.saved_tensors
        return None, 2 * g.t().mm(x), None

    monkeypatch.setattr(twin, "backward", staticmethod(doubled))
    x, w = torch.randn(5, 6), torch.randn(3, 6, requires_grad=True)
    torch.compile(lambda x: F.linear(x, w).sum(), backend="aot_eager", fullgraph=True)(x).backward()
    compiled_grad, w.grad = w.grad, None
    F.linear(x, w).sum().backward()  # eager: the original Function
    torch.testing.assert_close(compiled_grad, 2 * w.grad)


def _train_step_matches_eager(device: str, backend: str, inplace: bool = False,
                              steps: int = 3) -> None:
    """Forward, loss, backward and an SGD-with-momentum update in ONE compiled graph
    (fullgraph=True), against eager torch_mlp with torch.optim.SGD, step by step."""
    from torch.optim.sgd import sgd  # torch.optim's own update, minus Optimizer.step's
    # deliberate graph breaks (torch/optim/optimizer.py, _use_grad), which make fullgraph=True
    # impossible around any torch.optim optimizer's step(), native models' included.

    model, _ = make_models(6, 8, 3, device=device, dtype=torch.float32, inplace=inplace)
    eager = copy.deepcopy(model)
    params = list(model.parameters())
    buffers = [torch.zeros_like(p) for p in params]
    opt = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    x, y = data(5, 6, 3, device=device, dtype=torch.float32)

    def step(x, y):
        loss = F.cross_entropy(model(x), y) + model.l2_penalty(LAM)
        # autograd.grad, what trace_autograd_ops is documented to trace ("Trace through
        # torch.autograd.grad"), rather than loss.backward().
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            sgd(params, list(grads), buffers, weight_decay=0.0, momentum=0.9,
                lr=0.1, dampening=0.0, nesterov=False, maximize=False, foreach=False)
        return loss.detach()

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for _ in range(steps):
            loss = compiled(x, y)
            opt.zero_grad()
            ref = F.cross_entropy(eager(x), y) + eager.l2_penalty(LAM)
            ref.backward()
            opt.step()
            assert_parity(loss, ref, torch.float32, "loss")
    for (k, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_parity(p, q, torch.float32, k)


@requires_trace_autograd
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_train_step_fullgraph_matches_eager(device, dynamo_reset):
    _train_step_matches_eager(device, "aot_eager")


@requires_trace_autograd
def test_compiled_train_step_with_inplace_relu(dynamo_reset):
    # Dynamo cannot trace mark_dirty; relu(inplace=True) computes out of place and copies.
    _train_step_matches_eager("cpu", "aot_eager", inplace=True)


@requires_trace_autograd
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_train_step_inductor_matches_eager(device, dynamo_reset):
    # The default backend, generated C++ / Triton code: ~20 s on 2 CPU cores with a cold
    # inductor cache (~15 s warm), so not marked slow.
    _train_step_matches_eager(device, "inductor")


@pytest.mark.parametrize("device,dtype", AMP_CASES)
def test_compile_under_autocast_matches_eager(device, dtype, dynamo_reset):
    model, _ = make_models(6, 8, 3, device=device, dtype=torch.float32)
    eager = copy.deepcopy(model)
    x, y = data(5, 6, 3, device=device, dtype=torch.float32)

    def fwd(m, x, y):
        with torch.autocast(device, dtype=dtype):
            z = m(x)
            return z, F.cross_entropy(z, y)

    explained = torch._dynamo.explain(fwd)(model, x, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    z, loss = torch.compile(fwd, backend="aot_eager", fullgraph=True)(model, x, y)
    z_ref, loss_ref = fwd(eager, x, y)
    assert z.dtype == z_ref.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    loss_ref.backward()
    assert_parity(loss, loss_ref, dtype, "loss")
    for (k, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.grad.dtype == torch.float32
        assert_parity(p.grad, q.grad, dtype, k)


def test_compile_around_a_torch_func_transform_is_refused(dynamo_reset):
    # Dynamo reads ctx.needs_input_grad from outside the transform there and drops gradients
    # without a word (pytorch/pytorch#193279); fullgraph=True must fail loudly instead...
    model, _ = make_models(6, 8, 3, dtype=torch.float32)
    x, y = data(5, 6, 3, dtype=torch.float32)

    def g(x):
        return grad(lambda x: F.cross_entropy(model(x), y))(x)

    with pytest.raises(Exception, match=r"torch\.func transform inside torch\.compile"):
        torch.compile(g, backend="eager", fullgraph=True)(x)
    # ...and without fullgraph the call falls back to eager, with the right gradient. (With
    # backend="eager" that fallback itself fails inside Dynamo in torch 2.14: an error too.)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(g, backend="aot_eager")(x), g(x))


def test_export_around_a_torch_func_transform_is_refused():
    # torch.export without strict traces the Python itself, with the same fault: our message,
    # not an assertion from inside torch's tracer.
    class Grad(nn.Module):
        def forward(self, x, w, b):
            return grad(lambda w: F.linear(x, w, b).tanh().sum())(w)

    args = (torch.randn(5, 3), torch.randn(4, 3), torch.randn(4))
    with pytest.raises(RuntimeError, match=r"torch\.func transform inside torch\.compile or "
                                           r"torch\.export"):
        torch.export.export(Grad(), args, strict=False)


# --------------------------------------------------------------------------------------------
# 4. Autocast and GradScaler
# --------------------------------------------------------------------------------------------
# Under autocast both sides run the same low-precision GEMMs on the same casts, and
# cross-entropy in float32 on the same low-precision logits; every compared value, even one
# stored in float32 (loss, parameter gradients), descends from low-precision GEMM results, so
# it is compared at the low dtype's tolerance, TOL[dtype].
@pytest.mark.parametrize("backward", ["inside", "outside"])
@pytest.mark.parametrize("device,dtype", AMP_CASES)
def test_autocast_training_step_follows_native_rules(device, dtype, backward):
    # The trap: an autograd.Function's backward runs outside the autocast context (or, on CPU,
    # inside it when backward is called in the block), so saved tensors and incoming grads can
    # be of other dtypes than the forward saw. Both placements of backward are run.
    ours_m, native_m = make_models(16, 32, 10, device=device, dtype=torch.float32)
    x, y = data(8, 16, 10, device=device, dtype=torch.float32)
    out = {}
    for name, model, ce, l2 in [("ours", ours_m, F.cross_entropy, ours_l2),
                                ("native", native_m, TF.cross_entropy, native_l2)]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with torch.autocast(device, dtype=dtype):
            h = model[0](x)
            z = model(x)
            loss = ce(z, y) + l2([model[0].weight, model[2].weight])
            if backward == "inside":
                loss.backward()
        if backward == "outside":
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        out[name] = (h, z, loss, grads, [p.detach().clone() for p in model.parameters()])
    (h, z, loss, grads, params), (h_n, z_n, loss_n, grads_n, params_n) = out["ours"], out["native"]
    # native autocast's dtype rules: Linear in the low dtype, cross-entropy (so the loss) in
    # float32, gradients in the parameters' float32.
    assert h.dtype == z.dtype == z_n.dtype == dtype
    assert loss.dtype == loss_n.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads)
    assert_parity([h, z, loss], [h_n, z_n, loss_n], dtype, "forward")
    assert_parity(grads, grads_n, dtype, "grad")
    assert_parity(params, params_n, dtype, "updated params")


@pytest.mark.parametrize("device,dtype", AMP_CASES)
def test_autocast_backward_with_a_float32_upstream_gradient(device, dtype):
    # The Linear's output is low precision; the gradient fed to it is float32 and arrives after
    # the autocast block: autograd casts it to the output's dtype before our backward sees it.
    out = []
    for lin in (F.linear, TF.linear):
        torch.manual_seed(0)
        x = torch.randn(4, 3, device=device)
        w = torch.randn(2, 3, device=device, requires_grad=True)
        b = torch.randn(2, device=device, requires_grad=True)
        with torch.autocast(device, dtype=dtype):
            z = lin(x, w, b)
        z.backward(torch.randn(4, 2, device=device, dtype=torch.float32))
        out.append((z, w.grad, b.grad))
    assert out[0][0].dtype == dtype and out[0][1].dtype == torch.float32
    assert_parity(out[0], out[1], dtype, "linear under autocast")


@pytest.mark.parametrize("device,dtype", AMP_CASES)
def test_forward_ad_under_autocast_matches_native(device, dtype):
    x = torch.randn(4, 3, device=device)
    w, b = torch.randn(2, 3, device=device), torch.randn(2, device=device)
    t = torch.randn_like(w)
    res = []
    for lin in (F.linear, TF.linear):
        with torch.autocast(device, dtype=dtype):
            res.append(jvp(lambda w, lin=lin: lin(x, w, b), (w,), (t,)))
    assert res[0][0].dtype == res[0][1].dtype == dtype
    assert_parity(res[0], res[1], dtype, "jvp under autocast")


def _grad_scaler_devices() -> list[str]:
    out = []
    for d in DEVICES:
        if not _autocast_supports(d, torch.float16):
            continue
        try:
            torch.amp.GradScaler(d)
        except (RuntimeError, TypeError, ValueError):
            continue
        out.append(d)
    return out


@pytest.mark.parametrize("device", _grad_scaler_devices())
def test_grad_scaler_float16_steps_and_skips_like_native(device):
    ours_m, native_m = make_models(16, 32, 10, device=device, dtype=torch.float32)
    x, y = data(8, 16, 10, device=device, dtype=torch.float32)
    out = {}
    for name, model, ce in [("ours", ours_m, F.cross_entropy),
                            ("native", native_m, TF.cross_entropy)]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
        record = []
        # Step 1 at scale 2^10: finite float16 grads, so the step is taken. Step 2 at scale
        # 2^40: the float16 grads overflow, so the step is skipped and the scale halved.
        for new_scale in (None, 2.0**40):
            if new_scale is not None:
                scaler.update(new_scale)
            opt.zero_grad()
            with torch.autocast(device, dtype=torch.float16):
                loss = ce(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            record.append((scaler.get_scale(), [p.detach().clone() for p in model.parameters()]))
        out[name] = record
    (s1, p1), (s2, p2) = out["ours"]
    (n1, q1), (n2, _) = out["native"]
    assert (s1, s2) == (n1, n2) == (2.0**10, 2.0**39)
    assert_parity(p1, q1, torch.float16, "after the step taken")
    for a, b in zip(p1, p2):  # the overflowing step left the parameters as they were
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# 5. Every Function on every device and dtype, against native
# --------------------------------------------------------------------------------------------
def _outputs_and_grads(fn: Callable[..., Any], inputs: Any, g: Tensor) -> list[Tensor]:
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, _diff(inputs), g)]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("ident", CASE_IDS)
def test_functional_parity_per_device_and_dtype(ident, device, dtype):
    _, custom, reference, inputs = _cases_on(device, dtype)[ident]
    ref_inputs = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t
                  for t in inputs]
    out = custom(*inputs)
    assert out.dtype == dtype and out.device.type == device
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    ours = _outputs_and_grads(custom, inputs, g)
    native = _outputs_and_grads(reference, ref_inputs, g)
    assert [t.dtype for t in ours] == [t.dtype for t in native]
    assert_parity(ours, native, dtype, ident)


class _ScaledBackward(torch.autograd.Function):
    """x ↦ x with a backward 10% too large: parity at the loosest tolerance must notice."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 1.1 * g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_tolerance_catches_a_wrong_backward(dtype):
    z = torch.randn(5, 4).to(dtype).requires_grad_()
    t = torch.tensor([0, 3, 1, 2, 3])
    g = torch.ones((), dtype=dtype)
    ours = _outputs_and_grads(lambda z: F.cross_entropy(_ScaledBackward.apply(z), t), [z], g)
    native = _outputs_and_grads(lambda z: TF.cross_entropy(z, t), [z], g)
    assert_parity(ours[0], native[0], dtype, "loss")  # the forward is right...
    with pytest.raises(AssertionError):  # ...the gradient is not, and it shows
        assert_parity(ours[1], native[1], dtype, "grad")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_mlp_training_step_parity_per_device_and_dtype(device, dtype):
    ours_m, native_m = make_models(16, 32, 10, device=device, dtype=dtype)
    x, y = data(8, 16, 10, device=device, dtype=dtype)
    res = []
    for model, ce, l2 in [(ours_m, F.cross_entropy, ours_l2),
                          (native_m, TF.cross_entropy, native_l2)]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            loss = ce(model(x), y) + l2([model[0].weight, model[2].weight])
            loss.backward()
            opt.step()
        res.append([loss, *(p.grad for p in model.parameters()), *model.parameters()])
    assert res[0][0].dtype == dtype
    assert_parity(res[0], res[1], dtype, "loss, grads, params")


# --------------------------------------------------------------------------------------------
# 6. Uses that cannot be supported fail at the call, never with a silently wrong derivative
# --------------------------------------------------------------------------------------------
def _ce_of_target(y: Tensor) -> Tensor:
    return F.cross_entropy(torch.randn(4, 3), y)


INTEGER_TARGET = {
    "grad": lambda y: grad(_ce_of_target)(y),
    "jacrev": lambda y: jacrev(_ce_of_target)(y),
    "vjp": lambda y: vjp(_ce_of_target, y),
    "jacfwd": lambda y: jacfwd(_ce_of_target)(y),
    "jvp": lambda y: jvp(_ce_of_target, (y,), (torch.ones(4),)),
}


@pytest.mark.parametrize("transform", list(INTEGER_TARGET))
def test_torch_func_transform_over_integer_target_raises(transform):
    y = torch.tensor([0, 2, 1, 1])
    with pytest.raises((RuntimeError, ValueError), match="floating point"):
        INTEGER_TARGET[transform](y)


CLASS_WEIGHT = {
    "grad": lambda f, w: grad(f)(w),
    "jacrev": lambda f, w: jacrev(f)(w),
    "jacfwd": lambda f, w: jacfwd(f)(w),
    "jvp": lambda f, w: jvp(f, (w,), (torch.ones_like(w),)),
    "hessian": lambda f, w: hessian(f)(w),
}


@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("transform", list(CLASS_WEIGHT))
def test_derivative_wrt_class_weight_raises(transform, target):
    # Not supported (as in native nll_loss's backward). Forward mode would otherwise drop the
    # weight's tangent silently: native F.cross_entropy returns 0 there for index targets.
    z = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 1]) if target == "index" else torch.softmax(torch.randn(4, 3), 1)
    with pytest.raises(RuntimeError, match="respect to weight is not supported"):
        CLASS_WEIGHT[transform](lambda w: F.cross_entropy(z, y, weight=w), torch.rand(3) + 0.5)


def test_forward_ad_wrt_logits_with_a_class_weight_still_works():
    # The refusal above keys on the weight having a tangent, not on there being a weight.
    z, y, w = torch.randn(4, 3), torch.tensor([0, 2, 1, 1]), torch.rand(3) + 0.5
    tz = torch.randn_like(z)
    for kw in ({}, {"label_smoothing": 0.1}):
        ours = jvp(lambda z, kw=kw: F.cross_entropy(z, y, weight=w, **kw), (z,), (tz,))
        native = jvp(lambda z, kw=kw: TF.cross_entropy(z, y, weight=w, **kw), (z,), (tz,))
        assert_parity(ours, native, torch.float32, f"jvp with weight {kw}")


def test_derivative_wrt_l2_lambda_raises():
    w = torch.randn(3, 4)
    with pytest.raises(TypeError, match="lam must be a Python number"):
        grad(lambda lam: F.l2_penalty(w, lam))(torch.tensor(0.1))
