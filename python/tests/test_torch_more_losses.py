"""The losses of issue 20 that culoss.torch has so far: hinge_embedding_loss,
soft_margin_loss, poisson_nll_loss, margin_ranking_loss, gaussian_nll_loss,
cosine_embedding_loss, triplet_margin_loss, multilabel_soft_margin_loss,
multilabel_margin_loss (their OpInfo samples and error
inputs run in test_torch_opinfo.py) and sigmoid_focal_loss (torchvision's,
which has no OpInfo entry): against float64 references on the same rounded
inputs, every reduction, input and target gradients, shapes and broadcasts
beyond the OpInfo samples, the modules, where culoss deliberately differs
(soft margin does not overflow; focal keeps the loss of confident
predictions), bad arguments, and torch.compile."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import culoss.torch as cl
from culoss.torch.functional import _focal_composite
from test_torch_ops import DT_IDS, DTYPES, check
from torch_ref import assert_close_ulps, tolerances

REDS = ["none", "mean", "sum"]


def _data(shape, dtype, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "pm1":
        y = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).double()
    elif kind == "counts":
        y = torch.randint(0, 7, shape, generator=gen).double()
    else:
        y = (torch.rand(shape, generator=gen) < 0.3).double()
        y[..., 0] = 0.37  # a soft label
    return (3 * x).to(dtype).requires_grad_(), y.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 0.5), (0.6, 0.0), (0.25, 1.0)])
def test_sigmoid_focal_against_torchvision_formula(dtype, reduction, alpha, gamma):
    x, y = _data((7, 11), dtype, 1, "labels")
    y.requires_grad_()  # the composite differentiates the targets too

    def ref(i, t, **kw):
        return _focal_composite(i, t, kw["alpha"], kw["gamma"], kw["reduction"])

    check(cl.sigmoid_focal_loss, ref, (x, y), dict(alpha=alpha, gamma=gamma, reduction=reduction),
          dtype)


def test_sigmoid_focal_default_is_torchvisions():
    x, y = _data((4, 5), torch.float32, 2, "labels")
    got = cl.sigmoid_focal_loss(x, y)
    assert got.shape == x.shape  # reduction "none"
    want = _focal_composite(x.double(), y.double(), 0.25, 2.0, "none")
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)


def test_sigmoid_focal_keeps_confident_losses():
    """At x = 20, y = 1 torchvision's 1 - p_t rounds to 0 in fp32 (loss 0);
    culoss forms it from sigmoid(-x) and keeps e^-20-sized terms."""
    x = torch.tensor([20.0, -20.0])
    y = torch.tensor([1.0, 0.0])
    got = cl.sigmoid_focal_loss(x, y, reduction="none")
    want = _focal_composite(x.double(), y.double(), 0.25, 2.0, "none")
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=0), (got, want)
    assert (_focal_composite(x, y, 0.25, 2.0, "none") == 0).all()  # torchvision's fp32


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
def test_hinge_embedding_and_soft_margin(dtype, reduction):
    x, y = _data((6, 9), dtype, 3, "pm1")
    y = y.clone()
    y[0, :3] = 0  # neither +1 nor -1: both terms, as torch
    check(cl.hinge_embedding_loss, F.hinge_embedding_loss, (x, y),
          dict(margin=0.75, reduction=reduction), dtype)
    check(cl.soft_margin_loss, F.soft_margin_loss, (x, y), dict(reduction=reduction), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("log_input,full", [(True, False), (True, True), (False, True)])
def test_poisson_nll_with_target_grad(dtype, reduction, log_input, full):
    x, y = _data((5, 8), dtype, 4, "counts")
    if not log_input:
        x = (x.detach().abs() + 0.2).requires_grad_()
    y = (y + 2).requires_grad_()  # counts above 1: the Stirling term's gradient is finite
    check(cl.poisson_nll_loss, F.poisson_nll_loss, (x, y),
          dict(log_input=log_input, full=full, reduction=reduction), dtype)


def test_soft_margin_does_not_overflow():
    x = torch.tensor([-200.0, 200.0], requires_grad=True)
    y = torch.tensor([1.0, -1.0])
    got = cl.soft_margin_loss(x, y, reduction="none")
    (g,) = torch.autograd.grad(got.sum(), x)
    assert torch.equal(got.detach(), torch.tensor([200.0, 200.0]))
    assert torch.equal(g, torch.tensor([-1.0, 1.0]))
    assert torch.isinf(F.soft_margin_loss(x, y, reduction="none")).all()  # torch's overflow


def test_soft_margin_target_grad_is_refused_as_torch():
    x, y = _data((3, 4), torch.float32, 5, "pm1")
    y.requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable"):
        cl.soft_margin_loss(x, y).backward()


def test_hinge_embedding_broadcasts_and_gives_the_target_no_grad():
    x, y = _data((4, 6), torch.float32, 6, "pm1")
    y = y[0].clone().requires_grad_()  # [6], broadcast over the rows
    got = cl.hinge_embedding_loss(x, y)
    want = F.hinge_embedding_loss(x, y)
    assert torch.allclose(got, want, rtol=1e-6)
    got.backward()
    assert y.grad is None


def test_modules():
    x, y = _data((5, 6), torch.float32, 7, "pm1")
    c, _ = _data((5, 6), torch.float32, 8, "counts")
    lab = (y.detach() > 0).float()
    pairs = [
        (cl.HingeEmbeddingLoss(margin=0.5, reduction="sum"),
         torch.nn.HingeEmbeddingLoss(margin=0.5, reduction="sum"), (x, y)),
        (cl.SoftMarginLoss(), torch.nn.SoftMarginLoss(), (x, y)),
        (cl.PoissonNLLLoss(log_input=True, full=True), torch.nn.PoissonNLLLoss(full=True),
         (x, c.detach())),
        (cl.SigmoidFocalLoss(alpha=0.3, gamma=1.5, reduction="mean"),
         lambda i, t: _focal_composite(i, t, 0.3, 1.5, "mean"), (x, lab)),
    ]
    for ours, theirs, args in pairs:
        got, want = ours(*args), theirs(*args)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), type(ours).__name__
        ga = torch.autograd.grad(got, x)[0]
        gb = torch.autograd.grad(want, x)[0]
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6), type(ours).__name__


def test_bad_arguments():
    x, y = _data((3, 4), torch.float32, 9, "labels")
    with pytest.raises(ValueError, match="gamma"):
        cl.sigmoid_focal_loss(x, y, gamma=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        cl.sigmoid_focal_loss(x, y[0])
    with pytest.raises(ValueError, match="reduction"):
        cl.sigmoid_focal_loss(x, y, reduction="batchmean")
    with pytest.raises(ValueError):
        cl.poisson_nll_loss(x, y, reduction="avg")
    with pytest.raises(RuntimeError, match="broadcast"):
        cl.soft_margin_loss(x[0], y)
    with pytest.raises(TypeError):
        cl.hinge_embedding_loss(x.detach().long(), y)


def test_float64_runs_torchs_op():
    x, y = _data((3, 4), torch.float64, 10, "pm1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = cl.soft_margin_loss(x, y)
    assert got.dtype == torch.float64
    assert torch.allclose(got, F.soft_margin_loss(x, y))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, y = _data((6, 5), torch.float32, 11, "pm1")
    c = torch.randint(0, 5, (6, 5)).float()
    lab = (y > 0).float()

    def f(x):
        return (cl.hinge_embedding_loss(x, y) + cl.soft_margin_loss(x, y) +
                cl.poisson_nll_loss(x, c) + cl.sigmoid_focal_loss(x, lab, reduction="mean"))

    eager = f(x)
    ge = torch.autograd.grad(eager, x)[0]
    comp = torch.compile(f, fullgraph=True)(x)
    gc = torch.autograd.grad(comp, x)[0]
    assert torch.allclose(eager, comp, rtol=1e-5) and torch.allclose(ge, gc, rtol=1e-4, atol=1e-6)
    assert math.isfinite(float(eager))


def _rows(shape, dtype, seed, count=3, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
            .requires_grad_() for _ in range(count)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
def test_margin_ranking_with_every_gradient(dtype, reduction):
    x1, x2 = _rows((6, 7), dtype, 12, 2)
    y = torch.where(torch.rand(6, 7, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0,
                    1.0).to(dtype)
    y[0, :2] = 0.0  # any float target: torch's formula
    y.requires_grad_()  # torch differentiates the target too
    check(cl.margin_ranking_loss, F.margin_ranking_loss, (x1, x2, y),
          dict(margin=0.25, reduction=reduction), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("var_shape", [(5, 6), (5, 1), (5,)], ids=["full", "col", "short"])
def test_gaussian_nll_with_input_target_and_var_gradients(dtype, reduction, var_shape):
    x, t = _rows((5, 6), dtype, 13, 2)
    gen = torch.Generator().manual_seed(2)
    var = (0.2 + torch.rand(var_shape, generator=gen, dtype=torch.float64)).to(dtype)
    var.view(-1)[0] = 1e-9  # clamped to eps; the gradient still flows (torch's clamp is no_grad)
    var.requires_grad_()
    eps = 0.05 if dtype == torch.float16 else 1e-4  # var's gradient ~ 1/eps^2: fp16's range
    check(cl.gaussian_nll_loss, F.gaussian_nll_loss, (x, t, var),
          dict(full=True, eps=eps, reduction=reduction), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("d", [2, 7, 300, 2500])  # d = 1: cos = +-1, a gradient of ~1e-12 noise
def test_cosine_embedding_rows(dtype, reduction, d):
    a, b = _rows((9, d), dtype, 14, 2)
    y = torch.tensor([1, -1, 1, -1, 0, 1, -1, 2, 1], dtype=torch.float32)  # 0, 2: no loss
    check(cl.cosine_embedding_loss, F.cosine_embedding_loss, (a, b, y),
          dict(margin=-0.1, reduction=reduction), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("p,swap", [(2, False), (2, True), (1, True), (3, False), (1.5, True)])
def test_triplet_margin_rows(dtype, reduction, p, swap):
    a, pos, neg = _rows((8, 33), dtype, 15, 3)
    with torch.no_grad():  # some active, some inactive rows
        neg[:3] = a[:3] + 0.1 * neg[:3]
    check(cl.triplet_margin_loss, F.triplet_margin_loss, (a, pos, neg),
          dict(margin=2.0, p=p, swap=swap, reduction=reduction), dtype)


def test_embedding_shapes_beyond_the_samples():
    a, b, c = _rows((2, 3, 5), torch.float32, 16)
    # triplet over any leading dims, and broadcast rows
    for args in [(a, b, c), (a, b[:1], c), (a[0, 0], b[0, 0], c[0, 0])]:
        got = cl.triplet_margin_loss(*args, reduction="none")
        want = F.triplet_margin_loss(*args, reduction="none")
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        gs = torch.autograd.grad(got.sum(), args)
        ws = torch.autograd.grad(want.sum(), args)
        for g, w in zip(gs, ws):
            assert g.shape == w.shape and torch.allclose(g, w, rtol=1e-4, atol=1e-6)
    # cosine: unbatched with a 0-dim target; a [1, D] row broadcast
    x1, x2 = a[0], b[0]
    y = torch.tensor([1.0, -1.0, 1.0])
    for args in [(x1[0], x2[0], torch.tensor(-1.0)), (x1, x2[:1], y)]:
        got = cl.cosine_embedding_loss(*args, margin=0.2, reduction="none")
        want = F.cosine_embedding_loss(*args, margin=0.2, reduction="none")
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_embedding_fallbacks_and_errors_match_torch():
    a, b, c = _rows((4, 6), torch.float32, 17)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # p < 1 and p = inf run torch's composite (culoss's kernel takes p >= 1)
    for p in (0.5, math.inf):
        assert torch.allclose(cl.triplet_margin_loss(a, b, c, p=p),
                              F.triplet_margin_loss(a, b, c, p=p))
    with pytest.raises(ValueError, match="margin must be greater than 0"):
        cl.triplet_margin_loss(a, b, c, margin=0.0)
    with pytest.raises(ValueError):
        cl.TripletMarginLoss(margin=-1.0)
    with pytest.raises(RuntimeError, match="same number of dimensions"):
        cl.triplet_margin_loss(a, b[0], c)
    with pytest.raises(RuntimeError):
        cl.cosine_embedding_loss(a, b, y[:3])
    with pytest.raises(RuntimeError, match="1D target tensor expects 2D input"):
        cl.cosine_embedding_loss(a[0], b[0], y)
    with pytest.raises(ValueError, match="is not a valid value"):
        cl.cosine_embedding_loss(a, b, y, reduction="avg")


def test_gaussian_nll_checks_as_torch():
    x, t = _rows((4, 3), torch.float32, 18, 2)
    with pytest.raises(ValueError, match="var has negative entry"):
        cl.gaussian_nll_loss(x, t, torch.tensor([1.0, -1.0, 1.0, 1.0]).reshape(4, 1))
    with pytest.raises(ValueError, match="var has negative entry"):
        cl.gaussian_nll_loss(x, t, -1.0)
    with pytest.raises(ValueError, match="var is of incorrect size"):
        cl.gaussian_nll_loss(x, t, torch.ones(4, 2))
    with pytest.raises(ValueError, match="abc is not valid"):
        cl.gaussian_nll_loss(x, t, torch.ones(4, 3), reduction="abc")
    got = cl.gaussian_nll_loss(x, t, 0.5)  # a float var
    assert torch.allclose(got, F.gaussian_nll_loss(x, t, 0.5), rtol=1e-6)
    # a NaN var gives a NaN loss (the clamp keeps NaN), as torch
    v = torch.ones(4, 3)
    v[1, 1] = math.nan
    got = cl.gaussian_nll_loss(x, t, v, reduction="none")
    want = F.gaussian_nll_loss(x, t, v, reduction="none")
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().sum() == 1


def test_more_modules():
    a, b, c = _rows((5, 6), torch.float32, 19)
    y = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0])
    ys = torch.where(a.detach() > b.detach(), 1.0, -1.0)
    var = (torch.rand(5, 1) + 0.5).requires_grad_()
    pairs = [
        (cl.MarginRankingLoss(margin=0.1), torch.nn.MarginRankingLoss(margin=0.1), (a, b, -ys)),
        (cl.GaussianNLLLoss(full=True), torch.nn.GaussianNLLLoss(full=True), (a, b, var)),
        (cl.CosineEmbeddingLoss(margin=0.3, reduction="sum"),
         torch.nn.CosineEmbeddingLoss(margin=0.3, reduction="sum"), (a, b, y)),
        (cl.TripletMarginLoss(margin=3.0, p=1.0, swap=True),
         torch.nn.TripletMarginLoss(margin=3.0, p=1.0, swap=True), (a, b, c)),
    ]
    for ours, theirs, args in pairs:
        got, want = ours(*args), theirs(*args)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), type(ours).__name__
        ga = torch.autograd.grad(got, a)[0]
        gb = torch.autograd.grad(want, a)[0]
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6), type(ours).__name__


def test_more_losses_compile_fullgraph():
    torch._dynamo.reset()
    a, b, c = _rows((6, 8), torch.float32, 20)
    y = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    var = torch.rand(6, 1) + 0.5

    def f(a):
        return (cl.margin_ranking_loss(a[:, 0], b[:, 0], y, margin=0.2) +
                cl.gaussian_nll_loss(a, b, var) + cl.cosine_embedding_loss(a, b, y) +
                cl.triplet_margin_loss(a, b, c, swap=True))

    eager = f(a)
    ge = torch.autograd.grad(eager, a)[0]
    comp = torch.compile(f, fullgraph=True)(a)
    gc = torch.autograd.grad(comp, a)[0]
    assert torch.allclose(eager, comp, rtol=1e-5) and torch.allclose(ge, gc, rtol=1e-4, atol=1e-6)
    # the negative-var check, compiled: the C call's ValueError
    g = torch.compile(lambda v: cl.gaussian_nll_loss(a, b, v), fullgraph=True)
    with pytest.raises(ValueError, match="negative"):
        g(-var)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("wkind", [None, "class", "element", "row1"])
def test_multilabel_soft_margin(dtype, reduction, wkind):
    gen = torch.Generator().manual_seed(21)
    x = (3 * torch.randn(6, 37, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    y = (torch.rand(6, 37, generator=gen) < 0.3).double()
    y[0, :4] = 0.4  # soft labels
    y = y.to(dtype).requires_grad_()  # torch differentiates the target too
    w = {None: None, "class": torch.rand(37, generator=gen) + 0.2,
         "element": torch.rand(6, 37, generator=gen), "row1": torch.rand(1, 37, generator=gen)}[wkind]
    if w is not None:
        w = w.to(dtype)
    check(cl.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, (x, y),
          dict(weight=w, reduction=reduction), dtype)


def test_multilabel_soft_margin_shapes_and_fallbacks():
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(2, 3, 5, generator=gen, requires_grad=True)
    y = (torch.rand(2, 3, 5, generator=gen) < 0.5).float()
    for args, kw in [((x, y), {}), ((x[0, 0], y[0, 0]), {}), ((x, y[0]), {}),
                     ((x, y), dict(weight=torch.rand(3, 5, generator=gen)))]:
        got = cl.multilabel_soft_margin_loss(*args, reduction="none", **kw)
        want = F.multilabel_soft_margin_loss(*args, reduction="none", **kw)
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    w = torch.rand(5, generator=gen, requires_grad=True)  # a weight with a gradient: torch's op
    got = cl.multilabel_soft_margin_loss(x, y, weight=w)
    got.backward()
    assert w.grad is not None
    m = cl.MultiLabelSoftMarginLoss(weight=torch.rand(5, generator=gen), reduction="sum")
    t = torch.nn.MultiLabelSoftMarginLoss(weight=m.weight, reduction="sum")
    assert torch.allclose(m(x, y), t(x, y), rtol=1e-5)
    big = torch.tensor([[200.0, -200.0]])  # overflow-free
    assert torch.isfinite(cl.multilabel_soft_margin_loss(big, torch.tensor([[0.0, 1.0]])))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("c", [1, 6, 300])
def test_multilabel_margin(dtype, reduction, c):
    gen = torch.Generator().manual_seed(23)
    x = (2 * torch.randn(7, c, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    t = torch.randint(-1, c, (7, c), generator=gen)
    t[0] = -1  # an empty list
    t[1] = torch.arange(c)  # every class: no pairs
    t[2, :2] = 0  # a class twice
    check(cl.multilabel_margin_loss, F.multilabel_margin_loss, (x, t), dict(reduction=reduction),
          dtype)


def test_multilabel_margin_edges_as_torch():
    x = torch.randn(4, 5, requires_grad=True)
    with pytest.raises(IndexError):  # torch: RuntimeError "out of range"; culoss: the C check
        cl.multilabel_margin_loss(x, torch.tensor([[5, -1, 0, 0, 0]] * 4))
    args = (x[0], torch.tensor([2, 0, -1, 1, 4]))  # unbatched
    for red in REDS:
        got = cl.multilabel_margin_loss(*args, reduction=red)
        want = F.multilabel_margin_loss(*args, reduction=red)
        assert got.shape == want.shape and torch.allclose(got, want), (red, got, want)
    # no rows: culoss's empty-input convention (torch 2.15's mean is an
    # unwritten value here)
    e = (x[:0], torch.zeros(0, 5).long())
    assert cl.multilabel_margin_loss(*e, reduction="none").shape == (0,)
    assert cl.multilabel_margin_loss(*e, reduction="sum") == 0
    assert torch.isnan(cl.multilabel_margin_loss(*e))
    m = cl.MultiLabelMarginLoss(reduction="sum")
    t = torch.tensor([[1, 3, -1, 0, 0]] * 4)
    assert torch.allclose(m(x, t), torch.nn.MultiLabelMarginLoss(reduction="sum")(x, t))


def test_every_op_takes_an_empty_batch():
    """reduction none on no rows gives an empty loss (the C call gets a NULL
    loss for it: allowed when it has no elements), sum 0, as torch."""
    e2, e1 = torch.empty(0, 4), torch.empty(0)
    calls = [
        (cl.cross_entropy, F.cross_entropy, (e2, torch.empty(0, dtype=torch.long))),
        (cl.mse_loss, F.mse_loss, (e1, e1)),
        (cl.hinge_embedding_loss, F.hinge_embedding_loss, (e1, e1)),
        (cl.margin_ranking_loss, F.margin_ranking_loss, (e1, e1, e1)),
        (cl.gaussian_nll_loss, F.gaussian_nll_loss, (e2, e2, e2)),
        (cl.cosine_embedding_loss, F.cosine_embedding_loss, (e2, e2, e1)),
        (cl.triplet_margin_loss, F.triplet_margin_loss, (e2, e2, e2)),
        (cl.multilabel_soft_margin_loss, F.multilabel_soft_margin_loss, (e2, e2)),
        (cl.multi_margin_loss, F.multi_margin_loss, (e2, torch.empty(0, dtype=torch.long))),
    ]
    for ours, theirs, args in calls:
        for red in ("none", "sum"):
            got, want = ours(*args, reduction=red), theirs(*args, reduction=red)
            if red == "sum" and ours is cl.multi_margin_loss:
                # torch 2.15's empty multi-margin sum is an unwritten value
                assert got.shape == () and got == 0, got
                continue
            assert got.shape == want.shape and torch.equal(got, want.to(got.dtype)), \
                (ours.__name__, red, got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("reduction", REDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_against_the_explicit_ce(dtype, reduction, symmetric):
    """InfoNCE vs F.cross_entropy over the explicit q k^T / t (float64 on the
    same rounded inputs), with the temperature's gradient (CLIP learns it)."""
    from culoss.torch.functional import _info_nce_explicit
    gen = torch.Generator().manual_seed(24)
    q = (0.5 * torch.randn(11, 8, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    k = (0.5 * torch.randn(11, 8, generator=gen, dtype=torch.float64)).to(dtype)
    k = (k + 0.5 * q.detach()).requires_grad_()
    t = torch.tensor(0.25, requires_grad=True)  # exact in every dtype

    def ref(q_, k_, t_, **kw):
        return _info_nce_explicit(q_, k_, t_, kw["symmetric"], kw["reduction"])

    kw = dict(symmetric=symmetric, reduction=reduction)
    loss_ulps, grad_ulps = tolerances(dtype)
    out = cl.info_nce_loss(q, k, temperature=t, **kw)
    ins64 = [x.detach().double().requires_grad_() for x in (q, k, t)]
    want = ref(*ins64, **kw)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close_ulps(out, want, dtype, loss_ulps, "loss")
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(out, (q, k, t), g)
    exp = torch.autograd.grad(want, ins64, g.double())
    # 16-bit: the logits' gradient is rounded to the dtype before its GEMMs
    # (linear CE's), and the symmetric direction adds a second such sum: an
    # error of up to rows / 2 ulps of the largest element where the sums
    # cancel (as the OpInfo test allows linear_cross_entropy)
    # (fp32: the rounding of q / t and of the intermediate gradients, sums
    # over rows: an ulp of the largest element)
    floor = 1.0 if dtype == torch.float32 else q.shape[0] / 2
    for name, a, b in zip(("query", "key", "temperature"), got, exp):
        assert_close_ulps(a, b, dtype if name != "temperature" else torch.float32,
                          grad_ulps if name != "temperature" else 64.0, f"grad {name}",
                          floor if name != "temperature" else 2.0 ** -12,
                          atol=0.0 if dtype == torch.float32 or name != "temperature"
                          else 2e-2 * float(b.abs()))


def test_info_nce_options_module_errors_and_compile():
    from culoss.torch.functional import _info_nce_explicit
    gen = torch.Generator().manual_seed(25)
    q = torch.randn(6, 4, generator=gen, requires_grad=True)
    k = torch.randn(6, 4, generator=gen, requires_grad=True)
    got = cl.info_nce_loss(q, k, temperature=0.5)  # a float temperature
    assert torch.allclose(got, _info_nce_explicit(q, k, 0.5, False, "mean"), rtol=1e-5)
    m = cl.InfoNCELoss(temperature=0.5, symmetric=True, reduction="sum")
    assert torch.allclose(m(q, k), _info_nce_explicit(q, k, 0.5, True, "sum"), rtol=1e-5)
    with pytest.raises(ValueError, match="must be > 0"):
        cl.info_nce_loss(q, k, temperature=0.0)
    with pytest.raises(ValueError, match="temperature = 0 must be > 0"):  # a tensor: the C check
        cl.info_nce_loss(q, k, temperature=torch.tensor(0.0))
    with pytest.raises(ValueError, match="must both be"):
        cl.info_nce_loss(q, k[:5])
    with pytest.raises(ValueError, match="reduction"):
        cl.info_nce_loss(q, k, reduction="batchmean")
    t = torch.tensor(0.5, requires_grad=True)
    for red in ("mean", "none"):
        torch.library.opcheck(torch.ops.culoss.info_nce.default,
                              (q.detach().requires_grad_(), k.detach().requires_grad_(), t, None,
                               True, {"none": 0, "mean": 2}[red], 7))
    torch._dynamo.reset()

    def f(q, k, t):
        return cl.info_nce_loss(q, k, temperature=t, symmetric=True)
    eager = f(q, k, t)
    ge = torch.autograd.grad(eager, (q, t))
    comp = torch.compile(f, fullgraph=True)(q, k, t)
    gc = torch.autograd.grad(comp, (q, t))
    assert torch.allclose(eager, comp) and all(torch.allclose(a, b) for a, b in zip(ge, gc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q64, k64 = q.double(), k.double()
        assert torch.allclose(cl.info_nce_loss(q64, k64), _info_nce_explicit(q64, k64, 1.0, False,
                                                                               "mean"))


def test_integer_inputs_promote_as_torch():
    a = torch.tensor([1, 2, 3])
    b = torch.tensor([0.5, 2.5, 1.0], requires_grad=True)
    y = torch.tensor([1.0, -1.0, 1.0])
    got = cl.margin_ranking_loss(a, b, y, margin=0.25)
    assert torch.allclose(got, F.margin_ranking_loss(a, b, y, margin=0.25))
    v = torch.tensor([0.5, 1.0, 2.0])
    got = cl.gaussian_nll_loss(a, b, v)
    assert torch.allclose(got, F.gaussian_nll_loss(a, b, v))
