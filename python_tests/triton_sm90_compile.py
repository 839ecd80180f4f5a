"""Compile every Triton kernel launch of kdkernels for sm_90 (H100/H200) on a machine without a GPU.

    python python_tests/triton_sm90_compile.py        # prints one line per compiled variant

The Triton interpreter (how the test suite runs Triton on CPU) executes kernels as NumPy code: it
never runs Triton's compiler, so a kernel can pass every interpreted test and still fail to compile
for a GPU (types that do not unify, an op without a lowering, a constexpr branch that is not
static). This script runs the real launchers (kdkernels/triton/<family>/<op>.py) on small CPU tensors with
``JITFunction.run`` replaced by a recorder, so every launch's arguments, constexprs and options are
captured exactly as a GPU run would pass them, then compiles each distinct variant with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` down to a cubin (ptxas included). No kernel
runs; outputs of the launchers are garbage and never looked at.

Must run WITHOUT ``TRITON_INTERPRET=1`` (the interpreter replaces ``triton.jit``). Exit status 1 if
any variant fails to compile; the failures are printed.
"""
from __future__ import annotations

import inspect
import itertools
import os
import sys
import time
import traceback

import torch

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter never compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")
POINTER_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                 torch.bool: "i1"}

launches: list[tuple[JITFunction, dict, dict]] = []


