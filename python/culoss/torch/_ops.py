"""The culoss custom ops (namespace ``culoss``): one per loss family, each a
``torch.library.custom_op`` with a fake kernel (shapes only, for
torch.compile / meta tensors) and an autograd rule.

Every op takes its input already in the layout the C call reads (the
functional layer, ``functional.py``, reshapes and casts with ordinary torch
ops, which autograd and the compiler see) and returns ``(loss, grad)``:

* ``loss``: float32, ``[n]`` (or the input's shape for elementwise losses)
  for reduction none, ``[]`` otherwise;
* ``grad``: the gradient of the loss with respect to the input, computed in
  the same fused pass with an upstream gradient of 1, in the input's dtype
  (an empty tensor when ``compute_grad`` is False).

The backward scales the saved gradient by the upstream gradient. That is
exact for every reduction: each loss's gradient is a per-row (or
per-element) multiple of the upstream gradient of that row (element), so
reduction none takes an arbitrary upstream gradient. The one exception is the
weight gradient of linear + cross-entropy, a sum over rows: with reduction
none its backward runs the fused op again with the upstream gradient.

Gradients with respect to targets (probability targets of cross-entropy,
the targets of BCE, KL divergence and the regression losses) are computed in
the backward with torch ops from the saved inputs, only when a target
requires grad.
"""
import ctypes
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _lib
from . import _runtime as rt

NONE, SUM, MEAN, BATCHMEAN = 0, 1, 2, 3
REGRESSION = {0: "mse", 1: "l1", 2: "huber", 3: "smooth_l1"}


def _loss_out(x, n, reduction):
    return torch.empty((n,) if reduction == NONE else (), dtype=torch.float32, device=x.device)


def _grad_out(x, compute_grad):
    """The gradient buffer: the input's shape, row stride and dtype."""
    if not compute_grad:
        return x.new_empty((0,))
    if x.dim() == 2:
        return x.new_empty_strided(tuple(x.shape), (rt.row_stride(x), 1))
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _opt_f32(t):
    return rt.ptr(t) if t is not None else None


def _scaled(grad, grad_loss, reduction, inplace=False):
    """grad * upstream gradient, broadcast over the class dimension for per-row
    losses. Out of place: the op's outputs stay as returned (ops are pure), so
    a backward holds a second gradient-sized buffer while it runs (none lives
    between forward and backward). inplace=True (the opt-in in-place
    cross-entropy, whose gradient already overwrote the logits) scales the
    saved buffer itself in eager mode."""
    if reduction == NONE and grad_loss.dim() < grad.dim():
        grad_loss = grad_loss.reshape(grad_loss.shape + (1,) * (grad.dim() - grad_loss.dim()))
    s = grad_loss.to(grad.dtype)
    if inplace and type(grad) is torch.Tensor and not torch.compiler.is_compiling() and \
            not torch.is_grad_enabled():
        return grad.mul_(s)
    return grad * s


def _acc(t):
    """The precision of target gradients computed with torch ops: float64 on
    the CPU (as the CPU backend's reference), float32 on CUDA."""
    return t.double() if t.device.type == "cpu" else t.float()


def _row_scale(grad_loss, reduction, n, normalizer):
    """Upstream gradient per row for target gradients computed in torch: [n, 1]
    (MEAN of soft targets divides by n, or by the normalizer)."""
    if reduction == NONE:
        return grad_loss.reshape(-1, 1)
    if reduction == MEAN:
        d = normalizer.reshape(()) if normalizer is not None else n
        return (grad_loss / d).reshape(1, 1)
    return grad_loss.reshape(1, 1)


def _elem_scale(grad_loss, reduction, numel, rows):
    if reduction == NONE:
        return grad_loss
    if reduction == MEAN:
        return grad_loss / numel
    if reduction == BATCHMEAN:
        return grad_loss / rows
    return grad_loss

# --------------------------------------------------------------------------- cross-entropy


@torch.library.custom_op("culoss::cross_entropy", mutates_args=())
def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor],
                  normalizer: Optional[Tensor], reduction: int, ignore_index: int,
                  label_smoothing: float, z_loss: float, logit_softcap: float,
                  compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """Fused softmax cross-entropy over rows of input [n, c] (unit column
    stride): class indices target [n] (int32/int64), or probabilities [n, c]
    of the input's dtype. weight: [c] fp32; normalizer: [1] fp32."""
    grad = _grad_out(input, compute_grad)
    loss = cross_entropy_call(input, target, weight, normalizer, reduction, ignore_index,
                              label_smoothing, z_loss, logit_softcap, grad)
    return loss, grad


def cross_entropy_call(input, target, weight, normalizer, reduction, ignore_index,
                       label_smoothing, z_loss, logit_softcap, grad):
    """The C call behind culoss::cross_entropy; `grad` is None, an empty
    tensor, or the [n, c] buffer to write (input itself for in place)."""
    o = _lib.options("cross_entropy", reduction=reduction, ignore_index=ignore_index,
                     label_smoothing=label_smoothing, class_weight=_opt_f32(weight),
                     z_loss=z_loss, logit_softcap=logit_softcap,
                     normalizer=_opt_f32(normalizer))
    if not target.is_floating_point():
        return _row_index_call("cross_entropy", o, input, target, reduction, grad)
    n, c = input.shape
    ld = rt.row_stride(input)
    if n > 1 and target.stride() != (ld, 1):  # the C call reads both with one row stride
        t = input.new_empty_strided((n, c), (ld, 1))
        t.copy_(target)
        target = t
    loss = _loss_out(input, n, reduction)
    _lib.call("cross_entropy_soft", rt.context(input).h, o, n, c, rt.dtype_code(input),
              rt.ptr(input), ld, rt.ptr(target), rt.ptr(loss), rt.ptr(grad), None)
    return loss


