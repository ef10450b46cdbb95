"""convert(): nested models, parameters kept (optimizers, tied weights), training mode, device
and dtype, round trips, the TWINS table, hooks and instance attributes carried over, all-or-nothing
refusals, modules left alone with a warning, verbose output and convert_plan."""

from __future__ import annotations

import copy
import gc
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import torch_mlp
from torch_mlp.modules import TWINS, ConvertStep, convert_plan


# --------------------------------------------------------------------------------------------
# swapping a nested model
# --------------------------------------------------------------------------------------------
class _SubLinear(nn.Linear):
    """A subclass of nn.Linear: convert() must leave it alone (its behaviour may differ)."""


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
        self.extra = _SubLinear(4, 4)
        self.loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.0]),
                                        label_smoothing=0.1)

    def forward(self, x, y):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.loss(self.extra(self.head(h)), y)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_convert_swaps_nested_modules_and_keeps_outputs_and_gradients():
    model = _Net()
    reference = copy.deepcopy(model)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    params_before = dict(model.named_parameters())
    untouched = {"stem.2": model.stem[2], "blocks.0.norm": model.blocks[0].norm,
                 "extra": model.extra}

    out = torch_mlp.convert(model)
    assert out is model
    assert type(model.stem[0]) is torch_mlp.Linear
    assert type(model.stem[1]) is torch_mlp.ReLU
    assert all(type(b.fc) is torch_mlp.Linear and type(b.act) is torch_mlp.ReLU
               for b in model.blocks)
    assert type(model.head) is torch_mlp.Linear and model.head.bias is None
    assert type(model.loss) is torch_mlp.CrossEntropyLoss
    assert model.loss.label_smoothing == 0.1
    # Everything else is untouched, the nn.Linear subclass included.
    for name, module in untouched.items():
        assert model.get_submodule(name) is module
    assert type(model.extra) is _SubLinear
    assert isinstance(model.blocks, nn.ModuleList)
    # The very same parameter objects, under the same names.
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before)
    assert model.state_dict().keys() == reference.state_dict().keys()

    loss, ref_loss = model(x, y), reference(x, y)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    ga, gb = _grads(model), _grads(reference)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], msg=k)


def test_convert_keeps_an_existing_optimizer_working():
    model = _Net()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # built before the swap
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    torch_mlp.convert(model)
    head_before = model.head.weight.detach().clone()
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    for m, o in ((model, opt), (reference, ref_opt)):
        o.zero_grad()
        m(x, y).backward()
        o.step()
    assert not torch.equal(model.head.weight, head_before)  # the old optimizer moved them
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_convert_to_native_goes_back():
    model = _Net()
    params = dict(model.named_parameters())
    torch_mlp.convert(model)
    torch_mlp.convert(model, to_native=True)
    assert type(model.stem[0]) is nn.Linear and type(model.stem[1]) is nn.ReLU
    assert all(type(b.fc) is nn.Linear for b in model.blocks)
    assert type(model.loss) is nn.CrossEntropyLoss
    assert model.loss.label_smoothing == 0.1
    assert torch.equal(model.loss.weight, torch.tensor([1.0, 2.0, 0.5, 1.0]))
    assert all(dict(model.named_parameters())[k] is p for k, p in params.items())


def test_convert_mlp_to_native_and_back_matches():
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
def test_convert_a_bare_module_returns_its_twin(make, twin):
    native = make()
    ours = torch_mlp.convert(native)
    assert type(ours) is twin
    assert ours.extra_repr() == native.extra_repr()
    for (k, a), (_, b) in zip(ours.named_parameters(), native.named_parameters()):
        assert a is b, k


def test_convert_keeps_device_dtype_and_training_mode():
    model = nn.Sequential(nn.Linear(3, 4, dtype=torch.float64), nn.ReLU()).eval()
    torch_mlp.convert(model)
    assert model[0].weight.dtype == torch.float64
    assert not model[0].training and not model[1].training


def test_convert_leaves_unrelated_model_alone():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Tanh())
    children = list(model)
    assert torch_mlp.convert(model) is model
    assert list(model) == children


