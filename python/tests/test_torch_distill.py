"""Distillation (issue 21): culoss.torch.generalized_jsd_loss, tvd_loss and
linear_generalized_jsd_loss, and their modules, against TRL's
generalized_jsd_loss written out here in float64 torch ops on the same
(dtype-rounded) inputs: forward and student gradients for every beta,
temperatures, labels with ignored rows, every reduction, fp32 / bf16 / fp16;
-inf teacher logits; [B, T, V] rows read without a copy; no gradient to the
teacher; the fused linear form against explicit logits with the hard-loss
term; bad arguments; torch.compile; and, on a GPU, the CUDA backend and the
linear form's peak memory against the explicit form."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import culoss.torch as cl
from test_torch_ops import DT_IDS, DTYPES, check
from torch_ref import RecordCulossOps, assert_close_ulps, tolerances, ulp

BETAS = [0.0, 0.25, 0.5, 1.0]
REDS = ["batchmean", "sum", "mean", "none"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="skipped: no CUDA device")


def trl_jsd(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
            reduction="batchmean", ignore_index=-100, tvd=False):
    """TRL's generalized_jsd_loss (trl/trainer/gkd_trainer.py), float64,
    with 0 * log 0 = 0 where a teacher probability is 0 (TRL's kl_div would
    give NaN there), and TVD in the same frame."""
    s = student_logits / temperature
    t = teacher_logits / temperature
    slp = F.log_softmax(s, dim=-1)
    tlp = F.log_softmax(t, dim=-1)

    def term(a_lp, b_lp):  # exp(a) (a - b), 0 where exp(a) = 0; logs masked first (no NaN grad)
        keep = a_lp > -math.inf
        z = torch.zeros_like(a_lp)
        return a_lp.exp() * (torch.where(keep, a_lp, z) - torch.where(keep, b_lp, z))

    if tvd:
        jsd = 0.5 * (tlp.exp() - slp.exp()).abs()
    elif beta == 0:
        jsd = term(tlp, slp)
    elif beta == 1:
        jsd = term(slp, tlp)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        none = (tlp == -math.inf) & (slp == -math.inf)
        z = torch.zeros_like(slp)
        mix = torch.logsumexp(torch.stack([torch.where(none, z, slp) + torch.log1p(-b),
                                           torch.where(none, z, tlp) + torch.log(b)]), dim=0)
        jsd = beta * term(tlp, mix) + (1 - beta) * term(slp, mix)
    if labels is not None:
        mask = labels != ignore_index
        jsd = jsd * mask.unsqueeze(-1)
    if reduction == "batchmean":
        return jsd.sum() / (mask.sum() if labels is not None else jsd[..., 0].numel())
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd.sum(-1)


def _pair(shape, dtype, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    t = (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    return s.requires_grad_(), t


def _labels(rows_shape, v, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, rows_shape, generator=gen)
    y[(torch.rand(rows_shape, generator=gen) < 0.3)] = -100
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_against_trl(dtype, reduction, beta, temperature):
    s, t = _pair((2, 5, 33), dtype, int(beta * 8) + 10 * int(temperature))
    y = _labels((2, 5), 33, 3)

    def ref(s_, t_, y_, **kw):
        return trl_jsd(s_, t_, y_, beta=kw["beta"], temperature=kw["temperature"],
                       reduction=kw["reduction"])

    check(cl.generalized_jsd_loss, ref, (s, t, y),
          dict(beta=beta, temperature=temperature, reduction=reduction), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
def test_tvd_against_the_formula(dtype, reduction):
    s, t = _pair((7, 29), dtype, 5)
    y = _labels((7,), 29, 6)

    def ref(s_, t_, y_, **kw):
        return trl_jsd(s_, t_, y_, temperature=kw["temperature"], reduction=kw["reduction"],
                       tvd=True)

    check(cl.tvd_loss, ref, (s, t, y), dict(temperature=1.5, reduction=reduction), dtype)


def test_no_labels_and_the_module_defaults():
    s, t = _pair((4, 3, 17), torch.float32, 7)
    m = cl.GeneralizedJSDLoss()
    assert (m.beta, m.temperature, m.ignore_index, m.reduction) == (0.5, 1.0, -100, "batchmean")
    got = m(s, t)
    want = trl_jsd(s.detach().double(), t.double())
    assert_close_ulps(got, want, torch.float32, 4, "loss")
    got = cl.TVDLoss(temperature=2.0, reduction="sum")(s, t)
    want = trl_jsd(s.detach().double(), t.double(), temperature=2.0, reduction="sum", tvd=True)
    assert_close_ulps(got, want, torch.float32, 4, "tvd")


def test_minus_inf_teacher_logits_give_no_nan():
    s, t = _pair((5, 12), torch.float32, 8)
    t = t.clone()
    t[:, 3] = -math.inf
    t[2, 5:] = -math.inf
    for beta in BETAS:
        if beta == 1.0:  # reverse KL is +inf where P = 0 < Q: keep the student -inf there too
            s2 = s.detach().clone()
            s2[t == -math.inf] = -math.inf
            s2.requires_grad_()
        else:
            s2 = s
        got = cl.generalized_jsd_loss(s2, t, beta=beta, reduction="none")
        want = trl_jsd(s2.detach().double(), t.double(), beta=beta, reduction="none")
        assert torch.isfinite(got).all(), (beta, got)
        assert_close_ulps(got, want, torch.float32, 4, f"beta {beta}")
        g = torch.autograd.grad(got.sum(), s2)[0]
        assert torch.isfinite(g[s2 > -math.inf]).all()


def test_confident_rows_keep_their_digits():
    """The top 20 logits ahead (1 + e^-20 is 1 in fp32): TRL's formula in
    fp32 loses the loss; culoss keeps fp32 accuracy against float64."""
    v = 50
    s = torch.zeros(3, v)
    t = torch.zeros(3, v)
    s[:, 0], t[:, 0] = 20.0, 21.0
    s[:, 1:] = torch.linspace(-1, 1, v - 1)
    t[:, 1:] = torch.linspace(1, -1, v - 1)
    for beta in BETAS:
        got = cl.generalized_jsd_loss(s, t, beta=beta, reduction="none")
        want = trl_jsd(s.double(), t.double(), beta=beta, reduction="none")
        assert torch.allclose(got.double(), want, rtol=2e-6, atol=0), (beta, got, want)


def test_rows_are_read_without_a_copy():
    """[B, T, V] through view(-1, V): the op gets a view of the caller's
    storage (also with padded rows: a slice of a wider tensor)."""
    base = torch.randn(2, 3, 40)
    s = base[..., :33].requires_grad_(False)
    s = s.detach().requires_grad_()  # a leaf view, row stride 40
    t = torch.randn(2, 3, 33)
    rec = RecordCulossOps()
    with rec:
        loss = cl.generalized_jsd_loss(s, t, reduction="sum")
    (args,) = [a for func, a, _ in rec.calls if "distill" in str(func)]
    assert args[0].data_ptr() == s.data_ptr() and args[0].stride() == (40, 1)
    assert args[1].data_ptr() == t.data_ptr()
    g = torch.autograd.grad(loss, s)[0]
    s64 = s.detach().double().requires_grad_()
    want = trl_jsd(s64, t.double(), reduction="sum")
    (g64,) = torch.autograd.grad(want, s64)
    assert_close_ulps(g, g64, torch.float32, 8, "grad")


def test_teacher_gets_no_gradient():
    s, t = _pair((4, 9), torch.float32, 9)
    t.requires_grad_()
    cl.generalized_jsd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_all_ignored_batchmean_is_nan_with_zero_grad():
    s, t = _pair((3, 8), torch.float32, 10)
    y = torch.full((3,), -100)
    loss = cl.generalized_jsd_loss(s, t, y)
    assert math.isnan(float(loss.detach()))
    (g,) = torch.autograd.grad(loss, s)
    assert (g == 0).all()


def test_bad_arguments():
    s, t = _pair((3, 8), torch.float32, 11)
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="beta"):
        cl.generalized_jsd_loss(s, t, beta=1.5)
    with pytest.raises(ValueError, match="beta"):
        cl.generalized_jsd_loss(s, t, beta=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        cl.generalized_jsd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        cl.tvd_loss(s, t, temperature=-1.0)
    with pytest.raises(ValueError, match="shape"):
        cl.generalized_jsd_loss(s, t[:, :7])  # vocabularies differ
    with pytest.raises(ValueError, match="shape"):
        cl.generalized_jsd_loss(s, t[:2])  # rows differ
    with pytest.raises(ValueError, match="labels"):
        cl.generalized_jsd_loss(s, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        cl.generalized_jsd_loss(s, t, torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        cl.generalized_jsd_loss(s, t, reduction="avg")
    with pytest.raises(TypeError):
        cl.generalized_jsd_loss(s, torch.zeros(3, 8, dtype=torch.long))
    w = torch.randn(8, 4)
    h = torch.randn(3, 4)
    with pytest.raises(ValueError, match="labels"):
        cl.linear_generalized_jsd_loss(h, w, h, w, weight_hard_loss=0.5)
    with pytest.raises(ValueError, match="vocabulary"):
        cl.linear_generalized_jsd_loss(h, w, h, w[:7])
    with pytest.raises(ValueError, match="rows"):
        cl.linear_generalized_jsd_loss(h, w, h[:2], w)
    with pytest.raises(ValueError, match="in_features"):
        cl.linear_generalized_jsd_loss(h, w, torch.randn(3, 5), w)
    with pytest.raises(ValueError, match="beta"):
        cl.linear_generalized_jsd_loss(h, w, h, w, y, beta=2.0)


def test_float64_runs_the_explicit_form():
    """float64 runs torch ops: the same loss and student gradient as the
    formula (-inf student and teacher logits included: no NaN from the
    masked terms), and still no gradient to the teacher."""
    s, t = _pair((3, 8), torch.float64, 12)
    s = s.detach().clone()
    s[0, 2] = -math.inf
    t[1, 4] = -math.inf
    t[0, 2] = -math.inf
    t.requires_grad_()
    for beta in BETAS:
        sb = s.clone()
        if beta == 1.0:  # reverse KL is +inf where P = 0 < Q: the student -inf there too
            sb[t.detach() == -math.inf] = -math.inf
        s1 = sb.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = cl.generalized_jsd_loss(s1, t, beta=beta)
        assert got.dtype == torch.float64
        s2 = sb.clone().requires_grad_()
        want = trl_jsd(s2, t.detach(), beta=beta)
        assert torch.allclose(got, want, rtol=1e-12), (beta, got, want)
        (g1,) = torch.autograd.grad(got, s1)
        (g2,) = torch.autograd.grad(want, s2)
        assert torch.isfinite(g1).all(), (beta, g1)
        assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14), (beta, g1, g2)
    cl.generalized_jsd_loss(s.clone().requires_grad_(), t).backward()
    assert t.grad is None


# ----------------------------------------------------------------- the linear form


def _exact(shape, gen, dtype):
    """Values in {0, +-1/2, +-1}: logits of a few such products are exact in
    every dtype, so the fused form's dtype logits equal the explicit ones."""
    vals = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0], dtype=torch.float64)
    return vals[torch.randint(0, 5, shape, generator=gen)].to(dtype)


