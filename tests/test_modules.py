"""torch_mlp's modules against torch.nn's: the twins are torch.nn's classes with only forward
overridden; constructors, initialisation, repr, state_dicts, forward/backward parity (in-place
ReLU included), the MLP (with its L2 term) against a native nn.Sequential, torch.func over the
MLP, a patched forward, and bad input."""

from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.func import functional_call, grad, vmap

import torch_mlp
from torch_mlp import functional as F

TWINS = [
    (torch_mlp.Linear, nn.Linear),
    (torch_mlp.ReLU, nn.ReLU),
    (torch_mlp.CrossEntropyLoss, nn.CrossEntropyLoss),
]
TWIN_IDS = ["Linear", "ReLU", "CrossEntropyLoss"]


def _native_mlp(sizes: list[int], bias: bool = True, **factory) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=bias, **factory))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------------------------
# the twins are torch.nn's classes
# --------------------------------------------------------------------------------------------
class _ForwardOnly(nn.Module):
    """A class with a docstring and one method: what Python itself puts in such a class's dict."""

    def forward(self, input):
        return input


# E.g. {'__module__', '__doc__', 'forward'}, plus '__firstlineno__' and '__static_attributes__'
# from Python 3.13 on.
FORWARD_ONLY = set(vars(_ForwardOnly))


def _defines_forward_only(cls: type) -> bool:
    # An empty __annotations__ is no definition: Python adds it to a class's dict when anything
    # (torch.jit.script, typing.get_type_hints) reads cls.__annotations__.
    names = {k for k, v in vars(cls).items() if not (k == "__annotations__" and v == {})}
    return names == FORWARD_ONLY and inspect.isfunction(vars(cls)["forward"])


@pytest.mark.parametrize(("ours", "native"), TWINS, ids=TWIN_IDS)
def test_twin_is_a_subclass_of_its_torch_nn_class_defining_forward_only(ours, native):
    assert ours.__bases__ == (native,)
    assert _defines_forward_only(ours), sorted(set(vars(ours)) - FORWARD_ONLY)
    assert vars(ours)["forward"] is not vars(native)["forward"]


def test_forward_only_check_catches_a_twin_that_defines_more():
    class Wider(nn.Linear):
        """A docstring."""

        def forward(self, input):
            return input

        def extra_repr(self):
            return "wider"

    class NoForward(nn.Linear):
        """A docstring."""

    assert not _defines_forward_only(Wider)
    assert not _defines_forward_only(NoForward)


def test_isinstance_holds_for_every_twin():
    assert isinstance(torch_mlp.Linear(2, 3), nn.Linear)
    assert isinstance(torch_mlp.ReLU(), nn.ReLU)
    assert isinstance(torch_mlp.CrossEntropyLoss(), nn.CrossEntropyLoss)


def test_mlp_is_an_nn_sequential_with_sequentials_forward():
    assert torch_mlp.MLP.__bases__ == (nn.Sequential,)
    assert "forward" not in vars(torch_mlp.MLP)  # one forward path: nn.Sequential's
    assert isinstance(torch_mlp.MLP(3, [4], 2), nn.Sequential)


@pytest.mark.parametrize(("ours", "native"), TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("method", ["__init__", "forward"])
def test_constructor_and_forward_signatures_match_torch_nn(ours, native, method):
    # Names, order, kinds and defaults (annotations may be strings here, so not compared).
    def params(cls):
        sig = inspect.signature(getattr(cls, method))
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    assert params(ours) == params(native)


@pytest.mark.parametrize("dtype", [None, torch.float64], ids=["default-dtype", "float64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_init_matches_torch_nn_under_same_seed(bias, dtype):
    torch.manual_seed(123)
    ours = torch_mlp.Linear(7, 5, bias=bias, dtype=dtype)
    torch.manual_seed(123)
    native = nn.Linear(7, 5, bias=bias, dtype=dtype)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in native.named_parameters()]
    for (_, a), (_, b) in zip(ours.named_parameters(), native.named_parameters()):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and the init is not trivially equal: kaiming-uniform bound 1/sqrt(in_features).
    assert 0 < ours.weight.abs().max() <= 1 / 7**0.5


def test_linear_reset_parameters_matches_torch_nn():
    ours, native = torch_mlp.Linear(4, 3), nn.Linear(4, 3)
    torch.manual_seed(7)
    ours.reset_parameters()
    torch.manual_seed(7)
    native.reset_parameters()
    torch.testing.assert_close(ours.weight, native.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.bias, native.bias, rtol=0, atol=0)


@pytest.mark.parametrize("hidden", [[], [16], [16, 8]], ids=["0-hidden", "1-hidden", "2-hidden"])
def test_mlp_init_matches_native_sequential_under_same_seed(hidden):
    torch.manual_seed(5)
    ours = torch_mlp.MLP(12, hidden, 3)
    torch.manual_seed(5)
    native = _native_mlp([12, *hidden, 3])
    sd_a, sd_b = ours.state_dict(), native.state_dict()
    assert list(sd_a) == list(sd_b)
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], rtol=0, atol=0)


