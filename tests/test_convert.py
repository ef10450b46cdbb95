"""convert(): a change of class of the very module objects. Exact types both ways, parameters,
shared modules, tied weights, optimizers and hooks kept; subclasses left alone with a warning;
user code written for torch.nn (init loops, weight-decay groups, quantization) and torchvision
models behave as with native modules."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import torch_mlp

NATIVE_TO_TWIN = {nn.Linear: torch_mlp.Linear, nn.ReLU: torch_mlp.ReLU,
                  nn.CrossEntropyLoss: torch_mlp.CrossEntropyLoss}


class _SubLinear(nn.Linear):
    """A user's subclass of nn.Linear: convert() must leave it alone (its forward may differ)."""


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.act(self.fc(x)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Tanh())
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 4, bias=False)
        self.loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.0]),
                                        label_smoothing=0.1)

    def forward(self, x, y):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.loss(self.head(h), y)


def _small() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


def _run(model: nn.Module, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and every gradient (the first input's under "input") of one forward/backward."""
    model.zero_grad(set_to_none=True)
    x = inputs[0].clone().requires_grad_()
    out = model(x, *inputs[1:])
    out.float().square().sum().backward()
    run = {"output": out.detach()}
    run.update((k, p.grad.clone()) for k, p in model.named_parameters() if p.grad is not None)
    run["input"] = x.grad.clone()
    return run


def _assert_same_run(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if not torch.equal(a[k], b[k]):  # equal is the common case, and cheap on resnet's 11M
            torch.testing.assert_close(a[k], b[k], msg=k)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------
# exact types, the same objects
# --------------------------------------------------------------------------------------------
def test_convert_swaps_nested_modules_in_place_and_keeps_outputs_and_gradients():
    model = _Net()
    reference = copy.deepcopy(model)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is left alone
        assert torch_mlp.convert(model) is model
    # The very module and parameter objects, under the same names; only their classes changed.
    assert dict(model.named_modules()) == modules
    assert all(dict(model.named_parameters())[k] is p for k, p in params.items())
    assert _types(model) == [NATIVE_TO_TWIN.get(t, t) for t in _types(reference)]
    assert torch_mlp.Linear in _types(model) and torch_mlp.CrossEntropyLoss in _types(model)
    assert model.head.bias is None and model.loss.label_smoothing == 0.1
    _assert_same_state(model.state_dict(), reference.state_dict())
    _assert_same_run(_run(model, x, y), _run(reference, x, y))


def test_convert_to_native_gives_exact_torch_nn_types_and_the_same_objects():
    model = _Net()
    modules, params = list(model.modules()), list(model.parameters())
    native_types = _types(model)
    torch_mlp.convert(model)
    assert torch_mlp.convert(model, to_native=True) is model
    assert _types(model) == native_types
    assert all(a is b for a, b in zip(model.modules(), modules, strict=True))
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert torch.equal(model.loss.weight, torch.tensor([1.0, 2.0, 0.5, 1.0]))


def test_convert_mlp_to_native_gives_torch_nn_layers_and_the_same_output():
    model = torch_mlp.MLP(6, [5], 3)
    x = torch.randn(4, 6)
    expected = model(x)
    torch_mlp.convert(model, to_native=True)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    ("make", "twin"),
    [
        (lambda: nn.Linear(3, 2), torch_mlp.Linear),
        (lambda: nn.ReLU(inplace=True), torch_mlp.ReLU),
        (lambda: nn.CrossEntropyLoss(reduction="sum", ignore_index=2), torch_mlp.CrossEntropyLoss),
    ],
    ids=["Linear", "ReLU-inplace", "CrossEntropyLoss"],
)
def test_a_bare_module_is_converted_in_place(make, twin):
    module = make()
    native_repr, state = repr(module), module.state_dict()
    assert torch_mlp.convert(module) is module
    assert type(module) is twin
    assert repr(module) == native_repr
    _assert_same_state(module.state_dict(), state)
    assert type(torch_mlp.convert(module, to_native=True)) is type(make())


def test_convert_keeps_each_modules_mode_device_dtype_and_attributes():
    model = nn.Sequential(nn.Linear(3, 4, dtype=torch.float64), nn.ReLU(),
                          nn.Linear(4, 2, device="meta"))
    model[1].eval()  # mixed modes: each module keeps its own
    model[0].register_buffer("mask", torch.ones(4, 3))
    model[0].my_tag = 3
    mask = model[0].mask
    torch_mlp.convert(model)
    assert [type(m) for m in model] == [torch_mlp.Linear, torch_mlp.ReLU, torch_mlp.Linear]
    assert [m.training for m in model] == [True, False, True]
    assert model[0].weight.dtype == torch.float64 and model[2].weight.device.type == "meta"
    assert model[0].my_tag == 3 and model[0].mask is mask
    assert list(model.state_dict()) == ["0.weight", "0.bias", "0.mask", "2.weight", "2.bias"]


def test_convert_leaves_an_unrelated_model_alone():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Tanh())
    types = _types(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch_mlp.convert(model) is model
    assert _types(model) == types


def test_a_module_used_twice_stays_one_shared_twin():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 4)
    torch_mlp.convert(model)
    assert type(lin) is torch_mlp.Linear and model[0] is model[2] is lin
    assert len(list(model.parameters())) == 2
    _assert_same_run(_run(model, x), _run(reference, x))


def test_convert_keeps_tied_weights_tied():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 4)
    torch_mlp.convert(model)
    assert type(model[2]) is torch_mlp.Linear
    assert model[0].weight is model[2].weight is a.weight
    assert len(list(model.parameters())) == 3  # one weight, two biases
    _assert_same_run(_run(model, x), _run(reference, x))