def _linear_ref(si, sw, ti, tw, y, sb, tb, beta, temperature, reduction, wh, ws, hard=None):
    return _linear_ref_from_logits(F.linear(si, sw, sb), ti, tw, y, tb, beta, temperature,
                                   reduction, wh, ws, hard)


def _linear_ref_from_logits(s, ti, tw, y, tb, beta, temperature, reduction, wh, ws, hard=None):
    """hard: None, or (label_smoothing, class weights, z-loss) of the hard
    term: F.cross_entropy's per-row loss plus z lse^2, reduced with the
    divergence's divisor (kept rows for batchmean)."""
    t = F.linear(ti, tw, tb)
    loss = ws * trl_jsd(s, t, y, beta=beta, temperature=temperature, reduction=reduction)
    if wh:
        eps, cw, z = hard if hard is not None else (0.0, None, 0.0)
        s2 = s.reshape(-1, s.shape[-1])
        ce = F.cross_entropy(s2, y.reshape(-1), reduction="none", label_smoothing=eps,
                             weight=cw.to(s2.dtype) if cw is not None else None)
        ce = ce + torch.where(y.reshape(-1) != -100, z * torch.logsumexp(s2, -1) ** 2, 0.0)
        ce = ce.reshape(y.shape)
        keep = y != -100
        if reduction == "batchmean":
            ce = ce.sum() / keep.sum()
        elif reduction == "sum":
            ce = ce.sum()
        elif reduction == "mean":
            ce = ce.sum() / (ce.numel() * s.shape[-1])
        loss = loss + wh * ce
    return loss


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
# weights exact in fp32 (the C options are floats: 0.3f's rounding, magnified by
# cancelling sums, would show in float64 comparisons)
# hopt: the hard term with smoothing 1/8, class weights in {1/2, 1, 3/2, 2} and z-loss 1/16
@pytest.mark.parametrize("beta,wh,hopt", [(0.5, 0.0, False), (0.0, 0.75, False),
                                          (1.0, 0.25, True), (0.25, 1.0, False),
                                          (0.25, 1.0, True), (0.5, 0.5, True)])
