#!/usr/bin/env python3
"""Times torch.nn.functional (eager and, where it works, torch.compile)
against culoss on the same CUDA tensors, forward + backward, and prints the
ratio table. Needs PyTorch with a GPU and libculoss.so (CULOSS_LIBRARY or the
build/ directory).

Method: each case is first checked for agreement (loss and gradient), then
timed with CUDA events: warm-up, L2 flushed before every repeat, median of
the repeats. Usage: compare_torch.py [--quick] [--no-compile]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import culoss  # noqa: E402


def timeit(fn, reps, flush):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def torch_fwd_bwd(loss_fn):
    def run(x, *args):
        xr = x.detach().requires_grad_()
        loss = loss_fn(xr, *args)
        loss.backward()
        return loss.detach(), xr.grad
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("compare_torch: no CUDA device; nothing to compare")
        return 0
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    flush = torch.empty(int(props.L2_cache_size * 2 // 4) + 1, dtype=torch.float32, device=dev)
    reps = 10 if args.quick else 30
    print(f"device: {props.name}; torch {torch.__version__}; culoss {'.'.join(map(str, culoss.version()))}")
    print(f"{'case':34s} {'dtype':5s} {'torch_ms':>9s} {'compile_ms':>10s} {'culoss_ms':>9s} "
          f"{'vs_eager':>8s} {'vs_comp':>8s} {'max_rel_err':>11s}")
    cases = []
    ns = [4096] if args.quick else [4096, 16384]
    vs = [32000, 128256] if args.quick else [32000, 50257, 128256, 152064, 256000]
    for n in ns:
        for v in vs:
            for dt in (torch.float32, torch.bfloat16):
                if n * v * (4 if dt == torch.float32 else 2) > 8 << 30:
                    continue
                cases.append(("cross_entropy", (n, v), dt))
    m = 1 << 24 if args.quick else 1 << 26
    for name in ("mse", "huber", "bce_with_logits", "kl_div"):
        for dt in (torch.float32, torch.bfloat16):
            cases.append((name, (m,), dt))
    bad = 0
    for name, shape, dt in cases:
        if name == "cross_entropy":
            n, v = shape
            x = (2 * torch.randn(n, v, device=dev)).to(dt)
            y = torch.randint(0, v, (n,), device=dev)
            ref_fn = torch_fwd_bwd(lambda a, b: F.cross_entropy(a.float() if dt != torch.float32 else a, b))
            ours = lambda: culoss.cross_entropy(x, y)  # noqa: E731
            label = f"cross_entropy n={n} v={v}"
        else:
            x = torch.randn(shape, device=dev).to(dt)
            if name == "kl_div":
                x = F.log_softmax(x.float().view(-1, 1024), 1).to(dt).view(-1)
                y = F.softmax(torch.randn(shape, device=dev).view(-1, 1024), 1).to(dt).view(-1)
            elif name == "bce_with_logits":
                y = torch.rand(shape, device=dev).to(dt)
            else:
                y = torch.randn(shape, device=dev).to(dt)
            tfn = {"mse": F.mse_loss, "huber": F.huber_loss,
                   "bce_with_logits": F.binary_cross_entropy_with_logits,
                   "kl_div": lambda a, b: F.kl_div(a, b, reduction="mean")}[name]
            ref_fn = torch_fwd_bwd(lambda a, b, f=tfn: f(a.float(), b.float()))
            if name == "kl_div":
                ours = lambda: culoss.kl_div(x.view(-1, 1024), y.view(-1, 1024))  # noqa: E731
            elif name == "bce_with_logits":
                ours = lambda: culoss.bce_with_logits(x.view(1, -1), y.view(1, -1))  # noqa: E731
            else:
                ours = lambda f=getattr(culoss, name): f(x, y)  # noqa: E731
            label = f"{name} m={shape[0]}"
        rl, rg = ref_fn(x, y)
        ol, og = ours()
        err = max(abs(ol.float().item() - rl.float().item()) / max(abs(rl.float().item()), 1e-30),
                  ((og.float().reshape(rg.shape) - rg.float()).norm() / rg.float().norm()).item())
        t_torch = timeit(lambda: ref_fn(x, y), reps, flush)
        t_comp = float("nan")
        if not args.no_compile:
            try:
                comp = torch.compile(ref_fn)
                t_comp = timeit(lambda: comp(x, y), reps, flush)
            except Exception as e:  # torch.compile is optional
                print(f"  (torch.compile failed for {label}: {type(e).__name__})")
        t_ours = timeit(ours, reps, flush)
        tol = 1e-4 if dt == torch.float32 else 2e-2
        bad |= err > tol
        print(f"{label:34s} {str(dt).split('.')[-1][:5]:5s} {t_torch:9.3f} {t_comp:10.3f} "
              f"{t_ours:9.3f} {t_torch / t_ours:7.2f}x {t_comp / t_ours:7.2f}x {err:11.2e}"
              f"{'' if err <= tol else '  MISMATCH'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