@cross_entropy.register_fake
def _(input, target, weight, normalizer, reduction, ignore_index, label_smoothing, z_loss,
      logit_softcap, compute_grad):
    return _loss_out(input, input.shape[0], reduction), _grad_out(input, compute_grad)


def _ce_setup(ctx, inputs, output):
    input, target, weight, normalizer, reduction = inputs[:5]
    ctx.reduction = reduction
    ctx.label_smoothing, ctx.logit_softcap = inputs[6], inputs[8]
    ctx.soft_target_grad = target.is_floating_point() and target.requires_grad
    saved = [output[1], normalizer]
    if ctx.soft_target_grad:
        saved += [input, weight]
    ctx.save_for_backward(*saved)


def _ce_backward(ctx, grad_loss, _grad_grad):
    saved = ctx.saved_tensors
    grad, normalizer = saved[0], saved[1]
    grad_target = None
    if ctx.soft_target_grad:
        # d loss_n / d y_nc = -(1 - eps) w_c log_softmax(x)_nc (z-loss does not depend on y)
        x, w = saved[2], saved[3]
        xf = _acc(x)
        if ctx.logit_softcap > 0:
            xf = ctx.logit_softcap * torch.tanh(xf / ctx.logit_softcap)
        g = -(1.0 - ctx.label_smoothing) * torch.log_softmax(xf, dim=1)
        if w is not None:
            g = g * w
        g = g * _row_scale(_acc(grad_loss), ctx.reduction, x.shape[0], normalizer)
        grad_target = g.to(x.dtype)
    grad_input = _scaled(grad, grad_loss, ctx.reduction) if ctx.needs_input_grad[0] else None
    return grad_input, grad_target, None, None, None, None, None, None, None, None


cross_entropy.register_autograd(_ce_backward, setup_context=_ce_setup)


def _row_index_call(fn, o, input, target, reduction, grad):
    """culoss_<fn>(ctx, o, n, c, dtype, input, ld, ttype, target, loss, grad,
    NULL) over rows of input [n, c] with class-index targets [n]; `grad` is
    the buffer to write (empty: none). Returns the loss."""
    n, c = input.shape
    loss = _loss_out(input, n, reduction)
    _lib.call(fn, rt.context(input).h, o, n, c, rt.dtype_code(input), rt.ptr(input),
              rt.row_stride(input), rt.index_code(target), rt.ptr(target), rt.ptr(loss),
              rt.ptr(grad), None)
    return loss


