"""Tests of the ctypes binding: NumPy on the CPU backend (run in CI), PyTorch
CUDA tensors where torch and a GPU exist (skipped visibly otherwise)."""
import math

import numpy as np
import pytest

import culoss  # noqa: E402

rng = np.random.default_rng(1234)


def log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def ce_ref(x, t, eps=0.0, w=None, ignore=-100):
    """Mean cross-entropy and its gradient, from docs/semantics.md, in float64."""
    x = x.astype(np.float64)
    n, c = x.shape
    w = np.ones(c) if w is None else w.astype(np.float64)
    lp = log_softmax(x)
    p = np.exp(lp)
    keep = t != ignore
    tt = np.where(keep, t, 0)
    nll = -lp[np.arange(n), tt] * w[tt]
    smooth = -(lp * w).sum(axis=1)
    per = np.where(keep, (1 - eps) * nll + eps / c * smooth, 0.0)
    d = (w[tt] * keep).sum()
    g = (1 - eps) * w[tt][:, None] * (p - np.eye(c)[tt]) + eps / c * (p * w.sum() - w)
    g = g * keep[:, None] / d
    return per.sum() / d, g


def test_version_and_errors():
    assert culoss.version() >= (0, 1, 0)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    with pytest.raises(culoss.CulossError) as e:
        culoss.cross_entropy(x, np.array([0, 1, 2]), label_smoothing=1.5)
    assert "label_smoothing" in str(e.value) and e.value.status == 1
    with pytest.raises(culoss.CulossError) as e:
        culoss.cross_entropy(x, np.array([0, 7, 2]))
    assert e.value.name == "CULOSS_ERROR_TARGET_OUT_OF_RANGE" and "targets[1]" in str(e.value)


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_formula(eps, weighted):
    x = (3 * rng.standard_normal((16, 11))).astype(np.float32)
    t = rng.integers(0, 11, 16)
    t[3] = -100
    w = rng.uniform(0.5, 2, 11).astype(np.float32) if weighted else None
    loss, g = culoss.cross_entropy(x, t, label_smoothing=eps, class_weight=w)
    want_l, want_g = ce_ref(x, t, eps, w)
    assert loss.shape == () and loss.dtype == np.float32
    np.testing.assert_allclose(loss, want_l, rtol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)


def test_cross_entropy_strided_inplace_int32_and_fp16():
    base = rng.standard_normal((6, 12)).astype(np.float32)
    x = base[:, :9]  # row stride 12, 9 classes
    t = rng.integers(0, 9, 6).astype(np.int32)
    loss, g = culoss.cross_entropy(x, t, reduction="none")
    lp = log_softmax(x.astype(np.float64))
    np.testing.assert_allclose(loss, -lp[np.arange(6), t], rtol=1e-5)
    assert g.shape == (6, 9)
    xc = np.ascontiguousarray(x)
    l2, g2 = culoss.cross_entropy(xc, t, reduction="none", inplace=True)
    assert g2 is xc and np.array_equal(g2, g)
    x16 = x.astype(np.float16)
    l16, g16 = culoss.cross_entropy(x16, t, reduction="none")
    assert g16.dtype == np.float16
    # the reference from the fp16-rounded logits; the gradient rounds once to
    # fp16 (half an ulp: 2^-11 relative) above fp16's normal range
    lp16 = log_softmax(x16.astype(np.float64))
    np.testing.assert_allclose(l16, -lp16[np.arange(6), t], rtol=1e-6, atol=1e-7)
    g_ref = np.exp(lp16) - np.eye(9)[t]
    np.testing.assert_allclose(g16.astype(np.float64), g_ref, rtol=2.0 ** -10, atol=2.0 ** -24)


def test_soft_and_nll():
    x = rng.standard_normal((5, 4)).astype(np.float32)
    t = rng.integers(0, 4, 5)
    onehot = np.eye(4, dtype=np.float32)[t]
    a, ga = culoss.cross_entropy(x, t)
    b, gb = culoss.cross_entropy_soft(x, onehot)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-7)
    lp = log_softmax(x.astype(np.float64)).astype(np.float32)
    c, gc = culoss.nll(lp, t, reduction="sum")
    np.testing.assert_allclose(c, -lp[np.arange(5), t].sum(), rtol=1e-6)
    assert gc[0, t[0]] == -1.0


