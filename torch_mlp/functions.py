"""The derivation: each layer's ``torch.autograd.Function``, forward and hand-derived backward.

Each backward computes exactly the formula derived in ``docs/derivation.md``, written in
differentiable torch ops so that double backward (``gradgradcheck``) is exact; each ``jvp`` is
the forward-mode twin of its backward; ``# (n)`` cites equation (n) there. Nothing here checks
arguments or picks a variant: the wrappers in :mod:`torch_mlp.functional` do that.

Sizes in shape comments: N batch, D input features, H hidden units (out features), C classes,
M = rows after flattening leading dims. g is the incoming gradient dL/d(output).

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd import Function

__all__ = [
    "L2PenaltyFunction",
    "LinearFunction",
    "ReLUFunction",
    "SoftmaxCrossEntropyFunction",
]

_threshold_backward = torch.ops.aten.threshold_backward.default  # the bound overload: less dispatch
_nll_loss = torch.ops.aten.nll_loss_forward.default  # F.nll_loss's kernel for (M, C), no checks


def _rows(t: Tensor) -> Tensor:
    """``t`` of shape (*, K) as (M, K) rows: M spelled out, as reshape(-1, K) cannot infer it
    when K is 0 (and legacy vmap, in gradcheck's batched check, has no rule for flatten)."""
    shape = t.shape
    return t.reshape(math.prod(shape[:-1]), shape[-1])


# --------------------------------------------------------------------------------------------
# Linear: u = x W + c, with W = weight.T (weight is stored (out, in) like nn.Linear)
# --------------------------------------------------------------------------------------------
def _affine(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x · weightᵀ + bias, always a fresh tensor, never a view: autograd forbids modifying a
    custom Function's view output in place, which would break a following ReLU(inplace=True)."""
    if x.dim() == 2:
        if bias is None:
            return x.mm(weight.t())  # (N, H)
        return torch.addmm(bias, x, weight.t())  # one fused GEMM + bias, (N, H)
    u = torch.matmul(x, weight.t())  # (*, H): matmul folds the leading dims, returns no view
    return u if bias is None else u + bias


def _linear_tangent(x: Tensor, weight: Tensor, x_t: Tensor | None, weight_t: Tensor | None,
                    bias_t: Tensor | None) -> Tensor | None:
    """(22) du = dx · weightᵀ + x · dweightᵀ + dbias: forward mode of the same product rule."""
    u_t = None
    if x_t is not None:
        u_t = _affine(x_t, weight, None)
    if weight_t is not None:
        term = _affine(x, weight_t, None)
        u_t = term if u_t is None else u_t + term
    if bias_t is not None:
        u_t = bias_t.expand(*x.shape[:-1], weight.shape[0]) if u_t is None else u_t + bias_t
    return u_t


class LinearFunction(Function):
    """``u = x · weightᵀ + bias`` for x of shape (*, D), weight (H, D), bias (H) or None (or a
    shape that broadcasts to (*, H) without enlarging it, as ``F.linear`` takes).

    Backward (g = dL/du): dL/dx = g · weight (10), dL/dweight = gᵀ · x (11) (summed over every
    leading dim), dL/dbias = Σ g (12).
    """

    generate_vmap_rule = True

    forward = staticmethod(_affine)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        need = ctx.needs_input_grad
        # Only what a requested gradient needs: x for dL/dweight, weight for dL/dx.
        ctx.save_for_backward(x if need[1] else None, weight if need[0] else None)
        ctx.save_for_forward(x, weight)
        # bias's shape where it is not (H,) but broadcast to the output (F.linear takes both)
        ctx.bias_shape = None if bias is None or bias.shape == weight.shape[:1] else bias.shape

    @staticmethod
    def backward(ctx, g: Tensor):
        # Each gradient only where needed. Complex tensors take PyTorch's conjugate Wirtinger
        # convention: g · conj(weight), gᵀ · conj(x) (conj() of a real tensor is no copy).
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        g2 = g if g.dim() == 2 else _rows(g)  # (M, H); a 2-D g as it is: two op calls fewer
        if needs[0]:
            grad_x = g2.mm(weight.conj())  # (10) g · weight, (M, D)
            if g.dim() != 2:
                grad_x = grad_x.reshape(*g.shape[:-1], weight.shape[1])  # (*, D)
        if needs[1]:
            x2 = x if x.dim() == 2 else _rows(x)  # (M, D)
            grad_weight = g2.t().mm(x2.conj())  # (11) gᵀ · x, (H, D)
        if needs[2]:
            # (12) Σ g over all rows, (H); a broadcast bias: Σ g down to its own shape
            shape = ctx.bias_shape
            grad_bias = g2.sum(0) if shape is None else g.sum_to_size(shape)
        return grad_x, grad_weight, grad_bias

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None):
        x, weight = ctx.saved_tensors
        return _linear_tangent(x, weight, x_t, weight_t, bias_t)


# --------------------------------------------------------------------------------------------
# ReLU: h = max(0, u)
# --------------------------------------------------------------------------------------------
class ReLUFunction(Function):
    """``h = max(0, u)``. Backward: dL/du = 1[u > 0] ⊙ g (13).

    The Jacobian is diagonal, so the product with it is element-wise. The mask is read off the
    saved *output* (h > 0 exactly where u > 0): when the next Linear saves h as its input, the
    two share one tensor and ReLU adds nothing to the memory kept for backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor) -> Tensor:
        return torch.relu(u)  # relu, not clamp_min: ONNX export gives Relu, not Clip

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g: Tensor):
        (h,) = ctx.saved_tensors
        # (13) 1[u > 0] ⊙ g as aten's threshold_backward(g, h, 0): (h > 0 ? g : 0) in one pass, no
        # (N, H) bool mask; zero at u = 0 and g's NaNs kept where h > 0, as PyTorch's relu.
        return _threshold_backward(g, h, 0)

    @staticmethod
    def jvp(ctx, u_t: Tensor):
        (h,) = ctx.saved_tensors
        return u_t.masked_fill(h <= 0, 0)  # (23) 1[u > 0] ⊙ du


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy: L_i = −Σ_c Q_ic log p_ic, p = softmax(z)
# --------------------------------------------------------------------------------------------
# torch.nn._reduction.get_enum's codes, as aten's loss kernels take them.
_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


class SoftmaxCrossEntropyFunction(Function):
    """Softmax + cross-entropy in one Function, with ``F.cross_entropy``'s semantics.

    Takes logits z of shape (M, C) and a target of shape (M,) (class indices) or (M, C) (class
    probabilities); the wrapper ``cross_entropy`` brings every input layout to this one.

    Every case is one target matrix Q (16): dL_i/dz_i = (Σ_c Q_ic) p_i − Q_i (17), times
    s_i = dL/dL_i (9). Index targets without a class weight (Q sums to 1 on every kept row)
    take a fast path, (7) or (18); class weights and probability targets build Q.

    Returns (loss, log p, d); the wrapper keeps the loss. log p (M, C) and d, the mean's
    denominator (20) (None where backward builds Q), are kept for backward as outputs, as torch
    keeps intermediates; log p is differentiable by (26): double backward reaches z through it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                reduction: str, label_smoothing: float
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        logp = torch.log_softmax(z, -1)  # (M, C), shifted log-sum-exp: stable at |z| ~ 1e4
        if target.is_floating_point() or (label_smoothing > 0 and weight is not None):
            return _general_loss(logp, target, weight, ignore_index, reduction,
                                 label_smoothing), logp, None
        picked = logp
        if label_smoothing > 0:
            # (19) with w = 1: −Σ_c Q_ic log p_ic is the pick of
            # (1 − ε) log p_i + (ε/C) Σ_c log p_ic at y_i: nll_loss below takes it.
            # mul_, not add_'s alpha: CPU casts alpha to float16, where ε/C = 1e-9 is 0,
            # and 0 · (−inf) would be NaN where native's loss is inf.
            picked = logp.mul(1 - label_smoothing).add_(
                logp.sum(-1, keepdim=True).mul_(label_smoothing / z.shape[-1]))
        # L_i = −w_{y_i} log p_{i,y_i}, 0 on ignored rows: nll_loss's pick, in one kernel, and
        # d: the rows not ignored (Σ w_{y_i} with a class weight), (20).
        loss, d = _nll_loss(picked, target, weight, _REDUCTION_ENUM[reduction], ignore_index)
        return loss, logp, d

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, target, weight, ignore_index, reduction, label_smoothing = inputs
        _, logp, d = output
        if d is not None:
            ctx.mark_non_differentiable(d)
        ctx.save_for_backward(logp, target, weight, d)
        ctx.save_for_forward(logp, target, weight)
        ctx.ignore_index = ignore_index
        ctx.reduction = reduction
        ctx.label_smoothing = label_smoothing
        # jvp then gets None, not zeros, for an input without a tangent: a tangent on the
        # class weight can be told apart from none, and refused.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g: Tensor | None, g_logp: Tensor | None, _):
        logp, target, weight, d = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or torch._C._are_functorch_transforms_active()):
            logp = logp.detach()  # its graph leads only to z (under torch.func: an outer level's)
        grad_z = grad_target = None
        if g is not None and (weight is not None or target.is_floating_point()):
            grad_z, grad_target = _general_grads(ctx, logp, target, weight, g)
        elif g is not None and ctx.needs_input_grad[0]:
            grad_z = _index_grad(ctx, logp, target, d, g)
        if g_logp is not None and ctx.needs_input_grad[0]:
            # (26) log p's own gradient; double backward comes here, through the log p that
            # backward above used.
            term = g_logp - logp.exp() * g_logp.sum(-1, keepdim=True)
            grad_z = term if grad_z is None else grad_z + term
        return grad_z, grad_target, None, None, None, None

    @staticmethod
    def jvp(ctx, z_t, target_t, weight_t, *_):
        if weight_t is not None:
            # Refused as backward refuses a weight that requires grad: dropping the tangent
            # would be a silently wrong derivative.
            raise RuntimeError(
                "cross_entropy: the derivative with respect to weight is not supported; pass a "
                "weight without a tangent (forward-mode AD: torch.func.jvp, jacfwd, hessian)"
            )
        logp, target, weight = ctx.saved_tensors
        M, eps = logp.shape[0], ctx.label_smoothing
        terms = _index_terms(target, weight, ctx.ignore_index, logp.dtype)
        row_t = logp.new_zeros(M)  # dL_i, (M,)
        logp_t = torch.zeros_like(logp)  # not None: torch asserts on a None tangent of an output
        if z_t is not None:
            p = logp.exp()
            q = _target_matrix(logp, target, weight, eps, terms)  # Q, (M, C)
            row_t = ((q.sum(-1, keepdim=True) * p - q) * z_t).sum(-1)  # (24) with (17)
            logp_t = z_t - (p * z_t).sum(-1, keepdim=True)  # (27)
        if target_t is not None and terms is None:
            row_t = row_t + (_dloss_dtarget(eps, logp, weight) * target_t).sum(-1)  # (24), (21)
        if terms is None:  # as native: probability targets, M = 0: tangent 0
            return _reduce(row_t, max(M, 1), ctx.reduction), logp_t, None
        # Ignored rows have no tangent; the mean divides last, as native: 0 / 0 = NaN when every
        # row is ignored or M = 0.
        loss_t = _reduce(torch.where(terms[0], row_t, 0), terms[2].sum(), ctx.reduction)  # (20)
        return loss_t, logp_t, None


