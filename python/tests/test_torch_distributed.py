"""culoss.torch.distributed.vocab_parallel_cross_entropy over torch.distributed
(gloo, CPU): three processes with uneven slices of the vocabulary, each
rank's loss the same and equal to F.cross_entropy on the whole logits in
float64, each rank's gradient slice equal to the matching columns of F's
gradient; every option and reduction; a one-process group; bad arguments."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from culoss.torch.distributed import (vocab_parallel_cross_entropy,
                                      vocab_parallel_linear_cross_entropy)

N, V = 37, 301
CASES = [dict(reduction="mean"), dict(reduction="sum", label_smoothing=0.25),
         dict(reduction="none", weighted=True, label_smoothing=0.125),
         dict(reduction="mean", weighted=True, label_smoothing=0.5, ignore_index=7)]


def _data(seed, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    x[5] += 1000.0  # a large common offset
    x[9, ::3] = float("-inf")
    t = torch.randint(0, V, (N,), generator=g)
    t[::6] = ignore_index
    t[11] = 7  # a valid class, ignored when ignore_index is 7
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.25
    return x, t, w


LINEAR_CASES = [dict(reduction="mean", dtype=torch.float32),
                dict(reduction="none", dtype=torch.float32, weighted=True, label_smoothing=0.25),
                dict(reduction="sum", dtype=torch.bfloat16, label_smoothing=0.125)]


def _linear_data(seed, dtype, d=8):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(dtype)
    w = (torch.randn(V, d, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.3).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = -100
    cw = torch.rand(V, generator=g) + 0.25
    return h, w, bias, t, cw


def _slices(ranks):
    widths = [V // 2, V // 3]
    widths = widths[:ranks - 1] + [V - sum(widths[:ranks - 1])]
    begins = [sum(widths[:k]) for k in range(ranks)]
    return begins, widths


def _reference(case, x, t, w, upstream):
    x = x.clone().requires_grad_(True)
    kw = dict(reduction=case["reduction"], label_smoothing=case.get("label_smoothing", 0.0),
              ignore_index=case.get("ignore_index", -100))
    loss = F.cross_entropy(x, t, weight=w if case.get("weighted") else None, **kw)
    loss.backward(upstream)
    return loss.detach(), x.grad


def _rank_run(rank, ranks, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=ranks)
    try:
        begins, widths = _slices(ranks)
        b, c = begins[rank], widths[rank]
        results = []
        for i, case in enumerate(CASES):
            x, t, w = _data(100 + i, case.get("ignore_index", -100))
            xs = x[:, b:b + c].to(torch.float32).requires_grad_(True)
            loss = vocab_parallel_cross_entropy(
                xs, t, v_begin=b, v_total=V,
                weight=w[b:b + c].to(torch.float32) if case.get("weighted") else None,
                reduction=case["reduction"], label_smoothing=case.get("label_smoothing", 0.0),
                ignore_index=case.get("ignore_index", -100))
            upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(i),
                                  dtype=torch.float32) + 0.5
            loss.backward(upstream)
            results.append((loss.detach(), xs.grad))
        linear = []
        for i, case in enumerate(LINEAR_CASES):
            h, w, bias, t, cw = _linear_data(200 + i, case["dtype"])
            hs = h.clone().requires_grad_(True)
            ws = w[b:b + c].clone().requires_grad_(True)
            bs = bias[b:b + c].clone().requires_grad_(True)
            loss = vocab_parallel_linear_cross_entropy(
                hs, ws, t, v_begin=b, v_total=V, linear_bias=bs,
                weight=cw[b:b + c] if case.get("weighted") else None,
                reduction=case["reduction"], label_smoothing=case.get("label_smoothing", 0.0))
            upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(50 + i)) + 0.5
            loss.backward(upstream.to(loss.dtype))
            linear.append((loss.detach(), hs.grad, ws.grad, bs.grad))
        torch.save((results, linear), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_three_processes_match_the_unsharded_loss():
    ranks = 3
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank_run, args=(ranks, os.path.join(d, "init"), d), nprocs=ranks,
                           join=True, start_method="spawn")
        saved = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(ranks)]
    per_rank = [s[0] for s in saved]
    begins, widths = _slices(ranks)
    for i, case in enumerate(LINEAR_CASES):
        h, w, bias, t, cw = _linear_data(200 + i, case["dtype"])
        h64, w64, b64 = (z.to(torch.float64).requires_grad_(True) for z in (h, w, bias))
        ref = F.cross_entropy(F.linear(h64, w64, b64), t, reduction=case["reduction"],
                              weight=cw.to(torch.float64) if case.get("weighted") else None,
                              label_smoothing=case.get("label_smoothing", 0.0))
        upstream = torch.rand(ref.shape, generator=torch.Generator().manual_seed(50 + i)) + 0.5
        ref.backward(upstream.to(torch.float64))
        tol = dict(rtol=2e-5, atol=1e-6) if case["dtype"] == torch.float32 else \
            dict(rtol=2e-2, atol=2e-3)
        for r in range(ranks):
            loss, gh, gw, gb = saved[r][1][i]
            assert torch.equal(loss, saved[0][1][i][0]), f"linear case {i}: rank {r}'s loss"
            torch.testing.assert_close(loss.to(torch.float64), ref.detach(), **tol)
            torch.testing.assert_close(gh.to(torch.float64), h64.grad, **tol)
            b, c = begins[r], widths[r]
            torch.testing.assert_close(gw.to(torch.float64), w64.grad[b:b + c], **tol)
            torch.testing.assert_close(gb.to(torch.float64), b64.grad[b:b + c], **tol)
    for i, case in enumerate(CASES):
        x, t, w = _data(100 + i, case.get("ignore_index", -100))
        x32 = x.to(torch.float32).to(torch.float64)  # the inputs as the ranks saw them
        upstream = torch.rand(per_rank[0][i][0].shape, generator=torch.Generator().manual_seed(i),
                              dtype=torch.float32) + 0.5
        ref_loss, ref_grad = _reference(case, x32, t, w.to(torch.float32).to(torch.float64),
                                        upstream.to(torch.float64))
        for r in range(ranks):
            loss, grad = per_rank[r][i]
            assert torch.equal(loss, per_rank[0][i][0]), f"case {i}: rank {r}'s loss differs"
            torch.testing.assert_close(loss.to(torch.float64), ref_loss, rtol=2e-6, atol=1e-6)
            b, c = begins[r], widths[r]
            torch.testing.assert_close(grad.to(torch.float64), ref_grad[:, b:b + c],
                                       rtol=1e-5, atol=1e-7)


@pytest.fixture
def one_rank_group():
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'init')}", rank=0,
                                world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_is_cross_entropy(one_rank_group, dtype):
    x, t, w = _data(5)
    x = x.to(dtype)
    xs = x.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(xs, t, v_begin=0, v_total=V, label_smoothing=0.25,
                                        z_loss=0.0)
    loss.backward()
    ref_loss, ref_grad = _reference(dict(reduction="mean", label_smoothing=0.25),
                                    x.to(torch.float64), t, w, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(loss.to(torch.float64), ref_loss, rtol=2e-6, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(xs.grad.to(torch.float64), ref_grad, **tol)


def test_bad_arguments(one_rank_group):
    x, t, _ = _data(6)
    x = x.to(torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(x, t, v_begin=0, v_total=V, reduction="batchmean")
    with pytest.raises(ValueError, match="target"):
        vocab_parallel_cross_entropy(x, t[:-1], v_begin=0, v_total=V)
    with pytest.raises(ValueError, match="weight"):
        vocab_parallel_cross_entropy(x, t, v_begin=0, v_total=V, weight=torch.ones(V - 1))
    with pytest.raises(TypeError, match="float32"):
        vocab_parallel_cross_entropy(x.to(torch.float64), t, v_begin=0, v_total=V)
    # a slice past v_total: the library's INVALID_VALUE, as ValueError
    with pytest.raises(ValueError, match="v_total"):
        vocab_parallel_cross_entropy(x, t, v_begin=1, v_total=V)


def test_needs_an_initialised_group():
    x, t, _ = _data(7)
    with pytest.raises(RuntimeError, match="not initialised"):
        vocab_parallel_cross_entropy(x.to(torch.float32), t, v_begin=0, v_total=V)


def test_row_strided_logits(one_rank_group):
    """A padded vocabulary's view logits[:, :V]: read and written with its
    row stride (a contiguous gradient buffer would be written past its end)."""
    x, t, _ = _data(8)
    padded = torch.randn(N, V + 27, dtype=torch.float32)
    padded[:, :V] = x.to(torch.float32)
    p = padded.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(p[:, :V], t, v_begin=0, v_total=V, reduction="sum")
    loss.backward()
    ref_loss, ref_grad = _reference(dict(reduction="sum"), padded[:, :V].to(torch.float64), t,
                                    None, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(loss.to(torch.float64), ref_loss, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(p.grad[:, :V].to(torch.float64), ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.all(p.grad[:, V:] == 0)


def test_linear_bad_devices_and_shapes(one_rank_group):
    h = torch.randn(4, 8)
    w = torch.randn(10, 8)
    t = torch.tensor([1, 2, 3, 4])
    with pytest.raises(ValueError, match="agree on D"):
        vocab_parallel_linear_cross_entropy(h, w[:, :7], t, v_begin=0, v_total=10)
    with pytest.raises(ValueError, match="linear_bias"):
        vocab_parallel_linear_cross_entropy(h, w, t, v_begin=0, v_total=10,
                                            linear_bias=torch.zeros(9))
    with pytest.raises(TypeError, match="share"):
        vocab_parallel_linear_cross_entropy(h, w.double(), t, v_begin=0, v_total=10)
    loss = vocab_parallel_linear_cross_entropy(h, w, t, v_begin=0, v_total=10)
    ref = F.cross_entropy(F.linear(h.double(), w.double()), t)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=1e-6)
