"""culoss: GPU loss functions through the C ABI (pure ctypes, no compiled extension).

Two front ends:

* ``culoss.torch`` (PyTorch): drop-in for ``torch.nn.functional``'s losses, as
  custom ops that autograd and ``torch.compile`` understand, on CPU and CUDA
  tensors. Most users want this one.
* this module (NumPy, and PyTorch CUDA tensors): every loss returns
  ``(loss, grad)``: ``loss`` is float32 (a scalar array/tensor for reductions,
  per row/element for ``reduction="none"``), ``grad`` the gradient with respect
  to the first input, in its dtype, or ``None`` with ``grad=False``. Errors
  raise :class:`CulossError` carrying the library's ``culoss_last_error()``.

The library is found as ``culoss._lib`` describes (next to this package after
``pip install .``, or ``$CULOSS_LIBRARY``).
"""
import ctypes

from ._lib import (BF16, F16, F32, I32, I64, CEOptions as _CE, BCEOptions as _BCE,
                   HingeOptions as _Hinge, MultiMarginOptions as _MM,
                   RegressionOptions as _Reg, KLOptions as _KL, Context, CulossError,
                   CulossIndexError, CulossValueError, REDUCTIONS as _RED, check as _check,
                   lib as _clib, thread_context, version)

__all__ = [
    "CulossError", "CulossValueError", "CulossIndexError", "Context", "version", "build_backend",
    "cross_entropy", "cross_entropy_soft", "nll", "bce_with_logits", "bce", "hinge",
    "multi_margin", "mse", "l1", "huber", "smooth_l1", "kl_div", "linear_cross_entropy",
    "CrossEntropyFunction",
]

_P = ctypes.c_void_p


def build_backend():
    """"cuda" or "cpu": the backends of the installed library (a wheel built
    where nvcc was on PATH has both; otherwise CPU only), or "development"
    for a library found through CULOSS_LIBRARY / a build tree."""
    try:
        from . import _build_info
    except ImportError:
        return "development"
    return _build_info.backend


# --------------------------------------------------------------------------- arrays


def _is_torch(a):
    return type(a).__module__.startswith("torch")


class _Call:
    """Collects the arrays of one call, checks they share a backend, and
    allocates outputs of the right kind."""

    def __init__(self, first, ctx):
        self.torch = _is_torch(first)
        if self.torch:
            import torch
            self.T = torch
            if not first.is_cuda:
                raise CulossError(1, "torch tensors must be CUDA tensors (use numpy for the CPU backend)")
            self.device = first.device
            self.ctx = ctx or thread_context("cuda", first.device.index or 0)
            self.ctx.set_stream(ctypes.c_void_p(torch.cuda.current_stream(first.device).cuda_stream))
        else:
            import numpy as np
            self.np = np
            self.ctx = ctx or thread_context("cpu", 0)
        self.keep = []

    def dtype(self, a):
        if self.torch:
            m = {self.T.float32: F32, self.T.float16: F16, self.T.bfloat16: BF16}
        else:
            m = {self.np.dtype("float32"): F32, self.np.dtype("float16"): F16}
        if a.dtype not in m:
            raise CulossError(1, f"unsupported dtype {a.dtype} (float32, float16{', bfloat16' if self.torch else ''})")
        return m[a.dtype]

    def ptr(self, a, dtype=None, contiguous=True):
        """Device/host pointer of `a` (converted to `dtype` if given), or None."""
        if a is None:
            return None
        if self.torch:
            if _is_torch(a) is False:
                a = self.T.as_tensor(a, device=self.device)
            if dtype is not None:
                a = a.to(dtype)
            if contiguous:
                a = a.contiguous()
            self.keep.append(a)
            return ctypes.c_void_p(a.data_ptr())
        a = self.np.asarray(a)
        if dtype is not None:
            a = a.astype(dtype, copy=False)
        if contiguous:
            a = self.np.ascontiguousarray(a)
        self.keep.append(a)
        return ctypes.c_void_p(a.ctypes.data)

    def f32(self, a, count=None, name="array"):
        """fp32 pointer of `a`; with `count`, `a` must hold exactly that many
        elements (the C call would read `count` of them)."""
        self.need(a, count, name)
        return self.ptr(a, self.T.float32 if self.torch else self.np.float32)

    def need(self, a, count, name):
        if a is None or count is None:
            return
        size = int(a.numel()) if _is_torch(a) else int(self.np.asarray(a).size)
        if size != count:
            raise CulossValueError(1, f"{name} has {size} elements, expected {count}")

    def targets(self, t, count=None):
        self.need(t, count, "targets")
        if self.torch:
            t = t if _is_torch(t) else self.T.as_tensor(t, device=self.device)
            kind = I32 if t.dtype == self.T.int32 else I64
            return self.ptr(t, None if kind == I32 else self.T.int64), kind
        t = self.np.asarray(t)
        kind = I32 if t.dtype == self.np.int32 else I64
        return self.ptr(t, None if kind == I32 else self.np.int64), kind

    def empty_f32(self, n):
        if self.torch:
            return self.T.empty(n, dtype=self.T.float32, device=self.device)
        return self.np.empty(n, dtype=self.np.float32)

    def empty_like(self, a):
        if self.torch:
            return self.T.empty_like(a, memory_format=self.T.contiguous_format)
        return self.np.empty_like(a)

    def empty_rows(self, n, c, ld, like):
        """[n, c] with row stride ld (the layout culoss writes gradients in)."""
        if self.torch:
            return self.T.empty((n, ld), dtype=like.dtype, device=self.device)[:, :c]
        return self.np.empty((n, ld), dtype=like.dtype)[:, :c]

    def finish(self, loss, reduction):
        return loss.reshape(()) if reduction != "none" else loss


