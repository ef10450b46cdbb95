"""Hand-derived autograd Functions for an MLP, and their functional wrappers.

Each ``torch.autograd.Function`` below computes its forward pass with plain tensor ops and its
backward pass exactly as derived in ``derivation.md``. None of the backward passes call native
autograd: they are the formulas, written in differentiable torch ops so that double backward
(``gradgradcheck``) is exact. Each also has a ``jvp``, the forward-mode twin of its backward.

Sizes in shape comments: N batch, D input features, H hidden units (out features), C classes,
M = rows after flattening leading dims.

The wrappers (``linear``, ``relu``, ``cross_entropy``, ``l2_penalty``) have the signatures of
their ``torch.nn.functional`` namesakes, check their arguments with PyTorch-style messages, and
follow autocast's dtype rules the way the native ops do.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.autograd import Function

from ._dispatch import native_enabled

__all__ = [
    "L2PenaltyFunction",
    "LinearFunction",
    "LinearReLUFunction",
    "MLPFunction",
    "ReLUFunction",
    "SoftmaxCrossEntropyFunction",
    "cross_entropy",
    "l2_penalty",
    "linear",
    "linear_relu",
    "mlp",
    "relu",
]


def _rows(t: Tensor) -> Tensor:
    """``t`` of shape (*, K) as (M, K) rows: M spelled out, as reshape(-1, K) cannot infer it
    when K is 0 (and legacy vmap, in gradcheck's batched check, has no rule for flatten)."""
    shape = t.shape
    return t.reshape(math.prod(shape[:-1]), shape[-1])


# --------------------------------------------------------------------------------------------
# Linear: u = x W + c, with W = weight.T (weight is stored (out, in) like nn.Linear)
# --------------------------------------------------------------------------------------------
class LinearFunction(Function):
    """``u = x · weightᵀ + bias`` for x of shape (*, D), weight (H, D), bias (H) or None.

    Backward, as derived (g = dL/du):  dL/dx = g · weight,  dL/dweight = gᵀ · x (summed over
    every leading dim),  dL/dbias = Σ g. For complex tensors, in the conjugate Wirtinger
    convention PyTorch's autograd uses: dL/dx = g · conj(weight), dL/dweight = gᵀ · conj(x).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # The output must be a fresh tensor, never a view (not even x2.mm(...).reshape(...)):
        # autograd forbids modifying a custom Function's view output in place, which would break
        # a following ReLU(inplace=True).
        if x.dim() == 2:
            if bias is None:
                return x.mm(weight.t())  # (N, H)
            return torch.addmm(bias, x, weight.t())  # one fused GEMM + bias, (N, H)
        u = torch.matmul(x, weight.t())  # (*, H): matmul folds the leading dims, returns no view
        return u if bias is None else u + bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(*LinearFunction._needed(ctx, x, weight))
        ctx.save_for_forward(x, weight)

    @staticmethod
    def _needed(ctx, x: Tensor, weight: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Only what a requested gradient needs: x for dL/dweight, weight for dL/dx."""
        return (x if ctx.needs_input_grad[1] else None,
                weight if ctx.needs_input_grad[0] else None)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        return LinearFunction._grads(ctx.needs_input_grad, x, weight, g)

    @staticmethod
    def _grads(needs_input_grad: tuple[bool, ...], x: Tensor | None, weight: Tensor | None,
               g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(dL/dx, dL/dweight, dL/dbias) from g = dL/du, each None where not needed."""
        grad_x = grad_weight = grad_bias = None
        # (M, H) rows of g. A 2-D g (the MLP's case) is used as it is: two fewer op calls per
        # backward. conj() is the complex case's conjugate and, for real dtypes, returns the
        # tensor itself (no copy, no conjugate view).
        g2 = g if g.dim() == 2 else _rows(g)
        if needs_input_grad[0]:
            grad_x = g2.mm(weight.conj())  # g · conj(weight), (M, D)
            if g.dim() != 2:
                grad_x = grad_x.reshape(*g.shape[:-1], weight.shape[1])  # (*, D)
        if needs_input_grad[1]:
            x2 = x if x.dim() == 2 else _rows(x)  # (M, D)
            grad_weight = g2.t().mm(x2.conj())  # gᵀ · conj(x), (H, D)
        if needs_input_grad[2]:
            grad_bias = g2.sum(0)  # Σ g over all rows, (H)
        return grad_x, grad_weight, grad_bias

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None):
        x, weight = ctx.saved_tensors
        return LinearFunction._tangent(x, weight, x_t, weight_t, bias_t)

    @staticmethod
    def _tangent(x: Tensor, weight: Tensor, x_t: Tensor | None, weight_t: Tensor | None,
                 bias_t: Tensor | None) -> Tensor | None:
        # Forward mode of the same product rule: du = dx · weightᵀ + x · dweightᵀ + dbias.
        u_t = None
        if x_t is not None:
            u_t = LinearFunction.forward(x_t, weight, None)
        if weight_t is not None:
            term = LinearFunction.forward(x, weight_t, None)
            u_t = term if u_t is None else u_t + term
        if bias_t is not None:
            u_t = bias_t.expand(*x.shape[:-1], weight.shape[0]) if u_t is None else u_t + bias_t
        return u_t


# --------------------------------------------------------------------------------------------
# ReLU: h = max(0, u)
# --------------------------------------------------------------------------------------------
_threshold_backward = torch.ops.aten.threshold_backward.default  # the bound overload: 3 µs less
_threshold_backward_out = torch.ops.aten.threshold_backward.grad_input  # the out= overload


class ReLUFunction(Function):
    """``h = max(0, u)``. Backward: dL/du = 1[u > 0] ⊙ g.

    The Jacobian is diagonal, so the product with it is element-wise. The mask is read off the
    saved *output* (h > 0 exactly where u > 0): when the next Linear saves h as its input, the
    two share one tensor and ReLU adds nothing to the memory kept for backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(u: Tensor, inplace: bool) -> Tensor:
        return u.clamp_min_(0) if inplace else u.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, inplace = inputs
        ctx.inplace = inplace
        if inplace:
            ctx.mark_dirty(u)
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g: Tensor):
        (h,) = ctx.saved_tensors
        # 1[u > 0] ⊙ g = (h > 0 ? g : 0), element by element; zero at u = 0 and g's NaNs kept
        # where h > 0, as PyTorch's relu. aten's threshold_backward(g, h, 0) is exactly that
        # select, in one pass with no (N, H) mask: g.masked_fill(h <= 0, 0) gives the same
        # values through a bool mask (N·H bytes more at the step's peak) and, on CPU, runs
        # ~15x slower (bench/: 0.9 ms of an 11 ms training step at B=128, H=1024).
        return _threshold_backward(g, h, 0), None

    @staticmethod
    def jvp(ctx, u_t: Tensor, _inplace_t: None):
        (h,) = ctx.saved_tensors
        if ctx.inplace:  # an in-place op must update its input's tangent in place too
            return u_t.masked_fill_(h <= 0, 0)
        return u_t.masked_fill(h <= 0, 0)


# --------------------------------------------------------------------------------------------
# Linear + ReLU: h = max(0, x W + c), the hidden layer in one Function
# --------------------------------------------------------------------------------------------
class LinearReLUFunction(Function):
    """``h = max(0, x · weightᵀ + bias)``: a Linear and the ReLU after it, in one Function.

    Backward: the two derivations above, chained (g = dL/dh). ReLU's first,
    g_u = dL/du = 1[u > 0] ⊙ g (read off h, as ``ReLUFunction`` does); then Linear's with g_u:
    dL/dx = g_u · weight, dL/dweight = g_uᵀ · x, dL/dbias = Σ g_u.

    Why fused: one Python forward and backward per hidden layer instead of two (each costs
    ~10-30 µs of interpreter and autograd work, the most of a small step), and u is never seen
    outside, so h overwrites it in place: the layer allocates one (N, H) tensor, not two. It
    saves what the pair saves: x (for dL/dweight), weight (for dL/dx) and h.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # u is LinearFunction.forward's fresh output, seen by nobody else: clamp it in place.
        return LinearFunction.forward(x, weight, bias).clamp_min_(0)  # (*, H)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(*LinearFunction._needed(ctx, x, weight), output)  # Linear's + h
        ctx.save_for_forward(x, weight, output)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, h = ctx.saved_tensors
        g_u = _threshold_backward(g, h, 0)  # ReLU's: 1[u > 0] ⊙ g, see ReLUFunction.backward
        return LinearFunction._grads(ctx.needs_input_grad, x, weight, g_u)  # Linear's

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None):
        x, weight, h = ctx.saved_tensors
        u_t = LinearFunction._tangent(x, weight, x_t, weight_t, bias_t)  # Linear's
        return u_t.masked_fill(h <= 0, 0)  # then ReLU's: 1[u > 0] ⊙ du


def _relu_grad(grad_h: Tensor, h: Tensor, inplace: bool) -> Tensor:
    """ReLU's backward, 1[u > 0] ⊙ dL/dh, read off h; with ``inplace``, written over grad_h (a
    fresh tensor the caller owns): one (N, H) buffer less at the backward's peak."""
    if inplace:
        try:
            return _threshold_backward_out(grad_h, h, 0, grad_input=grad_h)
        except RuntimeError:  # gradcheck's batched-grad check (legacy vmap) has no out= rule
            pass
    return _threshold_backward(grad_h, h, 0)


