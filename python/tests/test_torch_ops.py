"""culoss.torch beyond the OpInfo samples (float options are dyadic here: the
C ABI takes them as float32, and 0.2f is not 0.2; OpInfo's own values pass
too, but cancellation in p - q would show a parameter's rounding): every op and module against
torch.nn.functional over options, reductions and random upstream gradients;
the edges (all rows ignored, large-magnitude and -inf logits, empty batches);
linear + CE against torch's chunked op; torch.compile(fullgraph=True) of a
training step; a tiny language model trained with LinearCrossEntropyLoss;
bad input (each a regression test for the old binding's out-of-bounds reads);
and the CUDA paths (skipped visibly without a GPU)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import culoss.torch as cl
from torch_ref import RecordCulossOps, assert_close_ulps, to64, tolerances

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["f32", "bf16", "f16"]


def check(ours, ref_fn, args, kwargs, dtype, ours_kwargs=None):
    """ours(*args, **kwargs, **ours_kwargs) against ref_fn in float64 on the
    same inputs: loss and every gradient, with a random upstream gradient;
    a culoss op must have computed it (no torch fallback)."""
    loss_ulps, grad_ulps = tolerances(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = RecordCulossOps()
        with rec:
            out = ours(*args, **kwargs, **(ours_kwargs or {}))
        assert rec.calls, "no culoss op ran"
        args64, kwargs64 = to64(list(args)), to64(kwargs)
        ref = ref_fn(*args64, **kwargs64)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_ulps(out, ref, dtype, loss_ulps, "loss")
    ins = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    ins64 = [a for a in args64 if isinstance(a, torch.Tensor) and a.requires_grad]
    if not ins:
        return out
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(out, ins, g, allow_unused=True)
    want = torch.autograd.grad(ref, ins64, g.double(), allow_unused=True)
    for k, (a, b) in enumerate(zip(got, want)):
        if b is not None:
            assert a is not None
            assert_close_ulps(a, b, dtype, grad_ulps, f"grad {k}")
    return out


def logits(n, c, dtype, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, c, generator=gen, dtype=torch.float64)).to(dtype)
    return x.requires_grad_()

# ----------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.25}, {"weight": True},
                                  {"weight": True, "label_smoothing": 0.125, "ignore_index": 3}])
def test_cross_entropy_options(dtype, reduction, opts):
    x = logits(37, 11, dtype)
    t = torch.randint(0, 11, (37,), generator=torch.Generator().manual_seed(1))
    t[::5] = opts.get("ignore_index", -100)
    kw = dict(opts, reduction=reduction)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(11, generator=torch.Generator().manual_seed(2)).to(dtype) + 0.5
    check(cl.cross_entropy, F.cross_entropy, (x, t), kw, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cross_entropy_large_and_minus_inf_logits(dtype):
    x = logits(16, 9, dtype, scale=1e4).detach()
    x[0, 2] = -float("inf")
    x[3, :4] = -float("inf")  # the target column among them for row 3
    x[5] += 3e4
    t = torch.arange(16) % 9
    t[3] = 1
    x.requires_grad_()
    for red in ("none", "sum", "mean"):
        check(cl.cross_entropy, F.cross_entropy, (x, t), {"reduction": red}, dtype)
    t2 = t.clone()
    t2[3] = 5  # a finite target logit: the reduced losses are finite numbers too
    for red in ("sum", "mean"):
        check(cl.cross_entropy, F.cross_entropy, (x, t2), {"reduction": red}, dtype)


def test_cross_entropy_all_ignored_mean_is_nan_with_zero_grad():
    x = logits(6, 4, torch.float32)
    t = torch.full((6,), -100)
    loss = cl.cross_entropy(x, t)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x, t))
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert cl.cross_entropy(x, t, reduction="sum").item() == 0.0


def test_cross_entropy_k_dimensional_and_unbatched():
    x = logits(2 * 5 * 3, 4, torch.float32).detach().reshape(2, 5, 3, 4).movedim(3, 1)
    x = x.contiguous().requires_grad_()  # [N=2, C=4, 5, 3]
    t = torch.randint(0, 4, (2, 5, 3))
    for red in ("none", "mean"):
        check(cl.cross_entropy, F.cross_entropy, (x, t), {"reduction": red}, torch.float32)
    x1 = logits(1, 7, torch.float32).detach()[0].requires_grad_()
    check(cl.cross_entropy, F.cross_entropy, (x1, torch.tensor(3)), {"reduction": "none"},
          torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cross_entropy_probability_targets_with_target_grad(dtype):
    x = logits(9, 6, dtype)
    y = torch.softmax(torch.randn(9, 6, dtype=torch.float64), 1).to(dtype).requires_grad_()
    for kw in ({}, {"label_smoothing": 0.375, "reduction": "sum"},
               {"weight": torch.rand(6).to(dtype) + 0.1, "reduction": "none"}):
        check(cl.cross_entropy, F.cross_entropy, (x, y), kw, dtype)


class _Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """Records aten ops that copy tensor data."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(k in name for k in ("clone", "copy", "_to_copy", "contiguous")):
            self.copies.append(name)
        return func(*args, **(kwargs or {}))