REPR_PAIRS = {
    "Linear": lambda m: m.Linear(3, 4),
    "Linear-nobias": lambda m: m.Linear(3, 4, bias=False),
    "ReLU": lambda m: m.ReLU(),
    "ReLU-inplace": lambda m: m.ReLU(inplace=True),
    "CrossEntropyLoss": lambda m: m.CrossEntropyLoss(),
    "CrossEntropyLoss-options": lambda m: m.CrossEntropyLoss(
        weight=torch.ones(3), ignore_index=1, reduction="sum", label_smoothing=0.1
    ),
}


@pytest.mark.parametrize("make", list(REPR_PAIRS.values()), ids=list(REPR_PAIRS))
def test_repr_and_extra_repr_match_torch_nn(make):
    ours, native = make(torch_mlp), make(nn)
    assert ours.extra_repr() == native.extra_repr()
    assert repr(ours) == repr(native)


def test_mlp_repr_lists_its_layers():
    assert repr(torch_mlp.MLP(4, [3], 2)) == (
        "MLP(\n"
        "  (0): Linear(in_features=4, out_features=3, bias=True)\n"
        "  (1): ReLU()\n"
        "  (2): Linear(in_features=3, out_features=2, bias=True)\n"
        ")"
    )


STATE_PAIRS = {
    "Linear": (lambda: torch_mlp.Linear(5, 3), lambda: nn.Linear(5, 3)),
    "Linear-nobias": (lambda: torch_mlp.Linear(5, 3, bias=False),
                      lambda: nn.Linear(5, 3, bias=False)),
    "CrossEntropyLoss-weight": (
        lambda: torch_mlp.CrossEntropyLoss(weight=torch.rand(4)),
        lambda: nn.CrossEntropyLoss(weight=torch.rand(4)),
    ),
    "MLP-vs-Sequential": (lambda: torch_mlp.MLP(6, [5, 4], 3),
                          lambda: _native_mlp([6, 5, 4, 3])),
}