@torch.library.custom_op("culoss::nll_loss", mutates_args=())
def nll_loss(input: Tensor, target: Tensor, weight: Optional[Tensor],
             normalizer: Optional[Tensor], reduction: int, ignore_index: int,
             compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """Negative log-likelihood over rows of log-probabilities input [n, c]."""
    o = _lib.options("cross_entropy", reduction=reduction, ignore_index=ignore_index,
                     class_weight=_opt_f32(weight), normalizer=_opt_f32(normalizer))
    grad = _grad_out(input, compute_grad)
    return _row_index_call("nll", o, input, target, reduction, grad), grad


@nll_loss.register_fake
def _(input, target, weight, normalizer, reduction, ignore_index, compute_grad):
    return _loss_out(input, input.shape[0], reduction), _grad_out(input, compute_grad)


def _input_grad_backward(ctx, grad_loss, _grad_grad):
    """The input's gradient only: the saved fused gradient, scaled."""
    (grad,) = ctx.saved_tensors
    return (_scaled(grad, grad_loss, ctx.reduction),) + (None,) * (ctx.n_args - 1)


def _input_grad_setup(reduction_arg):
    """setup_context for ops whose only gradient is the input's: saves the
    fused gradient (output 1) and the reduction (argument reduction_arg)."""
    def setup(ctx, inputs, output):
        ctx.reduction, ctx.n_args = inputs[reduction_arg], len(inputs)
        ctx.save_for_backward(output[1])
    return setup


nll_loss.register_autograd(_input_grad_backward, setup_context=_input_grad_setup(4))


@torch.library.custom_op("culoss::multi_margin_loss", mutates_args=())
def multi_margin_loss(input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: int,
                      p: int, margin: float, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """Multi-class hinge over rows of scores input [n, c]."""
    o = _lib.options("multi_margin", reduction=reduction, p=p, margin=margin,
                     class_weight=_opt_f32(weight))
    grad = _grad_out(input, compute_grad)
    return _row_index_call("multi_margin", o, input, target, reduction, grad), grad


@multi_margin_loss.register_fake
def _(input, target, weight, reduction, p, margin, compute_grad):
    return _loss_out(input, input.shape[0], reduction), _grad_out(input, compute_grad)


multi_margin_loss.register_autograd(_input_grad_backward, setup_context=_input_grad_setup(3))

# --------------------------------------------------------------------------- elementwise


def _ew_loss_out(x, reduction):
    if reduction == NONE:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return torch.empty((), dtype=torch.float32, device=x.device)


@torch.library.custom_op("culoss::binary_cross_entropy", mutates_args=())
def binary_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor],
                         pos_weight: Optional[Tensor], reduction: int, logits: bool,
                         compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """BCE (logits=False: probabilities) or BCE-with-logits over input [n, c]
    (contiguous); target of the same shape and dtype; weight: [n, c] fp32;
    pos_weight: [c] fp32, broadcast over rows (logits only)."""
    n, c = input.shape
    loss = _ew_loss_out(input.reshape(-1), reduction)
    grad = _grad_out(input, compute_grad)
    ctx = rt.context(input)
    o = _lib.options("bce", reduction=reduction, weight=_opt_f32(weight),
                     pos_weight=_opt_f32(pos_weight))
    _lib.call("bce_with_logits" if logits else "bce", ctx.h, o, n, c, rt.dtype_code(input),
              rt.ptr(input), rt.ptr(target), rt.ptr(loss), rt.ptr(grad), None)
    return loss, grad


@binary_cross_entropy.register_fake
def _(input, target, weight, pos_weight, reduction, logits, compute_grad):
    return _ew_loss_out(input.reshape(-1), reduction), _grad_out(input, compute_grad)


def _bce_setup(ctx, inputs, output):
    input, target, weight, pos_weight, reduction, logits = inputs[:6]
    ctx.reduction, ctx.logits = reduction, logits
    ctx.target_grad = target.requires_grad
    saved = [output[1]]
    if ctx.target_grad:
        saved += [input, weight, pos_weight]
    ctx.save_for_backward(*saved)


def _bce_backward(ctx, grad_loss, _grad_grad):
    saved = ctx.saved_tensors
    grad_target = None
    if ctx.target_grad:
        x, w, pw = saved[1], saved[2], saved[3]
        xf = _acc(x)
        if ctx.logits:  # d/dy [(1-y) x - (1 + (pw-1) y) log sigmoid(x)]
            g = -xf if pw is None else -xf - (pw - 1) * torch.nn.functional.logsigmoid(xf)
        else:  # d/dy -[y log x + (1-y) log(1-x)], logs clamped at -100 as the loss
            g = torch.clamp(torch.log1p(-xf), min=-100) - torch.clamp(torch.log(xf), min=-100)
        if w is not None:
            g = g * w.reshape(g.shape)
        s = _elem_scale(_acc(grad_loss), ctx.reduction, x.numel(), x.shape[0])
        grad_target = (g * s.reshape(g.shape) if ctx.reduction == NONE else g * s).to(x.dtype)
    grad = saved[0]
    gl = grad_loss.reshape(grad.shape) if ctx.reduction == NONE else grad_loss
    grad_input = _scaled(grad, gl, ctx.reduction) if ctx.needs_input_grad[0] else None
    return grad_input, grad_target, None, None, None, None, None


binary_cross_entropy.register_autograd(_bce_backward, setup_context=_bce_setup)


def _flat_call(fn, o, input, target, reduction, compute_grad):
    """culoss_<fn>(ctx, o, m, dtype, input, target, loss, grad, NULL) over the
    m elements of contiguous input and target."""
    loss = _ew_loss_out(input, reduction)
    grad = _grad_out(input, compute_grad)
    ctx = rt.context(input)
    _lib.call(fn, ctx.h, o, input.numel(), rt.dtype_code(input), rt.ptr(input), rt.ptr(target),
              rt.ptr(loss), rt.ptr(grad), None)
    return loss, grad


@torch.library.custom_op("culoss::regression", mutates_args=())
def regression(input: Tensor, target: Tensor, kind: int, reduction: int, delta: float,
               beta: float, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """mse (kind 0), l1 (1), huber (2, delta), smooth_l1 (3, beta) over
    contiguous input and target of one shape and dtype."""
    o = _lib.options("regression", reduction=reduction, delta=delta, beta=beta)
    return _flat_call(REGRESSION[kind], o, input, target, reduction, compute_grad)


@regression.register_fake
def _(input, target, kind, reduction, delta, beta, compute_grad):
    return _ew_loss_out(input, reduction), _grad_out(input, compute_grad)


def _reg_setup(ctx, inputs, output):
    ctx.reduction = inputs[3]
    ctx.save_for_backward(output[1])


def _reg_backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    # every regression loss depends on input - target only: d/dtarget = -d/dinput
    if ctx.needs_input_grad[1]:
        g = grad * (grad_loss.to(grad.dtype))
        return (g if ctx.needs_input_grad[0] else None), -g, None, None, None, None, None
    return _scaled(grad, grad_loss, ctx.reduction), None, None, None, None, None, None


regression.register_autograd(_reg_backward, setup_context=_reg_setup)


POINTWISE = {0: "hinge_embedding", 1: "soft_margin", 2: "poisson_nll", 3: "sigmoid_focal"}


@torch.library.custom_op("culoss::pointwise", mutates_args=())
def pointwise(input: Tensor, target: Tensor, kind: int, reduction: int, a: float, b: float,
              flags: int, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """hinge_embedding (kind 0: a = margin), soft_margin (1), poisson_nll (2:
    a = eps, flags = log_input | 2 full), sigmoid_focal (3: a = alpha, b =
    gamma) over contiguous input and target of one shape and dtype; the
    gradient is the input's only."""
    name = POINTWISE[kind]
    if kind == 0:
        o = _lib.options(name, reduction=reduction, margin=a)
    elif kind == 1:
        o = _lib.options(name, reduction=reduction)
    elif kind == 2:
        o = _lib.options(name, reduction=reduction, eps=a, log_input=flags & 1,
                         full=(flags >> 1) & 1)
    else:
        o = _lib.options(name, reduction=reduction, alpha=a, gamma=b)
    return _flat_call(name, o, input, target, reduction, compute_grad)


@pointwise.register_fake
def _(input, target, kind, reduction, a, b, flags, compute_grad):
    return _ew_loss_out(input, reduction), _grad_out(input, compute_grad)


def _pw_target_grad(kind, x, y, a, b, flags):
    """d loss / d target of poisson_nll (kind 2) and sigmoid_focal (3), per
    element, in float64 torch ops (the backward's, off the fused path: a
    target that needs a gradient is rare; the terms cancel, so float64)."""
    x, y = x.double(), y.double()
    if kind == 2:
        d = -x if flags & 1 else -torch.log(x + a)
        if flags & 2:  # the Stirling term's where y > 1; times 0 elsewhere, as torch's
            # masked_fill backward: NaN where y <= 0 (log y, 1/y), 0 for 0 < y <= 1
            d = d + (y > 1).to(y.dtype) * (torch.log(y) + 0.5 / y)
        return d
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    ce = torch.clamp_min(x, 0) - x * y + torch.log1p(torch.exp(-x.abs()))
    omp = y * q + (1 - y) * p
    at = a * y + (1 - a) * (1 - y) if a >= 0 else torch.ones_like(y)
    dat = 2 * a - 1 if a >= 0 else 0.0
    mod = omp ** b if b != 0 else torch.ones_like(y)
    dmod = b * torch.where(omp > 0, omp ** (b - 1), torch.zeros_like(y)) if b != 0 else 0.0
    return dat * ce * mod - at * x * mod + at * ce * dmod * (q - p)


def _pw_setup(ctx, inputs, output):
    ctx.kind, ctx.reduction, ctx.a, ctx.b, ctx.flags = inputs[2], inputs[3], inputs[4], \
        inputs[5], inputs[6]
    ctx.save_for_backward(output[1], inputs[0], inputs[1])


def _pw_backward(ctx, grad_loss, _grad_grad):
    grad, x, y = ctx.saved_tensors
    gx = _scaled(grad, grad_loss, ctx.reduction) if ctx.needs_input_grad[0] else None
    gy = None
    if ctx.needs_input_grad[1]:
        if ctx.kind not in (2, 3):
            raise RuntimeError(f"culoss::pointwise: {POINTWISE[ctx.kind]} has no gradient with "
                               "respect to the target")
        d = _pw_target_grad(ctx.kind, x, y, ctx.a, ctx.b, ctx.flags)
        if ctx.reduction == MEAN:
            d = d / max(y.numel(), 1)
        gy = (d * grad_loss.float()).to(y.dtype)
    return gx, gy, None, None, None, None, None, None


pointwise.register_autograd(_pw_backward, setup_context=_pw_setup)


POINTWISE3 = {0: "margin_ranking", 1: "gaussian_nll"}


@torch.library.custom_op("culoss::pointwise3", mutates_args=())
def pointwise3(input: Tensor, input2: Tensor, target: Tensor, kind: int, reduction: int, a: float,
               flags: int, grad_mask: int) -> Tuple[Tensor, Tensor, Tensor]:
    """margin_ranking (kind 0: input2 = x2, a = margin) and gaussian_nll (1:
    input2 = var, a = eps, flags = full) over contiguous tensors of one shape
    and dtype: (loss, d/d input, d/d input2), bit k of grad_mask asking for
    the k-th gradient (else an empty tensor)."""
    name = POINTWISE3[kind]
    if kind == 0:
        o = _lib.options(name, reduction=reduction, margin=a)
    else:
        o = _lib.options(name, reduction=reduction, eps=a, full=flags & 1)
    loss = _ew_loss_out(input, reduction)
    g1, g2 = _grad_out(input, grad_mask & 1), _grad_out(input2, grad_mask & 2)
    ctx = rt.context(input)
    p1, p2 = (rt.ptr(g) if g.numel() else None for g in (g1, g2))
    if kind == 0:
        _lib.call(name, ctx.h, o, input.numel(), rt.dtype_code(input), rt.ptr(input),
                  rt.ptr(input2), rt.ptr(target), rt.ptr(loss), p1, p2, None)
    else:
        _lib.call(name, ctx.h, o, input.numel(), rt.dtype_code(input), rt.ptr(input),
                  rt.ptr(target), rt.ptr(input2), rt.ptr(loss), p1, p2, None)
    return loss, g1, g2


@pointwise3.register_fake
def _(input, input2, target, kind, reduction, a, flags, grad_mask):
    return (_ew_loss_out(input, reduction), _grad_out(input, grad_mask & 1),
            _grad_out(input2, grad_mask & 2))


def _pw3_setup(ctx, inputs, output):
    ctx.kind, ctx.reduction, ctx.a = inputs[3], inputs[4], inputs[5]
    ctx.target_grad = inputs[2].requires_grad
    saved = (output[1], output[2])
    if ctx.target_grad and ctx.kind == 0:
        saved = saved + (inputs[0], inputs[1], inputs[2])
    ctx.save_for_backward(*saved)


def _pw3_backward(ctx, grad_loss, _g1, _g2):
    saved = ctx.saved_tensors
    g1, g2 = saved[0], saved[1]
    n1 = ctx.needs_input_grad
    gx = _scaled(g1, grad_loss, ctx.reduction) if n1[0] else None
    gx2 = _scaled(g2, grad_loss, ctx.reduction) if n1[1] else None
    gy = None
    if n1[2]:
        if ctx.kind == 1:  # d/dy (x - y)^2 / (2 v) = -(x - y) / v: minus the input's
            gy = -_scaled(g1, grad_loss, ctx.reduction)
        else:  # d/dy max(0, margin - y (x1 - x2)) = -(x1 - x2) where active
            x1, x2, y = (_acc(t) for t in saved[2:5])
            r = x1 - x2
            d = torch.where(ctx.a - y * r > 0, -r, torch.zeros_like(r))
            if ctx.reduction == MEAN:
                d = d / max(y.numel(), 1)
            gy = (d * grad_loss.to(d.dtype)).to(saved[4].dtype)
    return gx, gx2, gy, None, None, None, None, None


pointwise3.register_autograd(_pw3_backward, setup_context=_pw3_setup)

EMBEDDING = {0: "cosine_embedding", 1: "triplet_margin"}


def _emb_outputs(x0, x1, x2, reduction, grad_mask):
    """embedding's outputs: loss, and the gradients of x0, x1, x2 that bit k of
    grad_mask asks for (x2 None: cosine, no third gradient)."""
    xs = (x0, x1, x2 if x2 is not None else x0)
    return (_loss_out(x0, x0.shape[0], reduction),) + tuple(
        _grad_out(xs[k], (grad_mask >> k) & 1 and (k < 2 or x2 is not None)) for k in range(3))


@torch.library.custom_op("culoss::embedding", mutates_args=())
def embedding(x0: Tensor, x1: Tensor, x2: Optional[Tensor], target: Optional[Tensor], kind: int,
              reduction: int, margin: float, p: float, eps: float, swap: bool,
              grad_mask: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """cosine_embedding (kind 0: rows x0, x1 [n, d], fp32 target codes [n] in
    {1, -1, 0}) and triplet_margin (1: anchor x0, positive x1, negative x2),
    contiguous, one dtype: (loss, gradients of x0, x1, x2; bit k of
    grad_mask asks for the k-th, else an empty tensor)."""
    n, d = x0.shape
    loss, *gs = _emb_outputs(x0, x1, x2, reduction, grad_mask)
    gp = [rt.ptr(g) for g in gs]  # None for an empty (unrequested) one
    ctx = rt.context(x0)
    if kind == 0:
        o = _lib.options("cosine_embedding", reduction=reduction, margin=margin)
        _lib.call("cosine_embedding", ctx.h, o, n, d, rt.dtype_code(x0), rt.ptr(x0), rt.ptr(x1),
                  d, rt.ptr(target), rt.ptr(loss), gp[0], gp[1], None)
    else:
        o = _lib.options("triplet_margin", reduction=reduction, margin=margin, p=p, eps=eps,
                         swap=int(swap))
        _lib.call("triplet_margin", ctx.h, o, n, d, rt.dtype_code(x0), rt.ptr(x0), rt.ptr(x1),
                  rt.ptr(x2), d, rt.ptr(loss), gp[0], gp[1], gp[2], None)
    return (loss, *gs)


@embedding.register_fake
def _(x0, x1, x2, target, kind, reduction, margin, p, eps, swap, grad_mask):
    return _emb_outputs(x0, x1, x2, reduction, grad_mask)


def _emb_setup(ctx, inputs, output):
    ctx.reduction = inputs[5]
    ctx.save_for_backward(*output[1:])


def _emb_backward(ctx, grad_loss, *_):
    gs = ctx.saved_tensors
    out = [_scaled(g, grad_loss, ctx.reduction) if ctx.needs_input_grad[k] and g.numel() else None
           for k, g in enumerate(gs)]
    return out[0], out[1], out[2], None, None, None, None, None, None, None, None


embedding.register_autograd(_emb_backward, setup_context=_emb_setup)


def _nce_outputs(query, key, reduction, grad_mask):
    """info_nce's outputs: loss, and the gradients bit k of grad_mask asks for
    (else empty)."""
    gq = torch.empty_like(query) if grad_mask & 1 else query.new_empty((0,))
    gk = torch.empty_like(key) if grad_mask & 2 else query.new_empty((0,))
    gt = torch.empty((), dtype=torch.float32, device=query.device) if grad_mask & 4 else \
        query.new_empty((0,), dtype=torch.float32)
    return _loss_out(query, query.shape[0], reduction), gq, gk, gt


@torch.library.custom_op("culoss::info_nce", mutates_args=())
def info_nce(query: Tensor, key: Tensor, temperature: Tensor, grad_loss: Optional[Tensor],
             symmetric: bool, reduction: int,
             grad_mask: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """InfoNCE over query, key [n, d] (contiguous, one dtype), temperature a
    0-dim float32 tensor: (loss, d/d query, d/d key, d/d temperature) for the
    upstream gradient grad_loss (None: 1), bit k of grad_mask asking for the
    k-th gradient (else an empty tensor)."""
    n, d = query.shape
    loss, gq, gk, gt = _nce_outputs(query, key, reduction, grad_mask)
    ctx = rt.context(query)
    dt = rt.dtype_code(query)
    o = _lib.options("info_nce", reduction=reduction, symmetric=int(symmetric),
                     temperature=rt.ptr(temperature), grad_temperature=rt.ptr(gt))
    size = ctypes.c_size_t()
    _lib.call("info_nce_workspace_size", ctx.h, o, n, d, dt, ctypes.byref(size))
    ws = torch.empty(max(size.value, 1), dtype=torch.uint8, device=query.device)
    _lib.call("info_nce", ctx.h, o, n, d, dt, rt.ptr(query), rt.ptr(key), rt.ptr(loss),
              rt.ptr(gq), rt.ptr(gk), _opt_f32(grad_loss), rt.ptr(ws), size.value)
    return loss, gq, gk, gt


@info_nce.register_fake
def _(query, key, temperature, grad_loss, symmetric, reduction, grad_mask):
    return _nce_outputs(query, key, reduction, grad_mask)


def _nce_setup(ctx, inputs, output):
    query, key, temperature, _gl, symmetric, reduction, grad_mask = inputs
    ctx.symmetric, ctx.reduction, ctx.grad_mask = symmetric, reduction, grad_mask
    ctx.t_dtype = temperature.dtype
    if reduction == NONE:  # the gradient is not a per-row multiple: run again with grad_loss
        ctx.save_for_backward(query, key, temperature)
    else:
        ctx.save_for_backward(*output[1:])


def _nce_backward(ctx, grad_loss, *_):
    need = ctx.needs_input_grad
    if ctx.reduction == NONE:
        q, k, t = ctx.saved_tensors
        mask = (1 if need[0] else 0) | (2 if need[1] else 0) | (4 if need[2] else 0)
        _, gq, gk, gt = torch.ops.culoss.info_nce(q, k, t, grad_loss.float().contiguous(),
                                                  ctx.symmetric, NONE, mask)
    else:
        gq, gk, gt = ctx.saved_tensors
        s = grad_loss.float()
        gq = gq * s.to(gq.dtype) if gq.numel() else gq
        gk = gk * s.to(gk.dtype) if gk.numel() else gk
        gt = gt * s if gt.numel() else gt
    return (gq if need[0] else None, gk if need[1] else None,
            gt.to(ctx.t_dtype) if need[2] else None, None, None, None, None)


info_nce.register_autograd(_nce_backward, setup_context=_nce_setup)


@torch.library.custom_op("culoss::multilabel_margin", mutates_args=())
def multilabel_margin(input: Tensor, target: Tensor, reduction: int,
                      compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """Multi-label margin over rows input [n, c] (contiguous) with int64
    targets [n, c], each row's classes up to its first -1."""
    n, c = input.shape
    loss = _loss_out(input, n, reduction)
    grad = _grad_out(input, compute_grad)
    ctx = rt.context(input)
    o = _lib.options("multilabel_margin", reduction=reduction)
    _lib.call("multilabel_margin", ctx.h, o, n, c, rt.dtype_code(input), rt.ptr(input), c,
              rt.index_code(target), rt.ptr(target), rt.ptr(loss),
              rt.ptr(grad) if compute_grad else None, None)
    return loss, grad


@multilabel_margin.register_fake
def _(input, target, reduction, compute_grad):
    return _loss_out(input, input.shape[0], reduction), _grad_out(input, compute_grad)


multilabel_margin.register_autograd(_input_grad_backward, setup_context=_input_grad_setup(2))


@torch.library.custom_op("culoss::multilabel_soft_margin", mutates_args=())
def multilabel_soft_margin(input: Tensor, target: Tensor, weight: Optional[Tensor],
                           weight_per_row: bool, reduction: int,
                           compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """Multi-label soft margin over rows input [n, c] (contiguous) and target
    of the same shape and dtype; weight: fp32, [c] or (weight_per_row) [n, c]."""
    n, c = input.shape
    loss = _loss_out(input, n, reduction)
    grad = _grad_out(input, compute_grad)
    ctx = rt.context(input)
    o = _lib.options("multilabel_soft_margin", reduction=reduction, weight=_opt_f32(weight),
                     weight_per_row=int(weight_per_row))
    _lib.call("multilabel_soft_margin", ctx.h, o, n, c, rt.dtype_code(input), rt.ptr(input),
              rt.ptr(target), c, rt.ptr(loss), rt.ptr(grad) if compute_grad else None, None)
    return loss, grad


@multilabel_soft_margin.register_fake
def _(input, target, weight, weight_per_row, reduction, compute_grad):
    return _loss_out(input, input.shape[0], reduction), _grad_out(input, compute_grad)


def _mlsm_setup(ctx, inputs, output):
    input, target, weight, _, reduction = inputs[:5]
    ctx.reduction = reduction
    ctx.target_grad = target.requires_grad
    ctx.save_for_backward(output[1], *((input, weight) if ctx.target_grad and weight is not None
                                        else (input,) if ctx.target_grad else ()))


def _mlsm_backward(ctx, grad_loss, _grad_grad):
    saved = ctx.saved_tensors
    gx = _scaled(saved[0], grad_loss, ctx.reduction) if ctx.needs_input_grad[0] else None
    gy = None
    if ctx.target_grad:  # d/dy = -(log sigmoid(x) - log sigmoid(-x)) w / c = -x w / c
        x = _acc(saved[1])
        n, c = x.shape
        d = -x / c
        if len(saved) > 2:
            d = d * saved[2].to(d.dtype)
        gy = (d * _row_scale(grad_loss.to(d.dtype), ctx.reduction, n, None)).to(saved[1].dtype)
    return gx, gy, None, None, None, None


multilabel_soft_margin.register_autograd(_mlsm_backward, setup_context=_mlsm_setup)


@torch.library.custom_op("culoss::hinge", mutates_args=())
def hinge(input: Tensor, target: Tensor, reduction: int, margin: float, squared: bool,
          compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """Binary hinge max(0, margin - y f) (or its square), y in {-1, +1}."""
    o = _lib.options("hinge", reduction=reduction, margin=margin, squared=int(squared))
    return _flat_call("hinge", o, input, target, reduction, compute_grad)


@hinge.register_fake
def _(input, target, reduction, margin, squared, compute_grad):
    return _ew_loss_out(input, reduction), _grad_out(input, compute_grad)


hinge.register_autograd(_input_grad_backward, setup_context=_input_grad_setup(2))


@torch.library.custom_op("culoss::kl_div", mutates_args=())
def kl_div(input: Tensor, target: Tensor, reduction: int, log_target: bool,
           compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """KL divergence over log-probabilities input [n, c] (contiguous) and
    target of the same shape and dtype; batchmean divides by n."""
    n, c = input.shape
    loss = _ew_loss_out(input.reshape(-1), reduction)
    grad = _grad_out(input, compute_grad)
    ctx = rt.context(input)
    o = _lib.options("kl_div", reduction=reduction, log_target=int(log_target))
    _lib.call("kl_div", ctx.h, o, n, c, rt.dtype_code(input), rt.ptr(input), rt.ptr(target),
              rt.ptr(loss), rt.ptr(grad), None)
    return loss, grad


@kl_div.register_fake
def _(input, target, reduction, log_target, compute_grad):
    return _ew_loss_out(input.reshape(-1), reduction), _grad_out(input, compute_grad)


def _kl_setup(ctx, inputs, output):
    input, target, reduction, log_target = inputs[:4]
    ctx.reduction, ctx.log_target = reduction, log_target
    ctx.target_grad = target.requires_grad
    ctx.save_for_backward(output[1], *((input, target) if ctx.target_grad else ()))


def _kl_backward(ctx, grad_loss, _grad_grad):
    saved = ctx.saved_tensors
    grad, grad_target = saved[0], None
    if ctx.target_grad:
        x, t = _acc(saved[1]), _acc(saved[2])
        if ctx.log_target:  # d/dt exp(t) (t - x) = exp(t) (t - x + 1)
            g = torch.exp(t) * (t - x + 1)
        else:  # d/dt [t log t - t x] = log t + 1 - x
            g = torch.log(t) + 1 - x
        s = _elem_scale(_acc(grad_loss), ctx.reduction, x.numel(), x.shape[0])
        grad_target = (g * (s.reshape(g.shape) if ctx.reduction == NONE else s)).to(saved[2].dtype)
    gl = grad_loss.reshape(grad.shape) if ctx.reduction == NONE else grad_loss
    grad_input = _scaled(grad, gl, ctx.reduction) if ctx.needs_input_grad[0] else None
    return grad_input, grad_target, None, None, None


kl_div.register_autograd(_kl_backward, setup_context=_kl_setup)

# --------------------------------------------------------------------------- linear + CE


@torch.library.custom_op("culoss::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                         class_weight: Optional[Tensor], normalizer: Optional[Tensor],
                         grad_loss: Optional[Tensor], reduction: int, ignore_index: int,
                         label_smoothing: float, z_loss: float, logit_softcap: float,
                         grad_input: bool, grad_weight: bool,
                         grad_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused linear + cross-entropy: logits = input [n, d] @ weight [v, d]^T
    (+ bias [v]) are never materialised whole. Returns (loss, grad_input,
    grad_weight, grad_bias), the gradients for an upstream gradient
    `grad_loss` (None: 1); unrequested ones are empty."""
    n, d = input.shape
    v = weight.shape[0]
    loss = _loss_out(input, n, reduction)
    gi = torch.empty_like(input) if grad_input else input.new_empty((0,))
    gw = torch.empty_like(weight) if grad_weight else input.new_empty((0,))
    gb = torch.empty_like(bias) if grad_bias and bias is not None else input.new_empty((0,))
    ctx = rt.context(input)
    dt = rt.dtype_code(input)
    size = ctypes.c_size_t()
    _lib.call("linear_cross_entropy_workspace_size", ctx.h, n, d, v, dt, ctypes.byref(size))
    ws = None
    if input.device.type == "cuda" and size.value:
        ws = torch.empty(size.value, dtype=torch.uint8, device=input.device)
    o = _lib.options("cross_entropy", reduction=reduction, ignore_index=ignore_index,
                     label_smoothing=label_smoothing, class_weight=_opt_f32(class_weight),
                     z_loss=z_loss, logit_softcap=logit_softcap,
                     normalizer=_opt_f32(normalizer))
    _lib.call("linear_cross_entropy", ctx.h, o, n, d, v, dt, rt.ptr(input), rt.ptr(weight),
              rt.ptr(bias), rt.index_code(target), rt.ptr(target), rt.ptr(loss), rt.ptr(gi),
              rt.ptr(gw), rt.ptr(gb), _opt_f32(grad_loss), rt.ptr(ws),
              size.value if ws is not None else 0)
    return loss, gi, gw, gb


@linear_cross_entropy.register_fake
def _(input, weight, target, bias, class_weight, normalizer, grad_loss, reduction, ignore_index,
      label_smoothing, z_loss, logit_softcap, grad_input, grad_weight, grad_bias):
    gi = torch.empty_like(input) if grad_input else input.new_empty((0,))
    gw = torch.empty_like(weight) if grad_weight else input.new_empty((0,))
    gb = torch.empty_like(bias) if grad_bias and bias is not None else input.new_empty((0,))
    return _loss_out(input, input.shape[0], reduction), gi, gw, gb


def _lce_setup(ctx, inputs, output):
    (input, weight, target, bias, class_weight, normalizer, _gl, reduction, ignore_index,
     label_smoothing, z_loss, logit_softcap) = inputs[:12]
    ctx.reduction = reduction
    ctx.options = (reduction, ignore_index, label_smoothing, z_loss, logit_softcap)
    ctx.has_bias = bias is not None
    if reduction == NONE:  # the weight gradient sums rows: recompute with the upstream gradient
        ctx.save_for_backward(input, weight, target, bias, class_weight, normalizer)
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _lce_backward(ctx, grad_loss, _g1, _g2, _g3):
    need = ctx.needs_input_grad
    if ctx.reduction == NONE:
        input, weight, target, bias, class_weight, normalizer = ctx.saved_tensors
        _, gi, gw, gb = linear_cross_entropy(
            input, weight, target, bias, class_weight, normalizer,
            grad_loss.float().contiguous(), *ctx.options, need[0], need[1],
            bool(need[3]) and ctx.has_bias)
        out = [gi if need[0] else None, gw if need[1] else None,
               gb if need[3] and ctx.has_bias else None]
    else:
        gi, gw, gb = ctx.saved_tensors
        out = [_scaled(gi, grad_loss, ctx.reduction) if need[0] else None,
               _scaled(gw, grad_loss, ctx.reduction) if need[1] else None,
               _scaled(gb, grad_loss, ctx.reduction) if need[3] and ctx.has_bias else None]
    return (out[0], out[1], None, out[2]) + (None,) * 11


linear_cross_entropy.register_autograd(_lce_backward, setup_context=_lce_setup)

# --------------------------------------------------------------------------- distillation


def _distill_options(tvd, beta, temperature, ignore_index, reduction, weight_soft, weight_hard,
                     hard_class_weight=None, hard_label_smoothing=0.0, hard_z_loss=0.0):
    o = _lib.options("distill", divergence=int(tvd), beta=beta, temperature=temperature,
                     reduction=reduction, ignore_index=ignore_index, weight_soft=weight_soft,
                     weight_hard=weight_hard)
    if hard_class_weight is not None or hard_label_smoothing != 0.0 or hard_z_loss != 0.0:
        # the pointer keeps the CE options alive as long as o
        o.hard_options = ctypes.pointer(_lib.options(
            "cross_entropy", label_smoothing=hard_label_smoothing, z_loss=hard_z_loss,
            class_weight=_opt_f32(hard_class_weight)))
    return o


@torch.library.custom_op("culoss::distill", mutates_args=())
def distill(student: Tensor, teacher: Tensor, labels: Optional[Tensor], tvd: bool, beta: float,
            temperature: float, ignore_index: int, reduction: int, weight_soft: float,
            weight_hard: float, compute_grad: bool) -> Tuple[Tensor, Tensor]:
    """Distillation over rows of student and teacher logits [n, v] (each with
    its own row stride, unit column stride): generalized JSD(beta) or TVD at
    `temperature`, plus weight_hard times the hard cross-entropy at labels.
    Returns (loss, the student's gradient for an upstream gradient of 1)."""
    n, v = student.shape
    o = _distill_options(tvd, beta, temperature, ignore_index, reduction, weight_soft,
                         weight_hard)
    loss = _loss_out(student, n, reduction)
    grad = _grad_out(student, compute_grad)
    ctx = rt.context(student)
    _lib.call("distill", ctx.h, o, n, v, rt.dtype_code(student), rt.ptr(student),
              rt.row_stride(student), rt.ptr(teacher), rt.row_stride(teacher),
              rt.index_code(labels) if labels is not None else _lib.I64, rt.ptr(labels),
              rt.ptr(loss), rt.ptr(grad), None)
    return loss, grad


@distill.register_fake
def _(student, teacher, labels, tvd, beta, temperature, ignore_index, reduction, weight_soft,
      weight_hard, compute_grad):
    return _loss_out(student, student.shape[0], reduction), _grad_out(student, compute_grad)


distill.register_autograd(_input_grad_backward, setup_context=_input_grad_setup(7))


@torch.library.custom_op("culoss::linear_distill", mutates_args=())
def linear_distill(student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
                   teacher_weight: Tensor, labels: Optional[Tensor], student_bias: Optional[Tensor],
                   teacher_bias: Optional[Tensor], grad_loss: Optional[Tensor],
                   hard_class_weight: Optional[Tensor], tvd: bool, beta: float,
                   temperature: float, ignore_index: int, reduction: int, weight_soft: float,
                   weight_hard: float, hard_label_smoothing: float, hard_z_loss: float,
                   grad_input: bool, grad_weight: bool,
                   grad_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused linear + distillation: the student's and teacher's logits
    (input @ weight^T + bias) exist one block of rows at a time. The hard
    term takes culoss_cross_entropy's class weights (float32 [v]), label
    smoothing and z-loss. Returns (loss, grad_input, grad_weight, grad_bias)
    of the student for an upstream gradient `grad_loss` (None: 1);
    unrequested ones are empty."""
    n, ds = student_input.shape
    dt_ = teacher_input.shape[1]
    v = student_weight.shape[0]
    o = _distill_options(tvd, beta, temperature, ignore_index, reduction, weight_soft,
                         weight_hard, hard_class_weight, hard_label_smoothing, hard_z_loss)
    loss = _loss_out(student_input, n, reduction)
    gi = torch.empty_like(student_input) if grad_input else student_input.new_empty((0,))
    gw = torch.empty_like(student_weight) if grad_weight else student_input.new_empty((0,))
    gb = (torch.empty_like(student_bias) if grad_bias and student_bias is not None
          else student_input.new_empty((0,)))
    ctx = rt.context(student_input)
    dt = rt.dtype_code(student_input)
    size = ctypes.c_size_t()
    _lib.call("linear_distill_workspace_size", ctx.h, None, n, ds, dt_, v, dt, ctypes.byref(size))
    ws = None
    if student_input.device.type == "cuda" and size.value:
        ws = torch.empty(size.value, dtype=torch.uint8, device=student_input.device)
    _lib.call("linear_distill", ctx.h, o, None, n, ds, dt_, v, dt, rt.ptr(student_input),
              rt.ptr(student_weight), rt.ptr(student_bias), rt.ptr(teacher_input),
              rt.ptr(teacher_weight), rt.ptr(teacher_bias),
              rt.index_code(labels) if labels is not None else _lib.I64, rt.ptr(labels),
              rt.ptr(loss), rt.ptr(gi), rt.ptr(gw), rt.ptr(gb), _opt_f32(grad_loss), rt.ptr(ws),
              size.value if ws is not None else 0)
    return loss, gi, gw, gb


@linear_distill.register_fake
def _(student_input, student_weight, teacher_input, teacher_weight, labels, student_bias,
      teacher_bias, grad_loss, hard_class_weight, tvd, beta, temperature, ignore_index, reduction,
      weight_soft, weight_hard, hard_label_smoothing, hard_z_loss, grad_input, grad_weight,
      grad_bias):
    gi = torch.empty_like(student_input) if grad_input else student_input.new_empty((0,))
    gw = torch.empty_like(student_weight) if grad_weight else student_input.new_empty((0,))
    gb = (torch.empty_like(student_bias) if grad_bias and student_bias is not None
          else student_input.new_empty((0,)))
    return _loss_out(student_input, student_input.shape[0], reduction), gi, gw, gb


def _ld_setup(ctx, inputs, output):
    (si, sw, ti, tw, labels, sb, tb, _gl, hcw) = inputs[:9]
    ctx.options = inputs[9:18]
    ctx.reduction = inputs[13]
    ctx.has_bias = sb is not None
    if ctx.reduction == NONE:  # the weight gradient sums rows: recompute with the upstream gradient
        ctx.save_for_backward(si, sw, ti, tw, labels, sb, tb, hcw)
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _ld_backward(ctx, grad_loss, _g1, _g2, _g3):
    need = ctx.needs_input_grad
    if ctx.reduction == NONE:
        si, sw, ti, tw, labels, sb, tb, hcw = ctx.saved_tensors
        _, gi, gw, gb = linear_distill(si, sw, ti, tw, labels, sb, tb,
                                       grad_loss.float().contiguous(), hcw, *ctx.options,
                                       need[0], need[1], bool(need[5]) and ctx.has_bias)
        out = [gi if need[0] else None, gw if need[1] else None,
               gb if need[5] and ctx.has_bias else None]
    else:
        gi, gw, gb = ctx.saved_tensors
        out = [_scaled(gi, grad_loss, ctx.reduction) if need[0] else None,
               _scaled(gw, grad_loss, ctx.reduction) if need[1] else None,
               _scaled(gb, grad_loss, ctx.reduction) if need[5] and ctx.has_bias else None]
    return (out[0], out[1], None, None, None, out[2]) + (None,) * 15


linear_distill.register_autograd(_ld_backward, setup_context=_ld_setup)
