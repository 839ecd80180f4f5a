"""Compares softmax_kl_div_topk(backend="triton") against backend="torch" (loss and student gradient).

Run: TRITON_INTERPRET=1 python python_tests/check_topk_triton.py (CPU tensors) or on a GPU.
"""
import itertools
import math
import sys

import torch

import kdkernels
from kdkernels import functional as F
from kdkernels.triton._common import override_tiles

DEV = "cuda" if torch.cuda.is_available() and "--cpu" not in sys.argv else "cpu"
worst = {}
fails = []
known = []


def run(be, s0, lq, idx, up, **kw):
    s = s0.clone().requires_grad_(True)
    loss = F.softmax_kl_div_topk(s, lq, idx, backend=be, **kw)
    (loss * up).sum().backward() if up is not None else loss.backward()
    return loss.detach(), s.grad


def compare(name, dtype, s, lq, idx, up=None, **kw):
    lt, gt = run("torch", s, lq, idx, up, **kw)
    lk, gk = run("triton", s, lq, idx, up, **kw)
    for what, a, b in (("loss", lt, lk), ("grad", gt, gk)):
        a = a.double(); b = b.double()
        same_nonfinite = torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()) and \
            torch.equal(a[a.isinf()], b[b.isinf()])
        fin = a.isfinite() & b.isfinite()
        d = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
        scale = max(1.0, a[fin].abs().max().item() if fin.any() else 0.0)
        tol = (1e-12 if dtype == torch.float64 else 2e-5) * scale
        key = (str(dtype), what)
        worst[key] = max(worst.get(key, 0.0), d / scale)
        if not same_nonfinite and d <= tol and what == "loss" and kw.get("tail") == "bucket" and \
                lq.shape[-1] == s.shape[-1]:
            # K = V: p_r = 0 exactly, so the loss is +inf iff q_r = max(0, 1 - Q) > 0, i.e. iff the
            # teacher's K probabilities sum below 1 by rounding; the two backends sum in different orders
            known.append(f"{name} {kw}: loss +inf in one backend only (K = V, q_r = 0 or ~1e-16 by rounding)")
        elif not same_nonfinite or d > tol:
            fails.append(f"{name} {kw} {what}: max diff {d:.3g} (tol {tol:.3g}), non-finite match {same_nonfinite}")


def shuffled(lq, idx, g):
    perm = torch.argsort(torch.rand(idx.shape, generator=g), dim=-1)
    return lq.gather(-1, perm), idx.gather(-1, perm)


def main():
    g = torch.Generator().manual_seed(0)
    n = 0
    for dtype in (torch.float64, torch.float32):
        for (R, V, K), tile in itertools.product(((5, 37, 6), (4, 37, 1), (3, 37, 37), (4, 300, 40)), (None, 16)):
            s = (torch.randn(R, V, generator=g) * 2).to(dtype)
            t = (torch.randn(R, V, generator=g) * 2).to(dtype)
            cases = {}
            for T in (1.0, 2.5):
                lq, idx = kdkernels.topk_teacher(t, K, temperature=T)
                cases[T] = shuffled(lq, idx, g)
            labels = torch.randint(0, V, (R,), generator=g)
            labels[1] = -100
            s_inf = s.clone()  # -inf student entries outside the top-k (of the T = 1 teacher)
            outside = torch.ones(R, V, dtype=torch.bool).scatter_(-1, cases[1.0][1], False)
            s_inf[outside & (torch.rand(R, V, generator=g) < 0.5)] = -math.inf
            ctx = override_tiles("response", tile) if tile else override_tiles("response", 4096)
            with ctx:
                for tail, T, t2, red in itertools.product(("renormalize", "bucket"), (1.0, 2.5), (True, False),
                                                          ("batchmean", "sum", "mean", "none")):
                    lq, idx = cases[T]
                    up = torch.rand(R, generator=g).to(dtype) + 0.5 if red == "none" else None
                    kw = dict(temperature=T, tail=tail, reduction=red, t2_scale=t2)
                    tag = f"{dtype} R{R} V{V} K{K} tile{tile}"
                    compare(tag, dtype, s.to(DEV), lq.to(DEV), idx.to(DEV), None if up is None else up.to(DEV), **kw)
                    compare(tag + " labels", dtype, s.to(DEV), lq.to(DEV), idx.to(DEV),
                            None if up is None else up.to(DEV), labels=labels.to(DEV), **kw)
                    n += 2
                    if T == 1.0:
                        compare(tag + " -inf", dtype, s_inf.to(DEV), lq.to(DEV), idx.to(DEV),
                                None if up is None else up.to(DEV), **kw)
                        n += 1
        # R = 0 (and a leading shape)
        for tail, red in itertools.product(("renormalize", "bucket"), ("batchmean", "sum", "mean", "none")):
            s = torch.randn(0, 3, 11, dtype=dtype, device=DEV)
            lq = torch.randn(0, 3, 4, dtype=dtype, device=DEV)
            idx = torch.zeros(0, 3, 4, dtype=torch.int64, device=DEV)
            compare("R=0", dtype, s, lq, idx, torch.ones(0, 3, dtype=dtype, device=DEV) if red == "none" else None,
                    tail=tail, reduction=red)
            n += 1
    print(f"{n} comparisons on {DEV}")
    for k, v in sorted(worst.items()):
        print(f"  max |diff| / max(1, max|ref|)  {k[0]:14s} {k[1]}: {v:.3g}")
    for f in fails[:40]:
        print("FAIL", f)
    print(f"{len(known)} known K = V bucket rounding cases (loss +inf in one backend), e.g.")
    for f in known[:3]:
        print("KNOWN", f)
    print(f"{len(fails)} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
