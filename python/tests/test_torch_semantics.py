"""culoss's CPU backend against torch.nn.functional itself, on the CPU.

docs/semantics.md says every loss has PyTorch's semantics; here PyTorch is the
oracle: the same float32 inputs go to culoss (numpy, CPU backend, double
accumulation) and to torch.nn.functional in float64 with autograd, over the
options both sides have, including the awkward points (ignored rows, -inf
logits, hinge and L1 kinks, zero KL targets, beta = 0). Needs only a CPU
build of torch; skipped visibly without torch.
"""

import numpy as np
import pytest

import culoss  # noqa: E402

import torch  # noqa: E402  (conftest.py leaves this suite out without torch)
F = torch.nn.functional

RTOL, ATOL = 2e-5, 1e-6
RED = ["none", "sum", "mean"]


def t64(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64, requires_grad=True)


def close(ours, ref, what):
    ours = np.asarray(ours, dtype=np.float64)
    ref = ref.detach().numpy() if torch.is_tensor(ref) else np.asarray(ref)
    ref = np.broadcast_to(ref, ours.shape) if ours.shape != ref.shape and ref.size == 1 else ref
    np.testing.assert_allclose(ours, ref.reshape(ours.shape), rtol=RTOL, atol=ATOL, equal_nan=True,
                               err_msg=what)


def torch_grad(loss, x, reduction, gl):
    """d(loss)/dx with the upstream gradient culoss was given."""
    if reduction == "none":
        (loss * torch.tensor(gl, dtype=torch.float64)).sum().backward()
    else:
        loss.backward()
    return x.grad


def opt64(a):
    """A constant float64 tensor, or None."""
    return None if a is None else torch.tensor(np.asarray(a, dtype=np.float64))


def agree(loss, g, ref, x, reduction, gl):
    """culoss's loss and gradient equal torch's (ref, autograd through x)."""
    close(loss, ref, "loss")
    close(g, torch_grad(ref, x, reduction, gl), "grad")


def upstream(reduction, shape, rng):
    return rng.uniform(0.5, 1.5, size=shape).astype(np.float32) if reduction == "none" else None


# ----------------------------------------------------------------------- cross-entropy family

@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_cross_entropy(reduction, smoothing, weighted, softcap):
    rng = np.random.default_rng(1)
    n, c = 33, 17
    x = (3 * rng.standard_normal((n, c))).astype(np.float32)
    x[2, 5] = -np.inf  # a masked class (never a target below)
    t = rng.integers(0, c, n)
    t[t == 5] = 4
    t[[3, 10]] = -100  # ignored rows
    w = rng.uniform(0.5, 1.5, c).astype(np.float32) if weighted else None
    if smoothing > 0:  # with smoothing a -inf logit makes the row +inf: keep rows finite
        x[2, 5] = -30.0
    gl = upstream(reduction, (n,), rng)
    loss, g = culoss.cross_entropy(x, t, reduction=reduction, label_smoothing=smoothing,
                                   class_weight=w, logit_softcap=softcap, grad_loss=gl)
    xt = t64(x)
    z = softcap * torch.tanh(xt / softcap) if softcap > 0 else xt
    ref = F.cross_entropy(z, torch.tensor(t), weight=opt64(w),
                          ignore_index=-100, reduction=reduction, label_smoothing=smoothing)
    agree(loss, g, ref, xt, reduction, gl)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cross_entropy_all_ignored(reduction):
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    t = np.full(4, -100)
    loss, g = culoss.cross_entropy(x, t, reduction=reduction)
    xt = t64(x)
    ref = F.cross_entropy(xt, torch.tensor(t), reduction=reduction)
    close(loss, ref, "loss")  # mean: NaN on both sides
    ref.backward()
    close(g, torch.nan_to_num(xt.grad, nan=0.0), "grad")  # culoss: zero, torch: zero or NaN


@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_soft(reduction, smoothing, weighted):
    rng = np.random.default_rng(3)
    n, c = 21, 13
    x = (2 * rng.standard_normal((n, c))).astype(np.float32)
    y = rng.uniform(0, 1, (n, c)).astype(np.float32)
    y[y < 0.3] = 0.0
    y /= np.maximum(y.sum(1, keepdims=True), 1e-6)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32) if weighted else None
    gl = upstream(reduction, (n,), rng)
    loss, g = culoss.cross_entropy_soft(x, y, reduction=reduction, label_smoothing=smoothing,
                                        class_weight=w, grad_loss=gl)
    xt = t64(x)
    ref = F.cross_entropy(xt, torch.tensor(y, dtype=torch.float64), weight=opt64(w),
                          reduction=reduction, label_smoothing=smoothing)
    agree(loss, g, ref, xt, reduction, gl)