@pytest.mark.parametrize("direction", ["ours-to-native", "native-to-ours"])
@pytest.mark.parametrize("pair", list(STATE_PAIRS.values()), ids=list(STATE_PAIRS))
def test_state_dict_loads_both_ways(pair, direction):
    ours, native = pair[0](), pair[1]()
    src, dst = (ours, native) if direction == "ours-to-native" else (native, ours)
    assert list(src.state_dict()) == list(dst.state_dict())
    for k, v in src.state_dict().items():
        assert v.shape == dst.state_dict()[k].shape
    assert not any(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: torch_mlp.Linear(3, 2, **kw),
        lambda **kw: torch_mlp.Linear(3, 2, bias=False, **kw),
        lambda **kw: torch_mlp.MLP(3, [4], 2, **kw),
    ],
    ids=["Linear", "Linear-nobias", "MLP"],
)
def test_factory_kwargs_device_and_dtype(make):
    m = make(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    m = make(device="meta")
    assert all(p.is_meta for p in m.parameters())
    m = make(device=torch.device("cpu"), dtype=torch.float16)
    assert all(p.device.type == "cpu" and p.dtype == torch.float16 for p in m.parameters())


def test_cross_entropy_weight_is_a_buffer_like_torch_nn():
    w = torch.rand(4)
    ours, native = torch_mlp.CrossEntropyLoss(weight=w), nn.CrossEntropyLoss(weight=w)
    assert dict(ours.named_buffers()).keys() == dict(native.named_buffers()).keys() == {"weight"}
    assert ours.weight is w
    assert list(ours.parameters()) == []
    ours64 = ours.to(torch.float64)
    assert ours64.weight.dtype == torch.float64  # buffers follow .to() like native
    assert "weight" not in torch_mlp.CrossEntropyLoss().state_dict()
    assert (torch_mlp.CrossEntropyLoss().state_dict().keys()
            == nn.CrossEntropyLoss().state_dict().keys())


@pytest.mark.parametrize(
    ("size_average", "reduce"),
    [(False, None), (True, None), (None, False), (True, True), (False, True)],
    ids=["size_average=False", "size_average=True", "reduce=False", "both-True", "sa-F-reduce-T"],
)
def test_cross_entropy_legacy_size_average_and_reduce(size_average, reduce):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ours = torch_mlp.CrossEntropyLoss(size_average=size_average, reduce=reduce)
        native = nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)
    assert ours.reduction == native.reduction
    # Both warn that the legacy arguments are deprecated.
    assert sum("size_average and reduce args will be deprecated" in str(w.message)
               for w in rec) == 2
    z, t = torch.randn(5, 3), torch.randint(0, 3, (5,))
    torch.testing.assert_close(ours(z, t), native(z, t))


def test_module_defaults_match_torch_nn():
    ours, native = torch_mlp.CrossEntropyLoss(), nn.CrossEntropyLoss()
    for attr in ("ignore_index", "reduction", "label_smoothing", "weight"):
        assert getattr(ours, attr) == getattr(native, attr)
    assert torch_mlp.ReLU().inplace is nn.ReLU().inplace is False


# --------------------------------------------------------------------------------------------
# module forward/backward parity
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_linear_and_relu_modules_match_native(dtype):
    ours = torch_mlp.Linear(6, 4, dtype=dtype)
    native = nn.Linear(6, 4, dtype=dtype)
    native.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 6, dtype=dtype)
    a = torch_mlp.ReLU()(ours(x))
    b = nn.ReLU()(native(x))
    torch.testing.assert_close(a, b)
    g = torch.randn_like(b)
    a.backward(g)
    b.backward(g)
    torch.testing.assert_close(ours.weight.grad, native.weight.grad)
    torch.testing.assert_close(ours.bias.grad, native.bias.grad)


def test_twin_forward_runs_the_hand_derived_function():
    x = torch.randn(3, 4, requires_grad=True)
    z = torch.randn(3, 5, requires_grad=True)
    assert "LinearFunction" in type(torch_mlp.Linear(4, 2)(x).grad_fn).__name__
    assert "ReLUFunction" in type(torch_mlp.ReLU()(x).grad_fn).__name__
    loss = torch_mlp.CrossEntropyLoss()(z, torch.tensor([0, 1, 4]))
    assert "SoftmaxCrossEntropyFunction" in type(loss.grad_fn).__name__
    assert "LinearFunction" not in type(nn.Linear(4, 2)(x).grad_fn).__name__


CE_MODULE_KW = {
    "default": {},
    "weight-ignore-ls": {"weight": torch.tensor([0.5, 1.0, 2.0, 1.5]), "ignore_index": 1,
                         "label_smoothing": 0.2},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
}


@pytest.mark.parametrize("kw", list(CE_MODULE_KW.values()), ids=list(CE_MODULE_KW))
def test_cross_entropy_module_matches_native(kw):
    ours, native = torch_mlp.CrossEntropyLoss(**kw), nn.CrossEntropyLoss(**kw)
    z = torch.randn(6, 4, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 1, 0])
    a, b = ours(z, t), native(z, t)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(b)
    torch.testing.assert_close(torch.autograd.grad(a, z, g)[0], torch.autograd.grad(b, z, g)[0])


def _error(call) -> str | None:
    """The message of the RuntimeError ``call()`` raises (addresses blanked), or None."""
    try:
        call()
    except RuntimeError as e:
        return re.sub(r"0x[0-9a-f]+", "0x", str(e))
    return None


