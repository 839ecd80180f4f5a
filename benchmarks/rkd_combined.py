"""What computing RKD's shared quantities once buys: RKDLoss (one fused distance + angle op) against
the two fused ops called one after the other, and against eager PyTorch.

    python benchmarks/rkd_combined.py                          # CPU, B = 512, D = 512, fp32
    python benchmarks/rkd_combined.py --device cuda --batch 2048 --dtype bfloat16

Each implementation computes ``1.0 * rkd_distance + 2.0 * rkd_angle`` ("mean") on the same inputs
in the same process: time of forward, backward and the full step (kdkernels.bench.timing, medians),
and the extra memory of one step above the inputs (GPU: max_memory_allocated; CPU: the process's
peak RSS after a reset of its peak mark, measured in a fresh subprocess per implementation with the
bench's allocator settings, so no heap cached by an earlier step is reused unseen).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from kdkernels import functional, reference
from kdkernels.bench.cases import DTYPES, Inputs
from kdkernels.bench.inputs import DeviceSource, relation_inputs
from kdkernels.bench.memory import worker_env
from kdkernels.bench.rss import peak_extra_bytes
from kdkernels.bench.timing import one_step, time_phases

WEIGHTS = (1.0, 2.0)


def implementations(backend: str) -> dict:
    d, a = WEIGHTS
    return {
        "eager": lambda inp: reference.rkd(*inp.args, d, a),
        "separate": lambda inp: (d * functional.rkd_distance(*inp.args, backend=backend)
                                 + a * functional.rkd_angle(*inp.args, backend=backend)),
        "combined": lambda inp: functional.rkd(*inp.args, d, a, backend=backend),
    }


def make_inputs(args) -> Inputs:
    return Inputs(relation_inputs(DeviceSource(0, DTYPES[args.dtype], args.device), args.batch, args.dim, args.dim), {})


def extra_bytes(fn, inputs: Inputs, device: torch.device) -> int:
    one_step(fn, inputs)  # warm-up: one-time allocations are not the step's
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        one_step(fn, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    extra = peak_extra_bytes(lambda: one_step(fn, inputs))
    return -1 if extra is None else extra


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default=None, help="kdkernels backend (default: cpu on CPU, auto's choice on CUDA)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # subprocess mode: one implementation
    args = p.parse_args(argv)
    device = torch.device(args.device)
    backend = args.backend or ("cpu" if device.type == "cpu" else "auto")
    impls = implementations(backend)
    if args.memory_of:
        print(json.dumps({"extra": extra_bytes(impls[args.memory_of], make_inputs(args), device)}))
        return

    inputs = make_inputs(args)
    print(f"RKD distance + 2 x angle, B={args.batch} D={args.dim} {args.dtype} on {args.device}, backend={backend}")
    print(f"{'impl':10} {'fwd ms':>9} {'bwd ms':>9} {'step ms':>9} {'x eager':>8} {'extra MiB':>10}")
    rows = {}
    for name, fn in impls.items():
        t = time_phases(fn, inputs, device, warmup=1, min_repeats=3, max_repeats=10, budget_s=2.0, cap_s=60.0)
        if device.type == "cuda":
            extra = extra_bytes(fn, inputs, device)
        else:  # a fresh process per implementation
            out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--memory-of", name],
                                 capture_output=True, text=True, check=True, env=worker_env())
            extra = json.loads(out.stdout.strip().splitlines()[-1])["extra"]
        rows[name] = (t, extra)
        speed = rows["eager"][0].step_ms / t.step_ms
        mib = f"{extra / 2**20:10.1f}" if extra >= 0 else f"{'n/a':>10}"
        print(f"{name:10} {t.fwd_ms:9.2f} {t.bwd_ms:9.2f} {t.step_ms:9.2f} {speed:8.2f} {mib}")
    sep, comb = rows["separate"], rows["combined"]
    print(f"combined vs separate: step {sep[0].step_ms / comb[0].step_ms:.2f}x faster, "
          f"extra memory {comb[1] / 2**20:.1f} vs {sep[1] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