@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("weighted", [False, True])
def test_nll(reduction, weighted):
    rng = np.random.default_rng(4)
    n, c = 25, 9
    x = F.log_softmax(torch.tensor(rng.standard_normal((n, c))), 1).numpy().astype(np.float32)
    t = rng.integers(0, c, n)
    t[[0, 7]] = -100
    w = rng.uniform(0.5, 1.5, c).astype(np.float32) if weighted else None
    gl = upstream(reduction, (n,), rng)
    loss, g = culoss.nll(x, t, reduction=reduction, class_weight=w, grad_loss=gl)
    xt = t64(x)
    ref = F.nll_loss(xt, torch.tensor(t), weight=opt64(w),
                     ignore_index=-100, reduction=reduction)
    agree(loss, g, ref, xt, reduction, gl)


# ----------------------------------------------------------------------- binary and margin

@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pos_weighted", [False, True])
def test_bce_with_logits(reduction, weighted, pos_weighted):
    rng = np.random.default_rng(5)
    n, c = 11, 7
    x = (4 * rng.standard_normal((n, c))).astype(np.float32)
    x[0, 0], x[0, 1] = 1000.0, -1000.0  # the stable form: no overflow
    y = rng.uniform(0, 1, (n, c)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, (n, c)).astype(np.float32) if weighted else None
    pw = rng.uniform(0.5, 3.0, c).astype(np.float32) if pos_weighted else None
    gl = upstream(reduction, (n, c), rng)
    loss, g = culoss.bce_with_logits(x, y, reduction=reduction, weight=w, pos_weight=pw, grad_loss=gl)
    xt = t64(x)
    ref = F.binary_cross_entropy_with_logits(
        xt, torch.tensor(y, dtype=torch.float64), weight=opt64(w), pos_weight=opt64(pw),
        reduction=reduction)
    agree(loss, g, ref, xt, reduction, gl)


@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("weighted", [False, True])
def test_bce(reduction, weighted):
    rng = np.random.default_rng(6)
    n, c = 9, 8
    p = rng.uniform(0.01, 0.99, (n, c)).astype(np.float32)
    p[0, 0], p[0, 1] = 0.0, 1.0  # logs clamped at -100
    y = rng.uniform(0, 1, (n, c)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, (n, c)).astype(np.float32) if weighted else None
    gl = upstream(reduction, (n, c), rng)
    loss, g = culoss.bce(p, y, reduction=reduction, weight=w, grad_loss=gl)
    pt = t64(p)
    ref = F.binary_cross_entropy(pt, torch.tensor(y, dtype=torch.float64), weight=opt64(w),
                                 reduction=reduction)
    close(loss, ref, "loss")
    # PyTorch's gradient divides by max((1 - p) p, 1e-12); at p = 0 or 1 it is huge: compare
    # where it is finite and moderate, and the clamped points by sign and size
    tg = torch_grad(ref, pt, reduction, gl).detach().numpy()
    inner = np.ones_like(p, dtype=bool)
    inner[0, :2] = False
    close(np.asarray(g)[inner], tg[inner], "grad")
    np.testing.assert_allclose(np.asarray(g)[~inner], tg[~inner], rtol=1e-3)


@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_hinge_is_clamp_min(reduction, squared, margin):
    """Binary hinge = clamp_min(margin - y f, 0) (squared), kinks included:
    torch 2.15's clamp_min gives subgradient 0 at equality (docs/semantics.md
    section 0), and so does culoss; a NaN score gives a NaN loss."""
    rng = np.random.default_rng(7)
    m = 64
    y = np.where(rng.uniform(0, 1, m) < 0.5, -1.0, 1.0).astype(np.float32)
    f = (2 * rng.standard_normal(m)).astype(np.float32)
    f[:4] = margin * y[:4]  # exactly at the kink
    f[4] = np.nan
    gl = upstream(reduction, (m,), rng)
    loss, g = culoss.hinge(f, y, reduction=reduction, margin=margin, squared=squared, grad_loss=gl)
    ft = t64(f)
    h = torch.clamp_min(margin - torch.tensor(y, dtype=torch.float64) * ft, 0)
    h = h * h if squared else h
    ref = {"none": h, "sum": h.sum(), "mean": h.mean()}[reduction]
    close(loss, ref, "loss")
    tg = torch_grad(ref, ft, reduction, gl).detach().numpy().copy()
    assert np.all(tg[:4] == 0) and np.all(g[:4] == 0)
    close(g, tg, "grad")