def test_linear_against_explicit_logits(dtype, reduction, beta, wh, hopt):
    gen = torch.Generator().manual_seed(21 + int(8 * beta))
    v, ds, dt = 37, 6, 8
    si = _exact((2, 5, ds), gen, dtype).requires_grad_()
    sw = _exact((v, ds), gen, dtype).requires_grad_()
    sb = _exact((v,), gen, dtype).requires_grad_()
    ti, tw, tb = _exact((2, 5, dt), gen, dtype), _exact((v, dt), gen, dtype), _exact((v,), gen, dtype)
    y = _labels((2, 5), v, 22)
    kw = dict(student_bias=sb, teacher_bias=tb, beta=beta, temperature=2.0, reduction=reduction,
              weight_hard_loss=wh, weight_soft_loss=0.75)
    hard = None
    if hopt:
        cw = 0.5 + 0.5 * torch.randint(0, 4, (v,), generator=gen).float()
        hard = (0.125, cw, 0.0625)
        kw.update(hard_label_smoothing=0.125, hard_class_weight=cw, hard_z_loss=0.0625)
    rec = RecordCulossOps()
    with rec:
        got = cl.linear_generalized_jsd_loss(si, sw, ti, tw, y, **kw)
    assert any("linear_distill" in str(func) for func, _, _ in rec.calls), "no culoss op ran"
    d64 = [x.detach().double().requires_grad_(x.requires_grad) for x in (si, sw, sb)]
    want = _linear_ref(d64[0], d64[1], ti.double(), tw.double(), y, d64[2], tb.double(), beta,
                       2.0, reduction, wh, 0.75, hard)
    loss_ulps, grad_ulps = tolerances(dtype)
    assert got.dtype == dtype and got.shape == want.shape
    assert_close_ulps(got, want, dtype, loss_ulps, "loss")
    g = torch.randn(got.shape, dtype=torch.float64).to(dtype)  # one upstream value for both
    gg = torch.autograd.grad(got, (si, sw, sb), g)
    gw = torch.autograd.grad(want, d64, g.double())
    if dtype == torch.float32:
        for k, (a, b) in enumerate(zip(gg, gw)):
            assert_close_ulps(a, b, dtype, grad_ulps, f"grad {k}")
        return
    # 16-bit: the gradients are sums over the logits' gradient G, which the
    # op rounds to the dtype (unit roundoff u, subnormal half-step f) before
    # them. Each element may differ from float64 by the sum of its terms'
    # rounding, (u |G| + f) |other factor|, plus its own rounding (ulps).
    u, f = {torch.bfloat16: (2.0 ** -9, 2.0 ** -134), torch.float16: (2.0 ** -11, 2.0 ** -25)}[dtype]
    logits = F.linear(d64[0].detach(), d64[1].detach(), d64[2].detach()).requires_grad_()
    ref = _linear_ref_from_logits(logits, ti.double(), tw.double(), y, tb.double(), beta, 2.0,
                                  reduction, wh, 0.75, hard)
    (G,) = torch.autograd.grad(ref, logits, g.double())
    err = (u * G.abs() + f).reshape(-1, v)
    h, w = d64[0].detach().reshape(-1, ds).abs(), d64[1].detach().abs()
    bounds = [(err @ w).reshape(si.shape), err.T @ h, err.sum(0)]
    for k, (a, b, bound) in enumerate(zip(gg, gw, bounds)):
        excess = (a.double() - b).abs() - bound - grad_ulps * ulp(b, dtype)
        assert (excess <= 0).all(), f"grad {k}: off by {excess.max().item():.3g} past the bound"


