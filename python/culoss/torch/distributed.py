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
import torch
import torch.distributed as dist

from .. import _lib
from . import _runtime as rt
from ._ops import _loss_out, _scaled

__all__ = ["vocab_parallel_cross_entropy"]

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
    grad = torch.empty_like(input) if want_grad else None
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
