"""Drop-in replacements for ``torch.nn.functional``'s losses (PyTorch 2.15):
the same names, positional order, keyword names, defaults and semantics, run
by culoss's fused kernels (CUDA tensors) or its CPU reference (CPU tensors).

What differs from ``torch.nn.functional``, on purpose:

* float64 and complex inputs, which the C library lacks, run ``torch``'s own
  op (a one-time warning says so); they are never downcast.
* culoss extras are keyword-only and off by default: ``z_loss``,
  ``logit_softcap``, ``normalizer`` (divide ``mean`` by this count instead of
  the weight sum: a float or a 1-element tensor) and ``inplace_backward``.
* class-index targets may be int32 as well as int64.
* a class target outside ``[0, C)`` on a CUDA tensor does not assert on the
  device: that row's loss is NaN and :func:`culoss.torch.synchronize` raises.
  On the CPU the call raises ``IndexError`` as torch does.
* ignored rows get a zero gradient even when their logits hold NaN.

Memory: a loss and its gradient are computed in one pass in the forward; the
gradient (input-sized) is what lives until the backward. Layouts the C calls
cannot read directly (a class dimension that is not last, as in K-dimensional
cross-entropy ``[N, C, d1, ...]``) cost one transposed copy of the input.
"""
import math
import warnings

import torch

from . import _ops

NONE, SUM, MEAN, BATCHMEAN = _ops.NONE, _ops.SUM, _ops.MEAN, _ops.BATCHMEAN
_RED = {"none": NONE, "sum": SUM, "mean": MEAN}
_RED_NAME = {v: k for k, v in _RED.items()}
_C_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned = set()

__all__ = [
    "cross_entropy", "nll_loss", "binary_cross_entropy_with_logits", "binary_cross_entropy",
    "multi_margin_loss", "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "kl_div",
    "hinge_loss", "linear_cross_entropy", "hinge_embedding_loss", "soft_margin_loss",
    "poisson_nll_loss", "sigmoid_focal_loss", "margin_ranking_loss", "gaussian_nll_loss",
    "cosine_embedding_loss", "triplet_margin_loss", "multilabel_soft_margin_loss",
    "multilabel_margin_loss", "info_nce_loss", "generalized_jsd_loss", "tvd_loss",
    "linear_generalized_jsd_loss",
]

# --------------------------------------------------------------------------- shared checks


def _reduction(reduction, size_average=None, reduce=None, batchmean=False):
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce, emit_warning=False)
    if reduction in _RED:
        return _RED[reduction]
    if batchmean and reduction == "batchmean":
        return BATCHMEAN
    raise ValueError(f"{reduction} is not a valid value for reduction")


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _native(fname, input):
    """True when `input` is a dtype culoss runs; False for float64/complex (the
    caller runs torch's op; warned once). Integer or bool inputs raise."""
    _tensor("input", input)
    if input.dtype in _C_DTYPES:
        return True
    if input.dtype == torch.float64 or input.is_complex():
        if fname not in _warned and not torch.compiler.is_compiling():
            _warned.add(fname)
            warnings.warn(f"culoss.torch.{fname}: {input.dtype} is not a culoss dtype (float32, "
                          "float16, bfloat16); running torch.nn.functional's op instead",
                          stacklevel=3)
        return False
    raise TypeError(f"{fname}: input must be a floating-point tensor (float32, float16, "
                    f"bfloat16), got {input.dtype}")


def _device(fname, input, **others):
    if input.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{fname}: culoss runs on CPU and CUDA tensors, input is on "
                         f"{input.device}")
    for name, t in others.items():
        if t is not None and isinstance(t, torch.Tensor) and t.device != input.device:
            raise ValueError(f"{fname}: {name} is on {t.device}, input on {input.device}: all "
                             "tensors must be on one device")


def _no_grad_for(fname, **tensors):
    for name, t in tensors.items():
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{fname}: {name} requires grad, but the loss is not differentiable "
                             f"with respect to {name} (as in torch.nn.functional); detach it")


def _wants_grad(*ts):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _out_dtype(loss, input):
    """torch's loss dtype: the input's, or float32 under autocast (where torch
    runs losses in float32)."""
    if torch.is_autocast_enabled(input.device.type):
        return loss
    return loss.to(input.dtype)


def _class_weight(fname, weight, c, input):
    if weight is None:
        return None
    _tensor("weight", weight)
    _device(fname, input, weight=weight)
    if weight.dim() != 1 or weight.shape[0] != c:
        raise ValueError(f"{fname}: weight must be a 1-D tensor of {c} elements (one per class), "
                         f"got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{fname}: weight must be floating point, got {weight.dtype}")
    _no_grad_for(fname, weight=weight)
    return weight.detach().to(torch.float32).contiguous()


def _normalizer(fname, normalizer, input):
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        _device(fname, input, normalizer=normalizer)
        if normalizer.numel() != 1:
            raise ValueError(f"{fname}: normalizer must hold one element, got shape "
                             f"{tuple(normalizer.shape)}")
        return normalizer.detach().to(torch.float32).reshape(1)
    return torch.full((1,), float(normalizer), dtype=torch.float32, device=input.device)


def _index_target(fname, target, shape):
    _tensor("target", target)
    if target.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"{fname}: target must hold class indices (int64 or int32), got "
                        f"{target.dtype}")
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"{fname}: target has shape {tuple(target.shape)}, expected "
                         f"{tuple(shape)} for this input")
    if target.dtype == torch.uint8:
        target = target.to(torch.int64)
    return target.reshape(-1).contiguous()


def _rows(input):
    """input [n, c] in a layout the C calls read without a copy when possible."""
    if input.shape[1] > 0 and input.stride(1) == 1 and (
            input.shape[0] <= 1 or input.stride(0) >= input.shape[1]):
        return input
    return input.contiguous()


def _class_last(input):
    """[N, C, d1, ...] (or [C], [N, C]) as rows [rows, C] with C last."""
    if input.dim() == 1:
        return input.unsqueeze(0)
    if input.dim() == 2:
        return _rows(input)
    return input.movedim(1, -1).reshape(-1, input.shape[1])


def _batch_shape(input):
    """The per-row loss shape of a class-at-dim-1 input."""
    if input.dim() == 1:
        return ()
    return (input.shape[0],) + tuple(input.shape[2:])


def _smoothing(fname, label_smoothing):
    eps = float(label_smoothing)
    if eps > 1.0:
        raise ValueError(f"{fname}: label_smoothing must be between 0.0 and 1.0. Got: {eps}")
    return eps if eps > 0.0 else 0.0  # torch: negative (or NaN) smoothing means none

# --------------------------------------------------------------------------- cross-entropy