@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_multi_margin(reduction, p, weighted):
    rng = np.random.default_rng(8)
    n, c = 17, 10
    x = rng.standard_normal((n, c)).astype(np.float32)
    t = rng.integers(0, c, n)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32) if weighted else None
    gl = upstream(reduction, (n,), rng)
    loss, g = culoss.multi_margin(x, t, reduction=reduction, p=p, margin=0.7, class_weight=w,
                                  grad_loss=gl)
    xt = t64(x)
    ref = F.multi_margin_loss(xt, torch.tensor(t), p=p, margin=0.7, weight=opt64(w),
                              reduction=reduction)
    agree(loss, g, ref, xt, reduction, gl)


# ----------------------------------------------------------------------- regression and KL

def regression_inputs(rng, m=200):
    x = (2 * rng.standard_normal(m)).astype(np.float32)
    y = rng.standard_normal(m).astype(np.float32)
    y[:5] = x[:5]  # d = 0: L1's subgradient 0, smooth-L1 with beta 0
    y[5:8] = x[5:8] - 1.0  # exactly at |d| = delta = beta = 1
    return x, y


@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("name,kw,tfn", [
    ("mse", {}, lambda a, b, r: F.mse_loss(a, b, reduction=r)),
    ("l1", {}, lambda a, b, r: F.l1_loss(a, b, reduction=r)),
    ("huber", {"delta": 1.0}, lambda a, b, r: F.huber_loss(a, b, reduction=r, delta=1.0)),
    ("huber", {"delta": 0.3}, lambda a, b, r: F.huber_loss(a, b, reduction=r, delta=0.3)),
    ("smooth_l1", {"beta": 1.0}, lambda a, b, r: F.smooth_l1_loss(a, b, reduction=r, beta=1.0)),
    ("smooth_l1", {"beta": 0.0}, lambda a, b, r: F.smooth_l1_loss(a, b, reduction=r, beta=0.0)),
])
def test_regression(reduction, name, kw, tfn):
    rng = np.random.default_rng(9)
    x, y = regression_inputs(rng)
    gl = upstream(reduction, x.shape, rng)
    loss, g = getattr(culoss, name)(x, y, reduction=reduction, grad_loss=gl, **kw)
    xt = t64(x)
    ref = tfn(xt, torch.tensor(y, dtype=torch.float64), reduction)
    agree(loss, g, ref, xt, reduction, gl)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div(reduction, log_target):
    rng = np.random.default_rng(10)
    n, c = 12, 9
    x = F.log_softmax(torch.tensor(rng.standard_normal((n, c))), 1).numpy().astype(np.float32)
    p = rng.uniform(0, 1, (n, c))
    p[p < 0.25] = 0.0  # 0 log 0 = 0
    p /= p.sum(1, keepdims=True)
    y = (np.log(np.maximum(p, 1e-30)) if log_target else p).astype(np.float32)
    gl = upstream(reduction, (n, c), rng)
    loss, g = culoss.kl_div(x, y, reduction=reduction, log_target=log_target, grad_loss=gl)
    xt = t64(x)
    ref = F.kl_div(xt, torch.tensor(y, dtype=torch.float64), reduction=reduction,
                   log_target=log_target)
    agree(loss, g, ref, xt, reduction, gl)


# ----------------------------------------------------------------------- fused linear + CE

@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy(reduction, bias, smoothing):
    rng = np.random.default_rng(11)
    n, d, v = 19, 8, 23
    h = rng.standard_normal((n, d)).astype(np.float32)
    w = (0.5 * rng.standard_normal((v, d))).astype(np.float32)
    b = rng.standard_normal(v).astype(np.float32) if bias else None
    t = rng.integers(0, v, n)
    t[4] = -100
    gl = upstream(reduction, (n,), rng)
    loss, gh, gw, gb = culoss.linear_cross_entropy(h, w, t, b, reduction=reduction,
                                                   label_smoothing=smoothing, grad_loss=gl)
    ht, wt = t64(h), t64(w)
    bt = t64(b) if bias else None
    logits = ht @ wt.T + (bt if bias else 0)
    ref = F.cross_entropy(logits, torch.tensor(t), reduction=reduction, label_smoothing=smoothing)
    close(loss, ref, "loss")
    if reduction == "none":
        (ref * torch.tensor(gl, dtype=torch.float64)).sum().backward()
    else:
        ref.backward()
    close(gh, ht.grad, "grad_hidden")
    close(gw, wt.grad, "grad_weight")
    if bias:
        close(gb, bt.grad, "grad_bias")


