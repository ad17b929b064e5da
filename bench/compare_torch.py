#!/usr/bin/env python3
"""Times torch.nn.functional (eager and, where it works, torch.compile)
against culoss on the same CUDA tensors, forward + backward, and prints the
ratio table. Needs PyTorch with a GPU and libculoss.so (CULOSS_LIBRARY or the
build/ directory).

Method: each case is first checked for agreement (loss and gradient), then
timed with CUDA events: warm-up, L2 flushed before every repeat, median of
the repeats. Usage: compare_torch.py [--quick] [--no-compile] [--cpu]

--cpu runs the same cases at small sizes on the CPU (torch on the CPU,
culoss's CPU backend through numpy, wall-clock timing): a check of this
script and of the agreement, not a benchmark.
"""
import argparse
import os
import math
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import culoss  # noqa: E402


class Timer:
    """Median time of fn() in ms: CUDA events with an L2 flush, or the wall clock."""

    def __init__(self, dev):
        self.cuda = dev.type == "cuda"
        if self.cuda:
            props = torch.cuda.get_device_properties(dev)
            self.flush = torch.empty(int(props.L2_cache_size * 2 // 4) + 1, dtype=torch.float32,
                                     device=dev)

    def __call__(self, fn, reps):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                self.flush.zero_()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return times[len(times) // 2]


def torch_fwd_bwd(loss_fn):
    def run(x, *args):
        xr = x.detach().requires_grad_()
        loss = loss_fn(xr, *args)
        loss.backward()
        return loss.detach(), xr.grad
    return run


def culoss_call(fn, cpu):
    """fn(*tensors) through culoss: CUDA tensors as they are, or numpy on the CPU."""
    def run(*args):
        if not cpu:
            return fn(*args)
        out = fn(*[a.numpy() if torch.is_tensor(a) else a for a in args])
        return tuple(torch.from_numpy(o) if o is not None and not torch.is_tensor(o)
                     else o for o in out)
    return run


def row_case(name, n, v, dt, dev):
    """Inputs, torch reference and culoss call for a loss over [n, v] rows."""
    x = (2 * torch.randn(n, v, device=dev)).to(dt)
    t = torch.randint(0, v, (n,), device=dev)
    if name == "cross_entropy":
        return x, t, lambda a, b: F.cross_entropy(a.float(), b), culoss.cross_entropy
    if name == "cross_entropy_soft":
        y = F.softmax(torch.randn(n, v, device=dev), 1).to(dt)
        return x, y, lambda a, b: F.cross_entropy(a.float(), b.float()), culoss.cross_entropy_soft
    if name == "nll":
        x = F.log_softmax(x.float(), 1).to(dt)
        return x, t, lambda a, b: F.nll_loss(a.float(), b), culoss.nll
    return x, t, lambda a, b: F.multi_margin_loss(a.float(), b), culoss.multi_margin


def elementwise_case(name, m, dt, dev):
    x = torch.randn(m, device=dev).to(dt)
    y = torch.randn(m, device=dev).to(dt)
    two_d = False
    if name == "kl_div":
        x = F.log_softmax(x.float().view(-1, 1024), 1).to(dt).view(-1)
        y = F.softmax(torch.randn(m, device=dev).view(-1, 1024), 1).to(dt).view(-1)
        two_d = True
    elif name in ("bce_with_logits", "bce"):
        y = torch.rand(m, device=dev).to(dt)
        two_d = True
        if name == "bce":
            x = torch.sigmoid(x.float()).clamp(1e-3, 1 - 1e-3).to(dt)
    tfn = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss,
           "smooth_l1": F.smooth_l1_loss, "bce": F.binary_cross_entropy,
           "bce_with_logits": F.binary_cross_entropy_with_logits,
           "kl_div": lambda a, b: F.kl_div(a, b, reduction="batchmean")}[name]
    ref = lambda a, b, f=tfn: f(a.float(), b.float())  # noqa: E731
    ours = getattr(culoss, name)
    if two_d:  # culoss takes these as [n, c]; the mean/batchmean match torch's
        rows = m // 1024 if name == "kl_div" else 1
        x, y = x.view(rows, -1), y.view(rows, -1)
        if name == "kl_div":
            ours = lambda a, b: culoss.kl_div(a, b, reduction="batchmean")  # noqa: E731
    return x, y, ref, ours


def embedding_case(name, n, d, dt, dev):
    """Triplet margin / cosine embedding through culoss.torch (autograd) against
    torch's composite (pairwise_distance or the products, clamp, mean and
    their backward kernels) on the inputs upcast to float32, as the other
    cases' references: torch's fp16 composite loses eps and its sums' bits."""
    import culoss.torch as cl
    a, p, q = (torch.randn(n, d, device=dev).to(dt) for _ in range(3))
    y = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    if name == "triplet_margin":
        xs, tfn, ofn = (a, p, q), F.triplet_margin_loss, cl.triplet_margin_loss
    else:
        xs, tfn, ofn = (a, p), F.cosine_embedding_loss, cl.cosine_embedding_loss

    def fwd_bwd(fn, cast):
        def run():
            ins = [t.detach().requires_grad_() for t in xs]
            loss = fn(*[cast(t) for t in ins], *(() if name == "triplet_margin" else (y,)))
            loss.backward()
            return loss.detach(), torch.cat([t.grad.flatten() for t in ins])
        return run
    return fwd_bwd(tfn, lambda t: t.float()), fwd_bwd(ofn, lambda t: t)


def more_case(name, m, dt, dev):
    """Issue 20's other losses through culoss.torch (autograd) against
    torch.nn.functional's composite on the inputs upcast to float32: m
    elements (rows of 1024 for the row losses)."""
    import culoss.torch as cl
    x = torch.randn(m, device=dev).to(dt)
    y = torch.randn(m, device=dev).to(dt)
    pm = torch.where(torch.rand(m, device=dev) < 0.5, -1.0, 1.0).to(dt)
    lab = (torch.rand(m, device=dev) < 0.3).to(dt)
    var = (torch.rand(m, device=dev) + 0.1).to(dt)
    rows = lambda t: t.view(-1, 1024)  # noqa: E731
    tgt = torch.randint(-1, 1024, (m // 1024, 1024), device=dev)
    spec = {
        "hinge_embedding": ((x, pm), F.hinge_embedding_loss, cl.hinge_embedding_loss),
        "soft_margin": ((x, pm), F.soft_margin_loss, cl.soft_margin_loss),
        "poisson_nll": ((x, lab * 3), F.poisson_nll_loss, cl.poisson_nll_loss),
        "margin_ranking": ((x, y, pm), F.margin_ranking_loss, cl.margin_ranking_loss),
        "gaussian_nll": ((x, y, var), F.gaussian_nll_loss, cl.gaussian_nll_loss),
        "multilabel_soft_margin": ((rows(x), rows(lab)), F.multilabel_soft_margin_loss,
                                   cl.multilabel_soft_margin_loss),
        "multilabel_margin": ((rows(x), tgt), F.multilabel_margin_loss,
                              cl.multilabel_margin_loss),
    }
    args, tfn, ofn = spec[name]

    def fwd_bwd(fn, cast):
        def run():
            a = args[0].detach().requires_grad_()
            loss = fn(cast(a), *[cast(t) if t.is_floating_point() else t for t in args[1:]])
            loss.backward()
            return loss.detach(), a.grad
        return run
    return fwd_bwd(tfn, lambda t: t.float()), fwd_bwd(ofn, lambda t: t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="small CPU run: checks the script")
    args = ap.parse_args()
    cpu = args.cpu
    if not cpu and not torch.cuda.is_available():
        print("compare_torch: no CUDA device; nothing to compare (--cpu checks the script)")
        return 0
    dev = torch.device("cpu" if cpu else "cuda")
    timer = Timer(dev)
    reps = 5 if cpu else (10 if args.quick else 30)
    name = "CPU (torch vs culoss's CPU reference; not a benchmark)" if cpu else \
        torch.cuda.get_device_properties(dev).name
    print(f"device: {name}; torch {torch.__version__}; culoss {'.'.join(map(str, culoss.version()))}")
    print(f"{'case':34s} {'dtype':5s} {'torch_ms':>9s} {'compile_ms':>10s} {'culoss_ms':>9s} "
          f"{'vs_eager':>8s} {'vs_comp':>8s} {'max_rel_err':>11s}")
    # numpy has no bfloat16: the CPU run uses float32 and float16
    dts = (torch.float32, torch.float16) if cpu else (torch.float32, torch.bfloat16)
    cases = []
    ns = [64] if cpu else ([4096] if args.quick else [4096, 16384])
    vs = [1000] if cpu else ([32000, 128256] if args.quick else [32000, 50257, 128256, 152064, 256000])
    for n in ns:
        for v in vs:
            for dt in dts:
                if n * v * (4 if dt == torch.float32 else 2) <= 8 << 30:
                    cases.append(("cross_entropy", (n, v), dt))
    for rname in ("cross_entropy_soft", "nll", "multi_margin"):
        for dt in dts:  # multi-margin is slow in torch: a narrower row
            cases.append((rname, (ns[0], 1000 if rname == "multi_margin" else vs[0]), dt))
    m = 1 << 16 if cpu else (1 << 24 if args.quick else 1 << 26)
    for ename in ("mse", "l1", "huber", "smooth_l1", "bce_with_logits", "bce", "kl_div"):
        for dt in dts:
            cases.append((ename, (m,), dt))
    cases.append(("linear_cross_entropy", (128, 64, 1000) if cpu else (4096, 2048, 32000),
                  torch.float32 if cpu else torch.bfloat16))
    for ename in ("triplet_margin", "cosine_embedding"):
        for dt in dts:
            cases.append((ename, (256, 64) if cpu else (65536, 1024), dt))
    for ename in ("hinge_embedding", "soft_margin", "poisson_nll", "margin_ranking",
                  "gaussian_nll", "multilabel_soft_margin", "multilabel_margin"):
        for dt in dts:
            mm = (1 << 14) if cpu else (1 << 20 if ename == "multilabel_margin" else 1 << 26)
            cases.append((ename, (mm,), dt))
    bad = 0
    for cname, shape, dt in cases:
        if cname == "linear_cross_entropy":
            n, d, v = shape
            h = torch.randn(n, d, device=dev).to(dt)
            w = (0.02 * torch.randn(v, d, device=dev)).to(dt)
            y = torch.randint(0, v, (n,), device=dev)

            def ref_fn(h_, w_, t_):
                hr, wr = h_.detach().requires_grad_(), w_.detach().requires_grad_()
                loss = F.cross_entropy((hr @ wr.T).float(), t_)
                loss.backward()
                return loss.detach(), torch.cat([hr.grad.flatten(), wr.grad.flatten()])

            lin = culoss_call(culoss.linear_cross_entropy, cpu)

            def ours(h_=h, w_=w, t_=y):
                loss, gh, gw, _ = lin(h_, w_, t_)
                return loss, torch.cat([gh.flatten(), gw.flatten()])
            x, call_args = h, (h, w, y)
            label = f"linear_cross_entropy n={n} d={d} v={v}"
        elif cname in ("triplet_margin", "cosine_embedding"):
            ref_fn, ours = embedding_case(cname, *shape, dt, dev)
            call_args = ()
            label = f"{cname} n={shape[0]} d={shape[1]}"
        elif cname in ("hinge_embedding", "soft_margin", "poisson_nll", "margin_ranking",
                       "gaussian_nll", "multilabel_soft_margin", "multilabel_margin"):
            ref_fn, ours = more_case(cname, shape[0], dt, dev)
            call_args = ()
            label = f"{cname} m={shape[0]}"
        else:
            if cname in ("cross_entropy", "cross_entropy_soft", "nll", "multi_margin"):
                x, y, tref, tours = row_case(cname, *shape, dt, dev)
                label = f"{cname} n={shape[0]} v={shape[1]}"
            else:
                x, y, tref, tours = elementwise_case(cname, shape[0], dt, dev)
                label = f"{cname} m={shape[0]}"
            ref_fn = torch_fwd_bwd(tref)
            ours = (lambda f=culoss_call(tours, cpu), a=x, b=y: f(a, b))  # noqa: E731
            call_args = (x, y)
        rl, rg = ref_fn(*call_args)
        ol, og = ours()
        loss_err = abs(ol.float().item() - rl.float().item()) / max(abs(rl.float().item()), 1e-30)
        grad_err = ((og.float().reshape(rg.shape) - rg.float()).norm() / rg.float().norm()).item()
        # NaN-aware: max() would drop a NaN second argument, and NaN > tol is
        # False, so a NaN error must count as the worst error there is
        err = float("nan") if math.isnan(loss_err) or math.isnan(grad_err) else max(loss_err, grad_err)
        t_torch = timer(lambda: ref_fn(*call_args), reps)
        t_comp = float("nan")
        if not args.no_compile and not cpu:
            try:
                comp = torch.compile(ref_fn)
                t_comp = timer(lambda: comp(*call_args), reps)
            except Exception as e:  # torch.compile is optional
                print(f"  (torch.compile failed for {label}: {type(e).__name__})")
        t_ours = timer(ours, reps)
        tol = 1e-4 if dt == torch.float32 else 2e-2
        bad |= not (err <= tol)
        dname = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dt]
        print(f"{label:34s} {dname:5s} {t_torch:9.3f} {t_comp:10.3f} "
              f"{t_ours:9.3f} {t_torch / t_ours:7.2f}x {t_comp / t_ours:7.2f}x {err:11.2e}"
              f"{'' if err <= tol else '  MISMATCH'}", flush=True)
    bad |= distill_cases(dev, timer, reps, cpu, args.quick)
    if not cpu:
        bad |= info_nce_memory(dev, timer, reps)
        bad |= linear_jsd_memory(dev, timer, reps)
    return 1 if bad else 0


def _trl_jsd(s, t, beta):
    """TRL's generalized_jsd_loss (batchmean, T = 1) in float32 torch ops."""
    slp, tlp = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
    if beta == 0:
        per = F.kl_div(slp, tlp, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, device=s.device)
        mix = torch.logsumexp(torch.stack([slp + torch.log1p(-b), tlp + torch.log(b)]), 0)
        per = beta * F.kl_div(mix, tlp, reduction="none", log_target=True) + \
            (1 - beta) * F.kl_div(mix, slp, reduction="none", log_target=True)
    return per.sum() / s.shape[0]


def distill_cases(dev, timer, reps, cpu, quick):
    """Generalized JSD (beta 0.5 and 0) fwd+bwd over [n, v] student and teacher
    logits: torch's composite (TRL's formula, float32), Liger's LigerJSD
    where liger_kernel is installed, and culoss.torch.generalized_jsd_loss."""
    import culoss.torch as cl
    try:
        from liger_kernel.transformers import LigerJSD  # noqa: F401
        have_liger = not cpu
    except Exception:
        have_liger = False
    print(f"\ndistillation fwd+bwd (batchmean, T = 1){'' if have_liger else '; Liger: not installed'}")
    print(f"{'case':34s} {'dtype':5s} {'torch_ms':>9s} {'liger_ms':>9s} {'culoss_ms':>9s} "
          f"{'vs_torch':>8s} {'vs_liger':>8s} {'max_rel_err':>11s}")
    n = 64 if cpu else 4096
    vs = [1000] if cpu else ([32000, 128256] if quick else [32000, 128256, 256000])
    dts = (torch.float32,) if cpu else (torch.float32, torch.bfloat16)
    bad = 0
    for v in vs:
        for dt in dts:
            for beta in (0.5, 0.0):
                if not cpu and n * v * (4 if dt == torch.float32 else 2) * 6 > 40 << 30:
                    continue
                s = (2 * torch.randn(n, v, device=dev)).to(dt)
                t = (2 * torch.randn(n, v, device=dev)).to(dt)

                def fwd_bwd(fn):
                    def run():
                        a = s.detach().requires_grad_()
                        loss = fn(a, t)
                        loss.backward()
                        return loss.detach(), a.grad
                    return run
                ref = fwd_bwd(lambda a, b: _trl_jsd(a, b, beta))
                ours = fwd_bwd(lambda a, b: cl.generalized_jsd_loss(a, b, beta=beta))
                rl, rg = ref()
                ol, og = ours()
                err = max(abs(ol.float().item() - rl.item()) / max(abs(rl.item()), 1e-30),
                          ((og.float() - rg.float()).norm() / rg.float().norm()).item())
                if math.isnan(err):
                    err = float("inf")
                t_torch = timer(ref, reps)
                t_liger = float("nan")
                if have_liger and beta > 0:
                    from liger_kernel.transformers import LigerJSD
                    # Liger's JSD takes log-probabilities (student, teacher);
                    # at beta 0.5 its convention and TRL's agree
                    lj = LigerJSD(beta=beta)
                    liger = fwd_bwd(lambda a, b: lj(F.log_softmax(a.float(), -1).view(-1, v),
                                                    F.log_softmax(b.float(), -1).view(-1, v)))
                    try:
                        t_liger = timer(liger, reps)
                    except Exception as e:  # a Liger version we do not know
                        print(f"  (LigerJSD failed: {type(e).__name__}: {e})")
                t_ours = timer(ours, reps)
                tol = 1e-4 if dt == torch.float32 else 2e-2
                bad |= not (err <= tol)
                dname = {torch.float32: "f32", torch.bfloat16: "bf16"}[dt]
                label = f"jsd(beta={beta}) n={n} v={v}"
                print(f"{label:34s} {dname:5s} {t_torch:9.3f} {t_liger:9.3f} {t_ours:9.3f} "
                      f"{t_torch / t_ours:7.2f}x {t_liger / t_ours:7.2f}x {err:11.2e}"
                      f"{'' if err <= tol else '  MISMATCH'}", flush=True)
    return int(bad)


def linear_jsd_memory(dev, timer, reps):
    """Fused linear + JSD at n = 8192, d = 4096, v = 128256 bf16 against the
    explicit form (torch: both [n, v] logits, their softmaxes and the
    gradient): time and peak memory."""
    import culoss.torch as cl
    n, d, v = 8192, 4096, 128256
    g = torch.Generator(device=dev).manual_seed(5)
    kw = dict(device=dev, dtype=torch.bfloat16)
    hs, ht = (0.5 * torch.randn(n, d, generator=g, **kw) for _ in range(2))
    ws, wt = (0.02 * torch.randn(v, d, generator=g, **kw) for _ in range(2))
    results = []
    for name, fn in (("explicit", lambda a, w: _trl_jsd(a @ w.T, ht @ wt.T, 0.5)),
                     ("culoss", lambda a, w: cl.linear_generalized_jsd_loss(a, w, ht, wt))):
        def run():
            a, w = hs.detach().requires_grad_(), ws.detach().requires_grad_()
            loss = fn(a, w)
            loss.backward()
            return loss.detach(), torch.cat([a.grad.flatten(), w.grad.flatten()])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        try:
            out = run()
        except torch.cuda.OutOfMemoryError:
            print(f"linear jsd {name}: out of memory")
            return 0 if name == "explicit" else 1
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev) - base
        ms = timer(run, reps)
        results.append((name, out, peak, ms))
    (_, (l0, g0), p0, t0), (_, (l1, g1), p1, t1) = results
    err = max(abs(l1.float().item() - l0.float().item()) / abs(l0.float().item()),
              ((g1.float() - g0.float()).norm() / g0.float().norm()).item())
    print(f"\nlinear jsd n={n} d={d} v={v} bf16: explicit {t0:.3f} ms, peak {p0 / 2**20:.0f} MiB; "
          f"culoss {t1:.3f} ms, peak {p1 / 2**20:.0f} MiB ({100 * p1 / p0:.1f}% of the explicit "
          f"form's); max_rel_err {err:.2e}{'' if err <= 2e-2 else '  MISMATCH'}")
    return int(not (err <= 2e-2))


def info_nce_memory(dev, timer, reps):
    """InfoNCE fwd+bwd at N = 16384, D = 1024 bf16: time and peak memory of the
    explicit form (torch: the N x N logits and their gradient) against
    culoss.torch.info_nce_loss (one block of rows at a time)."""
    import culoss.torch as cl
    from culoss.torch.functional import _info_nce_explicit
    n, d = 16384, 1024
    q = torch.randn(n, d, device=dev).to(torch.bfloat16)
    k = (q.float() + 0.5 * torch.randn(n, d, device=dev)).to(torch.bfloat16)
    results = []
    for name, fn in (("explicit", lambda a, b: _info_nce_explicit(a, b, 0.07, True, "mean")),
                     ("culoss", lambda a, b: cl.info_nce_loss(a, b, temperature=0.07,
                                                             symmetric=True))):
        def run():
            a, b = q.detach().requires_grad_(), k.detach().requires_grad_()
            loss = fn(a, b)
            loss.backward()
            return loss.detach(), torch.cat([a.grad.flatten(), b.grad.flatten()])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev) - base
        ms = timer(run, reps)
        results.append((name, out, peak, ms))
    (_, (l0, g0), p0, t0), (_, (l1, g1), p1, t1) = results
    err = max(abs(l1.float().item() - l0.float().item()) / abs(l0.float().item()),
              ((g1.float() - g0.float()).norm() / g0.float().norm()).item())
    print(f"\ninfo_nce symmetric n={n} d={d} bf16: explicit {t0:.3f} ms, peak {p0 / 2**20:.0f} MiB; "
          f"culoss {t1:.3f} ms, peak {p1 / 2**20:.0f} MiB ({100 * p1 / p0:.1f}% of the explicit "
          f"form's); max_rel_err {err:.2e}{'' if err <= 2e-2 else '  MISMATCH'}")
    return int(not (err <= 2e-2))


if __name__ == "__main__":
    sys.exit(main())