class _InplaceCrossEntropy(torch.autograd.Function):
    """inplace_backward=True (eager): the fused pass writes the gradient over
    the logits' storage, so no gradient buffer is allocated. The logits'
    version counter is bumped, so an op that saved them for its own backward
    fails loudly instead of reading gradients."""

    @staticmethod
    def forward(ctx, x, t, w, normalizer, reduction, ignore_index, eps, z_loss, softcap):
        loss = _ops.cross_entropy_call(x, t, w, normalizer, reduction, ignore_index, eps, z_loss,
                                       softcap, grad=x)
        torch.autograd.graph.increment_version(x)
        ctx.reduction = reduction
        ctx.save_for_backward(x.detach())
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (g,) = ctx.saved_tensors
        return (_ops._scaled(g, grad_loss, ctx.reduction, inplace=True),) + (None,) * 8


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, logit_softcap=0.0,
                  normalizer=None, inplace_backward=False):
    """Softmax cross-entropy, as ``torch.nn.functional.cross_entropy``.

    Shapes: input ``[C]``, ``[N, C]`` or ``[N, C, d1, ...]``; target class
    indices ``[]``, ``[N]`` or ``[N, d1, ...]`` (int64/int32), or
    probabilities of the input's shape (floating; then ``ignore_index`` must
    stay negative). Returns the loss in the input's dtype (float32 under
    autocast); ``[N, d1, ...]`` for ``reduction="none"``.

    culoss extras (keyword-only): ``z_loss`` adds ``z_loss * lse**2`` per
    non-ignored row; ``logit_softcap`` applies ``cap * tanh(x / cap)`` first;
    ``normalizer`` replaces the ``mean`` denominator; ``inplace_backward``
    writes the gradient over ``input`` (eager mode; only when nothing else
    needs the logits afterwards, e.g. straight out of a linear layer; ignored
    under torch.compile).

    Example::

        >>> logits = torch.randn(8, 32000, requires_grad=True)
        >>> loss = cross_entropy(logits, torch.randint(32000, (8,)), label_smoothing=0.1)
        >>> loss.backward()
    """
    fname = "cross_entropy"
    red = _reduction(reduction, size_average, reduce)
    _tensor("target", target)
    if not _native(fname, input):
        if z_loss or logit_softcap or normalizer is not None:
            raise TypeError(f"{fname}: z_loss, logit_softcap and normalizer need a float32, "
                            f"float16 or bfloat16 input, got {input.dtype}")
        return torch.nn.functional.cross_entropy(input, target, weight, None, ignore_index, None,
                                                 reduction, label_smoothing)
    _device(fname, input, target=target, weight=weight)
    if input.dim() == 0:
        raise ValueError(f"{fname}: input must have at least one dimension (classes)")
    c = input.shape[0] if input.dim() == 1 else input.shape[1]
    eps = _smoothing(fname, label_smoothing)
    soft = tuple(target.shape) == tuple(input.shape) and target.is_floating_point()
    w = _class_weight(fname, weight, c, input)
    norm = _normalizer(fname, normalizer, input)
    z_loss, logit_softcap = float(z_loss), float(logit_softcap)
    x = _class_last(input)
    if soft:
        if ignore_index >= 0:
            raise ValueError(f"{fname}: ignore_index is not supported for floating point target")
        t = _class_last(target.to(input.dtype))
        compute = _wants_grad(input, target)
    else:
        t = _index_target(fname, target, _batch_shape(input))
        compute = _wants_grad(input)
    if inplace_backward and compute and not soft and not torch.compiler.is_compiling():
        # x is input itself (or a view of it) for [C] and [N, C]; the
        # transposed copy of a K-dimensional input otherwise
        loss = _InplaceCrossEntropy.apply(x, t, w, norm, red, int(ignore_index), eps, z_loss,
                                          logit_softcap)
    else:
        loss, _ = torch.ops.culoss.cross_entropy(x, t, w, norm, red, int(ignore_index), eps,
                                                 z_loss, logit_softcap, compute)
    if red == NONE:
        loss = loss.reshape(_batch_shape(input))
    return _out_dtype(loss, input)


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean", *, normalizer=None):
    """Negative log-likelihood over log-probabilities, as
    ``torch.nn.functional.nll_loss`` (input ``[C]``, ``[N, C]`` or
    ``[N, C, d1, ...]``; class-index target)."""
    fname = "nll_loss"
    red = _reduction(reduction, size_average, reduce)
    _tensor("target", target)
    if not _native(fname, input):
        if normalizer is not None:
            raise TypeError(f"{fname}: normalizer needs a float32, float16 or bfloat16 input")
        return torch.nn.functional.nll_loss(input, target, weight, None, ignore_index, None,
                                            reduction)
    _device(fname, input, target=target, weight=weight)
    if input.dim() == 0:
        raise ValueError(f"{fname}: input must have at least one dimension (classes)")
    c = input.shape[0] if input.dim() == 1 else input.shape[1]
    w = _class_weight(fname, weight, c, input)
    t = _index_target(fname, target, _batch_shape(input))
    loss, _ = torch.ops.culoss.nll_loss(_class_last(input), t, w,
                                        _normalizer(fname, normalizer, input), red,
                                        int(ignore_index), _wants_grad(input))
    if red == NONE:
        loss = loss.reshape(_batch_shape(input))
    return _out_dtype(loss, input)


def multi_margin_loss(input, target, p=1, margin=1.0, weight=None, size_average=None,
                      reduce=None, reduction="mean"):
    """Multi-class hinge, as ``torch.nn.functional.multi_margin_loss``: input
    ``[]``, ``[C]`` or ``[N, C]``, int64 class targets (one per row)."""
    fname = "multi_margin_loss"
    red = _reduction(reduction, size_average, reduce)
    if p != 1 and p != 2:
        raise ValueError("only p == 1 and p == 2 supported")
    if weight is not None and _tensor("weight", weight).dim() != 1:
        raise ValueError("weight must be one-dimensional")
    _tensor("target", target)
    if not _native(fname, input):
        return torch.nn.functional.multi_margin_loss(input, target, p, margin, weight,
                                                     reduction=reduction)
    _device(fname, input, target=target, weight=weight)
    if input.dim() > 2 or (input.dim() >= 1 and input.shape[-1] == 0):
        raise ValueError(f"{fname}: expected a non-empty vector or matrix with optional 0-dim "
                         f"batch size, got input of shape {tuple(input.shape)}")
    x = input.reshape(1, 1) if input.dim() == 0 else _class_last(input)
    n, c = x.shape
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fname}: target must hold class indices (int64), got {target.dtype}")
    if target.dim() > 1 or target.numel() != n:
        raise ValueError(f"{fname}: target tensor should be 1-D with size equal to the number of "
                         f"rows ({n}), got shape {tuple(target.shape)}")
    w = _class_weight(fname, weight, c, input)
    loss, _ = torch.ops.culoss.multi_margin_loss(x, target.reshape(-1).contiguous(), w, red,
                                                 int(p), float(margin), _wants_grad(input))
    if red == NONE:
        loss = loss.reshape(target.shape if input.dim() < 2 else (n,))
    return _out_dtype(loss, input)

# --------------------------------------------------------------------------- elementwise


def _same_size(fname, input, target):
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(f"{fname}: target size ({tuple(target.shape)}) must be the same as "
                         f"input size ({tuple(input.shape)})")


def _broadcast_pair(input, target):
    """torch's broadcasting of mismatched input/target sizes, with its warning."""
    if tuple(target.shape) != tuple(input.shape):
        if not torch.compiler.is_compiling():
            warnings.warn(f"Using a target size ({target.size()}) that is different to the input "
                          f"size ({input.size()}). This will likely lead to incorrect results "
                          "due to broadcasting. Please ensure they have the same size.",
                          stacklevel=3)
        input, target = torch.broadcast_tensors(input, target)
    return input, target


def _elementwise_weight(fname, weight, input):
    """An elementwise weight broadcast to the input: [m] float32."""
    if weight is None:
        return None
    return _broadcast_f32(fname, "weight", weight, input).contiguous()


def _broadcast_f32(fname, name, t, input):
    """A weight tensor (not differentiated, as in torch) as float32, broadcast
    to the input's shape (a view), or ValueError naming it."""
    _tensor(name, t)
    _device(fname, input, **{name: t})
    _no_grad_for(fname, **{name: t})
    try:
        return t.detach().to(torch.float32).expand(input.shape)
    except RuntimeError as e:
        raise ValueError(f"{fname}: {name} of shape {tuple(t.shape)} does not broadcast to the "
                         f"input's shape {tuple(input.shape)}") from e