def _small() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every gradient (the input's under "input") of one forward and backward."""
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    grads["input"] = x.grad.clone()
    return out.detach(), grads


def _assert_same_run(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], msg=k)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------
# parameters, mode, device, dtype, round trip
# --------------------------------------------------------------------------------------------
def test_convert_keeps_each_modules_mode_and_the_very_parameters():
    model = nn.Sequential(nn.Linear(3, 4, dtype=torch.float64), nn.ReLU(),
                          nn.Linear(4, 2, device="meta"))
    model[1].eval()  # mixed modes: each module keeps its own
    params = list(model.parameters())
    torch_mlp.convert(model)
    assert [type(m) for m in model] == [torch_mlp.Linear, torch_mlp.ReLU, torch_mlp.Linear]
    assert [m.training for m in model] == [True, False, True]
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert model[0].weight.dtype == torch.float64 and model[2].weight.device.type == "meta"


def test_convert_keeps_tied_weights_tied():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    torch_mlp.convert(model)
    assert model[0].weight is model[2].weight is a.weight
    assert len(list(model.parameters())) == 3  # one weight, two biases


def test_a_module_used_twice_becomes_one_shared_twin():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 4)
    torch_mlp.convert(model)
    assert type(model[0]) is torch_mlp.Linear and model[0] is model[2]
    assert len(list(model.parameters())) == 2
    _assert_same_run(_run(model, x), _run(reference, x))


