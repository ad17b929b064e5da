"""Vocabulary-parallel cross-entropy over ``torch.distributed``.

Each rank of a process group holds the logits of its slice of the classes,
columns ``[v_begin, v_begin + C_local)`` of a ``v_total``-class problem (as
Megatron-LM's and TransformerEngine's tensor-parallel heads do; slices may
differ in size). :func:`vocab_parallel_cross_entropy` runs culoss's first
phase on the local slice, one ``all_gather_into_tensor`` of 32 bytes per row
and rank, and the second phase, so every rank gets the same full loss and
the gradient of its own slice. Eager mode (the collective runs inside the
autograd function, which ``torch.compile`` would graph-break on).
"""
import ctypes

import torch
import torch.distributed as dist

from .. import _lib
from . import _runtime as rt
from ._ops import _grad_out, _loss_out, _scaled

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

_REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


def _call_phases(input, target, weight, v_begin, v_total, group, reduction, ignore_index,
                 label_smoothing, z_loss, logit_softcap, want_grad):
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    n, c = input.shape
    w32 = None if weight is None else weight.detach().to(torch.float32).contiguous()
    o = _lib.options("cross_entropy", reduction=reduction, ignore_index=ignore_index,
                     label_smoothing=label_smoothing, z_loss=z_loss,
                     logit_softcap=logit_softcap, class_weight=rt.ptr(w32))
    vp = _lib.VocabParallel(rank, ranks, v_begin, v_total, None, None)
    ctx = rt.context(input).h
    rec = _lib.VOCAB_PARALLEL_RECORD_FLOATS * (n + 1)
    stats = torch.empty(rec, dtype=torch.float32, device=input.device)
    gathered = torch.empty(ranks * rec, dtype=torch.float32, device=input.device)
    args = (n, c, rt.dtype_code(input), rt.ptr(input), rt.row_stride(input),
            rt.index_code(target), rt.ptr(target))
    _lib.call("cross_entropy_vocab_parallel_stats", ctx, o, vp, *args, rt.ptr(stats))
    dist.all_gather_into_tensor(gathered, stats, group=group)
    loss = _loss_out(input, n, reduction)
    grad = _grad_out(input, True) if want_grad else None  # input's row stride, as ld says
    _lib.call("cross_entropy_vocab_parallel_finish", ctx, o, vp, *args, rt.ptr(gathered),
              rt.ptr(loss), rt.ptr(grad), None)
    return loss, grad


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, v_begin, v_total, group, reduction, ignore_index,
                label_smoothing, z_loss, logit_softcap):
        loss, grad = _call_phases(input, target, weight, v_begin, v_total, group, reduction,
                                  ignore_index, label_smoothing, z_loss, logit_softcap,
                                  input.requires_grad)
        ctx.reduction = reduction
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (_scaled(grad, grad_loss, ctx.reduction),) + (None,) * 10


def vocab_parallel_cross_entropy(input, target, *, v_begin, v_total, group=None, weight=None,
                                 ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                 z_loss=0.0, logit_softcap=0.0):
    """Cross-entropy over a vocabulary sharded across the ranks of `group`
    (default: the world).

    Args:
        input: this rank's logits ``[N, C_local]`` (float32, float16 or
            bfloat16; unit column stride), classes ``v_begin`` to
            ``v_begin + C_local - 1`` of ``v_total``.
        target: ``[N]`` global class indices (int64 or int32), the same on
            every rank.
        weight: this rank's slice ``[C_local]`` of the class weights, or None.
        ignore_index, reduction, label_smoothing: as ``F.cross_entropy``
            (smoothing spreads over all ``v_total`` classes); z_loss and
            logit_softcap as :func:`culoss.torch.cross_entropy`.

    Returns the full loss (the same on every rank); ``backward`` gives
    ``input`` the gradient of its own slice. Every rank must call it with
    the same N, target and options.

        >>> loss = vocab_parallel_cross_entropy(local_logits, labels,
        ...                                     v_begin=rank * shard, v_total=vocab)
    """
    fname = "vocab_parallel_cross_entropy"
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fname}: torch.distributed is not initialised")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fname}: reduction must be 'none', 'sum' or 'mean', not {reduction!r}")
    if not isinstance(input, torch.Tensor) or input.dim() != 2:
        raise ValueError(f"{fname}: input must be a 2-D tensor [N, C_local]")
    if input.dtype not in rt.DTYPES:
        raise TypeError(f"{fname}: input must be float32, float16 or bfloat16, not {input.dtype}")
    if not isinstance(target, torch.Tensor) or target.dim() != 1 or \
            target.shape[0] != input.shape[0] or target.dtype not in rt.INDEX_TYPES:
        raise ValueError(f"{fname}: target must be int32/int64 [N] with N = {input.shape[0]}")
    if target.device != input.device or (weight is not None and weight.device != input.device):
        raise ValueError(f"{fname}: input, target and weight must be on one device")
    if weight is not None and tuple(weight.shape) != (input.shape[1],):
        raise ValueError(f"{fname}: weight must be this rank's slice [{input.shape[1]}]")
    if input.stride(1) != 1:
        input = input.contiguous()
    return _VocabParallelCE.apply(input, target.contiguous(), weight, int(v_begin), int(v_total),
                                  group, _REDUCTIONS[reduction], int(ignore_index),
                                  float(label_smoothing), float(z_loss), float(logit_softcap))


