"""Projected MSE (FitNets hint through a 1x1 conv) vs eager PyTorch: time and peak memory.

    python benchmarks/projected_mse.py                     # CPU, the issue's size, fp32
    python benchmarks/projected_mse.py --device cuda --dtype bfloat16 --n 256

Baselines measured in the same process: eager ``F.mse_loss(F.conv2d(x, W[..., None, None], b), t)``
and eager ``F.linear`` on the channels-last view. Forward, backward and the full step (forward +
backward) are timed separately (median of --reps after a warm-up); memory is the peak above the
inputs during one full step: ``torch.cuda.max_memory_allocated`` on GPU, the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs after a warm-up step) on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kdkernels import backends, functional
from kdkernels.bench.rss import peak_extra_bytes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--cs", type=int, default=128)
    p.add_argument("--ct", type=int, default=256)
    p.add_argument("--hw", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.n, args.cs, args.hw, args.hw, device=device, dtype=dtype, requires_grad=True)
    t = torch.randn(args.n, args.ct, args.hw, args.hw, device=device, dtype=dtype)
    w = (torch.randn(args.ct, args.cs, device=device, dtype=dtype) / args.cs ** 0.5).requires_grad_(True)
    b = torch.zeros(args.ct, device=device, dtype=dtype, requires_grad=True)

    impls = {
        "eager conv1x1": lambda: F.mse_loss(F.conv2d(x, w[:, :, None, None], b), t),
        "eager linear": lambda: F.mse_loss(F.linear(x.movedim(1, -1), w, b), t.movedim(1, -1)),
    }
    for name in backends.implemented_backends("projected_mse", device):
        if name != "torch":
            impls[f"kdkernels {name}"] = (lambda n: lambda: functional.projected_mse(x, t, w, b, feature_dim=1,
                                                                                    backend=n))(name)

    def clear():
        x.grad = w.grad = b.grad = None

    rows = []
    for name, fn in impls.items():
        fn().backward()  # warm-up (Triton compiles, allocator warms)
        clear()
        fwd, bwd, full = [], [], []
        for _ in range(args.reps):
            _sync(device)
            t0 = time.perf_counter()
            loss = fn()
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            full.append(t2 - t0)
            clear()
            del loss
        # memory of one full step above the inputs
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn().backward()
            torch.cuda.synchronize()
            mem = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            extra = peak_extra_bytes(lambda: fn().backward())
            mem = float("nan") if extra is None else extra / 2**20
        clear()
        rows.append((name, statistics.median(fwd), statistics.median(bwd), statistics.median(full), mem))

    ref_full, ref_mem = rows[0][3], rows[0][4]
    print(f"projected_mse N={args.n} Cs={args.cs} Ct={args.ct} {args.hw}x{args.hw} feature_dim=1 {args.dtype} "
          f"{device} threads={torch.get_num_threads()}")
    print(f"{'impl':<18}{'fwd ms':>9}{'bwd ms':>9}{'step ms':>9}{'speed-up':>10}{'peak MiB':>10}{'mem ratio':>10}")
    for name, f_, b_, s_, m_ in rows:
        print(f"{name:<18}{f_ * 1e3:9.2f}{b_ * 1e3:9.2f}{s_ * 1e3:9.2f}{ref_full / s_:10.2f}{m_:10.0f}"
              f"{m_ / ref_mem if ref_mem else float('nan'):10.2f}")


if __name__ == "__main__":
    main()