# --------------------------------------------------------------------------------------------
# The whole MLP: h_k = max(0, h_{k-1} W_kᵀ + c_k) for the hidden layers, z = h_{L-1} W_Lᵀ + c_L
# --------------------------------------------------------------------------------------------
class MLPFunction(Function):
    """An MLP's layers in one Function: ``apply(x, W_1, c_1, ..., W_L, c_L)`` (a bias may be
    None) runs Linear → ReLU for layers 1..L-1 and a last Linear, and returns
    ``(z, h_1, ..., h_{L-1})``: the logits, then every hidden activation.

    Backward: the derivations above, chained from the last layer down (g = dL/dz). Layer k's
    Linear: dL/dW_k = gᵀ · h_{k-1}, dL/dc_k = Σ g, dL/dh_{k-1} = g · W_k; then the ReLU below
    it: dL/du_{k-1} = 1[u_{k-1} > 0] ⊙ dL/dh_{k-1} (read off h_{k-1}), the g of layer k-1.

    Why: one Python forward and one backward for the whole network, where the layer-by-layer
    path has one per Linear and ReLU (each ~10-30 µs of interpreter and autograd work, most of
    a small step's overhead). The hidden activations are outputs, not hidden intermediates, so
    that autograd sees them (double backward, torch.func): their gradients, None unless a caller
    uses them, are added to the dL/dh_k that comes from above. ``mlp`` returns z alone.

    It saves what the layer-by-layer path saves: x (for dL/dW_1), each W_k whose input needs a
    gradient, and every h_k (the next Linear's input and the ReLU mask at once). But it holds
    the h_k until its backward returns, where that path frees each after its ReLU's backward:
    its backward peak is higher by up to N·Σ H_k entries. ``MLP`` does not use it: on 2 CPU
    cores a step through it was 0-2% faster than through ``MLP``'s Linear+ReLU pair path (within
    the machine's noise), which did not pay for that memory.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, *params: Tensor | None) -> tuple[Tensor, ...]:
        L = len(params) // 2
        hs = []
        h = x
        for k in range(L - 1):
            h = LinearReLUFunction.forward(h, params[2 * k], params[2 * k + 1])  # (*, H_k)
            hs.append(h)
        z = LinearFunction.forward(h, params[-2], params[-1])  # (*, K)
        return (z, *hs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, params = inputs[0], inputs[1:]
        need = ctx.needs_input_grad
        L = len(params) // 2
        # W_k is needed for dL/dh_{k-1} only when something below layer k wants a gradient.
        weights = [w if any(need[:2 * k + 1]) else None for k, w in enumerate(params[0::2])]
        ctx.save_for_backward(x if need[1] else None, *weights, *output[1:])
        ctx.save_for_forward(x, *params[0::2], *output[1:])
        ctx.num_layers = L
        if not torch.compiler.is_compiling():  # as in SoftmaxCrossEntropyFunction
            # The h_k outputs' gradients come as None, not zeros, when nobody uses them.
            ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g: Tensor | None, *g_hs: Tensor | None):
        L = ctx.num_layers
        saved = ctx.saved_tensors
        x, weights, hs = saved[0], saved[1:L + 1], saved[L + 1:]
        need = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * len(need)
        # dL/dh may be overwritten by dL/du unless this backward is itself differentiated
        # (create_graph=True) or runs under a torch.func transform.
        inplace_ok = not (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active())
        for k in range(L - 1, -1, -1):  # layer k+1 of the docstring, 0-based here
            below = any(need[:2 * k + 1])  # does anything under this Linear want a gradient?
            grad_in = None
            if g is not None:
                grad_in, grads[2 * k + 1], grads[2 * k + 2] = LinearFunction._grads(
                    (below, need[2 * k + 1], need[2 * k + 2]), x if k == 0 else hs[k - 1],
                    weights[k], g)  # Linear's: (dL/dinput, dL/dW_k, dL/dc_k)
            if k == 0:
                grads[0] = grad_in
                break
            if not below:
                break
            h, g_h = hs[k - 1], g_hs[k - 1]
            if g_h is not None:  # h_{k-1} is also an output: its own gradient adds in
                grad_in = g_h if grad_in is None else grad_in + g_h
                inplace_ok = False  # grad_in may be g_h itself: not ours to overwrite
            if grad_in is None:
                g = None
            else:
                g = _relu_grad(grad_in, h, inplace_ok)  # ReLU's: 1[u > 0] ⊙ dL/dh
        return tuple(grads)

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, *params_t: Tensor | None):
        L = ctx.num_layers
        saved = ctx.saved_tensors
        x, weights, hs = saved[0], saved[1:L + 1], saved[L + 1:]
        t, out_t = x_t, []
        for k in range(L):
            t = LinearFunction._tangent(x if k == 0 else hs[k - 1], weights[k], t,
                                        params_t[2 * k], params_t[2 * k + 1])  # Linear's
            if k < L - 1:
                if t is not None:
                    t = t.masked_fill(hs[k] <= 0, 0)  # ReLU's: 1[u > 0] ⊙ du
                # h_k has no tangent when only later layers' parameters have: zeros, as an
                # output's tangent must be a tensor.
                out_t.append(torch.zeros_like(hs[k]) if t is None else t)
        return (t, *out_t)


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy: L_i = -log p_{y_i}, p = softmax(z)
# --------------------------------------------------------------------------------------------
def _index_target_terms(
    target: Tensor, weight: Tensor | None, ignore_index: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """For class-index targets: (valid mask, target with ignored rows set to 0, w_{y_i}).

    w_{y_i} is the class weight of each row's target (1 without ``weight``), 0 on ignored rows.
    """
    valid = target != ignore_index  # (M,)
    safe_t = torch.where(valid, target, 0)  # (M,) a valid index on every row, for gather
    if weight is None:
        w_y = valid.to(dtype)
    else:
        w_y = torch.where(valid, weight.gather(0, safe_t), 0)
    return valid, safe_t, w_y


def _soft_target(
    target: Tensor, weight: Tensor | None, label_smoothing: float, num_classes: int
) -> Tensor:
    """Class-probability targets as the weighted distribution Q the loss is taken against."""
    q = target
    if label_smoothing > 0:
        q = q * (1 - label_smoothing) + label_smoothing / num_classes
    return q if weight is None else q * weight  # (M, C)


def _log_softmax(z: Tensor) -> Tensor:
    """log p = s − log Σ_c exp(s_c) with s = z − max z, (M, C).

    Shifting before the log-sum-exp keeps log p accurate at |z| ~ 1e4: ``z − z.logsumexp()``
    rounds the ~1e4 log-sum-exp to its float32 ulp (~1e-3) before subtracting.
    ``torch.log_softmax`` computes exactly this shifted form in one fused pass over (M, C)
    (the manual max / sub / exp / sum / log / sub is six passes and six kernel launches).
    It is a forward primitive here: the loss's derivative is still the hand-derived one in
    ``SoftmaxCrossEntropyFunction.backward``; only double backward differentiates through it.
    """
    return torch.log_softmax(z, dim=-1)


# torch.nn._reduction.get_enum's codes, as aten's loss kernels take them.
_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}


def _reduce(loss: Tensor, denom: Tensor | int, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denom


class SoftmaxCrossEntropyFunction(Function):
    """Softmax + cross-entropy in one Function, with ``F.cross_entropy``'s semantics.

    Takes logits z of shape (M, C) and a target of shape (M,) (class indices) or (M, C) (class
    probabilities); the wrapper ``cross_entropy`` brings every input layout to this one.

    Each row's loss is ``L_i = -Σ_c Q_ic log p_ic`` with p = softmax(z) and Q the row's
    (weighted, smoothed) target: Q = onehot(y) in the derivation's plain case. Hence

        dL_i/dz_i = (Σ_c Q_ic) · p_i − Q_i,

    which is the derivation's p − onehot(y) when Q is a plain one-hot. Class weights, label
    smoothing, ignore_index and the reduction change Q and the scale, never the form. Q is never
    built as an (M, C) one-hot for index targets: its one-hot part is a scatter into p.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        z: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
    ) -> Tensor:
        logp = _log_softmax(z)  # (M, C), shifted log-sum-exp: stable at |z| ~ 1e4
        if target.is_floating_point():
            q = _soft_target(target, weight, label_smoothing, z.shape[-1])  # (M, C)
            loss = -(q * logp).sum(-1)  # (M,)
            return _reduce(loss, loss.shape[0], reduction)
        if label_smoothing == 0:
            # Q = w_{y_i} onehot(y_i): L_i = −w_{y_i} log p_{i,y_i} (w = 1 without weight), 0 on
            # ignored rows, the mean taken over Σ w_{y_i}. nll_loss is exactly this pick of
            # −log p at the targets, weighted and reduced, in one kernel: the general path
            # below spells out the same with ~10 small ops.
            # (torch._C._nn.nll_loss_nd is what F.nll_loss calls after its Python-side checks,
            # which cross_entropy has already made.)
            return torch._C._nn.nll_loss_nd(
                logp, target, weight, _REDUCTION_ENUM[reduction], ignore_index
            )
        valid, safe_t, w_y = _index_target_terms(target, weight, ignore_index, z.dtype)
        nll = -logp.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)  # (M,) -log p_{y_i}
        loss = nll if weight is None else w_y * nll  # w_{y_i} -log p_{y_i}; w = 1 unweighted
        if label_smoothing > 0:
            smooth = -(logp.sum(-1) if weight is None else (logp * weight).sum(-1))  # (M,)
            loss = (1 - label_smoothing) * loss + (label_smoothing / z.shape[-1]) * smooth
        loss = torch.where(valid, loss, 0)  # ignored rows cost 0 (where, so inf·0 is no NaN)
        return _reduce(loss, w_y.sum(), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, target, weight, ignore_index, reduction, label_smoothing = inputs
        # z is saved (not p or log p): p is recomputed from it in backward, so the backward is a
        # function of z that double backward differentiates exactly. Recomputing costs one
        # log-sum-exp over (M, C); keeping log p instead would cost the same memory.
        ctx.save_for_backward(z, target, weight)
        ctx.save_for_forward(z, target, weight)
        ctx.ignore_index = ignore_index
        ctx.reduction = reduction
        ctx.label_smoothing = label_smoothing
        # The derivation's own case: backward takes the short path, _plain_grad.
        ctx.plain = weight is None and label_smoothing == 0 and not target.is_floating_point()
        if not torch.compiler.is_compiling():  # jvp is not traced by torch.compile anyway
            # jvp then gets None, not zeros, for an input without a tangent: a tangent on the
            # class weight can be told apart from none, and refused.
            ctx.set_materialize_grads(False)

    @staticmethod
    def _row_scale(ctx, z: Tensor, target: Tensor, weight: Tensor | None, g: Tensor,
                   terms: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """dL/dL_i for every row, (M,): g, or g/N for mean (g/Σw_{y_i} with index targets).

        ``terms``: ``_index_target_terms`` of the target, when the caller has them already.
        """
        M = z.shape[0]
        if target.is_floating_point():
            denom = M
            valid = None
        else:
            if terms is None:
                terms = _index_target_terms(target, weight, ctx.ignore_index, z.dtype)
            valid, _, w_y = terms
            denom = w_y.sum()
        if ctx.reduction == "none":
            scale = g
        elif ctx.reduction == "sum":
            scale = g.expand(M)
        else:
            scale = (g / denom).expand(M)
        # Rows that are ignored get exactly 0, even when every row is ignored and g/0 is inf.
        return scale if valid is None else torch.where(valid, scale, 0)

    @staticmethod
    def _dloss_dz(
        ctx,
        z: Tensor,
        target: Tensor,
        weight: Tensor | None,
        terms: tuple[Tensor, Tensor, Tensor] | None = None,
        scale: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(s_i · dL_i/dz_i = s_i ((Σ_c Q_ic) p_i − Q_i) for every row, log p), both (M, C).

        s is ``scale`` (M,) when given (dL/dL_i from ``_row_scale``), else 1. It multiplies the
        (M,) factors of the formula before they meet the (M, C) ones: one pass less over (M, C).
        ``terms``: ``_index_target_terms`` of the target, when the caller has them already.
        """
        C = z.shape[-1]
        eps = ctx.label_smoothing
        logp = _log_softmax(z)  # (M, C)
        p = logp.exp()  # softmax(z), (M, C)
        if target.is_floating_point():
            q = _soft_target(target, weight, eps, C)  # (M, C)
            dz = p * q.sum(-1, keepdim=True) - q
            return (dz if scale is None else scale.unsqueeze(-1) * dz), logp
        if terms is None:
            terms = _index_target_terms(target, weight, ctx.ignore_index, z.dtype)
        valid, safe_t, w_y = terms
        # Q_i = (1-eps) w_{y_i} onehot(y_i) + (eps/C) w  on valid rows, 0 on ignored ones.
        hot = w_y if eps == 0 else (1 - eps) * w_y  # (M,)
        if scale is not None:
            hot = scale * hot
        if eps > 0:
            # valid as z's dtype: a bool mask times a Python float (or torch.where of two Python
            # scalars) would come out in the default dtype, float32: a dtype error in bfloat16
            # and eps/C rounded to float32 in float64.
            valid_z = valid.to(z.dtype)  # (M,)
            if scale is not None:
                valid_z = scale * valid_z
            w_sum = C if weight is None else weight.sum()
            q_sum = hot + valid_z * (eps / C * w_sum)  # Σ_c Q_ic, (M,)
        else:
            q_sum = hot
        dz = p * q_sum.unsqueeze(-1)  # (M, C)
        if eps > 0:
            smooth = (eps / C) * (1 if weight is None else weight)
            dz = dz - valid_z.unsqueeze(-1) * smooth  # uniform part of Q
        # − onehot part of Q, scattered into place: no (M, C) one-hot is built.
        dz = dz.scatter_add(-1, safe_t.unsqueeze(-1), -hot.unsqueeze(-1))
        return dz, logp

    @staticmethod
    def _plain_grad(ctx, z: Tensor, target: Tensor, g: Tensor) -> Tensor:
        """The derivation's own case, index targets without class weight or smoothing:

            dL/dz_i = s_i (p_i − onehot(y_i)),  s_i = dL/dL_i = g, or g / (number of valid rows)

        for the mean, and 0 on ignored rows. The general path computes the same with the
        weight and smoothing terms at their neutral values; this one skips them (fewer ops:
        each costs a few µs of Python, most of a small step's loss).
        """
        # Every (M,) quantity is kept as an (M, 1) column, so that each meets the (M, C) ones
        # without a further unsqueeze: each op issued from Python costs more than the work of
        # these small tensors (bench/: ~5 µs alone, 15-50 µs inside a training step).
        t = target.unsqueeze(-1)  # (M, 1)
        valid = t != ctx.ignore_index  # (M, 1)
        if ctx.reduction == "mean":
            g = g / valid.sum()
        elif ctx.reduction == "none":
            g = g.unsqueeze(-1)  # (M, 1)
        # (M, 1) s_i; ignored rows get exactly 0, even when every row is ignored and g/0 is inf
        s = torch.where(valid, g, 0)
        # (M, 1) an index in [0, C) on every row: the forward's nll_loss has refused any
        # target outside it but ignore_index, and ignored rows scatter s_i = 0 wherever they land.
        y = t.clamp(0, z.shape[-1] - 1)
        # s_i p_i − s_i onehot(y_i): the one-hot part is scattered into place, never built, and
        # into s_i p_i itself, a fresh tensor of ours.
        return (torch.softmax(z, dim=-1) * s).scatter_add_(-1, y, -s)  # (M, C)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if g is None:  # undefined (zero) upstream gradient: grads are not materialized, see above
            return None, None, None, None, None, None
        z, target, weight = ctx.saved_tensors
        grad_z = grad_target = None
        if ctx.plain:
            if ctx.needs_input_grad[0]:
                grad_z = SoftmaxCrossEntropyFunction._plain_grad(ctx, z, target, g)
            return grad_z, None, None, None, None, None
        terms = None  # the target's valid mask, safe index and w_{y_i}: computed once here
        if not target.is_floating_point():
            terms = _index_target_terms(target, weight, ctx.ignore_index, z.dtype)
        scale = SoftmaxCrossEntropyFunction._row_scale(ctx, z, target, weight, g, terms)  # (M,)
        # dL/dz_i = dL/dL_i · dL_i/dz_i, the row scale folded in, (M, C)
        dz, logp = SoftmaxCrossEntropyFunction._dloss_dz(ctx, z, target, weight, terms, scale)
        if ctx.needs_input_grad[0]:
            grad_z = dz  # (M, C)
        if ctx.needs_input_grad[1]:
            # Class-probability targets: dL_i/dt_ic = −(1 − eps) w_c log p_ic.
            dt = -(1 - ctx.label_smoothing) * logp
            if weight is not None:
                dt = dt * weight
            grad_target = scale.unsqueeze(-1) * dt
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
        z, target, weight = ctx.saved_tensors
        dz, logp = SoftmaxCrossEntropyFunction._dloss_dz(ctx, z, target, weight)
        one = torch.ones((), dtype=z.dtype, device=z.device)
        scale = SoftmaxCrossEntropyFunction._row_scale(ctx, z, target, weight, one)
        row_t = (dz * z_t).sum(-1) if z_t is not None else torch.zeros_like(scale)
        if target_t is not None and target.is_floating_point():
            dt = -(1 - ctx.label_smoothing) * logp
            if weight is not None:
                dt = dt * weight
            row_t = row_t + (dt * target_t).sum(-1)
        out_t = scale * row_t
        return out_t if ctx.reduction == "none" else out_t.sum()


# --------------------------------------------------------------------------------------------
# L2 penalty: ½ λ Σ W²
# --------------------------------------------------------------------------------------------
class L2PenaltyFunction(Function):
    """``½ λ Σ_k ‖W_k‖²`` over any number of tensors. Backward: d/dW_k = λ W_k (times g)."""

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
        grads = [
            g * ctx.lam * w if ctx.needs_input_grad[k + 1] else None  # λ W, as derived
            for k, w in enumerate(weights)
        ]
        return (None, *grads)

    @staticmethod
    def jvp(ctx, _lam_t, *weights_t):
        weights = ctx.saved_tensors
        terms = [(w * w_t).sum() for w, w_t in zip(weights, weights_t) if w_t is not None]
        return ctx.lam * torch.stack(terms).sum()


# --------------------------------------------------------------------------------------------
# torch.compile twins: the same Functions without jvp
# --------------------------------------------------------------------------------------------
# Dynamo (torch.compile's tracer; seen with torch 2.14) refuses to trace an autograd.Function
# that defines jvp when an input requires grad: it graph-breaks with "Unsupported custom jvp" at
# every call, so fullgraph=True fails and each layer runs uncompiled. Under torch.compile the
# wrappers below call these twins instead: the same forward, setup_context and hand-derived
# backward (inherited), with jvp reset to autograd.Function's own. AOTAutograd then traces our
# backward into the compiled graph. Forward-mode AD (torch.func.jvp, jacfwd) is for eager code,
# where the originals run.
class _LinearFunctionNoJvp(LinearFunction):
    jvp = staticmethod(Function.jvp)


class _ReLUFunctionNoJvp(ReLUFunction):
    jvp = staticmethod(Function.jvp)


class _LinearReLUFunctionNoJvp(LinearReLUFunction):
    jvp = staticmethod(Function.jvp)


class _MLPFunctionNoJvp(MLPFunction):
    jvp = staticmethod(Function.jvp)


class _SoftmaxCrossEntropyFunctionNoJvp(SoftmaxCrossEntropyFunction):
    jvp = staticmethod(Function.jvp)


class _L2PenaltyFunctionNoJvp(L2PenaltyFunction):
    jvp = staticmethod(Function.jvp)


# --------------------------------------------------------------------------------------------
# Eager twins: the same Functions in the ctx-first style, for plain eager calls
# --------------------------------------------------------------------------------------------
# A Function with setup_context costs ~40 µs more per apply than one whose forward takes ctx
# (torch 2.14, 2 CPU cores): apply binds the arguments to forward's signature with
# inspect.signature on every call. The ctx-first style has no such step, but torch.func
# transforms (vmap, grad, jvp, ...) refuse it. So plain eager calls go through these twins:
# their forward runs the original forward and then the original setup_context on the same ctx,
# and backward and jvp are inherited, so the derivation is still written once, above. Under a
# torch.func transform the originals run; under torch.compile the jvp-less twins.
def _eager_twin(cls: type[Function]) -> type[Function]:
    def forward(ctx, *args):
        output = cls.forward(*args)
        cls.setup_context(ctx, args, output)
        return output

    return type(f"_{cls.__name__}Eager", (cls,), {
        "__doc__": f"{cls.__name__} in the ctx-first style (see _eager_twin).",
        "__module__": __name__,
        "forward": staticmethod(forward),
        # autograd.Function's own placeholder: apply takes the ctx-first path.
        "setup_context": staticmethod(Function.setup_context),
        "generate_vmap_rule": False,
    })


_EAGER: dict[type[Function], type[Function]] = {
    cls: _eager_twin(cls)
    for cls in (LinearFunction, ReLUFunction, LinearReLUFunction, MLPFunction,
                SoftmaxCrossEntropyFunction, L2PenaltyFunction)
}


def _pick(fn: type[Function], no_jvp: type[Function]) -> type[Function]:
    """``fn``'s eager twin in eager code, ``fn`` under a torch.func transform, its jvp-less twin
    under torch.compile.

    torch.compile around a torch.func transform (grad, vjp, jacrev, vmap, jvp, ...) that runs
    these Functions is refused with an error: there Dynamo mis-traces custom Functions and
    returns wrong gradients without a word (it reads ``ctx.needs_input_grad`` from the tensors
    outside the transform, and may drop the custom backward altogether:
    https://github.com/pytorch/pytorch/issues/193279). Without ``fullgraph=True`` the error is a
    graph break, and the call then runs in eager mode, correctly.
    """
    if not torch.compiler.is_compiling():
        return fn if torch._C._are_functorch_transforms_active() else _EAGER[fn]
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "torch_mlp: a hand-derived Function under a torch.func transform inside "
            "torch.compile is not supported (Dynamo mis-traces custom autograd.Functions "
            "there and can return wrong gradients, pytorch/pytorch#193279); run the torch.func "
            "transform uncompiled, or compile without fullgraph=True so that this call falls "
            "back to eager"
        )
    return no_jvp


# --------------------------------------------------------------------------------------------
# Argument checks and autocast
# --------------------------------------------------------------------------------------------
def _agree(t0: Tensor, t1: Tensor | None, t2: Tensor | None = None) -> bool:
    """Whether t1 and t2 (if given) have t0's dtype and device: the common case, checked
    without building the message that ``_same_dtype_device`` writes when they do not."""
    dtype, device = t0.dtype, t0.device
    return (t1 is None or (t1.dtype == dtype and t1.device == device)) and (
        t2 is None or (t2.dtype == dtype and t2.device == device)
    )


def _same_dtype_device(fn: str, **tensors: Tensor | None) -> None:
    named = [(k, t) for k, t in tensors.items() if t is not None]
    (k0, t0), rest = named[0], named[1:]
    for k, t in rest:
        if t.device != t0.device:
            raise RuntimeError(
                f"{fn}: expected all tensors on the same device, but {k0} is on {t0.device} "
                f"and {k} is on {t.device}"
            )
        if t.dtype != t0.dtype:
            raise RuntimeError(
                f"{fn}: expected {k0} and {k} to have the same dtype, but got "
                f"{k0}: {t0.dtype} and {k}: {t.dtype}"
            )


# One C call that says whether autocast is on for any device (~0.3 µs): when it is not, as in
# most calls, _autocast_dtype answers without building t.device (~2 µs in all otherwise).
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The autocast compute dtype for ``t``'s device type, or None when autocast is off."""
    if _any_autocast_enabled is not None and not _any_autocast_enabled():
        return None
    device_type = t.device.type
    if device_type not in ("cpu", "cuda", "mps", "xpu") or not torch.is_autocast_enabled(
        device_type
    ):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Autocast's eligibility rule: floating tensors other than float64 are cast.
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# --------------------------------------------------------------------------------------------
# Functional API, mirroring torch.nn.functional
# --------------------------------------------------------------------------------------------
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x · weightᵀ + bias``, like :func:`torch.nn.functional.linear`; hand-derived backward.

    Args:
        x: input of shape (*, D).
        weight: (H, D), stored (out, in) as in ``nn.Linear``; the derivation's W is ``weight.T``.
        bias: (H) or None.

    Under autocast, runs in the autocast dtype (float16 / bfloat16), as ``F.linear`` does.
    """
    if native_enabled():
        return TF.linear(x, weight, bias)
    return _linear_call("linear", LinearFunction, _LinearFunctionNoJvp, x, weight, bias)


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``max(0, x · weightᵀ + bias)``: ``relu(linear(x, weight, bias))`` as one Function,
    :class:`LinearReLUFunction` (the same values and gradients, less overhead); ``MLP`` runs
    its Linear → ReLU pairs through it. Arguments and checks as :func:`linear`.
    """
    if native_enabled():
        return TF.relu(TF.linear(x, weight, bias))
    return _linear_call("linear_relu", LinearReLUFunction, _LinearReLUFunctionNoJvp, x, weight,
                        bias)


def mlp(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None
        ) -> Tensor:
    """The logits of an MLP, ``linear(relu(... relu(linear(x, W_1, c_1)) ...), W_L, c_L)``, as
    one Function, :class:`MLPFunction`: the same values and gradients as the layer-by-layer
    chain, with one Python forward and backward for the whole network.

    Args:
        x: input of shape (*, D).
        weights: W_1, ..., W_L, each stored (out, in) as in ``nn.Linear``: W_1 is (H_1, D), and
            each next one takes the previous one's out features.
        biases: c_1, ..., c_L (each (H_k) or None), or None for no biases at all.

    Arguments are checked, and autocast applied, as in :func:`linear`.
    """
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    if not weights:
        raise ValueError("mlp: expected at least one weight, got none")
    if len(biases) != len(weights):
        raise ValueError(
            f"mlp: expected one bias (or None) per weight, got {len(biases)} biases for "
            f"{len(weights)} weights"
        )
    if x.dim() == 0:
        raise ValueError("mlp: expected input with at least 1 dimension, got a 0-d tensor")
    width, what = x.shape[-1], "input's last dimension"
    for k, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2:
            raise ValueError(
                f"mlp: expected weights[{k}] to be 2-D (out_features, in_features), got shape "
                f"{_shape(w)}"
            )
        if w.shape[1] != width:
            raise ValueError(
                f"mlp: {what} ({width}) does not match weights[{k}]'s in_features "
                f"({w.shape[1]}): weights[{k}] has shape {_shape(w)}"
            )
        if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0]):
            raise ValueError(
                f"mlp: expected biases[{k}] of shape ({w.shape[0]},) to match weights[{k}] "
                f"{_shape(w)}, got {_shape(b)}"
            )
        width, what = w.shape[0], f"weights[{k}]'s out_features"
    params = [t for pair in zip(weights, biases) for t in pair]
    cast = _autocast_dtype(x)
    if cast is not None:
        x = _autocast_to(x, cast)
        params = [_autocast_to(t, cast) for t in params]
    if not all(_agree(x, t) for t in params):
        _same_dtype_device("mlp", input=x, **{
            f"{'weights' if i % 2 == 0 else 'biases'}[{i // 2}]": t
            for i, t in enumerate(params)})
    if x.is_complex():
        _refuse_complex("mlp", x.dtype)
    fn = _pick(MLPFunction, _MLPFunctionNoJvp)
    if cast is None:
        return fn.apply(x, *params)[0]
    with torch.autocast(x.device.type, enabled=False):
        return fn.apply(x, *params)[0]


def _linear_call(name: str, cls: type[Function], no_jvp: type[Function], x: Tensor,
                 weight: Tensor, bias: Tensor | None) -> Tensor:
    """Check ``linear``'s arguments (messages start with ``name``), apply autocast, run cls."""
    if weight.dim() != 2:
        raise ValueError(
            f"{name}: expected weight to be 2-D (out_features, in_features), got shape "
            f"{_shape(weight)}"
        )
    if x.dim() == 0:
        raise ValueError(f"{name}: expected input with at least 1 dimension, got a 0-d tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: input's last dimension ({x.shape[-1]}) does not match weight's "
            f"in_features ({weight.shape[1]}): input shape {_shape(x)}, weight shape "
            f"{_shape(weight)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"{name}: expected bias of shape ({weight.shape[0]},) to match weight "
            f"{_shape(weight)}, got {_shape(bias)}"
        )
    cast = _autocast_dtype(x)
    if cast is not None:
        x, weight, bias = (_autocast_to(t, cast) for t in (x, weight, bias))
    if not _agree(x, weight, bias):
        _same_dtype_device(name, input=x, weight=weight, bias=bias)
    if name != "linear" and x.is_complex():  # linear_relu: its ReLU has no complex form
        _refuse_complex(name, x.dtype)
    fn = _pick(cls, no_jvp)
    if cast is None:
        return fn.apply(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return fn.apply(x, weight, bias)


def _refuse_complex(name: str, dtype: torch.dtype) -> None:
    raise TypeError(
        f"{name}: complex input is not supported (ReLU has no complex form, as in "
        f"torch.nn.functional.relu), got {dtype}"
    )


def relu(u: Tensor, inplace: bool = False) -> Tensor:
    """``max(0, u)``, like :func:`torch.nn.functional.relu`, with a hand-derived backward.

    ``inplace=True`` overwrites ``u`` and marks it dirty, so autograd's version counter still
    catches a later use of the overwritten values. Bool and complex tensors are refused, as
    ``F.relu`` refuses them; other dtypes keep their dtype.
    """
    if native_enabled():
        return TF.relu(u, inplace=inplace)
    dtype = u.dtype
    if dtype == torch.bool:  # clamp_min(0) would promote it to int64
        raise TypeError("relu: Boolean inputs are not supported, got torch.bool")
    if dtype.is_complex:
        _refuse_complex("relu", dtype)
    fn = _pick(ReLUFunction, _ReLUFunctionNoJvp)
    if inplace and (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()):
        # The in-place Function returns u itself and saves it: vmap refuses a Function that
        # saves an input returned as-is, and Dynamo cannot trace mark_dirty. There: the same
        # values, the same in-place effect on u and the same hand-derived backward, computed
        # out of place and then written into u.
        return u.copy_(fn.apply(u, False))
    return fn.apply(u, inplace)


_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Softmax cross-entropy, like :func:`torch.nn.functional.cross_entropy`, hand-derived backward.

    Args:
        input: logits, (C), (N, C) or (N, C, d1, ..., dk).
        target: class indices (int64) of shape () (or (1,) without label smoothing, as
            native), (N) or (N, d1, ..., dk), or class probabilities with the same shape and
            dtype as ``input`` (then ``ignore_index`` must stay -100, as native).
        weight: per-class weight, (C).
        ignore_index: target value that contributes neither loss nor gradient (index targets).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``. With index targets, ``"mean"`` divides
            by the summed weight of the non-ignored targets (NaN when all are ignored).
        label_smoothing: in [0, 1]; mixes the target with the uniform distribution.

    Under autocast it computes in float32, as the native op does.
    """
    if native_enabled():
        return TF.cross_entropy(input, target, weight, ignore_index=ignore_index,
                                reduction=reduction, label_smoothing=label_smoothing)
    # The checks read each tensor attribute once: each read costs ~0.1-0.3 µs, and this runs
    # on every step (bench/: the wrapper's checks were ~15 µs of a ~50 µs loss at B=128).
    _check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    shape = input.shape
    nd = len(shape)
    if nd == 0:
        raise ValueError("cross_entropy: expected input of shape (C), (N, C) or (N, C, d1, ...)")
    dtype = input.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"cross_entropy: expected floating-point input (logits), got {dtype}")
    tdtype = target.dtype
    if _autocast_dtype(input) is not None:
        # cross_entropy is on autocast's float32 list: low-precision logits are upcast.
        if dtype in (torch.float16, torch.bfloat16):
            input, dtype = input.float(), torch.float32
        if tdtype in (torch.float16, torch.bfloat16):
            target, tdtype = target.float(), torch.float32
    C = shape[0] if nd == 1 else shape[1]
    probs = tdtype.is_floating_point
    if probs:
        if ignore_index != -100:  # as native: ignore_index means nothing for probabilities
            raise ValueError(
                f"cross_entropy: ignore_index is not supported for class-probability "
                f"(floating-point) targets, got ignore_index={ignore_index}"
            )
        if target.shape != shape:
            raise ValueError(
                f"cross_entropy: class-probability target must have the input's shape "
                f"{tuple(shape)}, got {_shape(target)}"
            )
        _same_dtype_device("cross_entropy", input=input, target=target, weight=weight)
    else:
        if tdtype == torch.uint8:  # native nll_loss also takes Byte class indices
            target, tdtype = target.long(), torch.int64
        if tdtype != torch.int64:
            raise TypeError(
                f"cross_entropy: expected target of dtype torch.int64 (class indices) or "
                f"{dtype} (class probabilities), got {tdtype}"
            )
        tshape = target.shape
        if nd == 1 and len(tshape) == 1:
            # As native: an unbatched (C) input also takes a (1,) target, read as (), but not
            # with label smoothing or zero classes (native's forward fails on the shapes there).
            if tshape[0] != 1 or label_smoothing > 0 or C == 0:
                raise ValueError(
                    f"cross_entropy: for an unbatched input of shape {tuple(shape)}, expected "
                    f"target of shape ()"
                    + (", or (1,) without label smoothing" if C else "")
                    + f", got {tuple(tshape)}"
                )
            target = target.reshape(())
            tshape = target.shape
        if nd > 1 and len(tshape) >= 1 and tshape[0] != shape[0]:
            raise ValueError(
                f"Expected input batch_size ({shape[0]}) to match target batch_size "
                f"({tshape[0]})."
            )
        # target's shape must be input's without the class dim: () for (C), (N,) for (N, C), ...
        if len(tshape) != max(nd - 1, 0) or (nd > 2 and tshape[1:] != shape[2:]):
            expected = tuple(shape)[:1] + tuple(shape)[2:] if nd > 1 else ()
            raise ValueError(
                f"cross_entropy: expected target of shape {expected} for input of shape "
                f"{tuple(shape)}, got {tuple(tshape)}"
            )
        device = input.device
        if target.device != device:
            raise RuntimeError(
                f"cross_entropy: expected target on {device} like input, got {target.device}"
            )
        if weight is not None and not _agree(input, weight):
            _same_dtype_device("cross_entropy", input=input, weight=weight)
        if device.type not in ("cpu", "meta"):  # meta tensors have no values to check
            # On CPU the gather in forward refuses an out-of-range index with an error, which
            # is then explained below: no extra pass over the targets on the common path. A GPU
            # gather would stop the process on a device-side assert instead, so check first.
            _check_target_range(target, C, ignore_index)
    if weight is not None:
        if _shape(weight) != (C,):
            raise ValueError(
                f"cross_entropy: expected weight of shape ({C},) (one per class), got "
                f"{_shape(weight)}"
            )
        if weight.requires_grad:
            raise RuntimeError(
                "cross_entropy: the gradient with respect to weight is not supported; pass "
                "weight.detach()"
            )

    if C == 0:
        return _no_class_loss(input, target, ignore_index, reduction, label_smoothing)
    if nd == 2:
        z, t = input, target
    elif nd == 1:  # unbatched (C)
        z, t = input.unsqueeze(0), target.unsqueeze(0)
    else:  # (N, C, d1, ..., dk) -> (N·d1···dk, C): classes last, one row per position
        z = input.movedim(1, -1).reshape(-1, C)
        t = target.movedim(1, -1).reshape(-1, C) if probs else target.reshape(-1)
    fn = _pick(SoftmaxCrossEntropyFunction, _SoftmaxCrossEntropyFunctionNoJvp)
    try:
        loss = fn.apply(z, t, weight, ignore_index, reduction, label_smoothing)
    except (RuntimeError, IndexError):
        if not probs:  # an out-of-range target: say which, as PyTorch-style IndexError
            _check_target_range(target, C, ignore_index)
        raise
    if reduction != "none" or nd == 2:
        return loss
    if nd == 1:
        return loss.squeeze(0)
    return loss.reshape(tuple(shape)[:1] + tuple(shape)[2:])


def _no_class_loss(input: Tensor, target: Tensor, ignore_index: int, reduction: str,
                   label_smoothing: float) -> Tensor:
    """Native's loss for an input with zero classes (C = 0): there is nothing to derive, the
    gradient is empty. Each row costs 0 (index targets must all be ignore_index); the mean is
    NaN (0 / 0), and so is everything with index targets and label smoothing (the smoothing
    term divides by C)."""
    nd = input.dim()
    probs = target.is_floating_point()
    if not probs:
        _check_target_range(target, 0, ignore_index)  # refuses every target but ignore_index
        if nd > 2 and target.numel() > 0:
            raise ValueError(
                f"cross_entropy: class-index targets of shape {_shape(target)} need at least "
                f"one class, got input of shape {_shape(input)} (as torch.nn.functional's)"
            )
    loss = input.sum(1 if nd > 1 else 0)  # zeros of the batch shape, from input
    nan = not probs and label_smoothing > 0
    if reduction == "none":
        return loss + float("nan") if nan else loss
    total = loss.sum()
    return total + float("nan") if nan or reduction == "mean" else total


def _check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    # A value check needs concrete values; under torch.compile or a torch.func transform the
    # gather in forward still refuses an out-of-range index, so nothing passes silently.
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(target):
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bad.any():
        value = target[bad][0].item()
        raise IndexError(
            f"cross_entropy: target {value} is out of bounds: class indices must be in "
            f"[0, {num_classes}) or equal ignore_index ({ignore_index})"
        )


def l2_penalty(weights: Sequence[Tensor] | Tensor, lam: float) -> Tensor:
    """The derivation's regularisation term ``½ λ Σ_k ‖W_k‖²``; its gradient is ``λ W_k``.

    Args:
        weights: a tensor or a sequence of tensors (typically the weight matrices, not biases).
        lam: λ ≥ 0.
    """
    if isinstance(weights, Tensor):
        weights = [weights]
    weights = list(weights)
    if native_enabled():  # the same formula in native ops, autograd's backward
        return 0.5 * lam * sum(w.square().sum() for w in weights)
    if isinstance(lam, Tensor):
        raise TypeError("l2_penalty: lam must be a Python number, got a Tensor")
    if not lam >= 0:  # also refuses NaN
        raise ValueError(f"l2_penalty: lam must be non-negative, got {lam}")
    if not weights:
        raise ValueError("l2_penalty: expected at least one weight tensor, got none")
    for k, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(
                f"l2_penalty: weights[{k}] must be a floating-point tensor, got "
                f"{type(w).__name__}"
            )
        if not w.is_floating_point():  # complex too: its ½λ‖W‖² would need |W|², not W²
            raise TypeError(
                f"l2_penalty: weights[{k}] must be a floating-point tensor, got {w.dtype}"
                + (" (complex weights are not supported)" if w.is_complex() else "")
            )
    _same_dtype_device("l2_penalty", **{f"weights[{k}]": w for k, w in enumerate(weights)})
    fn = _pick(L2PenaltyFunction, _L2PenaltyFunctionNoJvp)
    return fn.apply(float(lam), *weights)