def test_cross_entropy_strided_rows_take_no_copy():
    base = logits(8, 40, torch.float32).detach()
    x = base[:, :33].requires_grad_()  # row stride 40: read in place
    t = torch.randint(0, 33, (8,))
    check(cl.cross_entropy, F.cross_entropy, (x, t), {}, torch.float32)
    v = torch.randn(4, 6, 50, requires_grad=True)
    # logits.view(-1, V), a padded pitch, and [N, C, d] whose classes are
    # innermost in memory (a transposed view): all read in place
    for inp in (v.view(-1, 50), x, v.transpose(1, 2)):
        rec = _Copies()
        tt = torch.randint(0, inp.shape[1], inp.shape[:1] + inp.shape[2:])
        with rec:
            cl.cross_entropy(inp, tt)
        assert not rec.copies, rec.copies
    rec = _Copies()  # [N, C, d] with classes strided does copy (documented)
    with rec:
        cl.cross_entropy(v, torch.randint(0, 6, (4, 50)))
    assert rec.copies


def test_autocast_takes_low_precision_logits_as_they_are():
    x = logits(6, 9, torch.bfloat16)
    t = torch.randint(0, 9, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec = _Copies()
        with rec:
            loss = cl.cross_entropy(x, t)
        assert not rec.copies, rec.copies  # no fp32 copy of the logits
        assert loss.dtype == torch.float32  # torch's autocast gives float32 losses
        assert_close_ulps(loss, F.cross_entropy(x.detach().double(), t), torch.float32, 4, "ce")
        h = torch.randn(6, 5, requires_grad=True)
        w = torch.randn(9, 5, requires_grad=True)  # fp32 master weights
        lin = cl.linear_cross_entropy(h, w, t)
        assert lin.dtype == torch.float32
    lin.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    # the logits from bf16-rounded h and w (as F.linear under autocast), in float64
    ref = F.cross_entropy(h.detach().bfloat16().double() @ w.detach().bfloat16().double().T, t)
    assert abs(lin.item() - ref.item()) < 1e-5 * abs(ref.item())


def test_cross_entropy_extras_against_composition():
    x = logits(12, 10, torch.float32)
    t = torch.randint(0, 10, (12,))
    cap, z = 4.0, 2.0 ** -10

    def ref(x, t):
        xc = cap * torch.tanh(x / cap)
        lse = torch.logsumexp(xc, 1)
        return F.cross_entropy(xc, t, reduction="sum") / 7.0 + z * (lse ** 2).sum() / 7.0

    check(cl.cross_entropy, ref, (x, t), {}, torch.float32,
          ours_kwargs=dict(z_loss=z, logit_softcap=cap, normalizer=7.0))


def test_cross_entropy_inplace_backward_overwrites_logits_and_matches():
    x0 = logits(10, 13, torch.float32).detach()
    t = torch.randint(0, 13, (10,))
    w = torch.randn(13, 13)
    h = x0.clone().requires_grad_()
    z = h @ w  # the logits are an intermediate, as after an LM head
    zr = (x0.clone().requires_grad_() @ w)
    loss = cl.cross_entropy(z, t, label_smoothing=0.1, inplace_backward=True)
    (loss * 3.0).backward()
    zr_loss = F.cross_entropy(zr, t, label_smoothing=0.1) * 3.0
    g_ref, = torch.autograd.grad(zr_loss, zr)
    assert torch.allclose(z.detach(), g_ref, rtol=1e-5, atol=1e-7), "gradient not written in place"
    assert torch.allclose(h.grad, g_ref @ w.T, rtol=1e-4, atol=1e-6)


def test_inplace_backward_refuses_logits_another_op_saved():
    x = logits(4, 6, torch.float32)
    y = torch.exp(x)  # exp saves its output for its backward
    loss = cl.cross_entropy(y, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_nll_and_multi_margin_options():
    lp = torch.log_softmax(torch.randn(20, 7, dtype=torch.float64), 1).float().requires_grad_()
    t = torch.randint(0, 7, (20,))
    t[2] = -100
    w = torch.rand(7) + 0.2
    for red in ("none", "sum", "mean"):
        check(cl.nll_loss, F.nll_loss, (lp, t), {"weight": w, "reduction": red}, torch.float32)
    s = logits(20, 7, torch.float32)
    t2 = torch.randint(0, 7, (20,))
    for kw in ({"p": 2, "margin": 0.75}, {"weight": w, "reduction": "sum"}, {"reduction": "none"}):
        check(cl.multi_margin_loss, F.multi_margin_loss, (s, t2), kw, torch.float32)

# ----------------------------------------------------------------- elementwise


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_elementwise_losses(dtype, reduction):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 9, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.randn(6, 9, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    p = torch.rand(6, 9, generator=gen, dtype=torch.float64).clamp(0.02, 0.98).to(dtype)
    p.requires_grad_()
    yb = torch.rand(6, 9, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.rand(9, generator=gen).to(dtype) + 0.5
    r = {"reduction": reduction}
    check(cl.mse_loss, F.mse_loss, (x, y), r, dtype)
    check(cl.l1_loss, F.l1_loss, (x, y), r, dtype)
    check(cl.huber_loss, F.huber_loss, (x, y), dict(r, delta=0.625), dtype)
    check(cl.smooth_l1_loss, F.smooth_l1_loss, (x, y), dict(r, beta=0.375), dtype)
    check(cl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (x, yb),
          dict(r, weight=w, pos_weight=w + 1), dtype)
    check(cl.binary_cross_entropy, F.binary_cross_entropy, (p, yb), dict(r, weight=w), dtype)
    lq = torch.log_softmax(x.detach().double(), 1).to(dtype).requires_grad_()
    check(cl.kl_div, F.kl_div, (lq, p), dict(reduction=reduction), dtype)
    check(cl.kl_div, F.kl_div, (lq, torch.log(p.detach()).requires_grad_()),
          dict(reduction=reduction, log_target=True), dtype)


def test_kl_batchmean_and_regression_weights():
    x = torch.log_softmax(torch.randn(5, 8, dtype=torch.float64), 1).float().requires_grad_()
    y = torch.softmax(torch.randn(5, 8, dtype=torch.float64), 1).float().requires_grad_()
    check(cl.kl_div, F.kl_div, (x, y), {"reduction": "batchmean"}, torch.float32)
    a = torch.randn(5, 8).requires_grad_()
    b = torch.randn(5, 8)
    w = (torch.rand(5, 8) + 0.1).requires_grad_()
    # torch 2.15's elementwise weight (mean: sum(w l) / sum(w) for mse and l1,
    # mean(w l) for huber), written out so older torch checks it too
    for fn, ref, by_w in ((cl.mse_loss, F.mse_loss, True), (cl.l1_loss, F.l1_loss, True),
                          (cl.huber_loss, F.huber_loss, False)):
        for red in ("none", "sum", "mean"):
            out = fn(a, b, reduction=red, weight=w)
            wl = ref(a.double(), b.double(), reduction="none") * w.double()
            want = {"none": wl, "sum": wl.sum(),
                    "mean": wl.sum() / w.double().sum() if by_w else wl.mean()}[red]
            assert_close_ulps(out, want, torch.float32, 4, fn.__name__)
            ga, gw = torch.autograd.grad(out.sum(), (a, w))
            ra, rw = torch.autograd.grad(want.sum(), (a, w))
            assert_close_ulps(ga, ra, torch.float32, 8, fn.__name__ + " grad input")
            # l / S - sum(w l) / S^2 cancels in the float32 composition: errors of
            # the largest element's size
            assert_close_ulps(gw, rw, torch.float32, 8, fn.__name__ + " grad weight", 1.0)


def test_broadcast_warns_like_torch():
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(3)
    with pytest.warns(UserWarning, match="target size"):
        out = cl.mse_loss(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close_ulps(out, F.mse_loss(a.double(), b.double()), torch.float32, 4, "mse bcast")


def test_hinge_loss_matches_margin_ranking_away_from_the_kink():
    f = torch.randn(50, dtype=torch.float64).float()
    y = torch.where(torch.rand(50) > 0.5, 1.0, -1.0)
    away = (1 - y * f).abs() > 1e-3  # the kink itself: test_torch_semantics.py
    f, y = f[away].requires_grad_(), y[away]
    for red in ("none", "sum", "mean"):
        check(cl.hinge_loss, lambda f, y, reduction: F.margin_ranking_loss(
            f, torch.zeros_like(f), y, margin=1.0, reduction=reduction), (f, y),
            {"reduction": red}, torch.float32)
        check(cl.hinge_loss, lambda f, y, reduction: (F.relu(1 - y * f) ** 2).sum() if
              reduction == "sum" else ((F.relu(1 - y * f) ** 2).mean() if reduction == "mean"
                                       else F.relu(1 - y * f) ** 2), (f, y),
              {"reduction": red}, torch.float32, ours_kwargs={"squared": True})


def test_float64_falls_back_to_torch_with_one_warning():
    import culoss.torch.functional as clf
    clf._warned.discard("mse_loss")
    a, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="float64 is not a culoss dtype"):
        out = cl.mse_loss(a, b)
    assert out.dtype == torch.float64 and torch.equal(out, F.mse_loss(a, b))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cl.mse_loss(a, b)  # once only

# ----------------------------------------------------------------- modules


def test_modules_match_their_functions():
    x = logits(8, 5, torch.float32)
    t = torch.randint(0, 5, (8,))
    w = torch.rand(5) + 0.5
    pairs = [
        (cl.CrossEntropyLoss(weight=w, label_smoothing=0.1), torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1), (x, t)),
        (cl.NLLLoss(weight=w, reduction="sum"), torch.nn.NLLLoss(weight=w, reduction="sum"), (torch.log_softmax(x, 1), t)),
        (cl.MultiMarginLoss(p=2), torch.nn.MultiMarginLoss(p=2), (x, t)),
        (cl.BCEWithLogitsLoss(pos_weight=w), torch.nn.BCEWithLogitsLoss(pos_weight=w), (x, torch.rand(8, 5))),
        (cl.BCELoss(), torch.nn.BCELoss(), (torch.sigmoid(x), torch.rand(8, 5))),
        (cl.MSELoss(), torch.nn.MSELoss(), (x, torch.randn(8, 5))),
        (cl.L1Loss(reduction="none"), torch.nn.L1Loss(reduction="none"), (x, torch.randn(8, 5))),
        (cl.HuberLoss(delta=0.5), torch.nn.HuberLoss(delta=0.5), (x, torch.randn(8, 5))),
        (cl.SmoothL1Loss(beta=0.5), torch.nn.SmoothL1Loss(beta=0.5), (x, torch.randn(8, 5))),
        (cl.KLDivLoss(reduction="batchmean"), torch.nn.KLDivLoss(reduction="batchmean"), (torch.log_softmax(x, 1), torch.softmax(torch.randn(8, 5), 1))),
    ]
    for ours, theirs, args in pairs:
        rec = RecordCulossOps()
        with rec:
            got = ours(*args)
        assert rec.calls, f"{type(ours).__name__}: no culoss op ran"
        want = theirs(*args)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), type(ours).__name__
        ga = torch.autograd.grad(got.sum(), x, retain_graph=True)[0]
        gb = torch.autograd.grad(want.sum(), x, retain_graph=True)[0]
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6), type(ours).__name__

# ----------------------------------------------------------------- linear + CE


def test_linear_cross_entropy_against_torch_chunked():
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch < 2.13 has no F.linear_cross_entropy (the composition is tested below)")
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(33, 16, generator=gen).requires_grad_()
    w = (0.3 * torch.randn(70, 16, generator=gen)).requires_grad_()
    b = torch.randn(70, generator=gen).requires_grad_()
    t = torch.randint(0, 70, (33,), generator=gen)
    t[4] = -100
    cw = torch.rand(70, generator=gen) + 0.5
    for kw in ({}, {"reduction": "sum"}, {"reduction": "none", "weight": cw}):
        opts = torch.nn.LinearCrossEntropyOptions()
        ours = cl.linear_cross_entropy(h, w, t, linear_bias=b, **kw)
        theirs = F.linear_cross_entropy(h, w, t, linear_bias=b, options=opts, **kw)
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
        g = torch.randn(ours.shape)
        go = torch.autograd.grad(ours, (h, w, b), g)
        gt = torch.autograd.grad(theirs, (h, w, b), g)
        for a, c in zip(go, gt):
            assert torch.allclose(a, c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_against_composition(dtype, reduction):
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(20, 12, generator=gen).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(50, 12, generator=gen)).to(dtype).requires_grad_()
    t = torch.randint(0, 50, (20,), generator=gen)
    t[0] = -100

    def ref(h, w, t, reduction, z_loss=0.0):
        x = h @ w.T
        lse = torch.logsumexp(x, 1)
        keep = (t != -100).to(x.dtype)
        loss = F.cross_entropy(x, t, reduction="none", label_smoothing=0.125) + z_loss * lse ** 2 * keep
        return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / keep.sum()}[reduction]

    check(lambda *a, **k: cl.linear_cross_entropy(*a, **k, label_smoothing=0.125, z_loss=2.0 ** -10),
          lambda h, w, t, reduction: ref(h, w, t, reduction, 2.0 ** -10), (h, w, t),
          {"reduction": reduction}, dtype)