def _as_rows(t, n, c):
    return t.reshape(n, c).contiguous()


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """Binary cross-entropy on logits, as
    ``torch.nn.functional.binary_cross_entropy_with_logits``: any shape;
    ``weight`` broadcasts to the input, ``pos_weight`` to it along the last
    dimension (or any broadcastable shape)."""
    fname = "binary_cross_entropy_with_logits"
    red = _reduction(reduction, size_average, reduce)
    _tensor("target", target)
    if not _native(fname, input):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            input, target, weight, reduction=reduction, pos_weight=pos_weight)
    _device(fname, input, target=target, weight=weight, pos_weight=pos_weight)
    _same_size(fname, input, target)
    if not target.is_floating_point():
        raise TypeError(f"{fname}: target must be floating point, got {target.dtype}")
    m = input.numel()
    c = input.shape[-1] if input.dim() >= 1 else 1
    pw = None
    if pos_weight is not None:
        full = _broadcast_f32(fname, "pos_weight", pos_weight, input)
        if pos_weight.dim() <= 1 and input.dim() >= 1:  # one value per class: [c]
            pw = full.reshape(-1, c)[0].contiguous() if m else full.reshape(-1)[:c].contiguous()
        else:  # any other broadcast: one row of m elements
            c = max(m, 1)
            pw = full.reshape(-1).contiguous()
    n = m // c if c else 0
    if m == 0:
        n, c = 0, max(c, 1)
    w = _elementwise_weight(fname, weight, input)
    x2 = _as_rows(input, n, c)
    y2 = _as_rows(target.to(input.dtype), n, c)
    loss, _ = torch.ops.culoss.binary_cross_entropy(x2, y2, w, pw, red, True,
                                                    _wants_grad(input, target))
    if red == NONE:
        loss = loss.reshape(input.shape)
    return _out_dtype(loss, input)


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    """Binary cross-entropy on probabilities, as
    ``torch.nn.functional.binary_cross_entropy`` (inputs and, on the CPU,
    targets outside [0, 1] raise; on CUDA they give NaN and
    :func:`culoss.torch.synchronize` raises)."""
    fname = "binary_cross_entropy"
    red = _reduction(reduction, size_average, reduce)
    _tensor("target", target)
    if not _native(fname, input):
        return torch.nn.functional.binary_cross_entropy(input, target, weight,
                                                        reduction=reduction)
    _device(fname, input, target=target, weight=weight)
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(f"Using a target size ({target.size()}) that is different to the input "
                         f"size ({input.size()}) is deprecated. Please ensure they have the same "
                         "size.")
    if not target.is_floating_point():
        raise TypeError(f"{fname}: target must be floating point, got {target.dtype}")
    m = input.numel()
    w = _elementwise_weight(fname, weight, input)
    x2 = _as_rows(input, 1 if m else 0, max(m, 1))
    y2 = _as_rows(target.to(input.dtype), 1 if m else 0, max(m, 1))
    loss, _ = torch.ops.culoss.binary_cross_entropy(x2, y2, w, None, red, False,
                                                    _wants_grad(input, target))
    if red == NONE:
        loss = loss.reshape(input.shape)
    return _out_dtype(loss, input)


def _regression(fname, kind, input, target, red, delta=1.0, beta=1.0):
    _tensor("target", target)
    _device(fname, input, target=target)
    if not target.is_floating_point():
        raise TypeError(f"{fname}: target must be floating point, got {target.dtype}")
    x, y = _broadcast_pair(input, target.to(input.dtype))
    loss, _ = torch.ops.culoss.regression(x.contiguous(), y.contiguous(), kind, red, float(delta),
                                          float(beta), _wants_grad(x, y))
    return loss


def _weighted(fname, loss_none, weight, input, red, mean_by_weight):
    """torch 2.15's elementwise weight for mse/l1/huber: applied to the
    per-element loss (torch ops, so the weight gets its gradient too)."""
    _tensor("weight", weight)
    _device(fname, input, weight=weight)
    if tuple(weight.shape) != tuple(input.shape):
        raise ValueError("Weights and input must have the same size.")
    wl = loss_none * weight
    if red == NONE:
        return wl
    if red == SUM:
        return wl.sum()
    return wl.sum() / weight.sum() if mean_by_weight else wl.mean()


def _regression_loss(fname, kind, input, target, reduction, size_average, reduce, weight,
                     mean_by_weight, torch_call, delta=1.0, beta=1.0):
    red = _reduction(reduction, size_average, reduce)
    if not _native(fname, input):
        if weight is None:
            return torch_call(reduction)
        # torch < 2.6 has no weight here: the per-element loss, then torch 2.15's weighting
        return _weighted(fname, torch_call("none"), weight, input, red, mean_by_weight)
    if weight is None:
        return _out_dtype(_regression(fname, kind, input, target, red, delta, beta), input)
    loss = _regression(fname, kind, input, target, NONE, delta, beta)
    return _weighted(fname, _out_dtype(loss, input), weight, input, red, mean_by_weight)


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Mean squared error, as ``torch.nn.functional.mse_loss`` (broadcasting
    mismatched sizes with torch's warning; ``weight``: elementwise, ``mean``
    divides by its sum)."""
    return _regression_loss("mse_loss", 0, input, target, reduction, size_average, reduce,
                            weight, True, lambda r: torch.nn.functional.mse_loss(input, target, reduction=r))


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Mean absolute error, as ``torch.nn.functional.l1_loss`` (subgradient
    0 at 0; ``weight``: elementwise, ``mean`` divides by its sum)."""
    return _regression_loss("l1_loss", 1, input, target, reduction, size_average, reduce,
                            weight, True, lambda r: torch.nn.functional.l1_loss(input, target, reduction=r))


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """Huber loss, as ``torch.nn.functional.huber_loss`` (``delta`` > 0;
    ``weight``: elementwise, ``mean`` is the mean of the weighted losses)."""
    if not delta > 0:
        raise ValueError("huber_loss does not support non-positive values for delta.")
    return _regression_loss("huber_loss", 2, input, target, reduction, None, None, weight, False,
                            lambda r: torch.nn.functional.huber_loss(input, target, r, delta),
                            delta=delta)


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """Smooth L1, as ``torch.nn.functional.smooth_l1_loss`` (``beta`` >= 0;
    ``beta == 0`` is exactly L1)."""
    if beta < 0:
        raise ValueError("smooth_l1_loss does not support negative values for beta.")
    return _regression_loss("smooth_l1_loss", 3, input, target, reduction, size_average, reduce,
                            None, False, lambda r: torch.nn.functional.smooth_l1_loss(
                                input, target, reduction=r, beta=beta), beta=beta)


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """KL divergence with log-probability input, as
    ``torch.nn.functional.kl_div`` (``batchmean`` divides by ``input.size(0)``;
    ``mean`` by the element count, with torch's warning)."""
    fname = "kl_div"
    if size_average is None and reduce is None and reduction == "mean" and \
            not torch.compiler.is_compiling():
        warnings.warn("reduction: 'mean' divides the total loss by both the batch size and the "
                      "support size.'batchmean' divides only by the batch size, and aligns with "
                      "the KL div math definition.'mean' will be changed to behave the same as "
                      "'batchmean' in the next major release.", stacklevel=2)
    red = _reduction(reduction, size_average, reduce, batchmean=True)
    _tensor("target", target)
    if not _native(fname, input):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.nn.functional.kl_div(input, target, reduction=reduction,
                                              log_target=log_target)
    _device(fname, input, target=target)
    if not target.is_floating_point():
        raise TypeError(f"{fname}: target must be floating point, got {target.dtype}")
    x, y = input, target.to(input.dtype)
    if tuple(x.shape) != tuple(y.shape):
        x, y = torch.broadcast_tensors(x, y)
    m = x.numel()
    n = x.shape[0] if x.dim() >= 1 else 1
    c = m // n if n else 1
    loss, _ = torch.ops.culoss.kl_div(_as_rows(x, n, c), _as_rows(y, n, c), red, bool(log_target),
                                      _wants_grad(x, y))
    if red == NONE:
        loss = loss.reshape(x.shape)
    return _out_dtype(loss, input)


def hinge_loss(input, target, *, margin=1.0, squared=False, reduction="mean"):
    """Binary hinge ``max(0, margin - y * input)`` (``squared``: its square)
    with targets y in {-1, +1}; same shapes. culoss's own (torch has no
    binary hinge): subgradient 0 at the kink, as torch 2.15's clamp_min
    (docs/semantics.md section 0)."""
    fname = "hinge_loss"
    red = _reduction(reduction)
    _tensor("target", target)
    if not _native(fname, input):
        z = torch.clamp_min(margin - target * input, 0)
        z = z * z if squared else z
        return {NONE: z, SUM: z.sum(), MEAN: z.mean()}[red]
    _device(fname, input, target=target)
    _same_size(fname, input, target)
    _no_grad_for(fname, target=target)
    loss, _ = torch.ops.culoss.hinge(input.contiguous(), target.to(input.dtype).contiguous(), red,
                                     float(margin), bool(squared), _wants_grad(input))
    return _out_dtype(loss, input)

# --------------------------------------------------------------------------- more pointwise losses