def test_linear_teacher_gets_no_gradient_and_the_module():
    gen = torch.Generator().manual_seed(30)
    si = torch.randn(6, 4, generator=gen, requires_grad=True)
    sw = torch.randn(11, 4, generator=gen, requires_grad=True)
    ti = torch.randn(6, 5, generator=gen, requires_grad=True)
    tw = torch.randn(11, 5, generator=gen, requires_grad=True)
    y = torch.randint(0, 11, (6,), generator=gen)
    m = cl.LinearGeneralizedJSDLoss(beta=0.25, weight_hard_loss=0.5)
    loss = m(si, sw, ti, tw, y)
    loss.backward()
    assert si.grad is not None and sw.grad is not None
    assert ti.grad is None and tw.grad is None
    want = _linear_ref(si.detach().double(), sw.detach().double(), ti.detach().double(),
                       tw.detach().double(), y, None, None, 0.25, 1.0, "batchmean", 0.5, 1.0)
    assert torch.allclose(loss.double(), want, rtol=1e-5)


def test_linear_hard_options_module_float64_and_bad_values():
    gen = torch.Generator().manual_seed(31)
    v = 11
    si = torch.randn(6, 4, generator=gen, requires_grad=True)
    sw = torch.randn(v, 4, generator=gen, requires_grad=True)
    ti, tw = torch.randn(6, 5, generator=gen), torch.randn(v, 5, generator=gen)
    y = torch.tensor([3, -100, 0, 10, 5, 1])
    cw = torch.rand(v, generator=gen) + 0.5
    m = cl.LinearGeneralizedJSDLoss(beta=0.25, weight_hard_loss=0.5, hard_label_smoothing=0.2,
                                    hard_class_weight=cw, hard_z_loss=0.01)
    assert "hard_class_weight" in dict(m.named_buffers())  # follows .to(device)
    loss = m(si, sw, ti, tw, y)
    want = _linear_ref(si.detach().double(), sw.detach().double(), ti.double(), tw.double(), y,
                       None, None, 0.25, 1.0, "batchmean", 0.5, 1.0, (0.2, cw.double(), 0.01))
    assert torch.allclose(loss.double(), want, rtol=1e-5), (loss.item(), want.item())
    # without the options the loss differs: they reach the op
    plain = cl.linear_generalized_jsd_loss(si, sw, ti, tw, y, beta=0.25, weight_hard_loss=0.5)
    assert not torch.allclose(plain, loss, rtol=1e-3)
    # float64 takes the explicit form, with the same options
    d = [x.detach().double().requires_grad_() for x in (si, sw)]
    with pytest.warns(UserWarning, match="not a culoss dtype"):
        l64 = cl.linear_generalized_jsd_loss(d[0], d[1], ti.double(), tw.double(), y, beta=0.25,
                                             weight_hard_loss=0.5, hard_label_smoothing=0.2,
                                             hard_class_weight=cw, hard_z_loss=0.01)
    assert l64.dtype == torch.float64
    assert torch.allclose(l64, want, rtol=1e-12)
    g64 = torch.autograd.grad(l64, d)
    gg = torch.autograd.grad(loss, (si, sw))
    for a, b in zip(gg, g64):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6)
    for kw, msg in [(dict(hard_label_smoothing=1.5), "hard_label_smoothing"),
                    (dict(hard_label_smoothing=-0.1), "hard_label_smoothing"),
                    (dict(hard_z_loss=-1.0), "hard_z_loss"),
                    (dict(hard_z_loss=math.inf), "hard_z_loss"),
                    (dict(hard_class_weight=torch.ones(v + 1)), "weight"),
                    (dict(hard_class_weight=torch.ones(v, dtype=torch.int64)), "weight")]:
        with pytest.raises((ValueError, TypeError), match=msg):
            cl.linear_generalized_jsd_loss(si, sw, ti, tw, y, weight_hard_loss=0.5, **kw)