def test_linear_cross_entropy_never_materialises_logits():
    """The fused path calls culoss::linear_cross_entropy alone: no [n, v] tensor is
    created by a torch op on the way (checked with a dispatch-mode recorder)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    Sizes.biggest = max(Sizes.biggest, o.numel())
            return out

    h = torch.randn(64, 8, requires_grad=True)
    w = torch.randn(1000, 8, requires_grad=True)
    t = torch.randint(0, 1000, (64,))
    with Sizes():
        loss = cl.linear_cross_entropy(h, w, t)
        loss.backward()
    assert Sizes.biggest <= 1000 * 8, Sizes.biggest  # grad_weight's size, never 64 x 1000

# ----------------------------------------------------------------- compile


def test_compile_fullgraph_training_step_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    h0 = torch.randn(24, 16, generator=gen)
    w0 = 0.2 * torch.randn(40, 16, generator=gen)
    t = torch.randint(0, 40, (24,), generator=gen)
    t[3] = -100

    def step(h, w, t):
        logits = h @ w.T
        a = cl.cross_entropy(logits, t, label_smoothing=0.1)
        b = cl.linear_cross_entropy(h, w, t, z_loss=1e-4)
        return a + 0.5 * b

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w, t)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compile_dynamic_shapes_and_float_options():
    """dynamic=True: shapes symbolic; the float options stay Python floats passed
    to the op (no float64 promotion), and a second size does not recompile wrongly."""
    torch._dynamo.reset()

    def f(x, t):
        return cl.cross_entropy(x, t, label_smoothing=0.125, z_loss=2.0 ** -10)

    from torch._dynamo.testing import CompileCounterWithBackend
    cnt = CompileCounterWithBackend("inductor")
    cf = torch.compile(f, fullgraph=True, dynamic=True, backend=cnt)
    frames = []
    for n in (5, 9):
        x = torch.randn(n, 7, requires_grad=True)
        t = torch.randint(0, 7, (n,))
        a, b = f(x, t), cf(x, t)
        assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-6)
        x64 = x.detach().double()
        want = F.cross_entropy(x64, t, label_smoothing=0.125) + \
            2.0 ** -10 * (torch.logsumexp(x64, 1) ** 2).mean()
        assert_close_ulps(b, want, torch.float32, 4, f"compiled n={n}")
        ga = torch.autograd.grad(a, x)[0]
        gb = torch.autograd.grad(b, x)[0]
        assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7)
        frames.append(cnt.frame_count)
    # (dynamo may restart its first analysis once; what matters is that the
    # second size reuses the first graph)
    assert frames[1] == frames[0], f"recompiled for a second size: {frames}"


def test_compile_fullgraph_every_op():
    torch._dynamo.reset()
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    y = torch.rand(6, 5)

    def f(x):
        return (cl.nll_loss(torch.log_softmax(x, 1), t) + cl.multi_margin_loss(x, t) +
                cl.binary_cross_entropy_with_logits(x, y) + cl.binary_cross_entropy(torch.sigmoid(x), y) +
                cl.mse_loss(x, y) + cl.l1_loss(x, y) + cl.huber_loss(x, y) + cl.smooth_l1_loss(x, y) +
                cl.kl_div(torch.log_softmax(x, 1), y, reduction="batchmean") +
                cl.hinge_loss(x, torch.sign(y - 0.5)) + cl.cross_entropy(x, y))
    eager = f(x)
    ge = torch.autograd.grad(eager, x)[0]
    comp = torch.compile(f, fullgraph=True)(x)
    gc = torch.autograd.grad(comp, x)[0]
    assert torch.allclose(eager, comp, rtol=1e-5) and torch.allclose(ge, gc, rtol=1e-4, atol=1e-6)

# ----------------------------------------------------------------- training


def test_tiny_language_model_trains_like_torch():
    """Embedding + one linear head, next-token prediction on a fixed random
    sequence, 300 SGD steps: the loss curve with LinearCrossEntropyLoss matches
    the same model with F.cross_entropy to 1e-4 relative at every step."""
    vocab, dim, steps = 64, 32, 300
    gen = torch.Generator().manual_seed(11)
    seq = torch.randint(0, vocab, (129,), generator=gen)
    emb0 = 0.1 * torch.randn(vocab, dim, generator=gen)
    head0 = 0.1 * torch.randn(vocab, dim, generator=gen)
    curves = []
    for use_culoss in (True, False):
        emb = torch.nn.Embedding(vocab, dim)
        head = torch.nn.Linear(dim, vocab, bias=False)
        with torch.no_grad():
            emb.weight.copy_(emb0)
            head.weight.copy_(head0)
        opt = torch.optim.SGD(list(emb.parameters()) + list(head.parameters()), lr=0.5)
        loss_fn = cl.LinearCrossEntropyLoss()
        curve = []
        for _ in range(steps):
            h = emb(seq[:-1])
            if use_culoss:
                loss = loss_fn(h, head.weight, seq[1:])
            else:
                loss = F.cross_entropy(head(h), seq[1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    assert curves[0][-1] < 0.5 * curves[0][0], "the model did not learn"
    assert torch.allclose(curves[0], curves[1], rtol=1e-4, atol=1e-5), (curves[0] - curves[1]).abs().max()

# ----------------------------------------------------------------- bad input


def test_class_weight_length_is_checked():  # the old binding read past a 3-element weight
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="weight"):
        cl.cross_entropy(x, torch.tensor([1, 2]), weight=torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        cl.nll_loss(x, torch.tensor([1, 2]), weight=torch.ones(11))
    with pytest.raises(ValueError, match="weight"):
        cl.linear_cross_entropy(torch.randn(2, 4), torch.randn(10, 4), torch.tensor([1, 2]),
                                weight=torch.ones(3))


def test_target_length_is_checked():  # the old binding read past short targets
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="target"):
        cl.cross_entropy(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="target"):
        cl.multi_margin_loss(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="target"):
        cl.linear_cross_entropy(torch.randn(4, 3), torch.randn(10, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match="target"):
        cl.binary_cross_entropy_with_logits(x, torch.rand(4, 9))


def test_dtypes_are_checked():
    x = torch.randn(4, 10)
    with pytest.raises(TypeError, match="target"):
        cl.cross_entropy(x, torch.rand(4))  # float targets that are not probabilities
    with pytest.raises(TypeError, match="input"):
        cl.cross_entropy(torch.ones(4, 10, dtype=torch.long), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(TypeError, match="linear_weight"):
        cl.linear_cross_entropy(torch.randn(4, 3), torch.randn(10, 3).bfloat16(),
                                torch.tensor([1, 2, 3, 4]))


def test_devices_and_shapes_are_checked():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="target is on meta"):
        cl.cross_entropy(x, torch.empty(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="pos_weight"):
        cl.binary_cross_entropy_with_logits(x, torch.rand(4, 10), pos_weight=torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        cl.binary_cross_entropy(torch.rand(4, 10), torch.rand(4, 10), weight=torch.ones(3))
    with pytest.raises(ValueError, match="label_smoothing"):
        cl.cross_entropy(x, torch.tensor([1, 2, 3, 4]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight"):
        cl.cross_entropy(x, torch.tensor([1, 2, 3, 4]), weight=torch.ones(10, requires_grad=True))


def test_out_of_range_targets_raise_index_error_on_cpu():
    with pytest.raises(IndexError):
        cl.cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1]))
    with pytest.raises(IndexError):
        cl.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, -3, 1]))
    with pytest.raises(ValueError):
        cl.binary_cross_entropy(torch.rand(3), torch.tensor([0.5, 2.0, 0.1]))


def test_negative_label_smoothing_means_none_as_in_torch():
    x, t = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert torch.allclose(cl.cross_entropy(x, t, label_smoothing=-0.5), F.cross_entropy(x, t))

# ----------------------------------------------------------------- CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="skipped: no CUDA device")


@cuda
def test_cuda_ops_match_cpu_on_current_stream_without_sync():
    assert cl.has_cuda(), "this libculoss was built without CUDA"
    x = logits(64, 1000, torch.bfloat16).detach()
    t = torch.randint(0, 1000, (64,))
    xc, tc = x.cuda().requires_grad_(), t.cuda()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(10 ** 8)  # the stream is busy: a host sync inside would wait
        loss = cl.cross_entropy(xc, tc, label_smoothing=0.125)
        assert not s.query(), "the call waited for the stream (a host synchronisation)"
        loss.backward()
    torch.cuda.synchronize()
    xr = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xr, t, label_smoothing=0.125)
    ref.backward()
    assert_close_ulps(loss.cpu(), ref, torch.bfloat16, 1.25, "cuda loss")
    assert_close_ulps(xc.grad.cpu(), xr.grad, torch.bfloat16, 4, "cuda grad", 2.0 ** -4)
    cl.synchronize()


@cuda
def test_cuda_graph_capture_and_deferred_error():
    x = torch.randn(32, 100, device="cuda", requires_grad=True)
    t = torch.randint(0, 100, (32,), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            cl.cross_entropy(x, t).backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        loss = cl.cross_entropy(x, t)
    with torch.no_grad():  # new logits: a replay must read them
        x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert_close_ulps(loss, F.cross_entropy(x.detach().double(), t), torch.float32, 8, "replay")
    bad = t.clone()
    bad[0] = 100
    assert torch.isnan(cl.cross_entropy(x, bad))
    with pytest.raises(IndexError):
        cl.synchronize()


def test_opcheck_hinge_which_has_no_opinfo_entry():
    """culoss::hinge has no OpInfo entry (torch has no binary hinge): opcheck on
    samples of its own, every reduction, with and without the gradient."""
    f = torch.randn(7, 3, requires_grad=True)
    y = torch.where(torch.rand(7, 3) > 0.5, 1.0, -1.0)
    for red in (0, 1, 2):
        for squared in (False, True):
            torch.library.opcheck(torch.ops.culoss.hinge.default,
                                  (f, y, red, 1.0, squared, True))
    torch.library.opcheck(torch.ops.culoss.hinge.default, (f.detach(), y, 2, 0.5, False, False))