def _pointwise(fname, kind, input, target, reduction, torch_call, a=0.0, b=0.0, flags=0,
               target_grad=False, same_shape_as_input=False):
    """culoss::pointwise with F's broadcasting and type promotion; torch's op
    where culoss does not apply: a float64 result. target_grad: True, the
    target is differentiated (culoss's backward, off the fused path); False,
    it only selects (no gradient, as torch's where); None, torch's op when
    the target needs a gradient (torch refuses it, so culoss does the same
    by running it)."""
    red = reduction
    _tensor("target", target)
    if not _native(fname, input):
        return torch_call()
    _device(fname, input, target=target)
    dt = torch.promote_types(input.dtype, target.dtype)
    if dt not in _C_DTYPES or (target_grad is None and _wants_grad(target)):
        return torch_call()
    if same_shape_as_input and torch.broadcast_shapes(input.shape, target.shape) != input.shape:
        raise RuntimeError(f"output with shape {list(input.shape)} doesn't match the broadcast "
                           f"shape {list(torch.broadcast_shapes(input.shape, target.shape))}")
    x, y = torch.broadcast_tensors(input.to(dt), target.to(dt))
    if not target_grad:  # the loss is not differentiable in the target (it only selects)
        y = y.detach()
    loss, _ = torch.ops.culoss.pointwise(x.contiguous(), y.contiguous(), kind, red, float(a),
                                         float(b), int(flags), _wants_grad(x))
    if torch.is_autocast_enabled(input.device.type):
        return loss
    return loss.to(dt)


def hinge_embedding_loss(input, target, margin=1.0, size_average=None, reduce=None,
                         reduction="mean"):
    """Hinge embedding loss, as ``torch.nn.functional.hinge_embedding_loss``:
    ``input`` where y = 1, ``max(0, margin - input)`` where y = -1, both for
    any other y; subgradient 0 at the kink (torch 2.15). Broadcasts as
    torch does; the target gets no gradient (it only selects)."""
    red = _reduction(reduction, size_average, reduce)
    return _pointwise("hinge_embedding_loss", 0, input, target, red,
                      lambda: torch.nn.functional.hinge_embedding_loss(
                          input, target, margin, reduction=_RED_NAME[red]),
                      a=margin)


def soft_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """Soft margin loss ``log(1 + exp(-y * input))``, as
    ``torch.nn.functional.soft_margin_loss``, but overflow-free: where
    ``-y * input`` is large culoss gives ``-y * input`` and gradient ``-y``,
    torch inf and NaN. A target that requires grad: torch's op (which
    refuses to differentiate it)."""
    red = _reduction(reduction, size_average, reduce)
    return _pointwise("soft_margin_loss", 1, input, target, red,
                      lambda: torch.nn.functional.soft_margin_loss(
                          input, target, reduction=_RED_NAME[red]),
                      target_grad=None, same_shape_as_input=True)


def poisson_nll_loss(input, target, log_input=True, full=False, size_average=None, eps=1e-8,
                     reduce=None, reduction="mean"):
    """Poisson negative log-likelihood, as
    ``torch.nn.functional.poisson_nll_loss`` (``log_input``: ``exp(input) -
    target * input``; else ``input - target * log(input + eps)``; ``full``:
    the Stirling term where target > 1). The target is differentiated too,
    as torch's composite does."""
    red = _reduction(reduction, size_average, reduce)
    return _pointwise("poisson_nll_loss", 2, input, target, red,
                      lambda: torch.nn.functional.poisson_nll_loss(
                          input, target, log_input, full, eps=eps, reduction=_RED_NAME[red]),
                      a=eps, flags=int(bool(log_input)) | (int(bool(full)) << 1),
                      target_grad=True)


