"""Probe for the "custom_op vs torch.library.triton_op" decision (docs/decisions.md).

kdkernels' Triton variants are opaque custom ops with explicit fake kernels. ``triton_op`` +
``wrap_triton`` would let Inductor see into the kernels. This script checks, on the machine it runs on,
whether a minimal ``triton_op`` survives ``torch.compile(fullgraph=True)`` (aot_eager and inductor) with the
same launch option kdkernels' response kernels need (``enable_fp_fusion=False``), and on a GPU times an
eager call against the compiled one. Run: ``python benchmarks/triton_op_probe.py`` (CPU: sets
TRITON_INTERPRET=1).
"""
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch.library import triton_op, wrap_triton  # noqa: E402


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, s, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * s, mask=mask)


@triton_op("kdkernels_probe::scale", mutates_args={})
def scale(x: torch.Tensor, s: float) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    wrap_triton(_scale_kernel)[(triton.cdiv(n, 1024),)](x, y, n, s, BLOCK=1024, enable_fp_fusion=False)
    return y


def _time(fn, x, reps=50):
    fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1 << 20 if device == "cuda" else 1000, device=device)
    print(f"torch {torch.__version__}, triton {triton.__version__}, device {device}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    print("eager triton_op correct:", torch.allclose(scale(x, 2.0), 2 * x))

    def step(x):
        return scale(x, 2.0).sum()

    for backend in ("aot_eager", "inductor"):
        try:
            compiled = torch.compile(step, fullgraph=True, backend=backend)
            ok = torch.allclose(compiled(x), step(x))
            timing = f", eager {_time(step, x) * 1e6:.1f} us, compiled {_time(compiled, x) * 1e6:.1f} us" if device == "cuda" else ""
            print(f"torch.compile({backend}): works, correct={ok}{timing}")
        except Exception as e:  # noqa: BLE001 - the outcome is what this probe reports
            print(f"torch.compile({backend}): FAILS: {str(e).splitlines()[0][:200]}")
            cause = [line for line in str(e).splitlines() if "got " in line][:1]
            if cause:
                print("   ", cause[0].strip()[:300])


if __name__ == "__main__":
    main()