def _red(r):
    if r not in _RED:
        raise CulossError(1, f"reduction must be one of {sorted(_RED)}, got {r!r}")
    return _RED[r]


def _rows(call, x):
    """(n, c, ld, x) for a 2-D input whose rows may be strided (unit column stride)."""
    if x.ndim != 2:
        raise CulossError(1, f"expected a 2-D [n, c] input, got shape {tuple(x.shape)}")
    if call.torch:
        if x.stride(1) != 1:
            x = x.contiguous()
        return x.shape[0], x.shape[1], x.stride(0) if x.shape[0] > 1 else x.shape[1], x
    st = x.strides
    if st[1] != x.itemsize or st[0] % x.itemsize:
        x = call.np.ascontiguousarray(x)
        st = x.strides
    return x.shape[0], x.shape[1], st[0] // x.itemsize if x.shape[0] > 1 else x.shape[1], x


def _strided_ptr(call, x):
    call.keep.append(x)
    return ctypes.c_void_p(x.data_ptr() if call.torch else x.ctypes.data)

# --------------------------------------------------------------------------- cross-entropy family


def _ce_opts(call, reduction, ignore_index, label_smoothing, class_weight, z_loss,
             logit_softcap, normalizer, c=None):
    o = _CE()
    _clib.culoss_cross_entropy_options_init(ctypes.byref(o))
    o.reduction = _red(reduction)
    o.ignore_index = int(ignore_index)
    o.label_smoothing = float(label_smoothing)
    o.class_weight = call.f32(class_weight, c, "class_weight")
    o.z_loss = float(z_loss)
    o.logit_softcap = float(logit_softcap)
    if normalizer is not None:
        o.normalizer = call.f32(call.np.array([normalizer], dtype="float32") if not call.torch
                                else call.T.tensor([float(normalizer)], device=call.device))
    return o


def _ce_like(fn, logits, second, *, soft, reduction, ignore_index, label_smoothing,
             class_weight, z_loss, logit_softcap, normalizer, grad, grad_loss, inplace, ctx):
    call = _Call(logits, ctx)
    n, c, ld, logits = _rows(call, logits)
    dt = call.dtype(logits)
    o = _ce_opts(call, reduction, ignore_index, label_smoothing, class_weight, z_loss,
                 logit_softcap, normalizer, c)
    loss = call.empty_f32(n if reduction == "none" else 1)
    g = None
    if grad:  # the gradient has the logits' row stride
        g = logits if inplace else call.empty_rows(n, c, ld, logits)
    gptr = _strided_ptr(call, g) if g is not None else None
    glp = call.f32(grad_loss, n if reduction == "none" else 1, "grad_loss")
    xptr = _strided_ptr(call, logits)
    if soft:
        if tuple(second.shape) != tuple(logits.shape):
            raise CulossError(1, "target_probs must have the logits' shape")
        y = second if call.torch else call.np.asarray(second)
        y = y.to(logits.dtype) if call.torch else y.astype(logits.dtype)
        if (call.torch and y.stride() != logits.stride()) or (not call.torch and y.strides != logits.strides):
            raise CulossError(1, "target_probs must have the logits' row stride")
        _check(_clib.culoss_cross_entropy_soft(call.ctx._h, ctypes.byref(o), n, c, dt, xptr, ld,
                                              _strided_ptr(call, y), call.ptr(loss, contiguous=False),
                                              gptr, glp))
    else:
        tp, tk = call.targets(second, n)
        _check(getattr(_clib, fn)(call.ctx._h, ctypes.byref(o), n, c, dt, xptr, ld, tk, tp,
                                 call.ptr(loss, contiguous=False), gptr, glp))
    if not call.torch:
        call.ctx.synchronize()
    return call.finish(loss, reduction), g


