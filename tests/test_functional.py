"""torch_mlp.functional against finite differences and against torch.nn.functional.

1. The whole option matrix (``torch_mlp.testing.function_cases``) through ``check_function``:
   gradcheck and gradgradcheck in float64, parity with the native op in float32 and float64;
   then forward mode (each Function's ``jvp``) and batched gradients (the generated vmap rule).
2. Parity with ``torch.nn.functional`` on the layouts the matrix does not cover: leading dims,
   non-contiguous inputs and upstream gradients, batch size 1, k-dim and unbatched inputs,
   all-ignored targets, logits of ±1e4, gradients w.r.t. probability targets.
3. In-place ReLU and autograd's version counter.
4. torch.func: vmap over each functional, and jvp.
5. Bad input: each raises, with a message naming the argument and the shapes or values.
6. Dtypes and edge shapes: complex Linear, zero-size Linear layouts, ReLU over
   every dtype, cross-entropy on meta tensors and unbatched (1,) targets.
7. The L2 value's accuracy against the native formula's.
8. Native's edges a drop-in user meets: autocast's cast of the class weight, in-place ReLU's
   refusals and version counter, every bias / weight layout of linear, probability targets of
   another dtype, NaN or negative label smoothing, exception types, jvp of an empty mean.

Parity uses ``torch.testing.assert_close``'s defaults, which are keyed by dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.func import jvp, vmap

import torch_mlp
from torch_mlp import functional as F
from torch_mlp.testing import check_function, function_cases

DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["float32", "float64"]
CASES = list(function_cases())
CASE_IDS = [case[0] for case in CASES]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _copies(args: list[Any]) -> list[Any]:
    """Fresh leaves with the same values, strides and requires_grad; other arguments as they are."""
    return [
        a.detach().clone().requires_grad_(a.requires_grad)
        if isinstance(a, Tensor) and a.is_floating_point()
        else a
        for a in args
    ]


def noncontig_randn(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A random tensor of ``shape`` laid out non-contiguously (transposed, or strided when 1-D)."""
    if len(shape) == 0:
        return torch.randn((), dtype=dtype)
    g = torch.randn(*reversed(shape), dtype=dtype).permute(*reversed(range(len(shape))))
    if g.is_contiguous():  # 1-D, or transposing only moved size-1 dims: stride 2 instead
        g = torch.randn(*shape, 2, dtype=dtype)[..., 0]
    assert g.shape == shape
    assert g.numel() <= 1 or not g.is_contiguous()
    return g


def assert_parity(
    ours: Callable[..., Tensor], ref: Callable[..., Tensor], args: list[Any]
) -> tuple[Tensor, list[Tensor]]:
    """Same inputs into ``ours`` and ``ref``: outputs equal, and the gradient w.r.t. every input
    that requires grad equal, for a non-contiguous random upstream gradient."""
    a_args, b_args = _copies(args), _copies(args)
    out_a, out_b = ours(*a_args), ref(*b_args)
    assert out_a.dtype == out_b.dtype
    torch.testing.assert_close(out_a, out_b, equal_nan=True)
    diff_a = [t for t in a_args if isinstance(t, Tensor) and t.requires_grad]
    diff_b = [t for t in b_args if isinstance(t, Tensor) and t.requires_grad]
    assert diff_a, "the case differentiates nothing"
    g = noncontig_randn(tuple(out_b.shape), out_b.dtype)
    grads_a = torch.autograd.grad(out_a, diff_a, g)
    grads_b = torch.autograd.grad(out_b, diff_b, g)
    for ga, gb, t in zip(grads_a, grads_b, diff_a):
        assert ga.shape == t.shape
        torch.testing.assert_close(ga, gb, equal_nan=True)
    return out_a, list(grads_a)


def randn(*shape: int, dtype: torch.dtype = torch.float64, grad: bool = True) -> Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# --------------------------------------------------------------------------------------------
# 1. the option matrix
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matrix_gradcheck_gradgradcheck_and_parity(case):
    ident, custom, reference, inputs = case
    result = check_function(custom, reference, *inputs, name=ident)  # raises on any failure
    assert result.failures == []
    assert result.checks == ["gradcheck", "gradgradcheck", "parity float32", "parity float64"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matrix_forward_mode_and_batched_grad(case):
    # check_forward_ad: each Function's jvp against finite differences; check_batched_grad:
    # the backward under vmap (generate_vmap_rule) against a loop.
    _, custom, _, inputs = case
    assert torch.autograd.gradcheck(
        custom, inputs, check_forward_ad=True, check_batched_grad=True, atol=1e-5
    )


def _ce(**kw: Any) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    # The class weight is an argument (not a closure), so the parity check casts it too.
    return (
        lambda z, t, w=None: F.cross_entropy(z, t, w, **kw),
        lambda z, t, w=None: TF.cross_entropy(z, t, w, **kw),
    )


def _extra_cases() -> list[tuple[str, Callable[..., Any], Callable[..., Any], tuple[Any, ...]]]:
    """Option combinations beyond the shipped matrix, in the same format."""
    gen = torch.Generator().manual_seed(1)

    def r(*shape: int, grad: bool = True) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(grad)

    C = 4
    w = torch.rand(C, dtype=torch.float64, generator=gen) + 0.5
    kdim_t = torch.tensor([[[0, -100]], [[2, 3]]])  # (2, 1, 2)
    kdim_p = torch.softmax(r(2, C, 1, 2, grad=False), 1).requires_grad_()
    cases = []
    for red in ("mean", "sum", "none"):
        ours, ref = _ce(reduction=red, label_smoothing=0.15)
        cases.append(
            (f"ce-kdim-index-weight-ignore-ls-{red}", ours, ref, (r(2, C, 1, 2), kdim_t, w))
        )
        cases.append((f"ce-kdim-prob-weight-ls-{red}", ours, ref, (r(2, C, 1, 2), kdim_p, w)))
    unb_p = torch.softmax(r(C, grad=False), 0).requires_grad_()
    cases.append(("ce-unbatched-prob", F.cross_entropy, TF.cross_entropy, (r(C), unb_p)))
    ours, ref = _ce(ignore_index=1)  # ignore_index that is also a valid class
    t = torch.tensor([1, 0, 1, 3, 2])
    cases.append(("ce-ignore_index-is-a-class", ours, ref, (r(5, C), t)))
    ours, ref = _ce(label_smoothing=1.0)
    cases.append(("ce-label_smoothing-1", ours, ref, (r(3, C), torch.tensor([0, 1, 2]), w)))
    cases.append(("ce-batch1", F.cross_entropy, TF.cross_entropy, (r(1, C), torch.tensor([2]))))
    x_nc = r(4, 3).t()  # (3, 4) transposed
    w_nc = r(4, 5).t()  # (5, 4) transposed
    cases.append(("linear-noncontig", F.linear, TF.linear, (x_nc, w_nc, r(5))))
    cases.append(("linear-x-only", F.linear, TF.linear, (r(3, 4), r(5, 4, grad=False), None)))
    u = r(2, 3, 4).detach()
    u = (u + 0.1 * u.sign()).requires_grad_()  # away from the kink
    cases.append(
        (
            "relu-inplace",
            lambda u: F.relu(u.clone(), inplace=True),
            lambda u: TF.relu(u.clone(), inplace=True),
            (u,),
        )
    )
    cases.append(
        (
            "l2-three-tensors",
            lambda a, b, c: F.l2_penalty([a, b, c], 0.7),
            lambda a, b, c: 0.35 * (a.square().sum() + b.square().sum() + c.square().sum()),
            (r(3, 2), r(4), r(2, 2, 2)),
        )
    )
    cases.append(
        (
            "l2-single-tensor",
            lambda a: F.l2_penalty(a, 0.5),
            lambda a: 0.25 * a.square().sum(),
            (r(3, 2),),
        )
    )
    return cases


EXTRA = _extra_cases()


@pytest.mark.parametrize("case", EXTRA, ids=[c[0] for c in EXTRA])
def test_more_options_gradcheck_gradgradcheck_and_parity(case):
    ident, custom, reference, inputs = case
    result = check_function(custom, reference, *inputs, name=ident)
    assert result.failures == []
    assert result.max_err < 1e-5


# --------------------------------------------------------------------------------------------
# 2. parity with torch.nn.functional
# --------------------------------------------------------------------------------------------
def _linear_case(name: str, dtype: torch.dtype) -> list[Any]:
    def r(*shape: int, grad: bool = True) -> Tensor:
        return randn(*shape, dtype=dtype, grad=grad)

    w, b = r(3, 4), r(3)
    return {
        "2d": lambda: [r(5, 4), w, b],
        "1d-input": lambda: [r(4), w, b],
        "leading-dims": lambda: [r(2, 3, 4), w, b],
        "batch1": lambda: [r(1, 4), w, b],
        "no-bias": lambda: [r(5, 4), w, None],
        "noncontig-input": lambda: [r(4, 5).detach().t().requires_grad_(), w, b],
        "noncontig-input-leading-dims": lambda: [
            r(2, 4, 6).detach().transpose(1, 2).requires_grad_(), w, b
        ],
        "strided-input": lambda: [r(5, 8).detach()[:, ::2].requires_grad_(), w, b],
        "noncontig-weight": lambda: [r(5, 4), r(4, 3).detach().t().requires_grad_(), b],
        "weight-grad-only": lambda: [r(5, 4, grad=False), w, r(3, grad=False)],
        "input-grad-only": lambda: [r(2, 5, 4), r(3, 4, grad=False), r(3, grad=False)],
    }[name]()


LINEAR_CASES = [
    "2d",
    "1d-input",
    "leading-dims",
    "batch1",
    "no-bias",
    "noncontig-input",
    "noncontig-input-leading-dims",
    "strided-input",
    "noncontig-weight",
    "weight-grad-only",
    "input-grad-only",
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", LINEAR_CASES)
def test_linear_parity(name, dtype):
    args = _linear_case(name, dtype)
    if name.startswith(("noncontig", "strided")):
        assert not all(a.is_contiguous() for a in args if a is not None)
    out, _ = assert_parity(F.linear, TF.linear, args)
    assert out.shape == (*args[0].shape[:-1], 3)


RELU_SHAPES = {
    "2d": lambda dt: torch.randn(5, 6, dtype=dt),
    "1d": lambda dt: torch.randn(7, dtype=dt),
    "batch1": lambda dt: torch.randn(1, 6, dtype=dt),
    "leading-dims": lambda dt: torch.randn(2, 3, 4, dtype=dt),
    "noncontig": lambda dt: torch.randn(6, 5, dtype=dt).t(),
    # Exact zeros: the gradient at u = 0 is 0, as in PyTorch.
    "exact-zeros": lambda dt: torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, -0.0]], dtype=dt),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("shape", list(RELU_SHAPES), ids=list(RELU_SHAPES))