def test_compile_fullgraph():
    torch._dynamo.reset()
    s, t = _pair((6, 13), torch.float32, 40)
    y = _labels((6,), 13, 41)
    w = torch.randn(13, 4, requires_grad=True)
    h = torch.randn(6, 4, requires_grad=True)

    def f(s, h, w):
        return (cl.generalized_jsd_loss(s, t, y, beta=0.25) + cl.tvd_loss(s, t) +
                cl.linear_generalized_jsd_loss(h, w, h.detach(), w.detach(), y,
                                               weight_hard_loss=0.5))

    eager = f(s, h, w)
    ge = torch.autograd.grad(eager, (s, h, w))
    comp = torch.compile(f, fullgraph=True)(s, h, w)
    gc = torch.autograd.grad(comp, (s, h, w))
    assert torch.allclose(eager, comp, rtol=1e-5)
    for a, b in zip(ge, gc):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- CUDA


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("beta", BETAS)
def test_cuda_matches_trl(dtype, beta):
    s, t = _pair((3, 4, 4099), dtype, 50)
    y = _labels((3, 4), 4099, 51)
    s, t, y = s.detach().cuda().requires_grad_(), t.cuda(), y.cuda()
    got = cl.generalized_jsd_loss(s, t, y, beta=beta, temperature=2.0)
    want = trl_jsd(s.detach().double(), t.double(), y, beta=beta, temperature=2.0)
    loss_ulps, grad_ulps = tolerances(dtype)
    assert_close_ulps(got, want, dtype, loss_ulps, "loss")
    s64 = s.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(trl_jsd(s64, t.double(), y, beta=beta, temperature=2.0), s64)
    (g,) = torch.autograd.grad(got, s)
    assert_close_ulps(g, g64, dtype, grad_ulps, "grad")


