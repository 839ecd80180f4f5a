"""Global-batch relation losses (kdkernels.distributed): bytes communicated per step, step time, and
the loss against one process on the gathered batch.

    .venv/bin/torchrun --nproc_per_node=2 benchmarks/global_relation_bytes.py [--rows 2048 --student-dim 256 --teacher-dim 512]

gloo on CPU (NCCL when run on GPUs with --device cuda). Each rank holds --rows rows (B_local) of
the batch; B_global = world * B_local. Every collective call of one step (forward + backward) is
counted (payload bytes this rank contributes: all_gather inputs, all_gather_object's pickles) by
wrapping torch.distributed's functions for the duration of the step (benchmarks/_dist_bytes.py).

The naive alternative is not run: its bytes are computed analytically as each rank all-gathering
its (B_local x B_global) rows of the student's and of the teacher's distance (RKD) or Gram (SP)
matrix, 2 * B_local * B_global * element size (the embeddings they are computed from would
have to be gathered too; not counted, so the naive figure is a lower bound).

Rank 0 also computes ``functional.<loss>`` (same backend) on the whole batch in one process and
prints |loss difference| and the largest difference of its gradient slice; --out writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from _dist_bytes import ByteCounter  # benchmarks/ is on sys.path: the script's folder
from kdkernels import backends, distributed, functional

LOSSES = ("rkd_distance", "similarity_preserving")


def _step(fn, s, t, backend):
    s.grad = None
    loss = fn(s, t, backend=backend)
    loss.backward()
    return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048, help="rows per rank (B_local)")
    p.add_argument("--student-dim", type=int, default=256)
    p.add_argument("--teacher-dim", type=int, default=512)
    p.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, of {LOSSES} and rkd_angle, rkd")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    b_local, b_global = args.rows, args.rows * world
    gen = torch.Generator().manual_seed(0)
    s_full = torch.randn(b_global, args.student_dim, generator=gen)
    t_full = torch.randn(b_global, args.teacher_dim, generator=gen)
    lo, hi = rank * b_local, (rank + 1) * b_local
    s = s_full[lo:hi].contiguous().to(device).requires_grad_(True)
    t = t_full[lo:hi].contiguous().to(device)

    results = {}
    for loss in args.losses.split(","):
        fn = getattr(distributed, f"global_{loss}")
        out = _step(fn, s, t, args.backend)  # warm-up
        with ByteCounter() as counter:
            _step(fn, s, t, args.backend)
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _step(fn, s, t, args.backend)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        naive = 2 * b_local * b_global * s.element_size()
        entry = {"backend": backends.resolve(loss, args.backend, device), "loss": float(out.detach()),
                 "bytes_per_step": counter.bytes, "collectives": counter.calls, "naive_bytes_analytic": naive,
                 "bytes_ratio": counter.bytes / naive, "step_ms": 1e3 * sorted(times)[len(times) // 2]}
        if rank == 0:  # the one-process loss and gradient on the whole batch
            s_one = s_full.clone().to(device).requires_grad_(True)  # a fresh leaf per loss (no accumulated grad)
            ref = getattr(functional, loss)(s_one, t_full.to(device), backend=args.backend)
            ref.backward()
            entry["one_process_loss"] = float(ref.detach())
            entry["loss_difference"] = abs(entry["loss"] - entry["one_process_loss"])
            entry["grad_max_difference"] = float((s.grad - s_one.grad[lo:hi]).abs().max())
        results[loss] = entry
        dist.barrier()
    if rank == 0:
        print(f"world {world}, B_local {b_local}, B_global {b_global}, D_s {args.student_dim}, D_t {args.teacher_dim}, "
              f"{args.device}, torch {torch.__version__}")
        print(f"{'':22} {'backend':>8} {'bytes/step/rank':>16} {'collectives':>12} {'naive bytes*':>14} {'step ms':>10}")
        for loss, r in results.items():
            print(f"{loss:22} {r['backend']:>8} {r['bytes_per_step']:>16,} {r['collectives']:>12} "
                  f"{r['naive_bytes_analytic']:>14,} {r['step_ms']:>10.1f}")
        print("* naive: all_gather of the (B_local x B_global) distance / Gram rows of student and teacher, "
              "computed analytically (not run)")
        for loss, r in results.items():
            print(f"bytes kdkernels / naive = {r['bytes_ratio']:.3f} ({loss}); max |grad difference| "
                  f"{r['grad_max_difference']:.1e}; |loss difference| {r['loss_difference']:.1e}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"world": world, "rows_per_rank": b_local, "student_dim": args.student_dim,
                           "teacher_dim": args.teacher_dim, "device": args.device, "torch": torch.__version__,
                           "results": results}, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