def test_relu_parity(shape, inplace, dtype):
    u = RELU_SHAPES[shape](dtype).requires_grad_()
    # clone() keeps u's strides, so the in-place op also runs on non-contiguous memory.
    out, (grad,) = assert_parity(
        lambda u: F.relu(u.clone(), inplace=inplace),
        lambda u: TF.relu(u.clone(), inplace=inplace),
        [u],
    )
    assert (out >= 0).all()
    if shape == "exact-zeros":
        assert (grad[u.detach() == 0] == 0).all()


def _ce_case(name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(logits, target, kwargs) for one cross-entropy layout."""
    N, C = 6, 5
    w = torch.rand(C, dtype=dtype) + 0.5

    def z(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    def idx(*shape: int) -> Tensor:
        return torch.randint(0, C, shape)

    def prob(*shape: int, dim: int = 1, grad: bool = False) -> Tensor:
        return torch.softmax(torch.randn(*shape, dtype=dtype), dim).requires_grad_(grad)

    t_ign = idx(N)
    t_ign[[1, 4]] = -100
    t_kdim = idx(2, 3, 4)
    t_kdim[0, 1, 2] = -100
    big = torch.tensor([[1e4, -1e4, 0, 1, -1], [-1e4, -1e4, 1e4, 0, 0], [1e4, 1e4, -1e4, 0, 0]],
                       dtype=dtype).requires_grad_()
    cases: dict[str, Callable[[], tuple[Tensor, Tensor, dict[str, Any]]]] = {
        "index-mean": lambda: (z(N, C), idx(N), {}),
        "index-sum-weight": lambda: (z(N, C), idx(N), {"weight": w, "reduction": "sum"}),
        "index-none": lambda: (z(N, C), idx(N), {"reduction": "none"}),
        "index-ignore-weight-ls": lambda: (
            z(N, C), t_ign, {"weight": w, "label_smoothing": 0.2}
        ),
        "index-ignore-none": lambda: (z(N, C), t_ign, {"reduction": "none"}),
        "index-custom-ignore_index": lambda: (
            z(N, C), torch.tensor([0, -1, 2, -1, 4, 1]), {"ignore_index": -1}
        ),
        "batch1-index": lambda: (z(1, C), idx(1), {"weight": w}),
        "batch1-prob": lambda: (z(1, C), prob(1, C, grad=True), {}),
        "unbatched-index": lambda: (z(C), torch.tensor(3), {"label_smoothing": 0.1}),
        "unbatched-index-none": lambda: (z(C), torch.tensor(3), {"reduction": "none"}),
        "unbatched-prob": lambda: (z(C), prob(C, dim=0, grad=True), {"weight": w}),
        "kdim-index-mean": lambda: (z(2, C, 3, 4), t_kdim, {"weight": w}),
        "kdim-index-none-ls": lambda: (
            z(2, C, 3, 4), t_kdim, {"reduction": "none", "label_smoothing": 0.1}
        ),
        "kdim-index-sum": lambda: (z(2, C, 3, 4), t_kdim, {"reduction": "sum"}),
        "kdim-prob-mean": lambda: (z(2, C, 3, 4), prob(2, C, 3, 4, grad=True), {}),
        "kdim-prob-none-weight-ls": lambda: (
            z(2, C, 3, 4),
            prob(2, C, 3, 4, grad=True),
            {"weight": w, "reduction": "none", "label_smoothing": 0.3},
        ),
        "noncontig-input": lambda: (z(C, N).detach().t().requires_grad_(), idx(N), {}),
        "noncontig-kdim-channels-last": lambda: (
            z(2, 3, 4, C).detach().permute(0, 3, 1, 2).requires_grad_(),
            t_kdim,
            {"reduction": "none", "weight": w},
        ),
        "noncontig-prob-target": lambda: (
            z(N, C),
            prob(C, N, dim=0).detach().t().requires_grad_(),
            {"label_smoothing": 0.1},
        ),
        "noncontig-index-target": lambda: (z(N, C), idx(2 * N)[::2], {"reduction": "none"}),
        "prob-target-grad-weight-ls-sum": lambda: (
            z(N, C), prob(N, C, grad=True), {"weight": w, "label_smoothing": 0.2,
                                             "reduction": "sum"}
        ),
        "prob-target-grad-only": lambda: (
            z(N, C).detach(), prob(N, C, grad=True), {"weight": w}
        ),
        "all-ignored-mean": lambda: (z(N, C), torch.full((N,), -100), {}),
        "all-ignored-mean-weight-ls": lambda: (
            z(N, C), torch.full((N,), -100), {"weight": w, "label_smoothing": 0.1}
        ),
        "all-ignored-sum": lambda: (z(N, C), torch.full((N,), -100), {"reduction": "sum"}),
        "all-ignored-none": lambda: (z(N, C), torch.full((N,), -100), {"reduction": "none"}),
        "logits-1e4-index": lambda: (big, torch.tensor([1, 0, 2]), {}),
        "logits-1e4-index-ls-weight": lambda: (
            big, torch.tensor([1, 0, 2]), {"label_smoothing": 0.1, "weight": w}
        ),
        "logits-1e4-prob": lambda: (big, prob(3, C, grad=True), {"label_smoothing": 0.1}),
        "uint8-target": lambda: (z(N, C), idx(N).to(torch.uint8), {}),
    }
    return cases[name]()


CE_CASES = [
    "index-mean",
    "index-sum-weight",
    "index-none",
    "index-ignore-weight-ls",
    "index-ignore-none",
    "index-custom-ignore_index",
    "batch1-index",
    "batch1-prob",
    "unbatched-index",
    "unbatched-index-none",
    "unbatched-prob",
    "kdim-index-mean",
    "kdim-index-none-ls",
    "kdim-index-sum",
    "kdim-prob-mean",
    "kdim-prob-none-weight-ls",
    "noncontig-input",
    "noncontig-kdim-channels-last",
    "noncontig-prob-target",
    "noncontig-index-target",
    "prob-target-grad-weight-ls-sum",
    "prob-target-grad-only",
    "all-ignored-mean",
    "all-ignored-mean-weight-ls",
    "all-ignored-sum",
    "all-ignored-none",
    "logits-1e4-index",
    "logits-1e4-index-ls-weight",
    "logits-1e4-prob",
    "uint8-target",
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", CE_CASES)
def test_cross_entropy_parity(name, dtype):
    z, t, kw = _ce_case(name, dtype)
    out, grads = assert_parity(
        lambda z, t: F.cross_entropy(z, t, **kw), lambda z, t: TF.cross_entropy(z, t, **kw), [z, t]
    )
    if name.startswith("noncontig"):
        assert not (z.is_contiguous() and t.is_contiguous())
    if t.is_floating_point() and t.requires_grad:
        # The gradient w.r.t. the probability target is among those compared.
        assert grads[-1].shape == t.shape
    if name.startswith("logits-1e4"):
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(g).all() for g in grads)
    if name == "all-ignored-mean" or name == "all-ignored-mean-weight-ls":
        assert torch.isnan(out)  # as native: 0 / 0 for the mean over no target
        assert (grads[0] == 0).all()  # ... but no NaN leaks into the gradient
    elif name.startswith("all-ignored"):
        assert (out == 0).all()


@pytest.mark.parametrize("z_grad", [False, True])
def test_cross_entropy_target_gradient_has_a_graph_only_through_the_logits(z_grad):
    # dL/dt = −log p depends on z, not on t: with create_graph it carries a graph exactly
    # when z requires grad, as native's does.
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=z_grad)
    t = torch.softmax(torch.randn(3, 4, dtype=torch.float64), -1).requires_grad_()
    ours, native = (torch.autograd.grad(f(z, t), t, create_graph=True)[0]
                    for f in (F.cross_entropy, TF.cross_entropy))
    torch.testing.assert_close(ours, native)
    assert ours.requires_grad == native.requires_grad == z_grad
    if z_grad:
        torch.testing.assert_close(torch.autograd.grad(ours.sum(), z)[0],
                                   torch.autograd.grad(native.sum(), z)[0])


@pytest.mark.parametrize("kwargs", [{}, {"label_smoothing": 0.2}, {"reduction": "sum"},
                                    {"weight": torch.tensor([0.5, 1.0, 2.0, 1.5],
                                                            dtype=torch.float64)}])
def test_torch_func_mixed_second_derivative_target_then_logits_as_native(kwargs):
    # d/dz (dL/dt) under torch.func: the inner level differentiates by the target only, and its
    # dL/dt = −log p must keep the outer level's path to z (a detached log p gave zeros).
    torch.manual_seed(0)
    z = torch.randn(3, 4, dtype=torch.float64)
    t = torch.softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    v = torch.randn_like(z)

    def second(f: Callable[..., Tensor]) -> tuple[Tensor, Tensor]:
        loss = functools.partial(f, **kwargs)
        mixed = torch.func.jacrev(torch.func.jacrev(loss, argnums=1), argnums=0)(z, t)
        _, tangent = jvp(lambda z: torch.func.grad(lambda t: loss(z, t))(t), (z,), (v,))
        return mixed, tangent

    (ours, ours_t), (native, native_t) = second(F.cross_entropy), second(TF.cross_entropy)
    assert native.abs().max() > 0.01  # the check can fail: the true values are not zero
    torch.testing.assert_close(ours, native)
    torch.testing.assert_close(ours_t, native_t)


def test_cross_entropy_mean_is_weighted_mean_over_kept_targets():
    # The native normaliser: Σ_i w_{y_i} L_i / Σ_i w_{y_i} over the non-ignored i.
    z = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0, 2, -100, 2])
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    per = F.cross_entropy(z, t, w, reduction="none")
    kept = t != -100
    expected = per[kept].sum() / w[t[kept]].sum()
    torch.testing.assert_close(F.cross_entropy(z, t, w), expected)
    assert per[2] == 0


def test_cross_entropy_backward_is_p_minus_onehot_over_n():
    # The derivation's formula, written out: dL/dz = (softmax(z) − onehot(y)) / N.
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2])
    (grad,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    expected = (torch.softmax(z.detach(), 1) - TF.one_hot(y, 4).double()) / 5
    torch.testing.assert_close(grad, expected)



@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["float16", "bfloat16", "float32"])
def test_cross_entropy_tiny_label_smoothing_keeps_an_infinite_loss_as_native(dtype, reduction):
    # ε/C = 3e-10 is 0 in float16: the smoothing term must still be ε/C · (−inf) = −inf, not
    # 0 · (−inf) = NaN, on a row whose logits hold a −inf (native's loss there is inf).
    z = torch.tensor([[0.0, float("-inf"), 1.0], [2.0, 0.5, -1.0]], dtype=dtype)
    t = torch.tensor([0, 2])
    kw = {"reduction": reduction, "label_smoothing": 1e-9}
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out, ref = F.cross_entropy(z1, t, **kw), TF.cross_entropy(z2, t, **kw)
    assert torch.isinf(ref).any()
    torch.testing.assert_close(out, ref, equal_nan=False)
    g = torch.ones_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, z1, g)[0],
                               torch.autograd.grad(ref, z2, g)[0])


@pytest.mark.parametrize("upstream", [float("inf"), float("-inf")])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
def test_cross_entropy_label_smoothing_infinite_upstream_gradient_is_nan_as_native(
        label_smoothing, reduction, upstream):
    # Native's dL/dz on a row with an infinite upstream gradient is NaN in every class (its
    # log_softmax backward subtracts ∞ from ∞); ignored rows stay 0.
    z = randn(4, 3, dtype=torch.float32)
    t = torch.tensor([0, -100, 2, 1])
    kw = {"reduction": reduction, "label_smoothing": label_smoothing}
    g = torch.tensor([upstream, 1.0, 1.0, 1.0]) if reduction == "none" else torch.tensor(upstream)
    z1, z2 = z.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(z1, t, **kw), z1, g)
    (ref,) = torch.autograd.grad(TF.cross_entropy(z2, t, **kw), z2, g)
    assert ref.isnan().any()
    torch.testing.assert_close(grad, ref, equal_nan=True)


def test_cross_entropy_float16_label_smoothing_stays_finite_where_native_overflows():
    # Native sums Σ_c log p over all rows in float16 (inf here, torch 2.14); the fast path folds the
    # smoothing term into each row before nll_loss reduces: the float64 value, to float16.
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(1000, 10, generator=gen) * 20).half()
    t = torch.randint(0, 10, (1000,), generator=gen)
    ours = F.cross_entropy(z, t, label_smoothing=0.1)
    exact = TF.cross_entropy(z.double(), t, label_smoothing=0.1)
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=0)


def test_cross_entropy_label_smoothing_vmap_over_the_target_alone_is_a_loop():
    # Native raises here (an in-place masked_fill_ meets a batched mask); ours maps.
    z = randn(5, 3, dtype=torch.float32)
    targets = torch.tensor([[0, 1, 2, -100, 1], [2, 2, 0, 1, -100], [1, 0, 0, 2, 2]])

    def loss(t: Tensor) -> Tensor:
        return F.cross_entropy(z, t, label_smoothing=0.1)

    mapped = vmap(loss)(targets)
    torch.testing.assert_close(mapped, torch.stack([loss(t) for t in targets]))
    torch.testing.assert_close(
        mapped, torch.stack([TF.cross_entropy(z, t, label_smoothing=0.1) for t in targets]))


def test_l2_penalty_value_and_gradient_are_half_lambda_w_squared_and_lambda_w():
    a = randn(3, 4)
    b = randn(2, 3)
    lam = 0.3
    out = F.l2_penalty([a, b], lam)
    torch.testing.assert_close(out, 0.5 * lam * (a.square().sum() + b.square().sum()))
    g = torch.tensor(2.5, dtype=torch.float64)
    ga, gb = torch.autograd.grad(out, [a, b], g)
    torch.testing.assert_close(ga, g * lam * a.detach())
    torch.testing.assert_close(gb, g * lam * b.detach())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_l2_penalty_float32_matches_formula(dtype):
    a, b = randn(7, 5, dtype=dtype), randn(5, 3, dtype=dtype)
    out, grads = assert_parity(
        lambda a, b: F.l2_penalty([a, b], 1e-2),
        lambda a, b: 0.5 * 1e-2 * (a.square().sum() + b.square().sum()),
        [a, b],
    )
    assert out.dtype == dtype
    assert len(grads) == 2


# --------------------------------------------------------------------------------------------
# 3. in-place ReLU
# --------------------------------------------------------------------------------------------
def test_relu_inplace_overwrites_input_and_marks_it_dirty():
    x = torch.randn(4, 5, requires_grad=True)
    u = x * 1.0  # a non-leaf, so the in-place op is allowed
    version = u._version
    out = F.relu(u, inplace=True)
    assert out.data_ptr() == u.data_ptr()
    assert u._version > version
    assert (u >= 0).all()
    # copy_'s backward hands the gradient to the hand-derived Function's
    assert any("ReLUFunction" in type(f).__name__ for f, _ in u.grad_fn.next_functions if f)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (x.detach() > 0).float())


@pytest.mark.parametrize("relu", [F.relu, TF.relu], ids=["torch_mlp", "native"])
def test_relu_inplace_after_use_raises_version_counter_error(relu):
    # sin saves its input; overwriting that input in place must make backward refuse.
    x = torch.randn(5, requires_grad=True)
    u = x * 2
    s = u.sin()
    relu(u, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


@pytest.mark.parametrize("relu", [F.relu, TF.relu], ids=["torch_mlp", "native"])
def test_relu_saved_output_modified_later_raises(relu):
    # ReLU saves its output for backward; an in-place change of it is caught, like native.
    x = torch.randn(5, requires_grad=True)
    h = relu(x * 1.0)
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()


@pytest.mark.parametrize("relu", [F.relu, TF.relu], ids=["torch_mlp", "native"])
def test_relu_inplace_on_leaf_that_requires_grad_raises(relu):
    x = torch.randn(5, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        relu(x, inplace=True)


def test_relu_inplace_without_grad_matches_native():
    u = torch.randn(3, 4)
    ref = TF.relu(u.clone(), inplace=True)
    out = F.relu(u, inplace=True)
    assert out.data_ptr() == u.data_ptr()
    torch.testing.assert_close(u, ref)


# --------------------------------------------------------------------------------------------
# 4. torch.func
# --------------------------------------------------------------------------------------------
def _loop(fn: Callable[..., Tensor], in_dims: tuple[int | None, ...], *args: Any) -> Tensor:
    B = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    return torch.stack(
        [fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(B)]
    )


def test_vmap_linear_over_inputs_and_over_weights():
    x = torch.randn(3, 5, 4)
    w, b = torch.randn(6, 4), torch.randn(6)
    out = vmap(F.linear, in_dims=(0, None, None))(x, w, b)
    torch.testing.assert_close(out, TF.linear(x, w, b))
    ws, bs = torch.randn(3, 6, 4), torch.randn(3, 6)
    out = vmap(F.linear, in_dims=(None, 0, 0))(x[0], ws, bs)
    torch.testing.assert_close(out, _loop(TF.linear, (None, 0, 0), x[0], ws, bs))
    out = vmap(F.linear, in_dims=(1, None, None))(x, w, None)  # batch dim not first
    torch.testing.assert_close(out, TF.linear(x.transpose(0, 1), w))


def test_vmap_relu():
    u = torch.randn(4, 3, 5)
    torch.testing.assert_close(vmap(F.relu)(u), TF.relu(u))
    torch.testing.assert_close(vmap(F.relu, in_dims=2)(u), TF.relu(u).movedim(2, 0))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target", ["index", "prob"])
def test_vmap_cross_entropy(target, reduction):
    B, N, C = 3, 5, 4
    z = torch.randn(B, N, C)
    w = torch.rand(C) + 0.5
    if target == "index":
        t = torch.randint(0, C, (B, N))
        t[0, 1] = -100
    else:
        t = torch.softmax(torch.randn(B, N, C), -1)

    def ours(z, t):
        return F.cross_entropy(z, t, w, reduction=reduction, label_smoothing=0.1)

    def ref(z, t):
        return TF.cross_entropy(z, t, w, reduction=reduction, label_smoothing=0.1)

    torch.testing.assert_close(vmap(ours)(z, t), _loop(ref, (0, 0), z, t))


def test_vmap_cross_entropy_out_of_range_target_still_fails():
    # Under vmap the value check cannot read the targets; the gather still refuses them.
    z = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="out of bounds"):
        vmap(F.cross_entropy)(z, torch.full((2, 3), 7))


def test_vmap_l2_penalty():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 2)
    out = vmap(lambda a, b: F.l2_penalty([a, b], 0.3))(a, b)
    torch.testing.assert_close(out, 0.15 * (a.square().sum((1, 2)) + b.square().sum(1)))
    out = vmap(lambda a, b: F.l2_penalty([a, b], 0.3), in_dims=(0, None))(a, b[0])
    torch.testing.assert_close(out, 0.15 * (a.square().sum((1, 2)) + b[0].square().sum()))


def test_vmap_of_grad_gives_per_sample_gradients():
    # vmap(grad(...)) runs the hand-written backward under vmap: per-sample gradients.
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    w, b = torch.randn(3, 4), torch.randn(3)

    def loss(w, b, x, y, ce, lin, relu):
        return ce(lin(relu(x.unsqueeze(0)), w, b), y.unsqueeze(0))

    ours = vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0, None, None, None))
    gw, gb = ours(w, b, x, y, F.cross_entropy, F.linear, F.relu)
    ref = torch.func.grad(loss, argnums=(0, 1))
    for i in range(6):
        rw, rb = ref(w, b, x[i], y[i], TF.cross_entropy, TF.linear, TF.relu)
        torch.testing.assert_close(gw[i], rw)
        torch.testing.assert_close(gb[i], rb)


JVP_FUNCS = {
    "linear": (F.linear, TF.linear, lambda: (torch.randn(2, 3, 4), torch.randn(5, 4),
                                             torch.randn(5))),
    "relu": (F.relu, TF.relu, lambda: (torch.randn(3, 4),)),
    "cross_entropy-prob": (
        lambda z, t: F.cross_entropy(z, t, label_smoothing=0.1),
        lambda z, t: TF.cross_entropy(z, t, label_smoothing=0.1),
        lambda: (torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)),
    ),
    "l2_penalty": (
        lambda a, b: F.l2_penalty([a, b], 0.2),
        lambda a, b: 0.1 * (a.square().sum() + b.square().sum()),
        lambda: (torch.randn(3, 4), torch.randn(4)),
    ),
}


@pytest.mark.parametrize("name", list(JVP_FUNCS), ids=list(JVP_FUNCS))
def test_torch_func_jvp_matches_native(name):
    ours, ref, make = JVP_FUNCS[name]
    primals = make()
    tangents = tuple(torch.randn_like(p) for p in primals)
    out, tan = jvp(ours, primals, tangents)
    ref_out, ref_tan = jvp(ref, primals, tangents)
    torch.testing.assert_close(out, ref_out)
    assert tan.dtype == out.dtype
    # check_dtype=False: native forward AD of the l2 formula (python-float times a float32
    # tensor) returns a float64 tangent; the values are what is compared.
    torch.testing.assert_close(tan, ref_tan, check_dtype=False)


def test_torch_func_jvp_cross_entropy_index_target():
    z, t = torch.randn(5, 3), torch.tensor([0, 2, -100, 1, 1])
    tz = torch.randn_like(z)
    out, tan = jvp(lambda z: F.cross_entropy(z, t, reduction="none"), (z,), (tz,))
    ref_out, ref_tan = jvp(lambda z: TF.cross_entropy(z, t, reduction="none"), (z,), (tz,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tan, ref_tan)


# --------------------------------------------------------------------------------------------
# 5. bad input
# --------------------------------------------------------------------------------------------
def _z() -> Tensor:
    return torch.randn(3, 4)


# Refused by torch_mlp before any kernel runs, naming the argument: (id, call, message pattern).
# Each is a ValueError, and a RuntimeError as native's refusals are.
BAD_INPUT = [
    ("ce-batch-size-mismatch", lambda: F.cross_entropy(_z(), torch.tensor([0, 1, 2, 3, 0])),
     r"Expected input batch_size \(3\) to match target batch_size \(5\)"),
    ("ce-prob-target-wrong-shape", lambda: F.cross_entropy(_z(), torch.rand(3, 5)),
     r"class-probability target must have the input's shape \(3, 4\), got \(3, 5\)"),
    ("ce-prob-target-flat", lambda: F.cross_entropy(_z(), torch.rand(3)),
     r"class-probability target must have the input's shape \(3, 4\), got \(3,\) \(class "
     r"indices are an integer tensor\)"),
    ("ce-complex-target", lambda: F.cross_entropy(_z(), torch.rand(3, 4, dtype=torch.cfloat)),
     r"^Expected floating point type for target with class probabilities, got torch\.complex64"),
    ("ce-kdim-target-wrong-shape",
     lambda: F.cross_entropy(torch.randn(2, 4, 3), torch.tensor([0, 1])),
     r"expected target of shape \(2, 3\) for input of shape \(2, 4, 3\), got \(2,\)"),
    ("ce-kdim-target-transposed",  # the same numel: flattening would read it in the wrong order
     lambda: F.cross_entropy(torch.randn(2, 4, 3, 5), torch.zeros(2, 5, 3, dtype=torch.long)),
     r"expected target of shape \(2, 3, 5\) for input of shape \(2, 4, 3, 5\), got \(2, 5, 3\)"),
    ("ce-invalid-reduction", lambda: F.cross_entropy(_z(), torch.tensor([0, 1, 2]),
                                                     reduction="elementwise_mean"),
     r"elementwise_mean is not a valid value for reduction"),
    ("ce-label_smoothing-above-one", lambda: F.cross_entropy(_z(), torch.tensor([0, 1, 2]),
                                                             label_smoothing=1.5),
     r"label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
    ("ce-weight-wrong-shape", lambda: F.cross_entropy(_z(), torch.tensor([0, 1, 2]),
                                                      weight=torch.ones(3)),
     r"expected weight of shape \(4,\) \(one per class\), got \(3,\)"),
    ("ce-weight-one-element",  # would broadcast over the classes in the general path
     lambda: F.cross_entropy(_z(), torch.rand(3, 4), weight=torch.ones(1)),
     r"expected weight of shape \(4,\) \(one per class\), got \(1,\)"),
    ("ce-weight-requires-grad", lambda: F.cross_entropy(_z(), torch.tensor([0, 1, 2]),
                                                        weight=torch.ones(4, requires_grad=True)),
     r"derivative with respect to weight is not supported; pass weight.detach\(\)"),
    ("ce-zero-classes", lambda: F.cross_entropy(torch.randn(3, 0), torch.tensor([0, 1, 2])),
     r"with C ≥ 1 classes, got \(3, 0\)"),
    ("ce-0d-input", lambda: F.cross_entropy(torch.tensor(1.0), torch.tensor(0)),
     r"expected input of shape \(C\), \(N, C\) or \(N, C, d1, ...\)"),
    ("linear-bias-wrong-shape", lambda: F.linear(torch.randn(5, 3), torch.randn(4, 3),
                                                 torch.randn(3)),
     r"expected bias of shape \(out_features,\).*output's shape \(5, 4\).*got bias \(3,\)"),
    ("linear-bias-enlarges-output",
     lambda: F.linear(torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(4, 2, 3, 5)),
     r"output's shape \(2, 3, 5\).*got bias \(4, 2, 3, 5\)"),
    ("linear-weight-1d-with-bias", lambda: F.linear(torch.randn(2, 4), torch.randn(4),
                                                    torch.randn(())),
     r"with a 2-D weight, got bias \(\) and weight \(4,\)"),
    ("linear-weight-1d-with-bias-of-its-length",
     lambda: F.linear(torch.randn(2, 4), torch.randn(4), torch.randn(4)),
     r"output's shape \(2,\) with a 2-D weight, got bias \(4,\) and weight \(4,\)"),
    ("linear-weight-3d", lambda: F.linear(torch.randn(5, 3), torch.randn(2, 4, 3)),
     r"expected weight of shape \(out_features, in_features\).*got weight \(2, 4, 3\)"),
]


@pytest.mark.parametrize(("call", "match"), [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert isinstance(info.value, RuntimeError)  # code written against native's catches it


L2_BAD_INPUT = [
    ("negative-lam", lambda: F.l2_penalty([torch.randn(2, 2)], -0.1), ValueError,
     r"lam must be a non-negative Python number, got -0.1"),
    ("nan-lam", lambda: F.l2_penalty([torch.randn(2, 2)], float("nan")), ValueError,
     r"lam must be a non-negative Python number, got nan"),
    ("tensor-lam", lambda: F.l2_penalty([torch.randn(2, 2)], torch.tensor(0.1)), TypeError,
     r"lam must be a Python number, got Tensor"),
    ("bool-lam", lambda: F.l2_penalty([torch.randn(2, 2)], True), TypeError,
     r"lam must be a Python number, got bool"),
    ("dict-weights", lambda: F.l2_penalty({"w": torch.randn(2, 2)}, 0.1), TypeError,
     r"weights must be a tensor or a sequence of tensors, got a dict; pass its values\(\)"),
    ("no-weights", lambda: F.l2_penalty([], 0.1), ValueError,
     r"expected at least one weight tensor"),
    ("integer-weight", lambda: F.l2_penalty([torch.ones(2, dtype=torch.int64)], 0.1), TypeError,
     r"weights\[0\] must be a real floating-point tensor, got torch.int64"),
    ("complex-weight", lambda: F.l2_penalty([torch.ones(2, dtype=torch.complex64)], 0.1),
     TypeError, r"weights\[0\] must be a real floating-point tensor, got torch.complex64"),
    ("not-a-tensor", lambda: F.l2_penalty([torch.ones(2), [1.0]], 0.1), TypeError,
     r"weights\[1\] must be a real floating-point tensor, got list"),
]


@pytest.mark.parametrize("value", [None, "0.1", torch.tensor([0.1]),
                                   torch.tensor(0.1, requires_grad=True)],
                         ids=["None", "str", "1-d-tensor", "tensor-requiring-grad"])
def test_cross_entropy_label_smoothing_of_another_type_is_a_type_error_as_native(value):
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError):
        TF.cross_entropy(z, y, label_smoothing=value)
    with pytest.raises(TypeError, match=r"^cross_entropy: label_smoothing must be a float, got "):
        F.cross_entropy(z, y, label_smoothing=value)


@pytest.mark.parametrize("value", [True, torch.tensor(0.2), torch.tensor(1)],
                         ids=["bool", "0-dim-tensor", "0-dim-int-tensor"])
def test_cross_entropy_label_smoothing_takes_what_native_takes(value):
    z, y = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2])
    ours, native = F.cross_entropy(z, y, label_smoothing=value), TF.cross_entropy(
        z, y, label_smoothing=value)
    torch.testing.assert_close(ours, native)
    torch.testing.assert_close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(native, z)[0])


@pytest.mark.parametrize(("call", "exc", "match"), [case[1:] for case in L2_BAD_INPUT],
                         ids=[case[0] for case in L2_BAD_INPUT])
def test_l2_penalty_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# Refused by the kernel itself, as native refuses them: (id, ours, native). Ours must raise
# native's exception type with native's message (no check of ours in front).
KERNEL_REFUSALS = {
    "ce-target-too-large": (lambda: F.cross_entropy(_z(), torch.tensor([0, 4, 1])),
                            lambda: TF.cross_entropy(_z(), torch.tensor([0, 4, 1]))),
    "ce-target-negative": (lambda: F.cross_entropy(_z(), torch.tensor([0, -1, 1])),
                           lambda: TF.cross_entropy(_z(), torch.tensor([0, -1, 1]))),
    "ce-target-not-ignore-index": (
        lambda: F.cross_entropy(_z(), torch.tensor([0, -100, 1]), ignore_index=-1),
        lambda: TF.cross_entropy(_z(), torch.tensor([0, -100, 1]), ignore_index=-1)),
    "ce-kdim-target-out-of-range": (
        lambda: F.cross_entropy(torch.randn(2, 4, 3), torch.tensor([[0, 1, 2], [3, 9, 0]])),
        lambda: TF.cross_entropy(torch.randn(2, 4, 3), torch.tensor([[0, 1, 2], [3, 9, 0]]))),
    "ce-target-int32": (
        lambda: F.cross_entropy(_z(), torch.tensor([0, 1, 2], dtype=torch.int32)),
        lambda: TF.cross_entropy(_z(), torch.tensor([0, 1, 2], dtype=torch.int32))),
    "ce-weight-dtype": (
        lambda: F.cross_entropy(_z(), torch.tensor([0, 1, 2]), weight=torch.ones(4).double()),
        lambda: TF.cross_entropy(_z(), torch.tensor([0, 1, 2]), weight=torch.ones(4).double())),
    "ce-target-device": (
        lambda: F.cross_entropy(_z(), torch.tensor([0, 1, 2], device="meta")),
        lambda: TF.cross_entropy(_z(), torch.tensor([0, 1, 2], device="meta"))),
    "ce-integer-logits": (
        lambda: F.cross_entropy(torch.ones(3, 4, dtype=torch.int64), torch.tensor([0, 1, 2])),
        lambda: TF.cross_entropy(torch.ones(3, 4, dtype=torch.int64), torch.tensor([0, 1, 2]))),
    # The same with a class weight and label smoothing, the path that builds Q:
    "ce-weighted-smoothed-target-too-large": (
        lambda: F.cross_entropy(_z(), torch.tensor([0, 9, 1]), torch.rand(4), label_smoothing=0.1),
        lambda: TF.cross_entropy(_z(), torch.tensor([0, 9, 1]), torch.rand(4),
                                 label_smoothing=0.1)),
    "ce-weighted-smoothed-bool-target": (
        lambda: F.cross_entropy(_z(), torch.tensor([True, False, True]), torch.rand(4),
                                label_smoothing=0.1),
        lambda: TF.cross_entropy(_z(), torch.tensor([True, False, True]), torch.rand(4),
                                 label_smoothing=0.1)),
    "ce-weighted-smoothed-weight-dtype": (
        lambda: F.cross_entropy(_z(), torch.tensor([0, 1, 2]), torch.rand(4).double(),
                                label_smoothing=0.1),
        lambda: TF.cross_entropy(_z(), torch.tensor([0, 1, 2]), torch.rand(4).double(),
                                 label_smoothing=0.1)),
    "linear-feature-dim": (lambda: F.linear(torch.randn(5, 3), torch.randn(4, 6)),
                           lambda: TF.linear(torch.randn(5, 3), torch.randn(4, 6))),
    "linear-dtype": (lambda: F.linear(torch.randn(5, 3), torch.randn(4, 3).double()),
                     lambda: TF.linear(torch.randn(5, 3), torch.randn(4, 3).double())),
    "relu-complex": (lambda: F.relu(torch.randn(3, dtype=torch.complex64)),
                     lambda: TF.relu(torch.randn(3, dtype=torch.complex64))),
    "relu-bool": (lambda: F.relu(torch.ones(3, dtype=torch.bool)),
                  lambda: TF.relu(torch.ones(3, dtype=torch.bool))),
}


@pytest.mark.parametrize("name", list(KERNEL_REFUSALS), ids=list(KERNEL_REFUSALS))
def test_kernel_refusals_are_natives_own(name):
    ours, native = KERNEL_REFUSALS[name]
    with pytest.raises(Exception) as ref:
        native()
    with pytest.raises(type(ref.value)) as info:
        ours()
    assert str(info.value).splitlines()[0] == str(ref.value).splitlines()[0]


def test_ignore_index_targets_outside_range_are_accepted():
    # The range check exempts ignore_index, wherever it lies.
    z = torch.randn(3, 4)
    t = torch.tensor([0, 7, 3])
    torch.testing.assert_close(
        F.cross_entropy(z, t, ignore_index=7), TF.cross_entropy(z, t, ignore_index=7)
    )


# --------------------------------------------------------------------------------------------
# 6. dtypes and edge shapes: complex, zero-size dims, relu over every dtype, meta tensors
# --------------------------------------------------------------------------------------------
def test_linear_complex128_gradcheck_and_gradgradcheck():
    # PyTorch's conjugate Wirtinger convention: dL/dx = g · conj(weight), dL/dweight = gᵀ · conj(x).
    x = randn(2, 3, 4, dtype=torch.complex128)
    w, b = randn(5, 4, dtype=torch.complex128), randn(5, dtype=torch.complex128)
    assert torch.autograd.gradcheck(F.linear, (x, w, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(F.linear, (x, w, b))
    assert torch.autograd.gradcheck(F.linear, (x[0].detach().requires_grad_(), w, None))


@pytest.mark.parametrize("shape", [(5, 4), (4,), (2, 3, 4)], ids=["2d", "1d", "leading-dims"])
def test_linear_complex64_matches_native(shape):
    x = randn(*shape, dtype=torch.complex64)
    w, b = randn(3, 4, dtype=torch.complex64), randn(3, dtype=torch.complex64)
    out, grads = assert_parity(F.linear, TF.linear, [x, w, b])
    assert out.dtype == torch.complex64 and len(grads) == 3


# (x shape, weight shape, bias): every zero-size layout F.linear takes, and 1-D inputs.
LINEAR_EDGE_SHAPES = {
    "zero-in-leading-dims": ((2, 3, 0), (4, 0), True),
    "zero-in-1d": ((0,), (4, 0), True),
    "zero-in-2d": ((3, 0), (4, 0), True),
    "zero-in-no-bias": ((2, 3, 0), (4, 0), False),
    "zero-out": ((2, 3), (0, 3), True),
    "zero-out-leading-dims": ((2, 5, 3), (0, 3), True),
    "zero-out-1d": ((3,), (0, 3), False),
    "zero-batch": ((0, 3), (4, 3), True),
    "zero-batch-leading-dims": ((2, 0, 3), (4, 3), True),
    "zero-everything": ((0, 0), (0, 0), True),
    "1d": ((3,), (4, 3), True),
    "1d-no-bias": ((3,), (4, 3), False),
}


@pytest.mark.parametrize("name", list(LINEAR_EDGE_SHAPES), ids=list(LINEAR_EDGE_SHAPES))
def test_linear_edge_shapes_match_native_forward_and_backward(name):
    x_shape, w_shape, bias = LINEAR_EDGE_SHAPES[name]
    args = [randn(*x_shape), randn(*w_shape), randn(w_shape[0]) if bias else None]
    out, grads = assert_parity(F.linear, TF.linear, args)
    assert out.shape == (*x_shape[:-1], w_shape[0])
    assert [g.shape for g in grads] == [a.shape for a in args if a is not None]
    assert torch.autograd.gradcheck(F.linear, tuple(args))
    assert torch.autograd.gradgradcheck(F.linear, tuple(args))


RELU_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
@pytest.mark.parametrize("dtype", RELU_DTYPES, ids=[str(d)[6:] for d in RELU_DTYPES])
def test_relu_every_dtype_matches_native_or_both_refuse(dtype, inplace):
    t = torch.tensor([-3, -1, 0, 2, 5]).to(dtype)
    try:
        expected = TF.relu(t.clone(), inplace=inplace)
    except (NotImplementedError, RuntimeError, TypeError) as e:
        with pytest.raises(type(e)):
            F.relu(t.clone(), inplace=inplace)
        return
    out = F.relu(t.clone(), inplace=inplace)
    assert out.dtype == expected.dtype == dtype
    assert torch.equal(out, expected)


@pytest.mark.parametrize("ignore_index", [0, 1, -1, -100, -7])
def test_cross_entropy_probability_target_takes_ignore_index_as_native(ignore_index):
    # Native refuses only a non-negative ignore_index there, and ignores a negative one.
    z, p = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), 1)
    if ignore_index >= 0:
        with pytest.raises(RuntimeError, match="ignore_index is not supported"):
            TF.cross_entropy(z, p, ignore_index=ignore_index)
        with pytest.raises(RuntimeError, match=r"ignore_index is not supported for floating "
                                               rf"point target, got ignore_index={ignore_index}"):
            F.cross_entropy(z, p, ignore_index=ignore_index)
        return
    torch.testing.assert_close(F.cross_entropy(z, p, ignore_index=ignore_index),
                               TF.cross_entropy(z, p, ignore_index=ignore_index))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("target", ["index", "prob"])
def test_cross_entropy_on_meta_tensors_returns_a_meta_tensor(target, reduction):
    z = torch.randn(3, 4, 2, device="meta", requires_grad=True)
    t = (torch.randint(0, 4, (3, 2), device="meta") if target == "index"
         else torch.rand(3, 4, 2, device="meta"))
    out = F.cross_entropy(z, t, reduction=reduction)
    ref = TF.cross_entropy(z, t, reduction=reduction)
    assert out.is_meta and out.shape == ref.shape and out.dtype == ref.dtype
    (grad,) = torch.autograd.grad(out, z, torch.ones_like(out))
    assert grad.is_meta and grad.shape == z.shape


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("target", [2, -100], ids=["class", "ignored"])
def test_cross_entropy_unbatched_input_takes_a_one_element_target_as_native(target, reduction):
    # Native reads a (1,) target of a (C) input as the () one in forward; its own backward
    # then fails on the shapes, so ours is compared with the () target's gradient.
    z = randn(4)
    kw = {"reduction": reduction, "weight": torch.rand(4, dtype=torch.float64) + 0.5}
    out = F.cross_entropy(z, torch.tensor([target]), **kw)
    ref = TF.cross_entropy(z, torch.tensor([target]), **kw)
    assert out.shape == ref.shape == ()
    torch.testing.assert_close(out, ref, equal_nan=True)
    (grad,) = torch.autograd.grad(out, z)
    (ref_grad,) = torch.autograd.grad(TF.cross_entropy(z, torch.tensor(target), **kw), z)
    torch.testing.assert_close(grad, ref_grad, equal_nan=True)
    with pytest.raises(ValueError, match=r"expected target of shape \(\) for input of shape "
                                         r"\(4,\), got \(2,\)"):
        F.cross_entropy(z, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"expected target of shape \(\).*got \(1,\)"):
        F.cross_entropy(z, torch.tensor([1]), label_smoothing=0.1)  # native's forward fails


# --------------------------------------------------------------------------------------------
# 7. the L2 value's accuracy
# --------------------------------------------------------------------------------------------
def test_l2_penalty_float32_value_is_as_accurate_as_the_native_formula():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(784, 1024, generator=gen), torch.randn(1024, 10, generator=gen)]
    lam = 1e-4
    exact = 0.5 * lam * sum(w.double().square().sum() for w in weights)
    native = 0.5 * lam * sum(w.square().sum() for w in weights)
    ours = F.l2_penalty(weights, lam)
    assert ours.dtype == torch.float32
    native_err = (native.double() - exact).abs() / exact
    ours_err = (ours.double() - exact).abs() / exact
    assert ours_err <= 1.5 * native_err + 1e-12


def test_l2_penalty_stays_exactly_differentiable():
    a, b = randn(7, 5), randn(3)
    fn = lambda a, b: F.l2_penalty([a, b], 0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a, b), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (a, b))
    ga, gb = torch.autograd.grad(fn(a, b), [a, b])
    torch.testing.assert_close(ga, 0.3 * a.detach())
    torch.testing.assert_close(gb, 0.3 * b.detach())


# --------------------------------------------------------------------------------------------
# 8. what a drop-in user meets at native's edges: autocast, dtypes, error types, in-place ReLU
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("target", ["index", "prob"])
def test_cross_entropy_under_autocast_casts_the_class_weight_as_native(target, autocast,
                                                                      weight_dtype):
    # cross_entropy is on autocast's float32 list: every low-precision floating argument is
    # cast, the class weight too.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=gen).requires_grad_()
    t = (torch.tensor([0, 1, 2, 3]) if target == "index"
         else torch.softmax(torch.randn(4, 5, generator=gen), 1))
    w = (torch.rand(5, generator=gen) + 0.5).to(weight_dtype)
    with torch.autocast("cpu", dtype=autocast):
        out, _ = assert_parity(
            lambda z: F.cross_entropy(z, t, weight=w, label_smoothing=0.1),
            lambda z: TF.cross_entropy(z, t, weight=w, label_smoothing=0.1), [z])
    assert out.dtype == torch.float32


def test_cross_entropy_float64_weight_under_autocast_is_refused_as_native():
    z, t, w = torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), torch.rand(5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="Double"):
            TF.cross_entropy(z, t, weight=w)
        with pytest.raises(RuntimeError, match="Double"):
            F.cross_entropy(z, t, weight=w)


@pytest.mark.parametrize("relu", [F.relu, TF.relu], ids=["torch_mlp", "native"])
@pytest.mark.parametrize("base", ["leaf", "non-leaf"])
def test_relu_inplace_on_a_view_made_under_no_grad_raises_as_native(relu, base):
    x = torch.randn(4, 5, requires_grad=True)
    src = x if base == "leaf" else x * 2
    with torch.no_grad():
        view = src[0]
    with pytest.raises(RuntimeError, match="A view was created in no_grad mode and is being "
                                           "modified inplace with grad mode enabled"):
        relu(view, inplace=True)
    with torch.no_grad():  # the view and the in-place op both under no_grad: allowed
        relu(view, inplace=True)


@pytest.mark.parametrize("relu", [F.relu, TF.relu], ids=["torch_mlp", "native"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_relu_inplace_bumps_the_version_counter_once_as_native(relu, grad):
    u = torch.randn(5, requires_grad=True) * 1.0 if grad else torch.randn(5)
    version = u._version
    relu(u, inplace=True)
    assert u._version == version + 1
    if grad:  # autograd's error then names the version native's would
        s = u.sin()  # saves u at version 1
        relu(u, inplace=True)
        with pytest.raises(RuntimeError, match="is at version 2; expected version 1"):
            s.sum().backward()


def _custom_view(t: Tensor) -> Tensor:
    class _View(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g

    return _View.apply(t)


# Each in-place case autograd refuses: (make the tensor from a leaf that requires grad, message)
INPLACE_REFUSALS = {
    "leaf": (lambda x: x, "a leaf Variable that requires grad is being used"),
    "view-of-leaf": (lambda x: x[0], "a view of a leaf Variable"),
    "multi-output-view": (lambda x: (x * 1).unbind(0)[0], "output of a function that returns "
                                                           "multiple views"),
    "custom-function-view": (lambda x: _custom_view(x * 1), "created inside a custom Function"),
}


@pytest.mark.parametrize("relu", [F.relu, TF.relu], ids=["torch_mlp", "native"])
@pytest.mark.parametrize("case", list(INPLACE_REFUSALS))
def test_relu_inplace_refusals_leave_the_tensor_unchanged_as_native(relu, case):
    make, match = INPLACE_REFUSALS[case]
    x = torch.randn(4, 5, requires_grad=True)
    before = x.detach().clone()
    u = make(x)
    version = u._version
    with pytest.raises(RuntimeError, match=match):
        relu(u, inplace=True)
    assert torch.equal(x.detach(), before) and u._version == version


def test_relu_inplace_on_a_view_of_a_non_leaf_matches_native():
    def run(relu):
        x = torch.linspace(-2, 2, 20, dtype=torch.float64).reshape(4, 5).requires_grad_()
        u = x * 3
        relu(u[1:3], inplace=True)
        return u, torch.autograd.grad((u * u).sum(), x)[0]

    (out, grad), (ref, ref_grad) = run(F.relu), run(TF.relu)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


# linear: every bias / weight layout F.linear accepts. (x shape, weight shape, bias shape)
LINEAR_BROADCAST = {
    "bias-per-row": ((3, 4), (5, 4), (3, 5)),
    "bias-row": ((3, 4), (5, 4), (1, 5)),
    "bias-column": ((3, 4), (5, 4), (3, 1)),
    "bias-0d": ((3, 4), (5, 4), ()),
    "bias-one": ((3, 4), (5, 4), (1,)),
    "bias-0d-1d-input": ((4,), (5, 4), ()),
    "bias-leading-dims": ((2, 3, 4), (5, 4), (3, 5)),
    "bias-full-leading-dims": ((2, 3, 4), (5, 4), (2, 1, 5)),
    "weight-1d": ((3, 4), (4,), None),
    "weight-1d-leading-dims": ((2, 3, 4), (4,), None),
    "weight-1d-1d-input": ((4,), (4,), None),
}


@pytest.mark.parametrize("name", list(LINEAR_BROADCAST), ids=list(LINEAR_BROADCAST))
def test_linear_takes_every_bias_and_weight_layout_native_takes(name):
    x_shape, w_shape, b_shape = LINEAR_BROADCAST[name]
    args = [torch.randn(s, dtype=torch.float64).requires_grad_() if s is not None else None
            for s in (x_shape, w_shape, b_shape)]
    out, grads = assert_parity(F.linear, TF.linear, args)
    assert out.shape == TF.linear(*args).shape
    assert [g.shape for g in grads] == [a.shape for a in args if a is not None]
    assert torch.autograd.gradcheck(F.linear, tuple(args), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(F.linear, tuple(args))


@pytest.mark.parametrize("target_dtype", [torch.float64, torch.float16, torch.bfloat16],
                         ids=["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("weight", [None, torch.float32, torch.float64],
                         ids=["no-weight", "weight32", "weight64"])
def test_cross_entropy_probability_target_of_another_dtype_promotes_as_native(target_dtype,
                                                                             weight):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=gen).requires_grad_()
    t = torch.softmax(torch.randn(4, 5, generator=gen), 1).to(target_dtype).requires_grad_()
    w = None if weight is None else (torch.rand(5, generator=gen) + 0.5).to(weight)
    kw = {"weight": w, "label_smoothing": 0.1}
    out = F.cross_entropy(z, t, **kw)
    ref = TF.cross_entropy(z, t, **kw)
    assert out.dtype == ref.dtype
    # Native takes log_softmax in the logits' float32, then promotes: float32's tolerance.
    tol = {"rtol": 1.3e-6, "atol": 1e-5}
    torch.testing.assert_close(out, ref, check_dtype=False, **tol)
    grads = torch.autograd.grad(out, [z, t])
    ref_grads = torch.autograd.grad(ref, [z, t])
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, **(tol if r.dtype in DTYPES else {}))


@pytest.mark.parametrize("label_smoothing", [float("nan"), -0.1, -5.0, float("-inf")])
@pytest.mark.parametrize("target", ["index", "prob"])
def test_cross_entropy_label_smoothing_nan_or_negative_is_none_as_native(target,
                                                                        label_smoothing):
    z = randn(4, 5)
    t = (torch.tensor([0, 1, -100, 3]) if target == "index"
         else torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1))
    out, _ = assert_parity(lambda z: F.cross_entropy(z, t, label_smoothing=label_smoothing),
                           lambda z: TF.cross_entropy(z, t, label_smoothing=label_smoothing), [z])
    torch.testing.assert_close(out, TF.cross_entropy(z, t))  # as label_smoothing=0
    module = torch_mlp.CrossEntropyLoss(label_smoothing=label_smoothing)
    torch.testing.assert_close(module(z, t), out)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["all-ignored", "empty-batch", "empty-batch-prob"])
def test_torch_func_jvp_of_an_empty_mean_is_nan_as_native(case, reduction):
    if case == "all-ignored":
        z, t = torch.randn(3, 4), torch.tensor([-100, -100, -100])
    elif case == "empty-batch":
        z, t = torch.randn(0, 4), torch.zeros(0, dtype=torch.int64)
    else:
        z, t = torch.randn(0, 4), torch.rand(0, 4)
    tz = torch.randn_like(z)
    kw = {"reduction": reduction, "weight": torch.rand(4) + 0.5}
    out, tan = jvp(lambda z: F.cross_entropy(z, t, **kw), (z,), (tz,))
    ref_out, ref_tan = jvp(lambda z: TF.cross_entropy(z, t, **kw), (z,), (tz,))
    torch.testing.assert_close(out, ref_out, equal_nan=True)
    torch.testing.assert_close(tan, ref_tan, equal_nan=True)