_GATHER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_size_t, ctypes.c_void_p)


def _host_bytes(address, nbytes):
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=torch.uint8)


def _gather_into(ws, group):
    """A culoss allgather callback for all_gather_into_tensor: on CUDA, send
    and recv point into the workspace tensor `ws` and become views of it; on
    the CPU backend (whose reference keeps its own host buffers) they are
    wrapped as they are. Exceptions are kept (ctypes would swallow them) and
    re-raised after the C call."""
    base = ws.data_ptr()
    errors = []

    def gather(user, send, recv, nbytes, stream):
        try:
            ranks = dist.get_world_size(group)
            if ws.is_cuda:
                s, r = send - base, recv - base
                out, inp = ws[r:r + ranks * nbytes], ws[s:s + nbytes]
            else:
                out, inp = _host_bytes(recv, ranks * nbytes), _host_bytes(send, nbytes)
            dist.all_gather_into_tensor(out, inp, group=group)
            return 0
        except BaseException as e:  # noqa: BLE001 - reported after the C call
            errors.append(e)
            return 1
    return _GATHER(gather), errors


def _lvp_call(a, grad_loss, want):
    """One culoss_linear_cross_entropy_vocab_parallel call over the saved
    arguments `a`; want = (grad_hidden, grad_weight, grad_bias) flags.
    Returns (loss, grad_hidden, grad_weight, grad_bias)."""
    x, w, target, b, v_begin, v_total, group, reduction, ignore_index, eps, z, cap, cw = a
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    n, d = x.shape
    v = w.shape[0]
    o = _lib.options("cross_entropy", reduction=reduction, ignore_index=ignore_index,
                     label_smoothing=eps, z_loss=z, logit_softcap=cap, class_weight=rt.ptr(cw))
    lo = _lib.options("linear_ce")
    cctx = rt.context(x)
    vp = _lib.VocabParallel(rank, ranks, v_begin, v_total, None, None)
    size = ctypes.c_size_t()
    _lib.call("linear_cross_entropy_vocab_parallel_workspace_size", cctx.h, lo, vp, n, d, v,
              rt.dtype_code(x), ctypes.byref(size))
    if x.is_cuda:
        ws = torch.empty(size.value, dtype=torch.uint8, device=x.device)
    else:  # the CPU reference keeps its own buffers: no workspace
        ws, size.value = torch.empty(0, dtype=torch.uint8), 0
    cb, errors = _gather_into(ws, group)
    vp.allgather = ctypes.cast(cb, ctypes.c_void_p)
    gh = torch.empty_like(x) if want[0] else None
    gw = torch.empty_like(w) if want[1] else None
    gb = torch.empty_like(b) if want[2] else None
    loss = _loss_out(x, n, reduction)
    gl = None if grad_loss is None else grad_loss.detach().to(torch.float32).contiguous()
    try:
        _lib.call("linear_cross_entropy_vocab_parallel", cctx.h, o, lo, vp, n, d, v,
                  rt.dtype_code(x), rt.ptr(x), rt.ptr(w), rt.ptr(b), rt.index_code(target),
                  rt.ptr(target), rt.ptr(loss), rt.ptr(gh), rt.ptr(gw), rt.ptr(gb), rt.ptr(gl),
                  rt.ptr(ws), size.value)
    except _lib.CulossError:
        if errors:
            raise errors[0]
        raise
    return loss, gh, gw, gb