def test_an_optimizer_built_before_convert_still_trains_the_model():
    model = _Net()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # built before the swap
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    torch_mlp.convert(model)
    head_before = model.head.weight.detach().clone()
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    for m, o in ((model, opt), (reference, ref_opt)):
        for _ in range(2):
            o.zero_grad()
            m(x, y).backward()
            o.step()
    assert not torch.equal(model.head.weight, head_before)  # the old optimizer moved them
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_round_trip_gives_torch_nn_classes_and_the_same_state_dict():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3, bias=False),
                          nn.CrossEntropyLoss(weight=torch.rand(3), ignore_index=1))
    state = copy.deepcopy(model.state_dict())
    reprs = [repr(m) for m in model]
    torch_mlp.convert(torch_mlp.convert(model), to_native=True)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.CrossEntropyLoss]
    assert [repr(m) for m in model] == reprs
    assert model[3].ignore_index == 1 and model[1].inplace
    _assert_same_state(model.state_dict(), state)


def test_verbose_prints_one_line_per_module_swapped(capsys):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.ReLU())
    torch_mlp.convert(model)
    assert capsys.readouterr().out == ""
    torch_mlp.convert(model, to_native=True, verbose=True)
    assert capsys.readouterr().out.splitlines() == [
        "convert: 0: torch_mlp.Linear -> torch.nn.Linear",  # a shared module once
        "convert: 3: torch_mlp.ReLU -> torch.nn.ReLU",
    ]
    torch_mlp.convert(lin, verbose=True)
    assert capsys.readouterr().out == "convert: (model): torch.nn.Linear -> torch_mlp.Linear\n"


# --------------------------------------------------------------------------------------------
# hooks ride along
# --------------------------------------------------------------------------------------------
def _forward_hook(m, inp, out):
    return out * 2


def _forward_pre_hook(m, inp):
    return (inp[0] + 1,)


def _forward_hook_kwargs(m, args, kwargs, out):
    return out - 0.5


def _backward_hook(m, grad_in, grad_out):
    return tuple(None if g is None else 3 * g for g in grad_in)


def _backward_pre_hook(m, grad_out):
    return tuple(-g for g in grad_out)


HOOKS = {
    "forward": lambda m, f: m.register_forward_hook(f(_forward_hook)),
    "forward-always-call": lambda m, f: m.register_forward_hook(f(_forward_hook),
                                                                always_call=True),
    "forward-with-kwargs": lambda m, f: m.register_forward_hook(f(_forward_hook_kwargs),
                                                                with_kwargs=True),
    "forward-pre": lambda m, f: m.register_forward_pre_hook(f(_forward_pre_hook)),
    "full-backward": lambda m, f: m.register_full_backward_hook(f(_backward_hook)),
    "full-backward-pre": lambda m, f: m.register_full_backward_pre_hook(f(_backward_pre_hook)),
}


