"""PyTorch's own test inputs for every culoss.torch op: each sample of the op's
OpInfo entry (torch.testing._internal.common_methods_invocations.op_db), in
float32 and bfloat16, forward and every input gradient (for a random upstream
gradient) against torch.nn.functional in float64 on the same (dtype-rounded)
inputs; and every OpInfo error input must raise. CPU tensors: the CPU backend."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import culoss.torch as cl
from torch_ref import RecordCulossOps, assert_close_ulps, grad_inputs, to64, tolerances, ulp

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.testing._internal.common_methods_invocations import op_db

OPS = {
    "nn.functional.cross_entropy": cl.cross_entropy,
    "nn.functional.nll_loss": cl.nll_loss,
    "nn.functional.binary_cross_entropy_with_logits": cl.binary_cross_entropy_with_logits,
    "nn.functional.binary_cross_entropy": cl.binary_cross_entropy,
    "nn.functional.multi_margin_loss": cl.multi_margin_loss,
    "nn.functional.mse_loss": cl.mse_loss,
    "nn.functional.l1_loss": cl.l1_loss,
    "nn.functional.huber_loss": cl.huber_loss,
    "nn.functional.smooth_l1_loss": cl.smooth_l1_loss,
    "nn.functional.kl_div": cl.kl_div,
    "nn.functional.linear_cross_entropy": cl.linear_cross_entropy,
    "nn.functional.hinge_embedding_loss": cl.hinge_embedding_loss,
    "nn.functional.soft_margin_loss": cl.soft_margin_loss,
    "nn.functional.poisson_nll_loss": cl.poisson_nll_loss,
    "nn.functional.margin_ranking_loss": cl.margin_ranking_loss,
    "nn.functional.gaussian_nll_loss": cl.gaussian_nll_loss,
    "nn.functional.cosine_embedding_loss": cl.cosine_embedding_loss,
    "nn.functional.triplet_margin_loss": cl.triplet_margin_loss,
    "nn.functional.multilabel_soft_margin_loss": cl.multilabel_soft_margin_loss,
    "nn.functional.multilabel_margin_loss": cl.multilabel_margin_loss,
}
# Ops whose inputs broadcast to the loss's shape with a gradient (summed).
BROADCAST_SUMS = {"margin_ranking_loss", "gaussian_nll_loss"}
# Refusals (a clear error instead of a value) this suite accepts: none.
ALLOWED_REFUSALS = set()

ENTRIES = [o for o in op_db if o.name in OPS]
ENTRY_IDS = [o.name.split(".")[-1] + (f".{o.variant_test_name}" if o.variant_test_name else "")
             for o in ENTRIES]


def test_every_op_has_an_opinfo_entry():
    found = {o.name for o in ENTRIES}
    missing = set(OPS) - found
    if "nn.functional.linear_cross_entropy" in missing and not hasattr(F, "linear_cross_entropy"):
        missing.discard("nn.functional.linear_cross_entropy")  # torch < 2.13
    assert not missing, f"no OpInfo entry for {sorted(missing)}"


def _composed_linear_ce(args, kwargs):
    """culoss materialises the logits (in the input dtype) for K-dimensional
    linear weights and probability targets."""
    return args[1].dim() > 2 or args[2].is_floating_point()


def _linear_ce_reference(args, kwargs, dtype):
    """float64 logits, rounded to `dtype` where culoss materialises them
    (straight-through: the rounding is not differentiated), then F.cross_entropy."""
    x, w, t = args[:3]
    kw = dict(kwargs)
    b = kw.pop("linear_bias", None)
    kw.pop("options", None)
    if kw.get("ignore_index", -100) is None:
        kw["ignore_index"] = -100
    logits = torch.tensordot(x, w, dims=([x.dim() - 1], [w.dim() - 1]))
    if b is not None:
        logits = logits + b
    if _composed_linear_ce(args, kwargs):
        logits = logits + (logits.detach().to(dtype).to(torch.float64) - logits.detach())
    return F.cross_entropy(logits, t, **kw)


def _reference(name, args, kwargs, dtype):
    if name.endswith("linear_cross_entropy"):
        return _linear_ce_reference(args, kwargs, dtype)
    fn = getattr(F, name.split(".")[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("entry", ENTRIES, ids=ENTRY_IDS)
def test_opinfo_samples(entry, dtype):
    ours_fn = OPS[entry.name]
    loss_ulps, grad_ulps = tolerances(dtype)
    torch.manual_seed(0)
    count, refusals = 0, []
    for i, s in enumerate(entry.sample_inputs("cpu", dtype, requires_grad=True)):
        args = [s.input] + list(s.args)
        what = f"{entry.name}[{i}] {dtype} shape {tuple(s.input.shape)} kwargs {s.kwargs}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = ours_fn(*args, **s.kwargs)
            except Exception as e:  # a refusal: listed, and failing unless allowed
                refusals.append((what, f"{type(e).__name__}: {e}"))
                continue
        args64, kwargs64 = to64(args), to64(s.kwargs)
        # culoss's scalar options (margin, delta, eps, ...) are float32 in its
        # C API: the reference gets them rounded so, like the tensors
        kwargs64 = {k: float(torch.tensor(v, dtype=torch.float32)) if isinstance(v, float) else v
                    for k, v in kwargs64.items()}
        ref = _reference(entry.name, args64, kwargs64, dtype)
        assert out.dtype == dtype, f"{what}: loss dtype {out.dtype}"
        atol = 0.0
        if entry.name.endswith("linear_cross_entropy") and _composed_linear_ce(args, s.kwargs):
            # logits from a GEMM in `dtype`: each off by up to d ulps of the largest
            with torch.no_grad():
                big = torch.tensordot(args64[0], args64[1],
                                      dims=([args64[0].dim() - 1], [args64[1].dim() - 1]))
                atol = args[0].shape[-1] * float(ulp(big.abs().max(), dtype))
        assert_close_ulps(out, ref, dtype, loss_ulps, what + " loss", atol=atol)
        ins = grad_inputs(args) + [v for v in s.kwargs.values()
                                   if isinstance(v, torch.Tensor) and v.requires_grad]
        assert out.requires_grad == ref.requires_grad, f"{what}: requires_grad differs from F's"
        if ins and out.requires_grad:
            g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
            got = torch.autograd.grad(out, ins, g, allow_unused=True)
            ins64 = grad_inputs(args64) + [v for v in kwargs64.values()
                                           if isinstance(v, torch.Tensor) and v.requires_grad]
            want = torch.autograd.grad(ref, ins64, g.to(torch.float64), allow_unused=True)
            # gradients through a materialised-logits matmul are sums over the
            # logit rows of terms rounded to `dtype`: their error is up to
            # rows / 2 ulps of the largest element (sums that cancel)
            floor = 2.0 ** -12
            if entry.name.endswith("linear_cross_entropy") and _composed_linear_ce(args, s.kwargs):
                floor = max(1.0, (ref.numel() if ref.dim() else args[0].shape[0]) / 2)
            for k, (a, b) in enumerate(zip(got, want)):
                if b is None:
                    continue
                f = floor
                if entry.name.split(".")[-1] in BROADCAST_SUMS:
                    full = torch.broadcast_shapes(*[t.shape for t in args
                                                    if isinstance(t, torch.Tensor)]).numel()
                    if 0 < b.numel() < full:
                        # a broadcast input's gradient: a float32 sum of
                        # full / b.numel() terms, each rounded to fp32 (the
                        # op runs in fp32 for a broadcast 16-bit input), which
                        # may cancel: that many fp32 ulps of the largest
                        f32_per_ulp = {torch.float32: 1.0, torch.bfloat16: 2.0 ** -16,
                                       torch.float16: 2.0 ** -13}[dtype]
                        f = max(floor, full / b.numel() * f32_per_ulp)
                assert a is not None, f"{what}: no gradient for input {k}"
                assert a.dtype == ins[k].dtype, f"{what}: grad {k} dtype {a.dtype}"
                assert_close_ulps(a, b, dtype, grad_ulps, f"{what} grad of input {k}", f)
        count += 1
    print(f"{entry.name} {dtype}: {count} samples checked, {len(refusals)} refused")
    for what, why in refusals:
        print("  refused:", what, why)
    bad = [f"{what}: {why}" for what, why in refusals if what not in ALLOWED_REFUSALS]
    assert not bad, "refused:\n  " + "\n  ".join(bad)
    assert count > 0


def _error_inputs(entry):
    try:
        return list(entry.error_inputs("cpu"))
    except (TypeError, NotImplementedError):  # the entry defines none
        return []


ERROR_ENTRIES = [(o, i) for o, i in zip(ENTRIES, ENTRY_IDS) if _error_inputs(o)]


def test_error_inputs_exist():
    assert len(ERROR_ENTRIES) >= 3, [i for _, i in ERROR_ENTRIES]


@pytest.mark.parametrize("entry", [o for o, _ in ERROR_ENTRIES], ids=[i for _, i in ERROR_ENTRIES])
def test_opinfo_error_inputs(entry):
    ours_fn = OPS[entry.name]
    errors = _error_inputs(entry)
    for e in errors:
        s = e.sample_input
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises((ValueError, TypeError, RuntimeError, IndexError)):
                ours_fn(s.input, *s.args, **s.kwargs)
    print(f"{entry.name}: {len(errors)} error inputs raise")


@pytest.mark.parametrize("entry", ENTRIES, ids=ENTRY_IDS)
def test_opcheck_on_opinfo_samples(entry):
    """torch.library.opcheck (schema, fake kernel, autograd registration, AOT
    dispatch with dynamic shapes) on every culoss op call the OpInfo samples make."""
    ours_fn = OPS[entry.name]
    checked = set()
    for s in entry.sample_inputs("cpu", torch.float32, requires_grad=True):
        rec = RecordCulossOps()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rec:
                ours_fn(s.input, *s.args, **s.kwargs)
        for func, args, kwargs in rec.calls:
            torch.library.opcheck(func, args, kwargs)
            checked.add(str(func))
    assert checked, f"{entry.name}: no culoss op was called"
    print(f"{entry.name}: opcheck passed for {sorted(checked)}")