def test_elementwise_losses():
    x = rng.standard_normal(100).astype(np.float32)
    y = rng.standard_normal(100).astype(np.float32)
    loss, g = culoss.mse(x, y)
    np.testing.assert_allclose(loss, np.mean((x - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(g, 2 * (x - y) / 100, rtol=1e-5)
    loss, g = culoss.l1(x, y, reduction="sum")
    np.testing.assert_allclose(loss, np.abs(x - y).sum(), rtol=1e-5)
    d = (x - y).astype(np.float64)
    loss, _ = culoss.huber(x, y, delta=0.5, reduction="none")
    want = np.where(np.abs(d) < 0.5, 0.5 * d * d, 0.5 * (np.abs(d) - 0.25))
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    loss, _ = culoss.smooth_l1(x, y, beta=0.0, reduction="sum")
    np.testing.assert_allclose(loss, np.abs(d).sum(), rtol=1e-5)
    z = rng.standard_normal((4, 5)).astype(np.float32)
    p = rng.uniform(0, 1, (4, 5)).astype(np.float32)
    loss, g = culoss.bce_with_logits(z, p, pos_weight=np.full(5, 2.0, np.float32), reduction="sum")
    zz = z.astype(np.float64)
    ls = -np.logaddexp(0, -zz)
    np.testing.assert_allclose(loss, -(2 * p * ls + (1 - p) * (ls - zz)).sum(), rtol=1e-5)
    s = 1 / (1 + np.exp(-zz))
    loss, _ = culoss.bce(s.astype(np.float32), p)
    np.testing.assert_allclose(loss, -(p * np.log(s) + (1 - p) * np.log(1 - s)).mean(), rtol=1e-4)
    yy = np.where(rng.uniform(size=100) < 0.5, -1, 1).astype(np.float32)
    loss, g = culoss.hinge(x, yy, reduction="sum")
    np.testing.assert_allclose(loss, np.maximum(0, 1 - yy * x).sum(), rtol=1e-5)
    lq = log_softmax(z.astype(np.float64)).astype(np.float32)
    pt = np.exp(log_softmax(p.astype(np.float64))).astype(np.float32)
    loss, g = culoss.kl_div(lq, pt, reduction="batchmean")
    np.testing.assert_allclose(loss, (pt * (np.log(pt) - lq)).sum() / 4, rtol=1e-5)
    np.testing.assert_allclose(g, -pt / 4, rtol=1e-6)
    sc = np.array([[0.1, 0.2, 0.4, 0.8]], np.float32)
    loss, g = culoss.multi_margin(sc, np.array([3]))
    np.testing.assert_allclose(loss, 0.325, rtol=1e-6)
    with pytest.raises(culoss.CulossError, match="outside"):
        culoss.bce(np.array([1.5], np.float32), np.array([1.0], np.float32))


def test_linear_cross_entropy_matches_explicit():
    h = rng.standard_normal((9, 6)).astype(np.float32)
    w = (0.5 * rng.standard_normal((13, 6))).astype(np.float32)
    b = rng.standard_normal(13).astype(np.float32)
    t = rng.integers(0, 13, 9)
    t[4] = -100
    loss, gh, gw, gb = culoss.linear_cross_entropy(h, w, t, b, label_smoothing=0.1)
    z = h.astype(np.float64) @ w.T.astype(np.float64) + b
    want_l, want_g = ce_ref(z, t, 0.1)
    np.testing.assert_allclose(loss, want_l, rtol=1e-5)
    np.testing.assert_allclose(gh, want_g @ w, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gw, want_g.T @ h, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gb, want_g.sum(axis=0), rtol=1e-4, atol=1e-7)


def _torch_cuda():
    try:
        import torch
    except ImportError:
        pytest.skip("skipped: torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("skipped: no CUDA device")
    return torch


def test_torch_cuda_matches_torch_functional():
    torch = _torch_cuda()
    import torch.nn.functional as F
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]:
        x = (3 * torch.randn(64, 50257, device="cuda")).to(dtype)
        t = torch.randint(0, 50257, (64,), device="cuda")
        t[5] = -100
        loss, g = culoss.cross_entropy(x, t, label_smoothing=0.1)
        xr = x.float().requires_grad_()
        ref = F.cross_entropy(xr, t, label_smoothing=0.1)
        ref.backward()
        assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
        torch.testing.assert_close(g.float(), xr.grad, rtol=tol * 10, atol=1e-6)


def test_torch_linear_cross_entropy():
    torch = _torch_cuda()
    h = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    w = (0.05 * torch.randn(3000, 128, device="cuda")).to(torch.bfloat16)
    t = torch.randint(0, 3000, (256,), device="cuda")
    loss, gh, gw, _ = culoss.linear_cross_entropy(h, w, t)
    hr, wr = h.float().requires_grad_(), w.float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(hr @ wr.T, t)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())
    assert ((gw.float() - wr.grad).norm() / wr.grad.norm()).item() < 3e-2
    assert ((gh.float() - hr.grad).norm() / hr.grad.norm()).item() < 3e-2


def test_torch_autograd_function():
    torch = _torch_cuda()
    x = torch.randn(32, 1000, device="cuda", requires_grad=True)
    t = torch.randint(0, 1000, (32,), device="cuda")
    loss = culoss.CrossEntropyFunction.apply(x, t, {"label_smoothing": 0.05})
    (2 * loss).backward()
    xr = x.detach().clone().requires_grad_()
    (2 * torch.nn.functional.cross_entropy(xr, t, label_smoothing=0.05)).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-7)


def test_lengths_are_checked_before_the_c_call():
    """Regressions: the binding forwarded pointers without lengths, so a short
    class weight or short targets were read past their end."""
    x = rng.standard_normal((2, 10)).astype(np.float32)
    with pytest.raises(culoss.CulossValueError, match="class_weight has 3 elements"):
        culoss.cross_entropy(x, np.array([1, 2]), class_weight=np.ones(3, np.float32))
    with pytest.raises(culoss.CulossValueError, match="targets has 1 elements"):
        culoss.cross_entropy(x, np.array([1]))
    with pytest.raises(culoss.CulossValueError, match="pos_weight"):
        culoss.bce_with_logits(x, np.zeros_like(x), pos_weight=np.ones(3, np.float32))
    with pytest.raises(culoss.CulossValueError, match="grad_loss"):
        culoss.mse(x, x, reduction="none", grad_loss=np.ones(3, np.float32))
    with pytest.raises(culoss.CulossValueError, match="bias"):
        culoss.linear_cross_entropy(x, np.ones((5, 10), np.float32), np.array([1, 2]),
                                    bias=np.ones(4, np.float32))