@pytest.mark.parametrize("where", [0, 1], ids=["Linear", "ReLU"])
@pytest.mark.parametrize("kind", list(HOOKS))
def test_module_hooks_registered_before_convert_fire_and_their_handles_remove_them(kind, where):
    fired: list[type] = []

    def counted(hook):
        def wrapper(m, *args):
            fired.append(type(m))
            return hook(m, *args)
        return wrapper

    native, model = _small(), _small()
    model.load_state_dict(native.state_dict())
    x = torch.randn(3, 4)
    plain = _run(native, x)
    HOOKS[kind](native[where], counted)
    handle = HOOKS[kind](model[where], counted)
    expected = _run(native, x)
    fired.clear()
    torch_mlp.convert(model)
    assert type(model[where]) is NATIVE_TO_TWIN[type(native[where])]
    _assert_same_run(_run(model, x), expected)
    assert fired == [type(model[where])]
    handle.remove()  # taken before convert, it still removes the hook from the twin
    fired.clear()
    _assert_same_run(_run(model, x), plain)
    assert fired == []


def test_state_dict_hooks_registered_before_convert_fire_and_their_handles_remove_them():
    seen: dict[str, list] = {"pre": [], "post": [], "load-pre": [], "load-post": []}
    lin = nn.Linear(3, 2)

    def post(m, state, prefix, meta):
        seen["post"].append(type(m))
        state[prefix + "extra"] = torch.zeros(1)  # a post hook may change the dict

    handles = [
        lin.register_state_dict_pre_hook(lambda m, prefix, keep: seen["pre"].append(type(m))),
        lin.register_state_dict_post_hook(post),
        lin.register_load_state_dict_pre_hook(lambda m, *args: seen["load-pre"].append(type(m))),
        lin.register_load_state_dict_post_hook(lambda m, keys: seen["load-post"].append(type(m))),
    ]
    model = nn.Sequential(lin)
    torch_mlp.convert(model)
    state = model.state_dict()
    assert list(state) == ["0.weight", "0.bias", "0.extra"]
    del state["0.extra"]
    model.load_state_dict(state)
    assert seen == {k: [torch_mlp.Linear] for k in seen}
    for h in handles:
        h.remove()
    assert list(model.state_dict()) == ["0.weight", "0.bias"]
    model.load_state_dict(state)
    assert seen == {k: [torch_mlp.Linear] for k in seen}


# --------------------------------------------------------------------------------------------
# left alone with a warning, or refused
# --------------------------------------------------------------------------------------------
def _parametrized_linear(d_in: int, d_out: int) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    parametrize.register_parametrization(lin, "weight", nn.Tanh())
    return lin


SUBCLASSES = {
    "user-subclass": (lambda: _SubLinear(5, 3), r"_SubLinear"),
    "parametrize": (lambda: _parametrized_linear(5, 3), r"ParametrizedLinear"),
}


@pytest.mark.parametrize(("make", "cls"), list(SUBCLASSES.values()), ids=list(SUBCLASSES))
def test_a_subclass_of_nn_linear_is_left_alone_with_a_warning_naming_its_path(make, cls):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Sequential(make(), nn.ReLU()))
    subclass = model[2][0]
    sub_type = type(subclass)
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 4)
    expected = model(x)
    with pytest.warns(UserWarning, match=rf"convert: left 2\.0 \({cls}\) as it is: a subclass of "
                                         r"torch\.nn\.Linear") as rec:
        torch_mlp.convert(model)
    assert len(rec) == 1
    assert model[2][0] is subclass and type(subclass) is sub_type
    assert [type(m) for m in (model[0], model[1], model[2][1])] == [
        torch_mlp.Linear, torch_mlp.ReLU, torch_mlp.ReLU]
    _assert_same_state(model.state_dict(), state)
    torch.testing.assert_close(model(x), expected)
    with pytest.warns(UserWarning, match=rf"convert: left the model \({cls}\) as it is"):
        assert torch_mlp.convert(subclass) is subclass
    assert type(subclass) is sub_type


def test_an_uninitialised_lazy_linear_is_left_alone_with_a_warning_then_swapped_after_init():
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU())
    with pytest.warns(UserWarning, match=r"convert: left 0 \(LazyLinear\) as it is"):
        torch_mlp.convert(model)
    assert type(model[0]) is nn.LazyLinear and type(model[1]) is torch_mlp.ReLU
    x = torch.randn(2, 4)
    expected = model(x)  # initialises it: it becomes an nn.Linear
    torch_mlp.convert(model)
    assert type(model[0]) is torch_mlp.Linear
    torch.testing.assert_close(model(x), expected)