class _VocabParallelLinearCE(torch.autograd.Function):
    """Mean and sum: the gradients come from the forward's fused pass, scaled
    in backward. None: the upstream gradient weights each row inside the
    GEMMs, so backward runs the call again with it (the forward computes the
    loss only)."""

    @staticmethod
    def forward(ctx, input, weight, target, bias, v_begin, v_total, group, reduction,
                ignore_index, label_smoothing, z_loss, logit_softcap, class_weight):
        cw = None if class_weight is None else class_weight.detach().to(torch.float32).contiguous()
        a = (input.detach().contiguous(), weight.detach().contiguous(), target.contiguous(),
             None if bias is None else bias.detach().contiguous(), v_begin, v_total, group,
             reduction, ignore_index, label_smoothing, z_loss, logit_softcap, cw)
        want = (input.requires_grad, weight.requires_grad,
                bias is not None and bias.requires_grad)
        fused = reduction != 0 and any(want)
        loss, gh, gw, gb = _lvp_call(a, None, want if fused else (False, False, False))
        ctx.a, ctx.want, ctx.fused, ctx.reduction = a, want, fused, reduction
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.fused:
            gh, gw, gb = (None if g is None else _scaled(g, grad_loss, ctx.reduction)
                          for g in ctx.saved_tensors)
        else:
            _, gh, gw, gb = _lvp_call(ctx.a, grad_loss, ctx.want)
        if gh is not None:  # this rank's partial sum: hidden is shared, so sum over the ranks
            dist.all_reduce(gh, group=ctx.a[6])
        return (gh, gw, None, gb) + (None,) * 9


def vocab_parallel_linear_cross_entropy(input, linear_weight, target, *, v_begin, v_total,
                                        linear_bias=None, group=None, weight=None,
                                        ignore_index=-100, reduction="mean",
                                        label_smoothing=0.0, z_loss=0.0, logit_softcap=0.0):
    """Fused linear + cross-entropy with the LM head sharded by vocabulary
    rows across the ranks of `group`: ``linear_weight`` ``[V_local, D]`` (and
    ``linear_bias`` ``[V_local]``) hold classes ``v_begin`` onward of
    ``v_total``; ``input`` ``[N, D]`` and ``target`` ``[N]`` (global class
    indices) are the same on every rank. The ``[N, V]`` logits are never
    stored. Returns the full loss; ``backward`` gives ``linear_weight`` and
    ``linear_bias`` this rank's slice and ``input`` the gradient summed over
    the ranks (an all-reduce). Options as :func:`vocab_parallel_cross_entropy`
    (``weight``: this rank's class-weight slice). Eager mode."""
    fname = "vocab_parallel_linear_cross_entropy"
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fname}: torch.distributed is not initialised")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fname}: reduction must be 'none', 'sum' or 'mean', not {reduction!r}")
    if input.dim() != 2 or linear_weight.dim() != 2 or input.shape[1] != linear_weight.shape[1]:
        raise ValueError(f"{fname}: input [N, D] and linear_weight [V_local, D] must agree on D")
    if input.dtype not in rt.DTYPES or linear_weight.dtype != input.dtype or \
            (linear_bias is not None and linear_bias.dtype != input.dtype):
        raise TypeError(f"{fname}: input, linear_weight and linear_bias must share one of float32, "
                        f"float16, bfloat16")
    if target.dim() != 1 or target.shape[0] != input.shape[0] or target.dtype not in rt.INDEX_TYPES:
        raise ValueError(f"{fname}: target must be int32/int64 [N] with N = {input.shape[0]}")
    others = [t for t in (linear_weight, target, linear_bias, weight) if t is not None]
    if any(t.device != input.device for t in others):
        raise ValueError(f"{fname}: input, linear_weight, target, linear_bias and weight must be "
                         f"on one device")
    if linear_bias is not None and tuple(linear_bias.shape) != (linear_weight.shape[0],):
        raise ValueError(f"{fname}: linear_bias must be [V_local] = [{linear_weight.shape[0]}]")
    if weight is not None and tuple(weight.shape) != (linear_weight.shape[0],):
        raise ValueError(f"{fname}: weight must be this rank's slice [{linear_weight.shape[0]}]")
    return _VocabParallelLinearCE.apply(input, linear_weight, target, linear_bias, int(v_begin),
                                        int(v_total), group, _REDUCTIONS[reduction],
                                        int(ignore_index), float(label_smoothing), float(z_loss),
                                        float(logit_softcap), weight)