def _inplace_relu_run(relu: nn.Module, a0: torch.Tensor) -> dict[str, object]:
    """What a user sees of an in-place ReLU: the result, the input, its version counter and
    gradients, through a plain tensor, a view, an output autograd saved, and a leaf."""
    x = a0.clone()
    version = x._version
    seen: dict[str, object] = {"same_object": relu(x) is x, "input": x,
                               "versions": x._version - version}
    a = a0.clone().requires_grad_()
    h = a * 1
    relu(h[1:])  # in place on a view: the base sees it
    (h * torch.arange(len(a0))).sum().backward()
    seen.update(base=h.detach(), grad=a.grad)
    saved = a0.clone().requires_grad_().exp()  # exp saves its output for backward
    relu(saved)
    seen["saved-error"] = _error(lambda: saved.sum().backward())
    seen["leaf-error"] = _error(lambda: relu(a0.clone().requires_grad_()))
    return seen


def _assert_same_run(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
        else:
            assert a[k] == b[k], k


def test_inplace_relu_has_native_semantics():
    a0 = torch.tensor([-1.0, 2.0, -3.0, 4.0, -0.5, 0.0])
    ours = _inplace_relu_run(torch_mlp.ReLU(inplace=True), a0)
    native = _inplace_relu_run(nn.ReLU(inplace=True), a0)
    assert native["same_object"] and native["versions"] == 1
    torch.testing.assert_close(native["input"], a0.clamp(min=0), rtol=0, atol=0)
    assert "leaf Variable that requires grad" in native["leaf-error"]
    assert "modified by an inplace operation" in native["saved-error"]
    _assert_same_run(ours, native)


def test_inplace_relu_comparison_catches_an_out_of_place_relu():
    a0 = torch.tensor([-1.0, 2.0, -3.0, 4.0])
    native = _inplace_relu_run(nn.ReLU(inplace=True), a0)
    with pytest.raises(AssertionError):
        _assert_same_run(_inplace_relu_run(torch_mlp.ReLU(inplace=False), a0), native)


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("hidden", "sizes"),
    [([], [5, 3]), ([8], [5, 8, 3]), (8, [5, 8, 3]), ((8, 6), [5, 8, 6, 3])],
    ids=["0-hidden", "1-hidden", "1-hidden-int", "2-hidden"],
)
def test_mlp_structure_and_forward_parity(hidden, sizes):
    model = torch_mlp.MLP(5, hidden, 3)
    n = len(sizes) - 1
    assert [type(m) for m in model] == [torch_mlp.Linear, torch_mlp.ReLU] * (n - 1) + [
        torch_mlp.Linear]
    assert [(m.in_features, m.out_features) for m in _linears(model)] == list(
        zip(sizes[:-1], sizes[1:]))
    native = _native_mlp(sizes)
    native.load_state_dict(model.state_dict())
    x = torch.randn(4, 5)
    torch.testing.assert_close(model(x), native(x))


def test_mlp_bias_false():
    model = torch_mlp.MLP(5, [4], 3, bias=False)
    assert all(m.bias is None for m in _linears(model))
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "2.weight"]


@pytest.mark.parametrize("hidden", [[], [4], [4, 3]], ids=["0-hidden", "1-hidden", "2-hidden"])
def test_mlp_l2_penalty_covers_weights_not_biases(hidden):
    model = torch_mlp.MLP(5, hidden, 2, dtype=torch.float64)
    lam = 0.3
    pen = model.l2_penalty(lam)
    weights = [m.weight for m in _linears(model)]
    assert len(weights) == len(hidden) + 1
    torch.testing.assert_close(pen, 0.5 * lam * sum(w.square().sum() for w in weights))
    pen.backward()
    for m in _linears(model):
        torch.testing.assert_close(m.weight.grad, lam * m.weight.detach())  # λW, as derived
        assert m.bias.grad is None  # biases are not penalised


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_full_mlp_loss_and_gradients_match_native_sequential(dtype):
    # The derivation's network end to end: Linear → ReLU → Linear → softmax-CE + ½λΣW².
    D, H, K, N, lam = 784, 32, 10, 16, 1e-2
    ours = torch_mlp.MLP(D, [H], K, dtype=dtype)
    native = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, K)).to(dtype)
    native.load_state_dict(ours.state_dict())
    x = torch.rand(N, D, dtype=dtype)
    y = torch.randint(0, K, (N,))

    loss_a = torch_mlp.CrossEntropyLoss()(ours(x), y) + ours.l2_penalty(lam)
    loss_b = nn.CrossEntropyLoss()(native(x), y) + 0.5 * lam * sum(
        m.weight.square().sum() for m in native if isinstance(m, nn.Linear)
    )
    torch.testing.assert_close(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    grads_a = {k: p.grad for k, p in ours.named_parameters()}
    grads_b = {k: p.grad for k, p in native.named_parameters()}
    assert list(grads_a) == ["0.weight", "0.bias", "2.weight", "2.bias"] == list(grads_b)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], msg=k)


