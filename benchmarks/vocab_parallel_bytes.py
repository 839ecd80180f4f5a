"""Vocab-parallel softmax-KL vs the naive all-gather of logits: bytes communicated and step time.

    .venv/bin/torchrun --nproc_per_node=2 benchmarks/vocab_parallel_bytes.py [--rows 4096 --vocab 32000]

gloo on CPU (NCCL when run on GPUs with --device cuda). Every collective call of one step is
counted (payload bytes this rank contributes: all_reduce / all_gather inputs, all_gather_object's
pickles) by wrapping torch.distributed's functions for the duration of the step. The naive way:
all_gather both ranks' logit slices, run the one-process fused loss on the full logits, keep this
rank's gradient slice. Rank 0 prints one table and writes --out (JSON) if given.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from _dist_bytes import ByteCounter  # benchmarks/ is on sys.path: the script's folder
from kdkernels import functional
from kdkernels.distributed import vocab_parallel_softmax_kl_div


def _slice(vocab: int, world: int, rank: int) -> tuple[int, int]:
    per = -(-vocab // world)  # Megatron-style: the last slice may be shorter
    return rank * per, min(vocab, (rank + 1) * per)


def _vocab_parallel_step(s, t, temperature):
    s.grad = None
    loss = vocab_parallel_softmax_kl_div(s, t, temperature=temperature)
    loss.backward()
    return loss


def _naive_step(s, t, temperature, lo, hi, world, slices):
    s.grad = None
    parts_s = [torch.empty(s.shape[0], b - a, dtype=s.dtype, device=s.device) for a, b in slices]
    parts_t = [torch.empty_like(p) for p in parts_s]
    dist.all_gather(parts_s, s.detach().contiguous())
    dist.all_gather(parts_t, t.contiguous())
    full_s = torch.cat(parts_s, dim=1).requires_grad_(True)
    loss = functional.softmax_kl_div(full_s, torch.cat(parts_t, dim=1), temperature=temperature)
    loss.backward()
    s.grad = full_s.grad[:, lo:hi].contiguous()
    return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=5)
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
    s_full = 2 * torch.randn(args.rows, args.vocab, generator=gen)
    t_full = 2 * torch.randn(args.rows, args.vocab, generator=gen)
    s = s_full[:, lo:hi].contiguous().to(device).requires_grad_(True)
    t = t_full[:, lo:hi].contiguous().to(device)
    del s_full, t_full

    results = {}
    for name, step in (("vocab_parallel", lambda: _vocab_parallel_step(s, t, args.temperature)),
                       ("naive_all_gather", lambda: _naive_step(s, t, args.temperature, lo, hi, world, slices))):
        loss = step()  # warm-up
        with ByteCounter() as counter:
            step()
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
                         "step_ms": 1e3 * sorted(times)[len(times) // 2]}
    same_loss = abs(results["vocab_parallel"]["loss"] - results["naive_all_gather"]["loss"])
    if rank == 0:
        vp, nv = results["vocab_parallel"], results["naive_all_gather"]
        ratio = vp["bytes_per_step"] / nv["bytes_per_step"]
        print(f"world {world}, rows {args.rows}, vocab {args.vocab} (slices {slices}), {args.device}, "
              f"torch {torch.__version__}")
        print(f"{'':18} {'bytes/step/rank':>16} {'collectives':>12} {'step ms':>10}")
        for name, r in results.items():
            print(f"{name:18} {r['bytes_per_step']:>16,} {r['collectives']:>12} {r['step_ms']:>10.1f}")
        print(f"bytes vocab-parallel / naive = {ratio:.2e} (issue 13 target <= 1e-3); "
              f"step time naive / vocab-parallel = {nv['step_ms'] / vp['step_ms']:.2f}x; |loss difference| {same_loss:.1e}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"world": world, "rows": args.rows, "vocab": args.vocab, "slices": slices,
                           "results": results, "bytes_ratio": ratio}, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
