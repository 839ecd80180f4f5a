"""Vocab-parallel fused linear + softmax-KL vs the naive all-gather of the head's logits: bytes and step time.

    .venv/bin/torchrun --nproc_per_node=2 benchmarks/vocab_parallel_linear_bytes.py [--rows 2048 --hidden 1024 --vocab 32000]

Each rank holds the same hidden states (rows, H), its rows of the student's LM-head weight and its
slice of the teacher's logits. kdkernels: ``vocab_parallel_fused_linear_softmax_kl_div`` (O(rows)
statistics per chunk, the hidden gradient all-reduced). The naive way (what a tensor-parallel user
does without it): the slice logits h W_r^T, all_gather of both sides' logit slices, the one-process
fused softmax-KL on the full (rows, V) logits, this rank's gradient slice back through its head, the
hidden gradient all-reduced. Bytes: the payload this rank contributes to every collective of one
step (benchmarks/_dist_bytes.py); peak extra memory: the RSS high-water mark
of one step above the RSS before it (CPU; the gradients included). Rank 0 prints one table and writes --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kdkernels import functional
from kdkernels.bench.rss import peak_extra_bytes
from kdkernels.distributed import vocab_parallel_fused_linear_softmax_kl_div
from _dist_bytes import ByteCounter  # benchmarks/ is on sys.path: the script's folder
from vocab_parallel_bytes import _slice


def _fused_step(h, w, z_t, temperature):
    h.grad = w.grad = None
    loss = vocab_parallel_fused_linear_softmax_kl_div(h, w, teacher_logits=z_t, temperature=temperature)
    loss.backward()
    return loss


def _naive_step(h, w, z_t, temperature, lo, hi, slices):
    h.grad = w.grad = None
    z_s = F.linear(h, w)
    parts_s = [torch.empty(h.shape[0], b - a, dtype=z_s.dtype, device=z_s.device) for a, b in slices]
    parts_t = [torch.empty_like(p) for p in parts_s]
    dist.all_gather(parts_s, z_s.detach().contiguous())
    dist.all_gather(parts_t, z_t.contiguous())
    full_s = torch.cat(parts_s, dim=1).requires_grad_(True)
    loss = functional.softmax_kl_div(full_s, torch.cat(parts_t, dim=1), temperature=temperature)
    loss.backward()
    z_s.backward(full_s.grad[:, lo:hi])
    dist.all_reduce(h.grad)  # the replicated hidden states: every slice's contribution
    return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    slices = [_slice(args.vocab, world, r) for r in range(world)]
    lo, hi = slices[rank]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.rows, args.hidden, generator=gen).to(device).requires_grad_(True)
    w_full = torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden ** 0.5
    w = w_full[lo:hi].contiguous().to(device).requires_grad_(True)
    z_t = (2 * torch.randn(args.rows, args.vocab, generator=gen))[:, lo:hi].contiguous().to(device)
    del w_full

    results = {}
    for name, step in (("vocab_parallel_fused", lambda: _fused_step(h, w, z_t, args.temperature)),
                       ("naive_all_gather", lambda: _naive_step(h, w, z_t, args.temperature, lo, hi, slices))):
        loss = step()  # warm-up
        with ByteCounter() as counter:
            step()
        grads = (h.grad.clone(), w.grad.clone())
        extra = peak_extra_bytes(step) if device.type == "cpu" else None  # gradients are freed first (step sets None)
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results[name] = {"loss": float(loss.detach()), "bytes_per_step": counter.bytes, "collectives": counter.calls,
                         "step_ms": 1e3 * sorted(times)[len(times) // 2], "grads": grads,
                         "peak_extra_mib": None if extra is None else extra / 2**20}
    vp, nv = results["vocab_parallel_fused"], results["naive_all_gather"]
    loss_diff = abs(vp["loss"] - nv["loss"])
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(vp.pop("grads"), nv.pop("grads")))
    if rank == 0:
        ratio = vp["bytes_per_step"] / nv["bytes_per_step"]
        print(f"world {world}, rows {args.rows}, hidden {args.hidden}, vocab {args.vocab} (slices {slices}), "
              f"{args.device}, torch {torch.__version__}")
        print(f"{'':22} {'bytes/step/rank':>16} {'collectives':>12} {'step ms':>10} {'peak extra MiB':>15}")
        for name, r in results.items():
            mib = "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
            print(f"{name:22} {r['bytes_per_step']:>16,} {r['collectives']:>12} {r['step_ms']:>10.1f} {mib:>15}")
        print(f"bytes fused / naive = {ratio:.2e} (the hidden gradient's all-reduce, rows x H, is in both); "
              f"step time naive / fused = {nv['step_ms'] / vp['step_ms']:.2f}x; |loss difference| {loss_diff:.1e}; "
              f"max |gradient difference| {grad_diff:.1e}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"world": world, "rows": args.rows, "hidden": args.hidden, "vocab": args.vocab,
                           "slices": slices, "results": results, "bytes_ratio": ratio, "loss_difference": loss_diff,
                           "max_gradient_difference": grad_diff}, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
