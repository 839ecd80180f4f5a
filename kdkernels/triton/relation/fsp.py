"""Triton kernel of the one-pass ``fsp`` op (contract: FSP in kdkernels/ops/relation.py; the same
math as csrc/include/kdkernels/fsp.h).

The GEMMs go through torch (cuBLAS; BLAS under the interpreter): G_s = A_s B_s^T and G_t = A_t B_t^T,
(N, C1, C2), accumulated and kept in op-math (16-bit CUDA maps: ``torch.bmm(..., out_dtype=float32)``;
16-bit CPU maps, interpreter only, are converted to float32 first, as the C++ CPU kernel does). Between
them one launch, ``_fsp_diff_kernel``, grid (N, cdiv(C1 C2, BLOCK)): per block of entries of a
sample D = G_s / S_s - G_t / S_t, the block's sum of D^2 into a partial (N, blocks) buffer (summed by
torch: deterministic, no atomics) and, when gradients are wanted, the gradient operands
g_s = 2 w D / S_s and g_t = -2 w D / S_t over the G buffers (into input-dtype buffers for 16-bit maps,
cuBLAS' operands). Then the gradient GEMMs dA = g B, dB = g^T A in the maps' dtype. ``weight`` (the
reduction's factor) is a 0-d device tensor read by the kernel: no host sync. The backward only
scales the saved gradients in place (kdkernels/triton/scale_rows.py), nothing where the factor is 1.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels._dtypes import opmath_dtype
from kdkernels.triton._common import launch, tiles, tl_opmath
from kdkernels.triton.scale_rows import scale_rows_

# (largest BLOCK of (C1, C2) entries per program, num_warps); tests may shrink it with
# kdkernels.triton._common.override_tiles("fsp", ...) to reach several blocks per sample. Not tuned on a GPU.
TILES = (2048, 4)


@triton.jit
def _fsp_diff_kernel(gs_ptr, gt_ptr, os_ptr, ot_ptr, weight_ptr, partial_ptr, M, blocks, inv_ss_in: "fp64",
                     inv_st_in: "fp64", WRITE_S: tl.constexpr, WRITE_T: tl.constexpr, DT: tl.constexpr,
                     BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    idx = n * M + offs
    inv_ss = tl.full([], inv_ss_in, DT)
    inv_st = tl.full([], inv_st_in, DT)
    g_s = tl.load(gs_ptr + idx, mask=mask, other=0.0).to(DT)
    g_t = tl.load(gt_ptr + idx, mask=mask, other=0.0).to(DT)
    d = g_s * inv_ss - g_t * inv_st
    tl.store(partial_ptr + n * blocks + b, tl.sum(d * d, axis=0))
    w = tl.load(weight_ptr).to(DT)
    if WRITE_S:
        tl.store(os_ptr + idx, (2.0 * (w * inv_ss) * d).to(os_ptr.dtype.element_ty), mask=mask)
    if WRITE_T:
        tl.store(ot_ptr + idx, (2.0 * (-w * inv_st) * d).to(ot_ptr.dtype.element_ty), mask=mask)


def _check(maps: tuple[Tensor, ...], weight: Tensor) -> None:
    sf, ss, tf, ts = maps
    if any(m.dim() != 3 for m in maps):
        raise ValueError(f"fsp (triton): the four maps must be 3-D (N, C, S), got {[tuple(m.shape) for m in maps]}")
    if any(m.shape[0] != sf.shape[0] for m in maps) or ss.shape[2] != sf.shape[2] or ts.shape[2] != tf.shape[2] \
            or tf.shape[1] != sf.shape[1] or ts.shape[1] != ss.shape[1]:
        raise ValueError(f"fsp (triton): maps (N, C1, S_s), (N, C2, S_s), (N, C1, S_t), (N, C2, S_t) expected, got "
                         f"{[tuple(m.shape) for m in maps]}")
    if min(sf.shape[1], ss.shape[1], sf.shape[2], tf.shape[2]) < 1:
        raise ValueError("fsp (triton): at least one channel and one position")
    if not sf.is_floating_point() or any(m.dtype != sf.dtype for m in maps):
        raise ValueError(f"fsp (triton): the maps must be floating tensors of one dtype, got {[m.dtype for m in maps]}")
    if not all(m.is_contiguous() for m in maps):
        raise ValueError("fsp (triton): contiguous maps")
    if any(m.device != sf.device for m in maps) or weight.device != sf.device:
        raise ValueError("fsp (triton): the maps and weight must be on one device")
    if weight.dim() != 0:
        raise ValueError(f"fsp (triton): weight must be 0-d, got shape {tuple(weight.shape)}")


def forward(student_first: Tensor, student_second: Tensor, teacher_first: Tensor, teacher_second: Tensor,
            weight: Tensor, per_row: bool, student_first_grad: bool, student_second_grad: bool,
            teacher_first_grad: bool, teacher_second_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_sf, grad_ss, grad_tf, grad_ts): loss = weight * sum_n l_n (0-d), or weight * l_n
    (N,) when ``per_row``; the gradients of that loss (of each sample's, when ``per_row``) in the maps'
    dtype, an unrequested one an empty (0,) tensor."""
    maps = (student_first, student_second, teacher_first, teacher_second)
    _check(maps, weight)
    wanted = (student_first_grad, student_second_grad, teacher_first_grad, teacher_second_grad)
    dtype = student_first.dtype
    acc = opmath_dtype(dtype)
    N, C1, Ss = student_first.shape
    C2, St = student_second.shape[1], teacher_first.shape[2]
    M = C1 * C2
    narrow = dtype != acc
    cast = narrow and not student_first.is_cuda  # the interpreter on the CPU: float32 operands (no bf16 GEMM
    as_, bs, at_, bt = (m.to(acc) for m in maps) if cast else maps  # with a float32 result there)

    def gram(a: Tensor, b: Tensor) -> Tensor:
        if narrow and not cast:  # cuBLAS: 16-bit operands, float32 accumulation and result
            return torch.bmm(a, b.transpose(1, 2), out_dtype=acc)
        return torch.bmm(a, b.transpose(1, 2))

    g_s, g_t = gram(as_, bs), gram(at_, bt)
    student_grad, teacher_grad = wanted[0] or wanted[1], wanted[2] or wanted[3]
    # gradient operands: over the G buffers, or input-dtype buffers for cuBLAS' 16-bit GEMMs
    op_s = (torch.empty_like(g_s, dtype=dtype) if narrow and not cast else g_s) if student_grad else g_s
    op_t = (torch.empty_like(g_t, dtype=dtype) if narrow and not cast else g_t) if teacher_grad else g_t
    block_max, num_warps = tiles("fsp", TILES)
    block = min(block_max, triton.next_power_of_2(max(M, 1)))
    blocks = triton.cdiv(M, block)
    partial = torch.empty((N, blocks), dtype=acc, device=student_first.device)
    if N > 0:
        launch(_fsp_diff_kernel, (N, blocks), g_s, g_t, op_s, op_t, weight.to(device=g_s.device, dtype=acc), partial,
               M, blocks, 1.0 / Ss, 1.0 / St, WRITE_S=student_grad, WRITE_T=teacher_grad, DT=tl_opmath(dtype),
               BLOCK=block, num_warps=num_warps)
    rows = partial.sum(dim=1)
    w = weight.to(device=rows.device, dtype=acc)
    loss = rows * w if per_row else rows.sum() * w

    def grad(need: bool, g: Tensor, other: Tensor, first: bool, like: Tensor) -> Tensor:
        if not need:
            return like.new_empty((0,))
        out = torch.bmm(g if first else g.transpose(1, 2), other)
        return out if out.dtype == dtype else out.to(dtype)

    return (loss, grad(wanted[0], op_s, bs, True, student_first), grad(wanted[1], op_s, as_, False, student_second),
            grad(wanted[2], op_t, bt, True, teacher_first), grad(wanted[3], op_t, at_, False, teacher_second))


def backward(grad_loss: Tensor, grad_student_first: Tensor, grad_student_second: Tensor, grad_teacher_first: Tensor,
             grad_teacher_second: Tensor) -> None:
    """Scales the saved gradients in place, sample n by grad_loss (0-d) or grad_loss[n] ((N,))."""
    grads = [g for g in (grad_student_first, grad_student_second, grad_teacher_first, grad_teacher_second) if g.numel()]
    if not grads:
        return
    if grad_loss.dim() not in (0, 1) or (grad_loss.dim() == 1 and grad_loss.shape[0] != grads[0].shape[0]):
        raise ValueError(f"fsp backward: grad_loss must be 0-d or ({grads[0].shape[0]},), got {tuple(grad_loss.shape)}")
    if any(g.dim() != 3 or not g.is_contiguous() or g.shape[0] != grads[0].shape[0] for g in grads):
        raise ValueError("fsp backward: the saved gradients must be contiguous (N, C, S) tensors of one N")
    factor = grad_loss.to(opmath_dtype(grads[0].dtype))
    for g in grads:
        scale_rows_(g.view(g.shape[0], -1), factor)