def _focal_composite(inputs, targets, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss's formula, in torch ops."""
    p = torch.sigmoid(inputs)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """Sigmoid focal loss, as ``torchvision.ops.sigmoid_focal_loss`` (its
    signature and default ``reduction="none"``): ``alpha_t * ce * (1 -
    p_t) ** gamma`` with ``alpha < 0`` turning the weighting off; ``1 -
    p_t`` formed from ``sigmoid(-inputs)``, so confident predictions keep
    their small loss. ``gamma`` must be >= 0. The targets are differentiated
    too, as the composite does."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"Invalid Value for arg 'reduction': '{reduction} \n Supported "
                         "reduction modes: 'none', 'mean', 'sum'")
    if not gamma >= 0:
        raise ValueError(f"sigmoid_focal_loss: gamma = {gamma} must be >= 0")
    _tensor("inputs", inputs)
    _tensor("targets", targets)
    if tuple(inputs.shape) != tuple(targets.shape):
        raise ValueError(f"sigmoid_focal_loss: inputs {tuple(inputs.shape)} and targets "
                         f"{tuple(targets.shape)} must have the same shape")
    return _pointwise("sigmoid_focal_loss", 3, inputs, targets, _RED[reduction],
                      lambda: _focal_composite(inputs, targets, alpha, gamma, reduction),
                      a=alpha, b=gamma, target_grad=True)

class _BroadcastTo(torch.autograd.Function):
    """t expanded to `shape` (a contiguous copy); the backward sums the
    broadcast gradient in float64: float32 sums of its terms cancel (a var or
    target with a dim of size 1 gets the sum of a whole row's gradients)."""

    @staticmethod
    def forward(ctx, t, shape):
        ctx.in_shape = t.shape
        return t.expand(shape).contiguous()

    @staticmethod
    def backward(ctx, g):
        return g.to(torch.float64).sum_to_size(ctx.in_shape).to(g.dtype), None


def _bcast(t, shape):
    """t as a contiguous tensor of `shape` (broadcast), for the fused ops."""
    if tuple(t.shape) == tuple(shape):
        return t.contiguous()
    return _BroadcastTo.apply(t, tuple(shape))


def _op_dtype(dt, shape, *ts):
    """The dtype the fused op runs in: float32 for a 16-bit dt where a tensor
    that needs a gradient is broadcast (its gradient is a sum of terms that
    would be rounded to 16 bits first), else dt."""
    if dt != torch.float32 and any(_wants_grad(t) and tuple(t.shape) != tuple(shape) for t in ts):
        return torch.float32
    return dt


def _native_promoted(fname, dt):
    """_native for the promoted dtype of several inputs: a culoss dtype runs
    culoss; float64 (warned) and the rest run torch's op, which promotes."""
    if dt in _C_DTYPES:
        return True
    if dt.is_floating_point:
        _native(fname, torch.empty(0, dtype=dt))  # the float64 warning
    return False


def _promote(*ts):
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def margin_ranking_loss(input1, input2, target, margin=0.0, size_average=None, reduce=None,
                        reduction="mean"):
    """Margin ranking loss ``max(0, -target * (input1 - input2) + margin)``, as
    ``torch.nn.functional.margin_ranking_loss`` (the three broadcast; the
    subgradient is 0 at the kink, torch 2.15). Gradients to both inputs and
    to the target, where they require grad."""
    red = _reduction(reduction, size_average, reduce)
    for name, t in (("input1", input1), ("input2", input2), ("target", target)):
        _tensor(name, t)

    def torch_call():
        return torch.nn.functional.margin_ranking_loss(input1, input2, target, margin,
                                                       reduction=_RED_NAME[red])

    if input1.dim() != input2.dim() or input1.dim() != target.dim():
        return torch_call()  # torch's error
    dt = _promote(input1, input2, target)  # torch promotes (an integer input1 included)
    if not _native_promoted("margin_ranking_loss", dt) or not math.isfinite(margin):
        return torch_call()
    _device("margin_ranking_loss", input1, input2=input2, target=target)
    shape = torch.broadcast_shapes(input1.shape, input2.shape, target.shape)
    cdt = _op_dtype(dt, shape, input1, input2, target)
    x1, x2, y = (_bcast(t.to(dt).to(cdt), shape) for t in (input1, input2, target))
    mask = int(_wants_grad(x1)) | (int(_wants_grad(x2)) << 1)
    loss = torch.ops.culoss.pointwise3(x1, x2, y, 0, red, float(margin), 0, mask)[0]
    return loss if torch.is_autocast_enabled(input1.device.type) else loss.to(dt)


def gaussian_nll_loss(input, target, var, full=False, eps=1e-6, reduction="mean"):
    """Gaussian negative log-likelihood ``(log v + (input - target)^2 / v) / 2``
    with ``v = max(var, eps)``, as ``torch.nn.functional.gaussian_nll_loss``:
    its checks and errors (a negative var, a var of the wrong size, the
    reduction), var with one dim fewer or one mismatched dim of size 1
    (broadcast; its gradient summed in float64), a float var; the clamp does
    not cut var's gradient (as torch). Gradients to input, target and var.
    Under torch.compile the negative-var check is the C call's (no
    data-dependent branch in the graph, so fullgraph=True works; torch's own
    op breaks the graph there)."""
    _tensor("input", input)
    _tensor("target", target)
    if isinstance(var, float):
        if var < 0:
            raise ValueError("var has negative entry/entries")
        var = var * torch.ones_like(input)
    else:
        _tensor("var", var)
        # eager: torch's check (a device sync, as torch's); compiled, the C
        # call checks (CPU: a ValueError; CUDA: NaN and a deferred error at
        # culoss.torch.synchronize), so the graph has no data-dependent branch
        if not torch.compiler.is_compiling() and torch.any(var < 0):
            raise ValueError("var has negative entry/entries")
    if var.size() != input.size():
        if input.size()[:-1] == var.size():
            var = torch.unsqueeze(var, -1)
        elif input.ndim == var.ndim and \
                sum(y for x, y in zip(input.size(), var.size()) if x != y) == 1:
            pass
        else:
            raise ValueError("var is of incorrect size")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(reduction + " is not valid")
    red = _RED[reduction]

    def torch_call():
        return torch.nn.functional.gaussian_nll_loss(input, target, var, full, eps, reduction)

    dt = _promote(input, target, var)
    if not _native_promoted("gaussian_nll_loss", dt) or not (math.isfinite(eps) and eps >= 0):
        return torch_call()
    _device("gaussian_nll_loss", input, target=target, var=var)
    shape = torch.broadcast_shapes(input.shape, target.shape, var.shape)
    cdt = _op_dtype(dt, shape, input, target, var)
    x, y, v = (_bcast(t.to(dt).to(cdt), shape) for t in (input, target, var))
    mask = int(_wants_grad(x, y)) | (int(_wants_grad(v)) << 1)
    loss = torch.ops.culoss.pointwise3(x, v, y, 1, red, float(eps), int(bool(full)), mask)[0]
    return loss if torch.is_autocast_enabled(input.device.type) else loss.to(dt)


def cosine_embedding_loss(input1, input2, target, margin=0.0, size_average=None, reduce=None,
                          reduction="mean"):
    """Cosine embedding loss, as ``torch.nn.functional.cosine_embedding_loss``:
    ``1 - cos`` where target = 1, ``max(0, cos - margin)`` where target = -1,
    0 for any other target; cos over the last dim of [N, D] (target [N]) or
    [D] (target 0-dim), with torch's 1e-12 in each squared norm. One fused
    row pass; gradients to both inputs (the target only selects)."""
    red = _reduction(reduction, size_average, reduce)
    for name, t in (("input1", input1), ("input2", input2), ("target", target)):
        _tensor(name, t)

    def torch_call():
        return torch.nn.functional.cosine_embedding_loss(input1, input2, target, margin,
                                                         reduction=_RED_NAME[red])

    td = target.dim()
    if td not in (0, 1) or input1.dim() != td + 1 or input2.dim() != td + 1:
        return torch_call()  # torch's error
    dt = torch.promote_types(input1.dtype, input2.dtype)
    if not _native("cosine_embedding_loss", input1) or dt not in _C_DTYPES or \
            not math.isfinite(margin):
        return torch_call()
    _device("cosine_embedding_loss", input1, input2=input2, target=target)
    try:
        shape = torch.broadcast_shapes(input1.shape, input2.shape)
        n = shape[0] if td == 1 else 1
        if torch.broadcast_shapes(target.shape, (n,) if td == 1 else ()) != ((n,) if td else ()):
            return torch_call()  # a target longer than the rows: torch's broadcast
    except RuntimeError:
        return torch_call()
    if shape[-1] == 0:
        return torch_call()
    cdt = _op_dtype(dt, shape, input1, input2)
    x1, x2 = (_bcast(t.to(dt).to(cdt), shape).reshape(-1, shape[-1]) for t in (input1, input2))
    t = target.detach().reshape(-1).expand(x1.shape[0])
    code = torch.where(t == 1, 1.0, torch.where(t == -1, -1.0, 0.0)).to(torch.float32)
    mask = int(_wants_grad(x1)) | (int(_wants_grad(x2)) << 1)
    loss = torch.ops.culoss.embedding(x1, x2, None, code.contiguous(), 0, red, float(margin), 2.0,
                                      0.0, False, mask)[0]
    if red == NONE and td == 0:
        loss = loss.reshape(())
    return loss if torch.is_autocast_enabled(input1.device.type) else loss.to(dt)


def triplet_margin_loss(anchor, positive, negative, margin=1.0, p=2, eps=1e-6, swap=False,
                        size_average=None, reduce=None, reduction="mean"):
    """Triplet margin loss ``max(d(a, p) - d(a, n) + margin, 0)`` with
    ``d(x, y) = |x - y + eps|_p`` over the last dim, as
    ``torch.nn.functional.triplet_margin_loss`` (swap: d(a, n) replaced by
    min(d(a, n), d(p, n)), a tie splitting the gradient; margin <= 0
    raises). One fused row pass; gradients to all three. p < 1 or p = inf:
    torch's composite."""
    red = _reduction(reduction, size_average, reduce)
    if margin <= 0:
        raise ValueError(f"margin must be greater than 0, got {margin}")
    for name, t in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        _tensor(name, t)

    def torch_call():
        return torch.nn.functional.triplet_margin_loss(anchor, positive, negative, margin, p, eps,
                                                       swap, reduction=_RED_NAME[red])

    if anchor.dim() != positive.dim() or anchor.dim() != negative.dim() or anchor.dim() == 0:
        return torch_call()  # torch's error
    dt = _promote(anchor, positive, negative)
    if not _native("triplet_margin_loss", anchor) or dt not in _C_DTYPES or \
            not (math.isfinite(p) and p >= 1 and math.isfinite(eps) and math.isfinite(margin)):
        return torch_call()
    _device("triplet_margin_loss", anchor, positive=positive, negative=negative)
    try:
        shape = torch.broadcast_shapes(anchor.shape, positive.shape, negative.shape)
    except RuntimeError:
        return torch_call()
    if shape[-1] == 0:
        return torch_call()
    cdt = _op_dtype(dt, shape, anchor, positive, negative)
    xs = [_bcast(t.to(dt).to(cdt), shape).reshape(-1, shape[-1])
          for t in (anchor, positive, negative)]
    mask = sum(int(_wants_grad(x)) << k for k, x in enumerate(xs))
    loss = torch.ops.culoss.embedding(xs[0], xs[1], xs[2], None, 1, red, float(margin), float(p),
                                      float(eps), bool(swap), mask)[0]
    if red == NONE:
        loss = loss.reshape(shape[:-1])
    return loss if torch.is_autocast_enabled(anchor.device.type) else loss.to(dt)


def multilabel_soft_margin_loss(input, target, weight=None, size_average=None, reduce=None,
                                reduction="mean"):
    """Multi-label soft margin loss, as
    ``torch.nn.functional.multilabel_soft_margin_loss``: per row (the last
    dim is the classes) ``-(1/C) sum_c w_c [y log sigmoid(x) + (1 - y) log
    sigmoid(-x)]``, overflow-free, in one fused pass; ``weight`` broadcast as
    torch does (per class or per element). The target is differentiated too,
    as torch's composite; a weight that requires grad runs torch's op."""
    red = _reduction(reduction, size_average, reduce)
    _tensor("input", input)
    _tensor("target", target)

    def torch_call():
        return torch.nn.functional.multilabel_soft_margin_loss(input, target, weight,
                                                               reduction=_RED_NAME[red])

    if input.dim() == 0 or input.shape[-1] == 0 or not _native("multilabel_soft_margin_loss",
                                                                input):
        return torch_call()
    dt = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        _tensor("weight", weight)
        dt = torch.promote_types(dt, weight.dtype)
    if dt not in _C_DTYPES or (weight is not None and _wants_grad(weight)):
        return torch_call()
    _device("multilabel_soft_margin_loss", input, target=target, weight=weight)
    shape = input.shape
    try:
        if torch.broadcast_shapes(shape, target.shape) != shape or (
                weight is not None and torch.broadcast_shapes(shape, weight.shape) != shape):
            return torch_call()  # the output's shape is the broadcast's: torch's
    except RuntimeError:
        return torch_call()  # torch's error
    c = shape[-1]
    x = input.to(dt).reshape(-1, c).contiguous()
    y = _bcast(target.to(dt), shape).reshape(-1, c)
    w, per_row = None, False
    if weight is not None:
        w = weight.detach().to(torch.float32)
        if w.numel() == c and w.shape[-1:] == (c,):
            w = w.reshape(c).contiguous()
        else:
            w, per_row = w.expand(shape).reshape(-1, c).contiguous(), True
    loss, _ = torch.ops.culoss.multilabel_soft_margin(x, y, w, per_row, red, _wants_grad(x))
    if red == NONE:
        loss = loss.reshape(shape[:-1])
    return loss if torch.is_autocast_enabled(input.device.type) else loss.to(dt)


def multilabel_margin_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """Multi-label margin loss, as ``torch.nn.functional.multilabel_margin_loss``:
    input [C] or [N, C], target of the same shape (int64 class indices, each
    row's list ended by its first -1; every entry in [-1, C));
    ``sum_{t in list} sum_{j not in list} max(0, 1 - x_t + x_j) / C`` per row,
    one fused block per row. Shapes torch refuses run torch's op (its error).
    No rows: mean NaN, sum 0 (torch 2.15 returns an unwritten value for the
    mean). A target outside [-1, C): on CPU an IndexError, on CUDA NaN rows
    and an error at culoss.torch.synchronize."""
    red = _reduction(reduction, size_average, reduce)
    _tensor("input", input)
    _tensor("target", target)

    def torch_call():
        return torch.nn.functional.multilabel_margin_loss(input, target,
                                                          reduction=_RED_NAME[red])

    if input.dim() > 2 or (input.dim() and input.shape[-1] == 0) or \
            target.shape != input.shape or target.dtype != torch.int64 or \
            not _native("multilabel_margin_loss", input):
        return torch_call()
    _device("multilabel_margin_loss", input, target=target)
    c = input.shape[-1] if input.dim() else 1
    x = input.reshape(-1, c).contiguous()
    loss, _ = torch.ops.culoss.multilabel_margin(x, target.reshape(-1, c).contiguous(), red,
                                                 _wants_grad(x))
    if red == NONE:
        loss = loss.reshape(input.shape[:-1] if input.dim() == 2 else ())
    return _out_dtype(loss, input)


def _info_nce_explicit(query, key, temperature, symmetric, reduction):
    logits = query @ key.transpose(0, 1) / temperature
    labels = torch.arange(query.shape[0], device=query.device)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction=reduction)
    if symmetric:
        loss = 0.5 * (loss + torch.nn.functional.cross_entropy(logits.transpose(0, 1), labels,
                                                               reduction=reduction))
    return loss


def info_nce_loss(query, key, *, temperature=1.0, symmetric=False, reduction="mean"):
    """Contrastive InfoNCE (CLIP) loss: ``cross_entropy(query @ key.T /
    temperature, arange(N))`` for query, key [N, D]; ``symmetric`` averages it
    with the transposed direction. On the fused linear + cross-entropy path:
    the N x N similarity matrix is never materialised (one block of rows at a
    time), so memory is O(block x N + N x D). ``temperature`` is a float or a
    0-dim tensor, which may require grad (CLIP's learned logit scale: pass
    ``1 / logit_scale.exp()``); it must be > 0. Gradients to query, key and
    temperature. float64 inputs run the explicit form in torch."""
    red = _reduction(reduction)
    _tensor("query", query)
    _tensor("key", key)
    if query.dim() != 2 or key.dim() != 2 or query.shape != key.shape:
        raise ValueError(f"info_nce_loss: query {tuple(query.shape)} and key {tuple(key.shape)} "
                         "must both be [N, D]")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError("info_nce_loss: temperature must be a float or a 0-dim tensor")
    elif not temperature > 0:
        raise ValueError(f"info_nce_loss: temperature = {temperature} must be > 0")
    dt = torch.promote_types(query.dtype, key.dtype)
    if not _native("info_nce_loss", query) or dt not in _C_DTYPES or query.shape[1] == 0:
        return _info_nce_explicit(query, key, temperature, symmetric, _RED_NAME[red])
    _device("info_nce_loss", query, key=key)
    if isinstance(temperature, torch.Tensor):  # any device: a 0-dim value, as torch's formula
        t = temperature.reshape(()).to(device=query.device, dtype=torch.float32)
    else:
        t = torch.tensor(float(temperature), dtype=torch.float32, device=query.device)
    q, k = query.to(dt).contiguous(), key.to(dt).contiguous()
    mask = int(_wants_grad(q)) | (int(_wants_grad(k)) << 1) | (int(_wants_grad(t)) << 2)
    if red == NONE:  # the backward reruns the op with the upstream gradient
        mask_fwd = 0
    else:
        mask_fwd = mask
    loss = torch.ops.culoss.info_nce(q, k, t, None, bool(symmetric), red, mask_fwd)[0]
    return loss if torch.is_autocast_enabled(query.device.type) else loss.to(dt)


# --------------------------------------------------------------------------- linear + CE


def _linear_ce_composed(input, linear_weight, target, linear_bias, weight, reduction,
                        ignore_index, label_smoothing, **extras):
    """Logits materialised, then culoss's cross_entropy: K-dimensional linear
    weights and probability targets (whose target is [N, V] already)."""
    w = linear_weight
    if w.dim() == 2:
        logits = torch.nn.functional.linear(input, w, linear_bias)
    else:  # [C, d1, ..., in] -> logits [N, C, d1, ...]
        logits = torch.tensordot(input, w, dims=([input.dim() - 1], [w.dim() - 1]))
        if linear_bias is not None:
            logits = logits + linear_bias
    return cross_entropy(logits, target, weight, None, ignore_index, None, reduction,
                         label_smoothing, **extras)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0, options=None,
                         z_loss=0.0, logit_softcap=0.0, normalizer=None):
    """Fused linear + cross-entropy, as ``torch.nn.functional.linear_cross_entropy``
    (torch 2.13+): the loss of ``cross_entropy(input @ linear_weight.T +
    linear_bias, target, weight, ...)`` without materialising the ``[N, V]``
    logits, computed a block of rows at a time; the forward also forms
    grad_input, grad_weight and grad_bias (reduction none: the backward does,
    with the upstream gradient).

    input ``[d]`` or ``[N, d]``; linear_weight ``[V, d]`` (fused) or
    ``[C, d1, ..., d]`` (K-dimensional logits ``[N, C, d1, ...]``, which are
    materialised); target class indices (fused) or probabilities (the logits
    are materialised: the target is ``[N, V]`` already). ``ignore_index=None``
    means -100. ``options`` (torch's ``LinearCrossEntropyOptions``) is accepted
    and has no effect. Under autocast, input, weight and bias are cast to the
    autocast dtype, as ``F.linear`` would be; the loss is float32.
    """
    fname = "linear_cross_entropy"
    del options  # torch's chunking options: culoss chooses its own blocks
    red = _reduction(reduction)
    ignore_index = -100 if ignore_index is None else int(ignore_index)
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        _tensor(name, t)
    if input.dim() not in (1, 2):
        raise ValueError(f"{fname}: expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise ValueError(f"{fname}: expected linear_weight with dimensionality at least 2, got "
                         f"{linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise ValueError(f"{fname}: expected equal input and linear_weight last dimensions "
                         f"(in_features), got {input.shape[-1]} and {linear_weight.shape[-1]}")
    if linear_weight.dim() > 2 and input.dim() != 2:
        raise ValueError(f"{fname}: K-dimensional loss defined by linear_weight shape "
                         f"{tuple(linear_weight.shape)} requires batched input")
    if linear_bias is not None and tuple(linear_bias.shape) != tuple(linear_weight.shape[:-1]):
        raise ValueError(f"{fname}: expected linear_bias shape {tuple(linear_weight.shape[:-1])}, "
                         f"got {tuple(linear_bias.shape)}")
    soft = target.is_floating_point()
    if soft and ignore_index != -100:
        raise ValueError(f"{fname}: ignore_index cannot be specified when target contains "
                         "probabilities")
    _device(fname, input, linear_weight=linear_weight, target=target, linear_bias=linear_bias,
            weight=weight)
    extras = dict(z_loss=z_loss, logit_softcap=logit_softcap, normalizer=normalizer)
    if torch.is_autocast_enabled(input.device.type):
        dt = torch.get_autocast_dtype(input.device.type)
        input, linear_weight = input.to(dt), linear_weight.to(dt)
        linear_bias = linear_bias.to(dt) if linear_bias is not None else None
    if soft or linear_weight.dim() > 2 or not _native(fname, input):
        return _linear_ce_composed(input, linear_weight, target, linear_bias, weight, reduction,
                                   ignore_index, label_smoothing, **extras)
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{fname}: {name} is {t.dtype}, input is {input.dtype}: one dtype "
                            "for input, linear_weight and linear_bias")
    v = linear_weight.shape[0]
    x = input.unsqueeze(0) if input.dim() == 1 else input
    t = _index_target(fname, target, x.shape[:1] if input.dim() == 2 else ())
    if input.dim() == 1:
        t = t.reshape(1)
    eps = _smoothing(fname, label_smoothing)
    cw = _class_weight(fname, weight, v, input)
    norm = _normalizer(fname, normalizer, input)
    need = (_wants_grad(input), _wants_grad(linear_weight),
            _wants_grad(linear_bias) if linear_bias is not None else False)
    if red == NONE:
        need = (False, False, False)  # the backward computes them with the upstream gradient
    loss = torch.ops.culoss.linear_cross_entropy(
        x.contiguous(), linear_weight.contiguous(), t,
        linear_bias.contiguous() if linear_bias is not None else None, cw, norm, None, red,
        ignore_index, eps, float(z_loss), float(logit_softcap), *need)[0]
    if red == NONE:
        loss = loss.reshape(()) if input.dim() == 1 else loss
    return _out_dtype(loss, input)