def cross_entropy(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                  class_weight=None, z_loss=0.0, logit_softcap=0.0, normalizer=None, grad=True,
                  grad_loss=None, inplace=False, ctx=None):
    """Softmax cross-entropy with class-index targets (culoss_cross_entropy)."""
    return _ce_like("culoss_cross_entropy", logits, targets, soft=False, reduction=reduction,
                    ignore_index=ignore_index, label_smoothing=label_smoothing,
                    class_weight=class_weight, z_loss=z_loss, logit_softcap=logit_softcap,
                    normalizer=normalizer, grad=grad, grad_loss=grad_loss, inplace=inplace, ctx=ctx)


def cross_entropy_soft(logits, target_probs, *, reduction="mean", label_smoothing=0.0,
                       class_weight=None, z_loss=0.0, logit_softcap=0.0, normalizer=None,
                       grad=True, grad_loss=None, inplace=False, ctx=None):
    """Softmax cross-entropy with probability targets (culoss_cross_entropy_soft)."""
    return _ce_like(None, logits, target_probs, soft=True, reduction=reduction, ignore_index=-100,
                    label_smoothing=label_smoothing, class_weight=class_weight, z_loss=z_loss,
                    logit_softcap=logit_softcap, normalizer=normalizer, grad=grad,
                    grad_loss=grad_loss, inplace=inplace, ctx=ctx)


def nll(logprobs, targets, *, reduction="mean", ignore_index=-100, class_weight=None,
        normalizer=None, grad=True, grad_loss=None, inplace=False, ctx=None):
    """Negative log-likelihood over log-probabilities (culoss_nll)."""
    return _ce_like("culoss_nll", logprobs, targets, soft=False, reduction=reduction,
                    ignore_index=ignore_index, label_smoothing=0.0, class_weight=class_weight,
                    z_loss=0.0, logit_softcap=0.0, normalizer=normalizer, grad=grad,
                    grad_loss=grad_loss, inplace=inplace, ctx=ctx)

# --------------------------------------------------------------------------- elementwise


def _ew(fn, opts, x, y, *, shape2d, reduction, grad, grad_loss, inplace, ctx):
    call = _Call(x, ctx)
    dt = call.dtype(x)
    if tuple(y.shape) != tuple(x.shape):
        raise CulossError(1, f"target shape {tuple(y.shape)} differs from input shape {tuple(x.shape)}")
    xp = call.ptr(x)
    x = call.keep[-1]
    yp = call.ptr(y, x.dtype)
    m = int(x.numel() if call.torch else x.size)
    loss = call.empty_f32(m if reduction == "none" else 1)
    g = (x if inplace else call.empty_like(x)) if grad else None
    args = [call.ctx._h, ctypes.byref(opts)]
    if shape2d:
        n = int(x.shape[0]) if x.ndim >= 1 else 1
        c = m // n if n else 1
        args += [n, max(c, 1)]
    else:
        args += [m]
    args += [dt, xp, yp, call.ptr(loss, contiguous=False),
             _strided_ptr(call, g) if g is not None else None,
             call.f32(grad_loss, m if reduction == "none" else 1, "grad_loss")]
    _check(getattr(_clib, fn)(*args))
    if not call.torch:
        call.ctx.synchronize()
    if reduction == "none":
        loss = loss.reshape(tuple(x.shape))
    return call.finish(loss, reduction), g