def _index_grad(ctx, logp: Tensor, target: Tensor, d: Tensor, g: Tensor) -> Tensor:
    """dL/dz for index targets without a class weight: s_i times (7), or (18) when smoothed."""
    y = target.unsqueeze(-1)  # (M, 1) columns meet the (M, C) ones without another op
    valid = y != ctx.ignore_index
    if ctx.reduction == "mean":
        g = g / d  # (20): the mean over the rows not ignored
    elif ctx.reduction == "none":
        g = g.unsqueeze(-1)
    s = torch.where(valid, g, 0)  # (9) s_i = dL/dL_i; exactly 0 on ignored rows, even if g/0
    C, eps = logp.shape[-1], ctx.label_smoothing
    y = y.clamp(0, C - 1)  # ignored rows scatter s_i = 0 wherever they land
    p = logp.exp()  # (M, C)
    if eps == 0:
        # (7) s_i (p_i − onehot(y_i)): the one-hot part scattered into s_i p_i, never built.
        return (p * s).scatter_add_(-1, y, -s)
    # (18) s_i (p_i − ε/C − (1 − ε) onehot(y_i)), the one-hot part scattered likewise;
    # s_i p_i − s_i ε/C, not (p_i − ε/C) s_i: an infinite s_i gives NaN, as native's.
    return (p * s).sub_(s * (eps / C)).scatter_add_(-1, y, -(1 - eps) * s)