# --------------------------------------------------------------------------- distillation

_DISTILL_RED = {"none": NONE, "sum": SUM, "mean": MEAN, "batchmean": BATCHMEAN}


def _distill_explicit(s, t, labels, tvd, beta, temperature, ignore_index, reduction):
    """TRL's generalized_jsd_loss (and TVD) in torch ops: the float64
    fallback. Terms where a probability is 0 are 0 (TRL's kl_div gives NaN
    for a -inf teacher logit)."""
    F = torch.nn.functional
    slp = F.log_softmax(s / temperature, dim=-1)
    tlp = F.log_softmax(t / temperature, dim=-1)
    P, Q = tlp.exp(), slp.exp()

    def kl(a_lp, a, b_lp):  # sum_a a (log a - log b), 0 where a = 0
        # the logs masked before the product: a where() over a * (-inf - x)
        # would still send 0 * inf = NaN back through the unused branch
        keep = a > 0
        zero = torch.zeros_like(a)
        return a * (torch.where(keep, a_lp, zero) - torch.where(keep, b_lp, zero))

    if tvd:
        per = 0.5 * (P - Q).abs()
    elif beta == 0:
        per = kl(tlp, P, slp)
    elif beta == 1:
        per = kl(slp, Q, tlp)
    else:
        # where both are 0 the mixture is unused; its logsumexp of two -inf would
        # send NaN back, so those columns take a finite stand-in
        none = (P == 0) & (Q == 0)
        zero = torch.zeros_like(tlp)
        mix = torch.logsumexp(torch.stack([torch.where(none, zero, tlp) + math.log(beta),
                                           torch.where(none, zero, slp) + math.log1p(-beta)]), 0)
        per = beta * kl(tlp, P, mix) + (1 - beta) * kl(slp, Q, mix)
    per = per.sum(-1)
    if labels is not None:
        keep = labels != ignore_index
        per = torch.where(keep, per, torch.zeros_like(per))
        kept = keep.sum()
    else:
        kept = per.numel()
    if reduction == "batchmean":
        return per.sum() / kept
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        return per.sum() / (per.numel() * s.shape[-1])
    return per