def test_round_trip_gives_torch_nn_classes_and_the_same_state_dict():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3, bias=False),
                          nn.CrossEntropyLoss(weight=torch.rand(3), ignore_index=1))
    model[0].register_buffer("mask", torch.ones(5, 4))
    model[2].my_tag = 3
    state = copy.deepcopy(model.state_dict())
    torch_mlp.convert(torch_mlp.convert(model), to_native=True)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.CrossEntropyLoss]
    assert [m.extra_repr() for m in model] == [
        "in_features=4, out_features=5, bias=True", "inplace=True",
        "in_features=5, out_features=3, bias=False", ""]
    assert model[3].ignore_index == 1
    assert model[2].my_tag == 3
    _assert_same_state(model.state_dict(), state)


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------
class _Sigmoid(nn.Module):
    """A toy twin of nn.Sigmoid, registered in TWINS by one test only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 / (1 + torch.exp(-x))

    @classmethod
    def from_native(cls, module: nn.Sigmoid) -> _Sigmoid:
        return cls()

    def to_native(self) -> nn.Sigmoid:
        return nn.Sigmoid()


def test_a_pair_added_to_the_table_is_swapped_both_ways(monkeypatch):
    monkeypatch.setitem(TWINS, nn.Sigmoid, _Sigmoid)  # removed again after the test
    model = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4)
    torch_mlp.convert(model)
    assert [type(m) for m in model] == [torch_mlp.Linear, _Sigmoid]
    _assert_same_run(_run(model, x), _run(reference, x))
    torch_mlp.convert(model, to_native=True)
    assert [type(m) for m in model] == [nn.Linear, nn.Sigmoid]


def test_a_table_entry_without_from_native_is_refused_before_any_change(monkeypatch):
    monkeypatch.setitem(TWINS, nn.Tanh, nn.Softsign)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    children = list(model)
    with pytest.raises(TypeError, match=r"Softsign has no from_native\(\)"):
        torch_mlp.convert(model)
    assert list(model) == children


# --------------------------------------------------------------------------------------------
# hooks and attributes
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


HOOKS: dict[str, Callable[[nn.Module, Callable], object]] = {
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
def test_module_hooks_carry_over(kind, where):
    fired: list[type] = []

    def counted(hook):
        def wrapper(m, *args):
            fired.append(type(m))
            return hook(m, *args)
        return wrapper

    native, model = _small(), _small()
    model.load_state_dict(native.state_dict())
    HOOKS[kind](native[where], counted)
    handle = HOOKS[kind](model[where], counted)
    x = torch.randn(3, 4)
    expected = _run(native, x)
    fired.clear()
    torch_mlp.convert(model)
    assert type(model[where]) in (torch_mlp.Linear, torch_mlp.ReLU)
    _assert_same_run(_run(model, x), expected)
    assert fired == [type(model[where])]
    # A handle taken before convert still removes the hook from the twin.
    handle.remove()
    fired.clear()
    model(x)
    assert fired == []


def test_state_dict_hooks_carry_over_and_see_the_twin():
    seen: dict[str, list] = {"post": [], "pre": [], "load-pre": [], "load-pre-public": [],
                             "load-post": []}
    lin = nn.Linear(3, 2)

    def post(m, state, prefix, meta):
        seen["post"].append(m)
        state[prefix + "extra"] = torch.zeros(1)  # old-style hook: may change the dict

    lin._register_state_dict_hook(post)
    lin.register_state_dict_pre_hook(lambda m, prefix, keep: seen["pre"].append(m))
    lin._register_load_state_dict_pre_hook(
        lambda m, *args: seen["load-pre"].append(m), with_module=True)
    lin.register_load_state_dict_pre_hook(lambda m, *args: seen["load-pre-public"].append(m))
    lin.register_load_state_dict_post_hook(lambda m, keys: seen["load-post"].append(m))
    model = nn.Sequential(lin)
    del lin
    torch_mlp.convert(model)
    gc.collect()  # the native Linear is gone: hooks bound to it would now fail
    twin = model[0]
    state = model.state_dict()
    assert list(state) == ["0.weight", "0.bias", "0.extra"]
    del state["0.extra"]
    model.load_state_dict(state)
    assert seen == {k: [twin] for k in seen}


def test_instance_attributes_and_extra_buffers_carry_over():
    lin = nn.Linear(3, 2)
    lin.my_tag = 3
    lin.register_buffer("mask", torch.ones(2, 3))
    lin.register_buffer("scratch", torch.zeros(2), persistent=False)
    model = nn.Sequential(lin)
    torch_mlp.convert(model)
    assert model[0].my_tag == 3
    assert model[0].mask is lin.mask and model[0].scratch is lin.scratch
    assert list(model.state_dict()) == ["0.weight", "0.bias", "0.mask"]


def test_convert_of_a_bare_module_leaves_it_as_it_was():
    lin = nn.Linear(3, 2)
    lin.register_forward_hook(_forward_hook)
    lin.my_tag = "x"
    twin = torch_mlp.convert(lin)
    assert type(lin) is nn.Linear and type(twin) is torch_mlp.Linear
    assert twin.my_tag == "x" and twin.weight is lin.weight
    x = torch.randn(4, 3)
    torch.testing.assert_close(twin(x), lin(x))


# --------------------------------------------------------------------------------------------
# all or nothing: refusals and modules left alone
# --------------------------------------------------------------------------------------------
class _WithLoss(nn.Module):
    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.act = nn.ReLU()
        self.loss = loss


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        (lambda: nn.CrossEntropyLoss(reduction="avg"), r"avg is not a valid value for reduction"),
        (lambda: nn.CrossEntropyLoss(label_smoothing=1.5),
         r"label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
    ],
    ids=["reduction", "label_smoothing"],
)
def test_an_invalid_loss_after_a_linear_is_refused_with_the_model_unchanged(loss, match):
    model = _WithLoss(loss())
    children = dict(model.named_children())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"convert: cannot swap 'loss' "
                       r"\(torch.nn.CrossEntropyLoss\) for torch_mlp.CrossEntropyLoss: " + match
                       + r".*left unchanged"):
        torch_mlp.convert(model)
    assert dict(model.named_children()) == children
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.CrossEntropyLoss) for m in children.values())
    _assert_same_state(model.state_dict(), state)


def _old_weight_norm(m: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
        return torch.nn.utils.weight_norm(m)


REPARAMETRIZED = {
    "weight_norm": (_old_weight_norm, r"torch.nn.utils.weight_norm"),
    "spectral_norm": (torch.nn.utils.spectral_norm, r"torch.nn.utils.spectral_norm"),
    "prune": (lambda m: prune.l1_unstructured(m, "weight", amount=0.5), r"torch.nn.utils.prune"),
    "parametrize-weight_norm": (parametrizations.weight_norm, r"parametrize"),
    "parametrize-spectral_norm": (parametrizations.spectral_norm, r"parametrize"),
}


@pytest.mark.parametrize("kind", list(REPARAMETRIZED))
def test_a_reparametrized_linear_is_left_alone_with_a_warning_naming_it(kind):
    apply, match = REPARAMETRIZED[kind]
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(),
                          nn.Sequential(apply(nn.Linear(5, 3)), nn.ReLU()))
    model.eval()  # spectral_norm's power iteration only runs in training mode
    reparametrized = model[2][0]
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 4)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"convert: left '2\.0' \(.*Linear\) as it is: .*"
                      + match):
        torch_mlp.convert(model)
    assert model[2][0] is reparametrized
    assert [type(m) for m in (model[0], model[1], model[2][1])] == [
        torch_mlp.Linear, torch_mlp.ReLU, torch_mlp.ReLU]
    _assert_same_state(model.state_dict(), state)
    torch.testing.assert_close(model(x), expected)


def test_a_scripted_model_is_refused_and_a_scripted_part_left_alone_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(TypeError, match=r"model is a torch.jit.ScriptModule"):
        torch_mlp.convert(scripted)
    model = nn.Sequential(nn.Linear(3, 4), scripted)
    with pytest.warns(UserWarning, match=r"left '1' .* torch.jit.ScriptModule"):
        torch_mlp.convert(model)
    assert type(model[0]) is torch_mlp.Linear and model[1] is scripted


def test_an_uninitialised_lazy_linear_is_left_alone_with_a_warning_then_swapped_after_init():
    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU())
    with pytest.warns(UserWarning, match=r"left '0' .* lazy module not initialised"):
        torch_mlp.convert(model)
    assert isinstance(model[0], nn.LazyLinear) and type(model[1]) is torch_mlp.ReLU
    x = torch.randn(2, 4)
    expected = model(x)  # initialises it: it becomes an nn.Linear
    torch_mlp.convert(model)
    assert type(model[0]) is torch_mlp.Linear
    torch.testing.assert_close(model(x), expected)


# --------------------------------------------------------------------------------------------
# telling the user: verbose and convert_plan
# --------------------------------------------------------------------------------------------
def test_verbose_prints_one_line_per_swap_and_skip(capsys):
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, _SubLinear(4, 4), lin)
    torch_mlp.convert(model)
    assert capsys.readouterr().out == ""
    torch_mlp.convert(model, to_native=True, verbose=True)
    assert capsys.readouterr().out.splitlines() == [
        "convert: swap 0: torch_mlp.Linear -> torch.nn.Linear",
        "convert: swap 2: torch_mlp.Linear -> torch.nn.Linear",
    ]
    torch_mlp.convert(model, verbose=True)
    assert capsys.readouterr().out.splitlines() == [
        "convert: swap 0: torch.nn.Linear -> torch_mlp.Linear",
        "convert: skip 1: _SubLinear, a subclass of torch.nn.Linear, whose behaviour may differ",
        "convert: swap 2: torch.nn.Linear -> torch_mlp.Linear",
    ]


def test_convert_plan_changes_nothing_and_lists_what_convert_does():
    model = _Net()
    children = list(model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain subclass is skipped without a warning
        plan = convert_plan(model)
    assert list(model.modules()) == children
    assert all(isinstance(s, ConvertStep) for s in plan)
    assert [(s.path, s.swapped) for s in plan] == [
        ("stem.0", True), ("stem.1", True), ("blocks.0.fc", True), ("blocks.0.act", True),
        ("blocks.1.fc", True), ("blocks.1.act", True), ("head", True), ("extra", False),
        ("loss", True)]
    assert re.fullmatch(r"skip extra: _SubLinear, a subclass of torch.nn.Linear.*",
                        str(plan[7]))


@pytest.mark.slow  # Module.compile() imports torch._dynamo: seconds on a busy machine
def test_a_module_compiled_in_place_is_left_alone_with_a_warning():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    compiled = model[0]
    compiled.compile()  # compiles its own call: a twin would not run the compiled code
    with pytest.warns(UserWarning, match=r"left '0' .* compiled in place by Module.compile"):
        torch_mlp.convert(model)
    assert model[0] is compiled and type(model[1]) is torch_mlp.ReLU


def test_torch_nn_modules_calling_functional_ops_themselves_are_named_in_plan_and_verbose(
        capsys):
    # convert swaps modules; a function call inside a torch.nn module's forward stays native.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation="relu", dropout=0.0),
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation=nn.ReLU(), dropout=0.0),
        nn.Linear(8, 3))
    plan = convert_plan(model)
    notes = {s.path: s.reason for s in plan if not s.swapped}
    assert re.search(r"calls torch\.nn\.functional\.relu itself.*stays native", notes["0"])
    assert "1" not in notes or "relu" not in notes["1"]  # a ReLU module there is swapped
    for path in ("0.self_attn", "1.self_attn"):
        assert re.search(r"multi_head_attention_forward.*stays native", notes[path])
    swapped = {s.path for s in plan if s.swapped}
    assert {"0.linear1", "0.linear2", "1.linear1", "1.linear2", "1.activation", "2"} <= swapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note, not a warning
        torch_mlp.convert(model, verbose=True)
    out = capsys.readouterr().out
    assert re.search(r"convert: skip 0: torch\.nn\.TransformerEncoderLayer, its forward calls "
                     r"torch\.nn\.functional\.relu itself", out)
    assert "convert: skip 0.self_attn: torch.nn.MultiheadAttention" in out
    decoder = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, activation="relu")
    assert any(s.path == "" and "functional.relu" in s.reason for s in convert_plan(decoder))
    gelu = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation="gelu")
    assert not any("functional.relu" in s.reason for s in convert_plan(gelu))