# The general path: class weights, label smoothing, probability targets ---------------------
def _index_terms(target: Tensor, weight: Tensor | None, ignore_index: int,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor] | None:
    """For class-index targets: (kept rows, y with ignored rows set to 0, w_{y_i} with 0 on
    ignored rows), (M,) each; None for probability targets."""
    if target.is_floating_point():
        return None
    valid = target != ignore_index
    y = torch.where(valid, target, 0)  # a valid index on every row, for gather and scatter
    w_y = valid.to(dtype) if weight is None else torch.where(valid, weight.gather(0, y), 0)
    return valid, y, w_y


def _target_matrix(z: Tensor, target: Tensor, weight: Tensor | None, eps: float,
                   terms: tuple[Tensor, Tensor, Tensor] | None, s: Tensor | None = None
                   ) -> Tensor:
    """(16) Q_i = w ⊙ ((1 − ε) t_i + ε/C), t_i the row's probabilities or onehot(y_i), 0 on
    ignored rows; times s_i (M,) when given. (M, C)."""
    C = z.shape[-1]
    if terms is None:
        q = target if eps == 0 else target * (1 - eps) + eps / C
        q = q if weight is None else q * weight
        return q if s is None else s.unsqueeze(-1) * q
    valid, y, w_y = terms
    r = valid.to(z.dtype) if s is None else s  # 1 or s_i per row, 0 on ignored rows
    q = torch.zeros_like(z)
    if eps > 0:
        q = q + (r * (eps / C)).unsqueeze(-1) * (1 if weight is None else weight)
    # The one-hot part scattered after s_i scales it: an infinite s_i gives inf, as native's,
    # not inf · 0 = NaN, in the other classes.
    return q.scatter_add(-1, y.unsqueeze(-1), (r * ((1 - eps) * w_y)).unsqueeze(-1))


