"""Tensors to C calls: the context for a tensor's device and stream, pointers,
dtype codes. Used only inside the custom ops' real implementations (never
traced: torch.compile sees the ops as opaque calls with fake kernels)."""
import ctypes

import torch

from .. import _lib

DTYPES = {torch.float32: _lib.F32, torch.float16: _lib.F16, torch.bfloat16: _lib.BF16}
INDEX_TYPES = {torch.int32: _lib.I32, torch.int64: _lib.I64}


def context(t):
    """The calling thread's culoss context for tensor `t`: the CPU backend for
    CPU tensors; for CUDA tensors the CUDA backend on t's device, bound to the
    current torch stream of that device (one context per stream: a context's
    scratch is used in stream order). Nothing is synchronised."""
    if t.device.type == "cpu":
        return _lib.thread_context("cpu", 0)
    if t.device.type != "cuda":
        raise ValueError(f"culoss runs on CPU and CUDA tensors, not {t.device.type}")
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(dev).cuda_stream
    if not _lib.has_thread_context("cuda", dev, stream) and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "culoss: the first culoss call on this CUDA stream is inside graph capture, where its "
            "context (a small device allocation) cannot be created. Run the step once on the "
            "capture stream before capturing, e.g. warm up on stream s and capture with "
            "torch.cuda.graph(g, stream=s).")
    try:
        ctx = _lib.thread_context("cuda", dev, stream)
    except _lib.CulossError as e:
        if e.status == 4:
            raise RuntimeError(
                "culoss: a CUDA tensor was passed, but this libculoss has no usable CUDA backend "
                f"({e}). A CPU-only build comes from installing without nvcc on PATH; reinstall "
                "with the CUDA toolkit present.") from e
        raise
    ctx.set_stream(ctypes.c_void_p(stream))
    return ctx


def ptr(t):
    """Data pointer of `t` (None for None or an empty tensor)."""
    if t is None or t.numel() == 0:
        return None
    return ctypes.c_void_p(t.data_ptr())


def dtype_code(t):
    return DTYPES[t.dtype]


def index_code(t):
    return INDEX_TYPES[t.dtype]


def row_stride(x):
    """Row stride (elements) the C calls take for a 2-D tensor with unit
    column stride: stride(0), or the row length when there is one row."""
    return int(x.stride(0)) if x.shape[0] > 1 else int(x.shape[1])