@cuda
def test_cuda_linear_memory_against_the_explicit_form():
    """n = 1024, v = 131072, d = 2048 bf16: the fused form's peak memory is a
    fraction of the explicit form's two [n, v] logits and their softmaxes."""
    n, v, d = 1024, 131072, 2048
    gen = torch.Generator(device="cuda").manual_seed(60)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    h = (torch.randn(n, d, generator=gen, **kw) * 0.05).requires_grad_()
    w = (torch.randn(v, d, generator=gen, **kw) * 0.05).requires_grad_()
    ht = torch.randn(n, d, generator=gen, **kw) * 0.05
    wt = torch.randn(v, d, generator=gen, **kw) * 0.05

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        h.grad = w.grad = None
        return torch.cuda.max_memory_allocated() - base, float(loss)

    fused, lf = peak(lambda: cl.linear_generalized_jsd_loss(h, w, ht, wt))
    explicit, le = peak(lambda: trl_jsd(F.linear(h, w).float(), F.linear(ht, wt).float()))
    print(f"linear JSD n={n} v={v} d={d}: peak {fused / 2**20:.0f} MiB fused, "
          f"{explicit / 2**20:.0f} MiB explicit")
    assert fused < explicit / 2, (fused, explicit)
    assert abs(lf - le) <= 2e-2 * abs(le)  # bf16 logits in both