def _dloss_dtarget(eps: float, logp: Tensor, weight: Tensor | None) -> Tensor:
    """(21) dL_i/dt_ic = −(1 − ε) w_c log p_ic, for probability targets, (M, C)."""
    dt = -(1 - eps) * logp
    return dt if weight is None else dt * weight


def _reduce(loss: Tensor, denom: Tensor | int, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denom


def _general_loss(logp: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                  reduction: str, label_smoothing: float) -> Tensor:
    """(15) L_i = −Σ_c Q_ic log p_ic, reduced by (20). Index targets come here only with both
    a class weight and label smoothing: forward's nll_loss pick takes every other case."""
    C = logp.shape[-1]
    if target.is_floating_point():
        q = _target_matrix(logp, target, weight, label_smoothing, None)  # (M, C)
        loss = -(q * logp).sum(-1)  # (M,)
        return _reduce(loss, loss.shape[0], reduction)
    # (M,) −w_{y_i} log p_{i,y_i}, 0 on ignored rows: nll_loss's pick, which also refuses a
    # target of another dtype or out of range, and a weight of another dtype, as native does.
    nll = _nll_loss(logp, target, weight, _REDUCTION_ENUM["none"], ignore_index)[0]
    valid, _, w_y = _index_terms(target, weight, ignore_index, logp.dtype)
    smooth = -(logp * weight).sum(-1)  # (M,) −Σ_c w_c log p_ic
    # (19), Q written out: ε/C scales the row's sum, as native's, not each entry of Q, where
    # float16 may round it to 0 and turn a −inf log p into NaN instead of inf.
    loss = (1 - label_smoothing) * nll + (label_smoothing / C) * smooth
    loss = torch.where(valid, loss, 0)  # ignored rows cost 0 (where, so inf·0 is no NaN)
    return _reduce(loss, w_y.sum(), reduction)


def _general_grads(ctx, logp: Tensor, target: Tensor, weight: Tensor | None,
                   g: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dz, dL/dtarget) = s_i times (17) and (21), each None where not needed."""
    M, eps = logp.shape[0], ctx.label_smoothing
    terms = _index_terms(target, weight, ctx.ignore_index, logp.dtype)
    if ctx.reduction == "none":
        s = g  # (9) s_i = dL/dL_i, (M,)
    elif ctx.reduction == "sum":
        s = g.expand(M)
    else:
        s = (g / (M if terms is None else terms[2].sum())).expand(M)  # (20)
    if terms is not None:
        s = torch.where(terms[0], s, 0)  # exactly 0 on ignored rows, even where g/0 is inf
    grad_z = grad_target = None
    if ctx.needs_input_grad[0]:
        sq = _target_matrix(logp, target, weight, eps, terms, s)  # s_i Q_i, (M, C)
        grad_z = sq.sum(-1, keepdim=True) * logp.exp() - sq  # (17), times s_i
    if ctx.needs_input_grad[1]:
        grad_target = s.unsqueeze(-1) * _dloss_dtarget(eps, logp, weight)  # (21), times s_i
    return grad_z, grad_target


# --------------------------------------------------------------------------------------------
# L2 penalty: ½ λ Σ W²
# --------------------------------------------------------------------------------------------
class L2PenaltyFunction(Function):
    """``½ λ Σ_k ‖W_k‖²`` over any number of tensors. Backward: d/dW_k = λ W_k (times g) (14)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(lam: float, *weights: Tensor) -> Tensor:
        # ‖W‖² as W.square().sum(), the native formula's own reduction: a float32 dot would
        # skip the squared copy but accumulates in float32 with far larger rounding error.
        return 0.5 * lam * torch.stack([w.square().sum() for w in weights]).sum()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.lam = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        ctx.save_for_forward(*inputs[1:])

    @staticmethod
    def backward(ctx, g: Tensor):
        weights = ctx.saved_tensors
        scale = g * ctx.lam  # 0-dim: the product with each W is then one pass over it
        grads = [
            w * scale if ctx.needs_input_grad[k + 1] else None  # (14) λ W, times g
            for k, w in enumerate(weights)
        ]
        return (None, *grads)

    @staticmethod
    def jvp(ctx, _lam_t, *weights_t):
        weights = ctx.saved_tensors
        terms = [(w * w_t).sum() for w, w_t in zip(weights, weights_t) if w_t is not None]
        return ctx.lam * torch.stack(terms).sum()  # (25) λ Σ W ⊙ dW