def bce_with_logits(logits, targets, *, reduction="mean", weight=None, pos_weight=None,
                    grad=True, grad_loss=None, inplace=False, ctx=None):
    """Binary cross-entropy on logits [n, c] (pos_weight: [c])."""
    call = _Call(logits, ctx)
    shape = tuple(logits.shape)
    m = 1
    for dim in shape:
        m *= int(dim)
    n = int(shape[0]) if len(shape) >= 1 else 1
    c = max(m // n, 1) if n else 1  # _ew's [n, c] view of the input
    o = _BCE(_red(reduction), call.f32(weight, m, "weight"), call.f32(pos_weight, c, "pos_weight"))
    r = _ew("culoss_bce_with_logits", o, logits, targets, shape2d=True, reduction=reduction,
            grad=grad, grad_loss=grad_loss, inplace=inplace, ctx=call.ctx)
    return r


def bce(probs, targets, *, reduction="mean", weight=None, grad=True, grad_loss=None,
        inplace=False, ctx=None):
    """Binary cross-entropy on probabilities in [0, 1]."""
    call = _Call(probs, ctx)
    m = 1
    for dim in probs.shape:
        m *= int(dim)
    o = _BCE(_red(reduction), call.f32(weight, m, "weight"), None)
    return _ew("culoss_bce", o, probs, targets, shape2d=True, reduction=reduction, grad=grad,
               grad_loss=grad_loss, inplace=inplace, ctx=call.ctx)


def hinge(scores, targets, *, reduction="mean", margin=1.0, squared=False, grad=True,
          grad_loss=None, inplace=False, ctx=None):
    """Binary hinge max(0, margin - y f) (or squared) with y in {-1, +1}."""
    o = _Hinge(_red(reduction), float(margin), int(bool(squared)))
    return _ew("culoss_hinge", o, scores, targets, shape2d=False, reduction=reduction, grad=grad,
               grad_loss=grad_loss, inplace=inplace, ctx=ctx)


def _regression(fn, x, y, reduction, delta, beta, grad, grad_loss, inplace, ctx):
    o = _Reg(_red(reduction), float(delta), float(beta))
    return _ew(fn, o, x, y, shape2d=False, reduction=reduction, grad=grad, grad_loss=grad_loss,
               inplace=inplace, ctx=ctx)


def mse(input, target, *, reduction="mean", grad=True, grad_loss=None, inplace=False, ctx=None):
    """Mean squared error."""
    return _regression("culoss_mse", input, target, reduction, 1.0, 1.0, grad, grad_loss, inplace, ctx)


def l1(input, target, *, reduction="mean", grad=True, grad_loss=None, inplace=False, ctx=None):
    """L1 / mean absolute error (subgradient 0 at 0)."""
    return _regression("culoss_l1", input, target, reduction, 1.0, 1.0, grad, grad_loss, inplace, ctx)


def huber(input, target, *, reduction="mean", delta=1.0, grad=True, grad_loss=None,
          inplace=False, ctx=None):
    """Huber loss (delta > 0)."""
    return _regression("culoss_huber", input, target, reduction, delta, 1.0, grad, grad_loss,
                       inplace, ctx)


def smooth_l1(input, target, *, reduction="mean", beta=1.0, grad=True, grad_loss=None,
              inplace=False, ctx=None):
    """Smooth L1 (beta >= 0; beta == 0 is L1)."""
    return _regression("culoss_smooth_l1", input, target, reduction, 1.0, beta, grad, grad_loss,
                       inplace, ctx)


def kl_div(input_logprobs, target, *, reduction="mean", log_target=False, grad=True,
           grad_loss=None, inplace=False, ctx=None):
    """KL divergence with log-probability input [n, c]; reduction may be "batchmean"."""
    o = _KL(_red(reduction), int(bool(log_target)))
    return _ew("culoss_kl_div", o, input_logprobs, target, shape2d=True, reduction=reduction,
               grad=grad, grad_loss=grad_loss, inplace=inplace, ctx=ctx)


def multi_margin(scores, targets, *, reduction="mean", p=1, margin=1.0, class_weight=None,
                 grad=True, grad_loss=None, inplace=False, ctx=None):
    """Multi-class hinge (torch.nn.functional.multi_margin_loss) over rows [n, c]."""
    call = _Call(scores, ctx)
    n, c, ld, scores = _rows(call, scores)
    dt = call.dtype(scores)
    o = _MM(_red(reduction), int(p), float(margin), call.f32(class_weight, c, "class_weight"))
    loss = call.empty_f32(n if reduction == "none" else 1)
    g = None
    if grad:
        g = scores if inplace else call.empty_rows(n, c, ld, scores)
    tp, tk = call.targets(targets, n)
    _check(_clib.culoss_multi_margin(call.ctx._h, ctypes.byref(o), n, c, dt,
                                    _strided_ptr(call, scores), ld, tk, tp,
                                    call.ptr(loss, contiguous=False),
                                    _strided_ptr(call, g) if g is not None else None,
                                    call.f32(grad_loss, n if reduction == "none" else 1,
                                             "grad_loss")))
    if not call.torch:
        call.ctx.synchronize()
    return call.finish(loss, reduction), g


def linear_cross_entropy(hidden, weight, targets, bias=None, *, reduction="mean",
                         ignore_index=-100, label_smoothing=0.0, class_weight=None, z_loss=0.0,
                         logit_softcap=0.0, normalizer=None, grad=True, grad_loss=None, ctx=None):
    """Fused linear + cross-entropy over logits = hidden @ weight.T (+ bias),
    never materialised whole. Returns (loss, grad_hidden, grad_weight,
    grad_bias) (gradients None with grad=False; grad_bias None without bias).
    The workspace is allocated here (a torch uint8 tensor on the GPU)."""
    call = _Call(hidden, ctx)
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise CulossError(1, f"expected hidden [n, d] and weight [v, d], got {tuple(hidden.shape)} "
                             f"and {tuple(weight.shape)}")
    n, d = int(hidden.shape[0]), int(hidden.shape[1])
    v = int(weight.shape[0])
    dt = call.dtype(hidden)
    hp = call.ptr(hidden)
    hidden = call.keep[-1]
    wp = call.ptr(weight, hidden.dtype)
    weight = call.keep[-1]
    call.need(bias, v, "bias")
    bp = call.ptr(bias, hidden.dtype) if bias is not None else None
    o = _ce_opts(call, reduction, ignore_index, label_smoothing, class_weight, z_loss,
                 logit_softcap, normalizer, v)
    tp, tk = call.targets(targets, n)
    loss = call.empty_f32(n if reduction == "none" else 1)
    gh = call.empty_like(hidden) if grad else None
    gw = call.empty_like(weight) if grad else None
    gb = None
    if grad and bias is not None:
        gb = call.empty_like(bias if call.torch else call.np.asarray(bias, dtype=hidden.dtype))
    size = ctypes.c_size_t()
    _check(_clib.culoss_linear_cross_entropy_workspace_size(call.ctx._h, n, d, v, dt, ctypes.byref(size)))
    ws, wsp = None, None
    if call.torch and size.value:
        ws = call.T.empty(size.value, dtype=call.T.uint8, device=call.device)
        wsp = ctypes.c_void_p(ws.data_ptr())
    _check(_clib.culoss_linear_cross_entropy(
        call.ctx._h, ctypes.byref(o), n, d, v, dt, hp, wp, bp, tk, tp,
        call.ptr(loss, contiguous=False),
        _strided_ptr(call, gh) if gh is not None else None,
        _strided_ptr(call, gw) if gw is not None else None,
        _strided_ptr(call, gb) if gb is not None else None,
        call.f32(grad_loss, n if reduction == "none" else 1, "grad_loss"), wsp,
        size.value if ws is not None else 0))
    if not call.torch:
        call.ctx.synchronize()
    return call.finish(loss, reduction), gh, gw, gb

# --------------------------------------------------------------------------- torch autograd


def _make_function():
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised where torch is absent
        return None

    class CrossEntropyFunction(torch.autograd.Function):
        """Drop-in cross-entropy for a PyTorch training step: the forward pass
        runs culoss's fused kernel (loss and gradient in one pass) and the
        backward scales the saved gradient by the upstream gradient.

        ``loss = CrossEntropyFunction.apply(logits, targets, options_dict)``
        """

        @staticmethod
        def forward(ctx, logits, targets, options=None):
            opts = dict(options or {})
            opts.setdefault("reduction", "mean")
            if opts["reduction"] != "mean" and opts["reduction"] != "sum":
                raise CulossError(1, "CrossEntropyFunction supports mean and sum")
            loss, g = cross_entropy(logits.detach(), targets, grad=logits.requires_grad, **opts)
            ctx.save_for_backward(g if g is not None else torch.empty(0))
            return loss

        @staticmethod
        def backward(ctx, grad_output):
            (g,) = ctx.saved_tensors
            return g * grad_output.to(g.dtype), None, None

    return CrossEntropyFunction


CrossEntropyFunction = _make_function()