def _distill_checks(fname, student, teacher, labels, beta, temperature, reduction, tvd):
    if reduction not in _DISTILL_RED:
        raise ValueError(f"{fname}: {reduction} is not a valid value for reduction (batchmean, "
                         "sum, mean, none)")
    _tensor("student", student)
    _tensor("teacher", teacher)
    for name, x in (("student", student), ("teacher", teacher)):
        if not x.is_floating_point():
            raise TypeError(f"{fname}: {name} must be a floating-point tensor, got {x.dtype}")
    if not tvd and not (0.0 <= float(beta) <= 1.0):
        raise ValueError(f"{fname}: beta = {beta} must be in [0, 1]")
    if not (float(temperature) > 0.0 and math.isfinite(float(temperature))):
        raise ValueError(f"{fname}: temperature = {temperature} must be finite and > 0")
    if labels is not None:
        _tensor("labels", labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{fname}: labels must be an integer tensor, got {labels.dtype}")


def _labels_rows(fname, labels, rows, lead):
    if labels is None:
        return None
    if labels.numel() != rows or (labels.dim() > 0 and tuple(labels.shape) != tuple(lead)
                                  and labels.dim() != 1):
        raise ValueError(f"{fname}: labels of shape {tuple(labels.shape)} do not match the "
                         f"{rows} rows of shape {tuple(lead)}")
    y = labels.reshape(-1)
    if y.dtype not in (torch.int32, torch.int64):
        y = y.long()
    return y.contiguous()


def _rows_view(x, v):
    """[..., V] as [rows, V] without a copy where the last dimension has unit
    stride (rows may be strided: the C call takes a row stride)."""
    r = x.reshape(-1, v)
    return r if r.stride(-1) == 1 or r.shape[0] == 0 else r.contiguous()


def _distill(fname, student_logits, teacher_logits, labels, tvd, beta, temperature,
             ignore_index, reduction):
    _distill_checks(fname, student_logits, teacher_logits, labels, beta, temperature, reduction,
                    tvd)
    s, t = student_logits, teacher_logits
    if s.dim() < 1 or s.shape != t.shape:
        raise ValueError(f"{fname}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must "
                         "have one shape [..., V] (the same rows and vocabulary)")
    _device(fname, s, teacher_logits=t, labels=labels)
    v = s.shape[-1]
    lead = s.shape[:-1]
    rows = math.prod(lead)
    y = _labels_rows(fname, labels, rows, lead)
    dt = torch.promote_types(s.dtype, t.dtype)
    if dt not in _C_DTYPES or not _native(fname, s) or v == 0:
        return _distill_explicit(s.to(dt), t.to(dt).detach(),
                                 y.reshape(lead) if y is not None else None,
                                 tvd, float(beta), float(temperature), ignore_index, reduction)
    red = _DISTILL_RED[reduction]
    x = _rows_view(s.to(dt), v)
    tt = _rows_view(t.to(dt), v).detach()
    loss = torch.ops.culoss.distill(x, tt, y, bool(tvd), float(beta), float(temperature),
                                    int(ignore_index), red, 1.0, 0.0, _wants_grad(x))[0]
    if red == NONE:
        loss = loss.reshape(lead)
    return loss if torch.is_autocast_enabled(s.device.type) else loss.to(dt)


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, *, beta=0.5,
                         temperature=1.0, ignore_index=-100, reduction="batchmean"):
    """Generalized Jensen-Shannon divergence between the teacher's and the
    student's softmax over the vocabulary (TRL's ``generalized_jsd_loss``):
    with P = softmax(teacher / T), Q = softmax(student / T), beta = 0 is
    KL(P || Q), beta = 1 KL(Q || P), otherwise beta KL(P || M) + (1 - beta)
    KL(Q || M) with M = beta P + (1 - beta) Q. Logits ``[..., V]`` (viewed as
    rows without a copy), labels (optional, the rows' shape) mark ignored
    rows (``ignore_index``): loss 0, no gradient, not counted by
    ``batchmean`` (the sum over kept rows / their number). ``sum``, ``mean``
    (over every element, as TRL), ``none`` (per row). The gradient goes to
    the student only; no T^2 factor. -inf teacher logits contribute 0 (TRL
    gives NaN). One fused pass per row pair."""
    return _distill("generalized_jsd_loss", student_logits, teacher_logits, labels, False, beta,
                    temperature, ignore_index, reduction)


