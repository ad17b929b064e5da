"""culoss for PyTorch: drop-in replacements for ``torch.nn.functional``'s
losses and their ``torch.nn`` modules (PyTorch 2.4 to 2.15), as custom ops
(namespace ``culoss``) that autograd and ``torch.compile(fullgraph=True)``
understand.

CPU tensors run the CPU backend (a double-precision reference), CUDA tensors
the fused CUDA kernels on the tensor's device and the current stream, with no
host synchronisation, so steps can be captured in CUDA graphs. Deferred errors
of the CUDA backend (a class target outside [0, C), a BCE probability outside
[0, 1]) are raised by :func:`synchronize`.

    >>> import culoss.torch as cl
    >>> loss = cl.cross_entropy(logits, labels, ignore_index=-100)
    >>> loss = cl.linear_cross_entropy(hidden, lm_head.weight, labels)
"""
try:
    import torch as _torch
except ImportError as _e:  # pragma: no cover - exercised in CI's fresh environment
    raise ImportError("culoss.torch needs PyTorch >= 2.4 (pip install torch); the rest of culoss "
                      "(import culoss) works without it") from _e

from .. import _lib
from . import _ops  # noqa: F401  (registers the custom ops)
from .functional import *  # noqa: F401,F403
from .functional import __all__ as _functional_all
from .modules import *  # noqa: F401,F403
from .modules import __all__ as _modules_all

__all__ = list(_functional_all) + list(_modules_all) + ["synchronize", "has_cuda"]

CulossError = _lib.CulossError


def has_cuda():
    """Whether this libculoss has a CUDA backend (False for a CPU-only build,
    made where no nvcc was on PATH at install time)."""
    return _lib.has_cuda()


def synchronize(device=None):
    """Waits for this thread's culoss work on `device` (default: every CUDA
    device it used) and raises the deferred errors its kernels flagged since
    the last call: IndexError for a class target outside [0, C), ValueError
    for a domain error (a BCE probability outside [0, 1]). A host
    synchronisation: call it at logging points, not every step."""
    if device is not None:
        device = _torch.device(device)
        index = device.index if device.index is not None else _torch.cuda.current_device()
    for ctx in _lib.thread_contexts():
        if ctx.backend == "cuda" and (device is None or ctx.device == index):
            ctx.synchronize()