def test_full_mlp_sgd_steps_track_native():
    ours = torch_mlp.MLP(20, [16], 5)
    native = _native_mlp([20, 16, 5])
    native.load_state_dict(ours.state_dict())
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(native.parameters(), lr=0.1)
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    start = {k: v.clone() for k, v in native.state_dict().items()}
    for _ in range(5):
        for model, opt, ce, pen in (
            (ours, opt_a, F.cross_entropy, lambda: ours.l2_penalty(1e-3)),
            (native, opt_b, TF.cross_entropy,
             lambda: 0.5e-3 * (native[0].weight.square().sum() + native[2].weight.square().sum())),
        ):
            opt.zero_grad()
            (ce(model(x), y) + pen()).backward()
            opt.step()
    for (k, a), (_, b) in zip(ours.state_dict().items(), native.state_dict().items()):
        assert not torch.equal(b, start[k]), k  # the steps moved every tensor
        torch.testing.assert_close(a, b, msg=k)


def test_torch_func_grad_of_mlp_loss_matches_native():
    model = torch_mlp.MLP(10, [8], 4, dtype=torch.float64)
    native = _native_mlp([10, 8, 4], dtype=torch.float64)
    native.load_state_dict(model.state_dict())
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(6, 10, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    lam = 0.1

    def loss_ours(p):
        pen = F.l2_penalty([p["0.weight"], p["2.weight"]], lam)
        return F.cross_entropy(functional_call(model, p, (x,)), y) + pen

    def loss_native(p):
        pen = 0.5 * lam * (p["0.weight"].square().sum() + p["2.weight"].square().sum())
        return TF.cross_entropy(functional_call(native, p, (x,)), y) + pen

    ga, gb = grad(loss_ours)(params), grad(loss_native)(params)
    assert ga.keys() == gb.keys() == params.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], msg=k)