def tvd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100,
             reduction="batchmean"):
    """Total variation distance 1/2 sum |P - Q| between the teacher's and the
    student's softmax (see :func:`generalized_jsd_loss` for the rest)."""
    return _distill("tvd_loss", student_logits, teacher_logits, labels, True, 0.0, temperature,
                    ignore_index, reduction)


def linear_generalized_jsd_loss(student_input, student_weight, teacher_input, teacher_weight,
                                labels=None, *, student_bias=None, teacher_bias=None, beta=0.5,
                                temperature=1.0, ignore_index=-100, reduction="batchmean",
                                weight_hard_loss=0.0, weight_soft_loss=1.0,
                                hard_label_smoothing=0.0, hard_class_weight=None,
                                hard_z_loss=0.0):
    """Fused linear + generalized JSD (Liger's ``LigerFusedLinearJSDLoss``
    shape): the student's logits ``student_input @ student_weight.T (+
    student_bias)`` and the teacher's likewise are computed a block of rows
    at a time and never materialised whole; the loss is ``weight_soft_loss *
    generalized_jsd_loss(...) + weight_hard_loss * cross_entropy(student
    logits, labels)`` (the hard term untempered, with ignore_index and the
    same reduction; it needs labels). The hard term takes
    ``F.cross_entropy``'s ``label_smoothing`` and ``weight`` (class weights
    ``[V]``) as ``hard_label_smoothing`` and ``hard_class_weight``, and a
    z-loss ``hard_z_loss * lse^2`` per kept row; its rows are reduced with
    the divergence's (``batchmean`` divides by the kept rows, not by the sum
    of the targets' weights as ``F.cross_entropy``'s mean does). Inputs
    ``[..., d_s]`` and ``[..., d_t]`` with the same rows, weights ``[V, d]``.
    Gradients to the student input, weight and bias; none to the teacher."""
    fname = "linear_generalized_jsd_loss"
    for name, t in (("student_input", student_input), ("student_weight", student_weight),
                    ("teacher_input", teacher_input), ("teacher_weight", teacher_weight)):
        _tensor(name, t)
    _distill_checks(fname, student_input, teacher_input, labels, beta, temperature, reduction,
                    False)
    si, ti, sw, tw = student_input, teacher_input, student_weight, teacher_weight
    if si.dim() < 1 or ti.dim() < 1 or si.shape[:-1] != ti.shape[:-1]:
        raise ValueError(f"{fname}: student_input {tuple(si.shape)} and teacher_input "
                         f"{tuple(ti.shape)} must have the same rows [..., d]")
    if sw.dim() != 2 or tw.dim() != 2 or sw.shape[0] != tw.shape[0]:
        raise ValueError(f"{fname}: student_weight {tuple(sw.shape)} and teacher_weight "
                         f"{tuple(tw.shape)} must be [V, d] with the same vocabulary V")
    if sw.shape[1] != si.shape[-1] or tw.shape[1] != ti.shape[-1]:
        raise ValueError(f"{fname}: weights' in_features ({sw.shape[1]}, {tw.shape[1]}) must "
                         f"match the inputs' ({si.shape[-1]}, {ti.shape[-1]})")
    v = sw.shape[0]
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None and tuple(b.shape) != (v,):
            raise ValueError(f"{fname}: {name} must be [{v}], got {tuple(b.shape)}")
    if float(weight_hard_loss) != 0.0 and labels is None:
        raise ValueError(f"{fname}: weight_hard_loss = {weight_hard_loss} needs labels")
    if not (math.isfinite(float(weight_hard_loss)) and math.isfinite(float(weight_soft_loss))):
        raise ValueError(f"{fname}: weight_hard_loss and weight_soft_loss must be finite")
    eps_h, z_h = float(hard_label_smoothing), float(hard_z_loss)
    if not 0.0 <= eps_h <= 1.0:
        raise ValueError(f"{fname}: hard_label_smoothing must be between 0.0 and 1.0. Got: "
                         f"{hard_label_smoothing}")
    if not (z_h >= 0.0 and math.isfinite(z_h)):
        raise ValueError(f"{fname}: hard_z_loss must be finite and >= 0. Got: {hard_z_loss}")
    hcw = _class_weight(fname, hard_class_weight, sw.shape[0], si)
    _device(fname, si, student_weight=sw, teacher_input=ti, teacher_weight=tw, labels=labels,
            student_bias=student_bias, teacher_bias=teacher_bias)
    lead = si.shape[:-1]
    rows = math.prod(lead)
    y = _labels_rows(fname, labels, rows, lead)
    if torch.is_autocast_enabled(si.device.type):
        adt = torch.get_autocast_dtype(si.device.type)
        si, sw, ti, tw = si.to(adt), sw.to(adt), ti.to(adt), tw.to(adt)
        student_bias = student_bias.to(adt) if student_bias is not None else None
        teacher_bias = teacher_bias.to(adt) if teacher_bias is not None else None
    dt = si.dtype
    if not _native(fname, si):
        F = torch.nn.functional
        s = F.linear(si, sw, student_bias)
        with torch.no_grad():
            t = F.linear(ti.to(dt), tw.to(dt), teacher_bias)
        loss = float(weight_soft_loss) * _distill_explicit(
            s, t, y.reshape(lead) if y is not None else None, False, float(beta),
            float(temperature), ignore_index, reduction)
        if float(weight_hard_loss) != 0.0:  # the same divisor as the soft term's
            s2 = s.reshape(-1, v)
            ce = F.cross_entropy(s2, y.long(), ignore_index=ignore_index, reduction="none",
                                 weight=hcw.to(s2.dtype) if hcw is not None else None,
                                 label_smoothing=eps_h)
            if z_h != 0.0:
                ce = ce + torch.where(y != ignore_index, z_h * torch.logsumexp(s2, -1) ** 2, 0.0)
            if reduction == "batchmean":
                ce = ce.sum() / (y != ignore_index).sum()
            elif reduction == "mean":
                ce = ce.sum() / (rows * v)
            elif reduction == "sum":
                ce = ce.sum()
            else:
                ce = ce.reshape(lead)
            loss = loss + float(weight_hard_loss) * ce
        return loss
    for name, t in (("student_weight", sw), ("student_bias", student_bias),
                    ("teacher_input", ti), ("teacher_weight", tw),
                    ("teacher_bias", teacher_bias)):
        if t is not None and t.dtype != dt:
            raise TypeError(f"{fname}: {name} is {t.dtype}, student_input is {dt}: one dtype "
                            "for every input, weight and bias")
    red = _DISTILL_RED[reduction]
    x = si.reshape(-1, si.shape[-1]).contiguous()
    xt = ti.reshape(-1, ti.shape[-1]).contiguous().detach()
    need = (_wants_grad(x), _wants_grad(sw),
            _wants_grad(student_bias) if student_bias is not None else False)
    if red == NONE:
        need = (False, False, False)  # the backward computes them with the upstream gradient
    loss = torch.ops.culoss.linear_distill(
        x, sw.contiguous(), xt, tw.contiguous().detach(), y,
        student_bias.contiguous() if student_bias is not None else None,
        teacher_bias.detach().contiguous() if teacher_bias is not None else None, None, hcw,
        False, float(beta), float(temperature), int(ignore_index), red, float(weight_soft_loss),
        float(weight_hard_loss), eps_h, z_h, *need)[0]
    if red == NONE:
        loss = loss.reshape(lead)
    return _out_dtype(loss, si)
