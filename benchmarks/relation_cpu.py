"""CPU time and peak memory of the relation losses, fused ("cpu") vs the accuracy reference ("torch").

The reference is the spec, not what users run (it computes distances without the Gram trick): for
ratios against the usual eager compositions, torch.compile and torchdistill use ``make bench``.

One fresh process per case (docs/design.md §5: peak RSS of a fresh process); forward + backward of the
"mean"/"batchmean" loss on fp32 (B, D) inputs, the student requiring grad. Prints one line per case:

    python benchmarks/relation_cpu.py                      # the default table
    python benchmarks/relation_cpu.py rkd_distance cpu 4096 512
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    ("rkd_distance", 4096, 512),
    ("similarity_preserving", 4096, 512),
    ("rkd_angle", 512, 512),
]


def run_case(loss: str, backend: str, batch: int, dim: int, reps: int = 3) -> None:
    import torch

    from kdkernels import functional
    from kdkernels.bench.rss import peak_extra_bytes

    fn = getattr(functional, loss)
    torch.manual_seed(0)
    fn(torch.randn(64, dim, requires_grad=True), torch.randn(64, dim), backend=backend).backward()  # warm up
    s = torch.randn(batch, dim, requires_grad=True)
    t = torch.randn(batch, dim)
    times = []

    def steps():
        for _ in range(reps):
            s.grad = None
            t0 = time.perf_counter()
            fn(s, t, backend=backend).backward()
            times.append(time.perf_counter() - t0)

    extra = peak_extra_bytes(steps)
    if extra is None:
        sys.exit("cannot reset the peak RSS here (/proc/self/clear_refs)")
    peak = extra / 2**20
    print(f"{loss:22s} {backend:6s} B={batch:5d} D={dim:4d}  fwd+bwd {statistics.median(times) * 1e3:9.1f} ms  "
          f"peak extra {peak:8.1f} MiB  (threads {torch.get_num_threads()})", flush=True)


def main() -> None:
    if len(sys.argv) == 5:
        run_case(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for loss, batch, dim in CASES:
        for backend in ("cpu", "torch"):
            subprocess.run([sys.executable, __file__, loss, backend, str(batch), str(dim)], env=env, check=False)


if __name__ == "__main__":
    main()