def test_torch_func_per_sample_grads_of_mlp_match_native_loop():
    model = torch_mlp.MLP(6, [5], 3)
    native = _native_mlp([6, 5, 3])
    native.load_state_dict(model.state_dict())
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(4):
        native.zero_grad()
        TF.cross_entropy(native(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in native.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, msg=k)


@pytest.mark.parametrize("batch", [5, 10000])
@pytest.mark.parametrize("where", ["model", "child"])
def test_mlp_honours_a_patched_instance_forward_at_every_batch_size(where, batch):
    # As accelerate, peft or a user patch an instance's forward: both models must run the patch.
    model = torch_mlp.MLP(4, [8], 3)
    native = _native_mlp([4, 8, 3])
    native.load_state_dict(model.state_dict())
    x = torch.randn(batch, 4)
    unpatched = native(x).detach()
    for m in (model, native):
        target = m if where == "model" else m[0]
        target.forward = lambda x, f=target.forward: f(x) * 2 + 1
    a, b = model(x), native(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(b, unpatched)  # the patch took effect
    if where == "model":
        torch.testing.assert_close(a, unpatched * 2 + 1)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
BAD_MLP_SIZES = {
    "hidden-0": ((4, [0], 2), r"MLP: layer sizes must be positive integers, got \[4, 0, 2\]"),
    "second-hidden-negative": ((4, [3, -2], 2), r"got \[4, 3, -2, 2\]"),
    "in_features-0": ((0, [3], 2), r"got \[0, 3, 2\]"),
    "out_features-float": ((4, [3], 2.0), r"got \[4, 3, 2\.0\]"),
    "in_features-bool": ((True, [3], 2), r"got \[True, 3, 2\]"),
    "hidden-str": ((4, "3", 2), r"got \[4, '3', 2\]"),
    "hidden-int-0": ((4, 0, 2), r"got \[4, 0, 2\]"),
    "hidden-int-negative": ((4, -3, 2), r"got \[4, -3, 2\]"),
    "hidden-float": ((4, 3.0, 2), r"got \[4, 3\.0, 2\]"),
    "hidden-None": ((4, None, 2), r"got \[4, None, 2\]"),
}


@pytest.mark.parametrize(("args", "match"), list(BAD_MLP_SIZES.values()), ids=list(BAD_MLP_SIZES))
def test_mlp_bad_sizes_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        torch_mlp.MLP(*args)


# (module call, its native twin's call, the message ours gives); ours raises native's type.
BAD_MODULE_INPUT = {
    "ce-label_smoothing-above-one": (
        lambda nn_: nn_.CrossEntropyLoss(label_smoothing=1.1)(torch.randn(3, 4),
                                                              torch.tensor([0, 1, 2])),
        r"label_smoothing must be between 0.0 and 1.0. Got: 1.1"),
    "ce-invalid-reduction": (
        lambda nn_: nn_.CrossEntropyLoss(reduction="avg")(torch.randn(3, 4),
                                                          torch.tensor([0, 1, 2])),
        r"avg is not a valid value for reduction"),
    "ce-weight-wrong-shape": (
        lambda nn_: nn_.CrossEntropyLoss(weight=torch.ones(5))(torch.randn(3, 4),
                                                               torch.tensor([0, 1, 2])),
        r"weight of shape \(4,\) \(one per class\).*\(5,\)"),
    "ce-batch-mismatch": (
        lambda nn_: nn_.CrossEntropyLoss()(torch.randn(3, 4), torch.tensor([0, 1])),
        r"Expected input batch_size \(3\) to match target batch_size \(2\)"),
    "linear-wrong-feature-dim": (
        lambda nn_: nn_.Linear(5, 2)(torch.randn(3, 4)),
        r"mat1 and mat2 shapes cannot be multiplied \(3x4 and 5x2\)"),
    "linear-dtype-mismatch": (
        lambda nn_: nn_.Linear(4, 2, dtype=torch.float64)(torch.randn(3, 4)),
        r"Float and Double"),
    "linear-device-mismatch": (
        lambda nn_: nn_.Linear(4, 2, device="meta")(torch.randn(3, 4)),
        r"meta.*cpu|cpu.*meta"),
}


@pytest.mark.parametrize(("call", "match"), list(BAD_MODULE_INPUT.values()),
                         ids=list(BAD_MODULE_INPUT))
def test_bad_module_input_raises_natives_exception_type_with_a_clear_message(call, match):
    with pytest.raises(Exception) as native:
        call(nn)
    with pytest.raises(type(native.value), match=match):
        call(torch_mlp)


def test_l2_penalty_refuses_a_negative_lambda():
    with pytest.raises(ValueError, match=r"lam must be a non-negative Python number, got -1.0"):
        torch_mlp.MLP(4, [3], 2).l2_penalty(-1.0)


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_mlp_takes_integer_likes_as_nn_linear(kind):
    np = pytest.importorskip("numpy")
    n = np.int64 if kind == "numpy" else torch.tensor
    for hidden in ([n(3)], n(3)):  # a list, or one hidden size
        model = torch_mlp.MLP(n(4), hidden, n(2))
        sizes = [(m.in_features, m.out_features) for m in _linears(model)]
        assert sizes == [(4, 3), (3, 2)]
        assert all(type(s) is int for pair in sizes for s in pair)
    assert nn.Linear(n(4), n(3)).in_features == 4  # as native takes them


def test_cross_entropy_module_takes_a_negative_label_smoothing_as_native():
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    torch.testing.assert_close(torch_mlp.CrossEntropyLoss(label_smoothing=-0.5)(z, y),
                               nn.CrossEntropyLoss(label_smoothing=-0.5)(z, y))