def test_a_subclass_of_a_twin_is_kept_by_convert_and_left_with_a_warning_by_to_native():
    class MyLinear(torch_mlp.Linear):
        pass

    model = nn.Sequential(MyLinear(3, 2), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already ours: nothing to say
        torch_mlp.convert(model)
    assert [type(m) for m in model] == [MyLinear, torch_mlp.ReLU]
    with pytest.warns(UserWarning, match=r"convert: left 0 \(.*MyLinear\) as it is: a subclass "
                                         r"of torch_mlp\.Linear"):
        torch_mlp.convert(model, to_native=True)
    assert [type(m) for m in model] == [MyLinear, nn.ReLU]


def _old_weight_norm(m: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
        return torch.nn.utils.weight_norm(m)


HOOK_REPARAMETRIZED = {
    "weight_norm": _old_weight_norm,
    "spectral_norm": torch.nn.utils.spectral_norm,
    "prune": lambda m: prune.l1_unstructured(m, "weight", amount=0.5),
}


@pytest.mark.parametrize("apply", list(HOOK_REPARAMETRIZED.values()), ids=list(HOOK_REPARAMETRIZED))
def test_a_linear_reparametrized_by_hooks_is_swapped_and_still_trains_the_same(apply):
    # These keep the exact nn.Linear type and recompute .weight in a forward pre-hook, which
    # the twin runs too.
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), apply(nn.Linear(5, 3))).eval()
    x = torch.randn(2, 4)
    expected = _run(model, x)
    torch_mlp.convert(model)
    assert [type(m) for m in model] == [torch_mlp.Linear, torch_mlp.ReLU, torch_mlp.Linear]
    _assert_same_run(_run(model, x), expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_a_scripted_model_is_refused_and_left_unchanged():
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    code = scripted.code
    with pytest.raises(TypeError, match=r"convert: model is a torch\.jit\.ScriptModule"):
        torch_mlp.convert(scripted)
    assert scripted.code == code


def test_a_model_that_is_not_a_module_is_refused_by_name():
    with pytest.raises(TypeError, match=r"^convert: model must be an nn\.Module, got list$"):
        torch_mlp.convert([nn.Linear(2, 3)])


# --------------------------------------------------------------------------------------------
# user code written for torch.nn
# --------------------------------------------------------------------------------------------
def _zero_linear_biases(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _decay_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """The usual weight-decay split: nn.Linear weights decay; everything else does not."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    names = [(n, id(p) in decay) for n, p in model.named_parameters()]
    return [n for n, d in names if d], [n for n, d in names if not d]


class _NotALinear(nn.Module):
    """A Linear that is not an nn.Linear, as the twins were: torch.nn-minded code skips it."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return torch_mlp.functional.linear(x, self.weight, self.bias)


def _user_code_outcome(model: nn.Module, x: torch.Tensor) -> dict[str, object]:
    """An init loop, then one AdamW step with weight decay on nn.Linear weights only."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _zero_linear_biases(model)
    zeroed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    decay, no_decay = _decay_names(model)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": 0.5},
                             {"params": [params[n] for n in no_decay], "weight_decay": 0.0}],
                            lr=0.1)
    model(x).square().sum().backward()
    opt.step()
    return {"zeroed": zeroed, "decay": decay, "no_decay": no_decay,
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _assert_same_outcome(a: dict[str, object], b: dict[str, object]) -> None:
    assert (a["zeroed"], a["decay"], a["no_decay"]) == (b["zeroed"], b["decay"], b["no_decay"])
    for k in a["state"]:
        torch.testing.assert_close(a["state"][k], b["state"][k], msg=k)


def _with_norm() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.LayerNorm(6), nn.Linear(6, 3))


def test_an_init_loop_and_weight_decay_groups_treat_a_converted_model_as_native():
    native = _with_norm()
    converted = torch_mlp.convert(copy.deepcopy(native))
    x = torch.randn(5, 4)
    outcome, native_outcome = _user_code_outcome(converted, x), _user_code_outcome(native, x)
    assert native_outcome["zeroed"] == ["0.bias", "3.bias"]
    assert native_outcome["decay"] == ["0.weight", "3.weight"]
    _assert_same_outcome(outcome, native_outcome)


def test_user_code_comparison_catches_a_linear_that_is_not_an_nn_linear():
    native = _with_norm()
    other = copy.deepcopy(native)
    other[3] = _NotALinear(6, 3)
    other[3].load_state_dict(native[3].state_dict())
    x = torch.randn(5, 4)
    with pytest.raises(AssertionError):
        _assert_same_outcome(_user_code_outcome(other, x), _user_code_outcome(native, x))


def _has_quantized_engine() -> bool:
    return bool(set(torch.backends.quantized.supported_engines) - {"none"})


@pytest.mark.skipif(not _has_quantized_engine(), reason="no quantized engine on this CPU")
@pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantize_dynamic_skips_twins_and_quantizes_after_to_native():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from torch.ao.quantization import quantize_dynamic

    native = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    converted = torch_mlp.convert(copy.deepcopy(native))
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = native(x)
        # quantize_dynamic swaps exact nn.Linear only: the twins stay float.
        skipped = quantize_dynamic(converted, {nn.Linear}, dtype=torch.qint8)
        assert [type(m) for m in skipped] == [torch_mlp.Linear, torch_mlp.ReLU, torch_mlp.Linear]
        # The documented route: back to torch.nn first.
        quantized = quantize_dynamic(torch_mlp.convert(converted, to_native=True), {nn.Linear},
                                     dtype=torch.qint8)
        assert [type(m) for m in quantized] == [DynamicQuantizedLinear, nn.ReLU,
                                                DynamicQuantizedLinear]
        out = quantized(x)
    assert not torch.equal(out, expected)  # quantized: close, not equal
    torch.testing.assert_close(out, expected, atol=0.1, rtol=0)


# --------------------------------------------------------------------------------------------
# torchvision and torch.nn models
# --------------------------------------------------------------------------------------------
def _torchvision_mlp() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.ops.MLP(6, [8, 8, 3])


def _resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(weights=None).eval()  # eval: a batch of one is enough


def _encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)


# (model, an input, the paths left alone with a warning)
MODELS = {
    "torchvision.ops.MLP": (_torchvision_mlp, lambda: torch.randn(4, 6), []),
    "resnet18": (_resnet18, lambda: torch.randn(1, 3, 16, 16), []),
    # Its NonDynamicallyQuantizableLinear out_proj is left, without a warning (never called).
    "TransformerEncoderLayer": (_encoder_layer, lambda: torch.randn(5, 2, 8), []),
}


@pytest.mark.parametrize(("make", "make_input", "left"), list(MODELS.values()), ids=list(MODELS))
def test_torch_and_torchvision_models_convert_and_come_back(make, make_input, left):
    native = make()
    model = copy.deepcopy(native)
    x = make_input()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch_mlp.convert(model)
    warned = [re.match(r"convert: left (\S+) ", str(w.message)) for w in rec]
    assert [m and m.group(1) for m in warned] == left
    assert _types(model) == [NATIVE_TO_TWIN.get(t, t) for t in _types(native)]
    assert any(t in NATIVE_TO_TWIN.values() for t in _types(model))
    _assert_same_run(_run(model, x), _run(native, x))
    torch_mlp.convert(model, to_native=True)
    assert _types(model) == _types(native)
    _assert_same_state(model.state_dict(), native.state_dict())


@pytest.mark.parametrize("to_native", [False, True], ids=["convert", "to_native"])
def test_a_module_whose_forward_is_patched_on_the_instance_is_left_with_a_warning(to_native):
    # accelerate's add_hook_to_module keeps the bound forward as _old_forward and sets its own:
    # a class change would leave that bound to the old class, running the old code silently.
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    if to_native:
        torch_mlp.convert(model)
    lin = model[0]
    lin._old_forward = lin.forward
    lin.forward = lambda *args: lin._old_forward(*args)
    before = type(lin)
    with pytest.warns(UserWarning, match=r"convert: left 0 \(Linear\) as it is: its forward is "
                                         r"replaced on the instance.*convert before patching"):
        torch_mlp.convert(model, to_native=to_native)
    assert type(lin) is before
    assert type(model[1]) is (nn.ReLU if to_native else torch_mlp.ReLU)  # the rest is swapped


class _MyLinear(nn.Linear):
    pass


def test_many_modules_left_for_one_reason_give_one_warning_naming_some():
    model = nn.Sequential(*(nn.Sequential(_MyLinear(4, 4), nn.ReLU()) for _ in range(4)))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch_mlp.convert(model)
    (w,) = [str(r.message) for r in rec if "convert" in str(r.message)]
    assert w.startswith("convert: left 4 _MyLinear modules (0.0, 1.0, 2.0, ...) as they are")


def test_attentions_out_proj_is_left_without_a_warning():
    # MultiheadAttention never calls out_proj's forward (F.multi_head_attention_forward reads
    # its weight): nothing there to swap, so nothing to warn about; the feed-forward is swapped.
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_mlp.convert(model)
    out_proj = model.layers[0].self_attn.out_proj
    assert type(out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert type(model.layers[0].linear1) is torch_mlp.Linear