def adversarial_rows(c, rng):
    """Rows that break naive arithmetic (issue 19): ties at 1e0..1e38, two tied
    maxima over zeros, large common offsets, -inf patterns."""
    rows = [[-1e20] * c, [1e30, 1e30] + [0.0] * (c - 2)]
    for e in range(0, 39):
        rows.append([(-1.0) ** e * 10.0 ** e] * c)
        rows.append([10.0 ** e] * 2 + [0.0] * (c - 2))
    for off in (1e3, 1e4, -1e4):
        rows.append(list(off + 3 * rng.standard_normal(c)))
    rows.append([0.0, -np.inf] + list(rng.standard_normal(c - 2)))
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy_adversarial_rows_match_torch(eps, weighted, soft):
    """The CPU backend on rows at huge magnitudes: before the fix every tied
    class got p = 1 (a gradient k times too large) and the loss 0 instead of
    log k, because exp(x - lse) and lse - x_y were formed where lse - m
    underflows in double."""
    rng = np.random.default_rng(19)
    c = 4
    x = adversarial_rows(c, rng)
    n = x.shape[0]
    t = np.arange(n) % c
    t[-1] = 0  # the -inf row's target is finite
    w = np.array([0.5, 2.0, 1.0, 1.5], dtype=np.float32) if weighted else None
    if soft:
        y = rng.uniform(0.1, 1.0, (n, c)).astype(np.float32)
        y /= y.sum(1, keepdims=True)
        second, tt = y, torch.tensor(y, dtype=torch.float64)
        loss, g = culoss.cross_entropy_soft(x, y, reduction="none", label_smoothing=eps,
                                            class_weight=w)
    else:
        second, tt = t, torch.tensor(t)
        loss, g = culoss.cross_entropy(x, t, reduction="none", label_smoothing=eps,
                                       class_weight=w)
    xt = t64(x)
    ref = F.cross_entropy(xt, tt, weight=None if w is None else torch.tensor(w, dtype=torch.float64),
                          reduction="none", label_smoothing=float(np.float32(eps)))
    close(loss, ref, "loss")
    tg = torch.autograd.grad(ref.sum(), xt)[0]
    close(g, tg, "grad")


def test_z_loss_gradient_at_huge_ties():
    """z-loss at lse ~ 1e18 with four tied logits: p = 1/4 each, so the
    gradient is 2 z lse / 4; before the fix it was 4x too large. (torch's own
    logsumexp backward, exp(x - lse), has the same flaw in float64 here, so
    the reference gradient is written with softmax, exp(x - m) / s.)"""
    x = np.full((1, 4), 1e18, dtype=np.float32)
    z = float(np.float32(1e-4))
    loss, g = culoss.cross_entropy(x, np.array([1]), reduction="sum", z_loss=z)
    xt = t64(x)
    lse = torch.logsumexp(xt, 1)
    ref = F.cross_entropy(xt, torch.tensor([1]), reduction="sum") + z * (lse ** 2).sum()
    close(loss, ref, "loss")
    ce_grad = torch.autograd.grad(F.cross_entropy(xt, torch.tensor([1]), reduction="sum"), xt)[0]
    close(g, ce_grad + 2 * z * lse[:, None] * torch.softmax(xt, 1), "grad")


def test_mean_with_every_target_on_a_zero_weight_class_is_nan():
    """D = 0 with label smoothing 0.3: the smoothing term made the sum
    positive, so sum / 0 was +inf; torch gives NaN (docs/semantics.md section 0:
    culoss keeps a zero gradient)."""
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    t = np.array([0, 0, 2, 2, 0])
    w = np.array([0.0, 1.0, 0.0, 1.0], dtype=np.float32)
    loss, g = culoss.cross_entropy(x, t, label_smoothing=0.3, class_weight=w)
    assert np.isnan(loss)
    assert np.all(g == 0)
    ref = F.cross_entropy(t64(x), torch.tensor(t), weight=torch.tensor(w, dtype=torch.float64),
                          label_smoothing=0.3)
    assert torch.isnan(ref)


def test_nan_residual_gradients_and_bce_target_range_match_torch():
    x = np.array([np.nan, 1.0, 2.0], dtype=np.float32)
    y = np.array([0.0, np.nan, 2.0], dtype=np.float32)
    for fn, ref, kw in ((culoss.l1, F.l1_loss, {}), (culoss.smooth_l1, F.smooth_l1_loss, {"beta": 0.0}),
                        (culoss.smooth_l1, F.smooth_l1_loss, {"beta": 1.0})):
        loss, g = fn(x, y, reduction="none", **kw)
        xt = t64(x)
        r = ref(xt, torch.tensor(y, dtype=torch.float64), reduction="none", **kw)
        close(loss, r, "loss")
        close(g, torch.autograd.grad(r.sum(), xt)[0], f"{fn.__name__} {kw} grad")
    p = np.array([0.5, 0.25], dtype=np.float32)
    for bad in ([0.5, 2.0], [-1.0, 0.5], [np.nan, 0.5]):
        with pytest.raises(culoss.CulossValueError, match="targets"):
            culoss.bce(p, np.array(bad, dtype=np.float32))
        with pytest.raises(RuntimeError):
            F.binary_cross_entropy(torch.tensor(p), torch.tensor(bad, dtype=torch.float32))