def _record(self, *args, grid, warmup, **kwargs):
    options = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
    bound = inspect.signature(self.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    launches.append((self, dict(bound.arguments), options))
    return None


def _scalar_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def first_pointer(signature: dict) -> str:
    return next((v for v in signature.values() if v.startswith("*")), "")


def variant(fn: JITFunction, arguments: dict, options: dict):
    """(signature, constexprs, options) of one launch, hashable parts as a key."""
    signature, constexprs = {}, {}
    for param in fn.params:
        value = arguments[param.name]
        if param.is_constexpr or value is None:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        else:
            signature[param.name] = _scalar_type(value)
    key = (fn.__name__, tuple(signature.items()), repr(sorted(constexprs.items(), key=lambda kv: kv[0])),
           tuple(sorted(options.items())))
    return key, signature, constexprs


# ---- the launches: every loss family, every constexpr branch, the dtypes a GPU run sees ------------
def response_launches():
    from kdkernels.triton.response import softmax_kl as k
    from kdkernels.triton.response import softmax_kl_step as step
    from kdkernels.triton.response import softmax_kl_topk as topk

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for vocab in (100, 40000):  # one chunk / several chunks (and the larger block config)
            s = torch.randn(3, vocab).to(dtype)
            t = torch.randn(3, vocab).to(dtype)
            labels = torch.tensor([0, -100, 2])
            for divergence in (0, 1, 2):
                for lab in (None, labels):
                    _, stats = k.forward(s, t, lab, 2.0, divergence, 0.5, -100, True)
                    for student_grad, teacher_grad in ((True, False), (True, True), (False, True)):
                        k.backward(torch.ones(3), s, t, lab, stats, 2.0, divergence, 0.5, -100, True,
                                              student_grad, teacher_grad)
                    # the one-pass step; its backward's scale_rows_ launches come with it (factor != 1)
                    for student_grad, teacher_grad in ((True, False), (True, True), (False, True), (False, False)):
                        for per_row in (False, True):
                            opmath = torch.float64 if dtype == torch.float64 else torch.float32
                            weight = torch.tensor(0.5, dtype=opmath)
                            _, gs, gt = step.forward(s, t, lab, weight, 2.0, divergence, 0.5, -100, True, per_row,
                                                     student_grad, teacher_grad)
                            step.backward(torch.full((3,) if per_row else (), 2.0, dtype=opmath), gs, gt)
                # the top-k op (student gradient only); K = 1, a few, several chunks (K = V); its
                # backward's scale_rows_ launches come with it (factor != 1)
                opmath = torch.float64 if dtype == torch.float64 else torch.float32
                weight = torch.tensor(0.5, dtype=opmath)
                for k_top in sorted({1, 7, vocab}):
                    lq, idx = t.float().log_softmax(-1).topk(k_top, dim=-1)
                    lq = lq.to(dtype)
                    for lab, tail, student_grad, per_row in itertools.product((None, labels), (0, 1), (True, False),
                                                                              (False, True)):
                        _, gs = topk.forward(s, lq, idx, lab, weight, 2.0, tail, -100, True, per_row, student_grad)
                        topk.backward(torch.full((3,) if per_row else (), 2.0, dtype=opmath), gs)


def feature_launches():
    from kdkernels.triton.feature import projected_mse as k
    from kdkernels.reduction import FEATURE_NONE

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for layout in ("rows", "feature_major"):
            x = torch.randn(2, 40, 24).to(dtype)
            t = torch.randn(2, 40, 36).to(dtype)
            if layout == "feature_major":  # NCHW maps seen as (B, P, C) with stride 1 along P
                x = torch.randn(2, 24, 40).to(dtype).transpose(1, 2)
                t = torch.randn(2, 36, 40).to(dtype).transpose(1, 2)
            w = torch.randn(36, 24).to(dtype)
            for bias, reduction in itertools.product((None, torch.randn(36).to(dtype)), (0, FEATURE_NONE)):
                loss, residual = k.forward(x, t, w, bias, reduction)  # "none": per-row (PER_ROW) variants
                for flags in ((True, False, True, bias is not None), (True, True, False, False),
                              (False, False, True, False), (False, True, False, True)):
                    k.backward(torch.ones_like(loss), x, w, residual, reduction, *flags)
    attention_transfer_launches()


def attention_transfer_launches():
    from kdkernels.triton.feature import attention_transfer as k

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        opmath = torch.float64 if dtype == torch.float64 else torch.float32
        weight = torch.tensor(0.5, dtype=opmath)
        # one S block / several S, channel and per-sample (BLOCK_R) blocks; Cs != Ct
        for cs, ct, positions in ((3, 5, 49), (20, 36, 1100)):
            s = torch.randn(2, cs, positions).to(dtype)
            t = torch.randn(2, ct, positions).to(dtype)
            for p, squared, per_row in itertools.product((1.0, 2.0, 2.5), (True, False), (False, True)):
                for student_grad, teacher_grad in ((True, False), (True, True), (False, True), (False, False)):
                    _, gs, gt = k.forward(s, t, weight, p, squared, per_row, student_grad, teacher_grad)
                    # its backward's scale_rows_ launches (factor != 1)
                    k.backward(torch.full((2,) if per_row else (), 2.0, dtype=opmath), gs, gt)


def fsp_launches():
    from kdkernels.triton.relation import fsp as k

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        opmath = torch.float64 if dtype == torch.float64 else torch.float32
        weight = torch.tensor(0.5, dtype=opmath)
        # one block / several blocks of (C1, C2) entries per sample; student and teacher S differ
        for c1, c2 in ((3, 5), (40, 70)):
            maps = [torch.randn(2, c, s).to(dtype) for c, s in ((c1, 49), (c2, 49), (c1, 16), (c2, 16))]
            for per_row in (False, True):
                for grads in ((True, True, False, False), (True, True, True, True), (False, False, False, True),
                              (False, False, False, False)):
                    _, *saved = k.forward(*maps, weight, per_row, *grads)
                    k.backward(torch.full((2,) if per_row else (), 2.0, dtype=opmath), *saved)
            if dtype in (torch.bfloat16, torch.float16):
                # on a GPU the launcher writes 16-bit gradient operands (cuBLAS' inputs); on CPU tensors it
                # takes the float32 path, so that variant is launched here directly
                from kdkernels.triton._common import launch, tl_opmath

                gram = torch.randn(2, c1 * c2)
                out = torch.empty(2, c1 * c2, dtype=dtype)
                block = min(k.TILES[0], triton.next_power_of_2(c1 * c2))
                blocks = triton.cdiv(c1 * c2, block)
                launch(k._fsp_diff_kernel, (2, blocks), gram, gram, out, out, weight, torch.empty(2, blocks), c1 * c2,
                       blocks, 1.0 / 49, 1.0 / 16, WRITE_S=True, WRITE_T=True, DT=tl_opmath(dtype), BLOCK=block,
                       num_warps=k.TILES[1])


def relation_launches():
    from kdkernels.triton.relation import rkd_angle, rkd_distance, rkd_distance_angle, similarity_preserving

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        s = torch.randn(70, 20).to(dtype)
        t = torch.randn(70, 12).to(dtype)
        opmath = torch.float64 if dtype == torch.float64 else torch.float32
        stats3 = torch.ones(3, dtype=opmath)
        for per_row in (False, True):  # the summed loss and a 0-d upstream; per-row losses and a (B,) one
            g = torch.ones((70,) if per_row else (), dtype=opmath)
            rkd_distance.forward(s, t, per_row)
            rkd_distance.backward(g, s, t, stats3)
            similarity_preserving.forward(s, t, per_row)
            similarity_preserving.backward(g, s, t, torch.ones(3, 70, dtype=opmath))
            rkd_angle.forward(s, t, per_row)
            rkd_angle.backward(g, s, t)
            rkd_distance_angle.forward(s, t, per_row)
            rkd_distance_angle.backward(g, g, s, t, stats3)
    fsp_launches()


FAMILIES = {"response": response_launches, "feature": feature_launches, "relation": relation_launches}


def main(argv: list[str]) -> int:
    families = argv or list(FAMILIES)
    JITFunction.run = _record
    for name in families:
        FAMILIES[name]()
    variants = {}
    for fn, arguments, options in launches:
        key, signature, constexprs = variant(fn, arguments, options)
        variants.setdefault(key, (fn, signature, constexprs, options))
    print(f"triton {triton.__version__}: {len(launches)} launches, {len(variants)} distinct variants, target {TARGET}")
    failures = 0
    t0 = time.perf_counter()
    for (name, *_), (fn, signature, constexprs, options) in variants.items():
        shown = {k: v for k, v in constexprs.items() if v is not None}
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=TARGET, options=options)
            print(f"ok    {name} {first_pointer(signature)} {shown} {options} cubin {len(compiled.asm['cubin'])} B",
                  flush=True)
        except Exception:  # noqa: BLE001 - report every failing variant, then fail
            failures += 1
            print(f"FAIL  {name} {shown} {options}\n{traceback.format_exc()}", flush=True)
    print(f"{len(variants) - failures} compiled, {failures} failed in {time.perf_counter() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
