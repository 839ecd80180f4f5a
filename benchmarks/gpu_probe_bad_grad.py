"""GPU probe: a misshapen upstream gradient into the CUDA relation backward ops must raise.

The first H200 run (benchmarks/results/h200-first-gpu-run) saw a segmentation fault here instead of
a RuntimeError. benchmarks/gpu_check.sh runs this under cuda-gdb with GPU_CHECK_PROBE=1: where it
faults, the backtrace says in which frame.
"""
import os
import sys

import torch

import kdkernels  # noqa: F401  (registers the ops)
from kdkernels import ops

DEVICE = os.environ.get("PROBE_DEVICE", "cuda")  # PROBE_DEVICE=cpu: a dry run of the script on the CPU ops
BACKEND = "cuda" if DEVICE == "cuda" else "cpu"
B, D = 8, 5
s = torch.randn(B, D, device=DEVICE).requires_grad_(True)  # as the test: a student that requires grad
t = torch.randn(B, D, device=DEVICE)


def _no_grad(op, *args):
    with torch.no_grad():
        return op(*args)


names = sys.argv[1:] or ["rkd_angle", "rkd_distance", "similarity_preserving"]
for name in names:
    spec = getattr(ops, name.upper())
    fwd, bwd = spec.forward_ops[BACKEND], spec.backward_ops[BACKEND]
    with torch.no_grad():
        out = fwd(s, t, False)
    outs = out if isinstance(out, tuple) else (out,)
    wrong = torch.ones(B + 1, dtype=outs[0].dtype, device=DEVICE)
    # the bare kernel (no autograd layer), then the op under no_grad, then with grad mode on: the
    # last line printed before a crash says which layer it is in
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA if DEVICE == "cuda" else torch._C.DispatchKey.CPU)
    calls = (("kernel", lambda: bwd.redispatch(keys, wrong, s.detach(), t, *outs[1:])),
             ("no_grad", lambda: _no_grad(bwd, wrong, s.detach(), t, *outs[1:])),
             ("grad", lambda: bwd(wrong, s.detach(), t, *outs[1:])))
    for mode, call in calls:
        print(f"{name} [{mode}] ...", flush=True)
        try:
            call()
            print(f"{name} [{mode}]: NO ERROR (wrong)", flush=True)
        except RuntimeError as e:
            print(f"{name} [{mode}]: raised: {str(e).splitlines()[0][:120]}", flush=True)
print("probe done", flush=True)
