"""Shared helpers of the culoss.torch tests: the float64 reference and an
ulp-based comparison (a tolerance in units of the compared dtype's precision,
so a 1% error fails in float32 and float16, and at 1.3 ulps in bfloat16)."""
import math

import torch

MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7, torch.float64: 52}


def ulp(ref, dtype):
    """The spacing of `dtype` at |ref| (ref: float64)."""
    p = MANTISSA[dtype]
    tiny = torch.finfo(dtype).tiny
    mag = ref.abs().clamp_min(tiny)
    return torch.exp2(torch.floor(torch.log2(mag)) - p)


def assert_close_ulps(got, ref, dtype, ulps, what, floor_rel=2.0 ** -12, atol=0.0):
    """|got - ref| <= ulps * (ulp(ref) + floor) + atol elementwise; the floor
    is floor_rel of the ulp of the largest |ref| (values that cancel to ~0);
    atol, when a model of an input's rounding says more (materialised logits).
    NaN must match NaN and infinities must match exactly."""
    got = got.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    nan_ref, nan_got = ref.isnan(), got.isnan()
    assert torch.equal(nan_ref, nan_got), f"{what}: NaN pattern differs: got {got}, want {ref}"
    inf = ref.isinf()
    assert torch.equal(got[inf], ref[inf]), f"{what}: infinities differ: got {got}, want {ref}"
    ok = ~(nan_ref | inf)
    if not ok.any():
        return
    r, g = ref[ok], got[ok]
    big = float(r.abs().max())
    floor = ulp(torch.tensor(big, dtype=torch.float64), dtype) * floor_rel if big > 0 else 0.0
    if isinstance(atol, torch.Tensor):
        atol = atol.detach().to(torch.float64).expand(ref.shape)[ok]
    tol = ulps * (ulp(r, dtype) + floor) + atol
    err = (g - r).abs()
    worst = int(torch.argmax(err - tol))
    assert bool((err <= tol).all()), (
        f"{what}: {int((err > tol).sum())} of {r.numel()} elements off by more than {ulps} ulps "
        f"of {dtype}; worst: got {float(g.reshape(-1)[worst])!r}, want {float(r.reshape(-1)[worst])!r}")


def to64(x):
    """A float tensor as float64 (the same values: dtype-rounded inputs), with
    requires_grad as the original; other values unchanged."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(torch.float64).requires_grad_(x.requires_grad)
    if isinstance(x, (list, tuple)):
        return type(x)(to64(v) for v in x)
    if isinstance(x, dict):
        return {k: to64(v) for k, v in x.items()}
    return x


def grad_inputs(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def tolerances(dtype):
    """(ulps for losses, ulps for gradients) per dtype. The CPU backend
    computes in double and rounds once; the gradient is then scaled by the
    upstream gradient in the input dtype (a second rounding)."""
    return {torch.float32: (4, 8), torch.bfloat16: (1.25, 1.5), torch.float16: (1.0, 1.75)}[dtype]


class RecordCulossOps(torch.overrides.TorchFunctionMode):
    """Records every culoss custom-op call (with the args autograd sees): a
    test can then assert culoss computed the value, not a torch fallback."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and \
                str(func).startswith("culoss."):
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


__all__ = ["assert_close_ulps", "to64", "grad_inputs", "tolerances", "ulp", "math",
           "RecordCulossOps"]
