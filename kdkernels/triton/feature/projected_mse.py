"""Triton kernels of the ``projected_mse`` op (docs/design.md §2.2); the math is csrc/include/kdkernels/feature.h.

x is (B, P, Ds), t (B, P, Dt), W (Dt, Ds), all read through their strides (NCHW maps arrive as
(N, H*W, C) views and are never copied). Per feature vector ``r = x W^T + b - t``; with
``s = grad_loss * 2 / denominator``:

* forward: a tiled GEMM (``tl.dot``) whose epilogue adds the bias, subtracts the t tile, writes r in
  the input dtype (the only tensor the backward needs) and stores the tile's sum of r^2 into a small
  partial-sum buffer, summed afterwards. y never reaches memory, t is read once.
* grad_x = s r W: a GEMM over Dt; the program of the first Ds tile also writes grad_t = -s r from the
  r tiles it loads anyway.
* grad_W = s r^T x and grad_b = s sum r: split-K GEMMs over the rows into float32 (float64) partial
  buffers of shape (splits, Dt, Ds) and (splits, Dt), summed afterwards (deterministic).
* reduction "none" (PER_ROW): the forward stores each tile's share of every position's sum of r^2
  ((B, P, feature tiles) partials, summed into the (B, P) loss); the backward scales per position,
  s_p = 2 * grad_loss[b, p]: grad_x and grad_t after their products, grad_W / grad_b on the r tile
  (rounded back to the input dtype for the grad_W GEMM, as the residual itself is stored).

Accumulation is float32 (float64 for float64 inputs); float32 ``tl.dot`` follows torch's matmul
precision (IEEE unless TF32 is allowed). Offsets are int64. Importing this module imports triton:
set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels._dtypes import opmath_dtype
from kdkernels._feature import empty_in_layout, feature_major
from kdkernels.reduction import FEATURE_NONE, FEATURES
from kdkernels.reduction import feature_denominator as denominator
from kdkernels.reduction import feature_grad_factor as grad_factor
from kdkernels.triton._common import dot_precision, launch, tiles, tl_opmath

# Tile sizes per input element size (bytes): (BLOCK_M positions, BLOCK_N teacher features,
# BLOCK_K student features, num_warps). Tests shrink them with
# kdkernels.triton._common.override_tiles("feature", ...) to exercise multi-tile paths on small inputs.
# Not autotuned yet (no GPU measurements so far).
TILES = {2: (128, 64, 32, 4), 4: (64, 64, 32, 4), 8: (32, 32, 16, 4)}
NUM_STAGES = 3
# grad_W / grad_b split the rows into at most this many partial sums.
MAX_SPLITS = 64


# ---------------------------------------------------------------------------------------------
# forward: GEMM + residual / square / partial-sum epilogue
# ---------------------------------------------------------------------------------------------
@triton.jit
def _projected_mse_fwd_kernel(
    x_ptr, t_ptr, w_ptr, b_ptr, r_ptr, part_ptr,
    P, DS, DT, tiles_p,
    sxb, sxp, sxd, stb, stp, std, swn, swk, srb, srp, srd,
    HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # (batch entry, tile of positions)
    pid_n = tl.program_id(1)  # tile of teacher features
    b = (pid_m // tiles_p).to(tl.int64)
    offs_p = ((pid_m % tiles_p) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_p = offs_p < P
    mask_n = offs_n < DT

    x_rows = x_ptr + b * sxb + offs_p[:, None] * sxp
    w_cols = w_ptr + offs_n[None, :] * swn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, DS, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < DS
        a = tl.load(x_rows + kk[None, :] * sxd, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_cols + kk[:, None] * swk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # W^T tile
        acc = tl.dot(a, wt, acc, input_precision=PRECISION, out_dtype=ACC)

    mask = mask_p[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]
    t = tl.load(t_ptr + b * stb + offs_p[:, None] * stp + offs_n[None, :] * std, mask=mask, other=0.0)
    r = tl.where(mask, acc - t.to(ACC), 0.0)
    tl.store(r_ptr + b * srb + offs_p[:, None] * srp + offs_n[None, :] * srd, r.to(r_ptr.dtype.element_ty),
             mask=mask)
    if PER_ROW:  # part: (B, P, feature tiles)
        tl.store(part_ptr + ((b * P + offs_p) * tl.num_programs(1) + pid_n), tl.sum(r * r, axis=1), mask=mask_p)
    else:
        tl.store(part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(r * r, axis=1), axis=0))


# ---------------------------------------------------------------------------------------------
# backward: grad_x = s r W (+ grad_t = -s r), and split-K grad_W = s r^T x, grad_b = s sum r
# ---------------------------------------------------------------------------------------------
@triton.jit
def _projected_mse_grad_x_kernel(
    r_ptr, w_ptr, s_ptr, rw_ptr, gx_ptr, gt_ptr,
    P, DS, DT, tiles_p,
    srb, srp, srd, swn, swk, sgxb, sgxp, sgxd, sgtb, sgtp, sgtd,
    WRITE_GT: tl.constexpr, PER_ROW: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # (batch entry, tile of positions)
    pid_k = tl.program_id(1)  # tile of student features
    b = (pid_m // tiles_p).to(tl.int64)
    offs_p = ((pid_m % tiles_p) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask_p = offs_p < P
    mask_k = offs_k < DS
    s = tl.load(s_ptr).to(ACC)
    if PER_ROW:  # rw: (B, P) contiguous grad_loss; (diag(s_p) r) W = diag(s_p) (r W)
        s = (s * tl.load(rw_ptr + b * P + offs_p, mask=mask_p, other=0.0).to(ACC))[:, None]

    r_rows = r_ptr + b * srb + offs_p[:, None] * srp
    gt_rows = gt_ptr + b * sgtb + offs_p[:, None] * sgtp
    w_cols = w_ptr + offs_k[None, :] * swk
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
    for n0 in range(0, DT, BLOCK_N):
        nn = n0 + offs_n
        mask_n = nn < DT
        r_mask = mask_p[:, None] & mask_n[None, :]
        r = tl.load(r_rows + nn[None, :] * srd, mask=r_mask, other=0.0)
        w = tl.load(w_cols + nn[:, None] * swn, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(r, w, acc, input_precision=PRECISION, out_dtype=ACC)
        if WRITE_GT:  # one program per row tile writes grad_t, from the r tile already in registers
            g = (-s * r.to(ACC)).to(gt_ptr.dtype.element_ty)
            tl.store(gt_rows + nn[None, :] * sgtd, g, mask=r_mask & (pid_k == 0))
    out = (acc * s).to(gx_ptr.dtype.element_ty)
    tl.store(gx_ptr + b * sgxb + offs_p[:, None] * sgxp + offs_k[None, :] * sgxd, out,
             mask=mask_p[:, None] & mask_k[None, :])


@triton.jit
def _projected_mse_grad_w_kernel(
    r_ptr, x_ptr, rw_ptr, pw_ptr, pb_ptr,
    P, DS, DT, tiles_p, total_tiles,
    srb, srp, srd, sxb, sxp, sxd,
    WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, PER_ROW: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)  # tile of teacher features
    pid_k = tl.program_id(1)  # tile of student features
    split = tl.program_id(2)  # this program sums row tiles split, split + splits, ...
    splits = tl.num_programs(2)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_n = offs_n < DT
    mask_k = offs_k < DS

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    acc_b = tl.zeros((BLOCK_N,), dtype=ACC)
    for tile in range(split, total_tiles, splits):
        b = (tile // tiles_p).to(tl.int64)
        offs_p = (tile % tiles_p) * BLOCK_M + offs_m
        mask_p = offs_p < P
        # r^T tile (BLOCK_N x BLOCK_M), loaded transposed through the strides
        rt = tl.load(r_ptr + b * srb + offs_n[:, None] * srd + offs_p[None, :] * srp,
                     mask=mask_n[:, None] & mask_p[None, :], other=0.0)
        if PER_ROW:  # each position's r times its grad_loss (rw: (B, P) contiguous)
            rt_acc = rt.to(ACC) * tl.load(rw_ptr + b * P + offs_p, mask=mask_p, other=0.0).to(ACC)[None, :]
            rt = rt_acc.to(rt.dtype)
        else:
            rt_acc = rt.to(ACC)
        if WEIGHT_GRAD:
            xt = tl.load(x_ptr + b * sxb + offs_p[:, None] * sxp + offs_k[None, :] * sxd,
                         mask=mask_p[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(rt, xt, acc, input_precision=PRECISION, out_dtype=ACC)
        if BIAS_GRAD:
            acc_b += tl.sum(rt_acc, axis=1)
    if WEIGHT_GRAD:
        pw = pw_ptr + split.to(tl.int64) * DT * DS + offs_n[:, None] * DS + offs_k[None, :]
        tl.store(pw, acc, mask=mask_n[:, None] & mask_k[None, :])
    if BIAS_GRAD:
        tl.store(pb_ptr + split.to(tl.int64) * DT + offs_n, acc_b, mask=mask_n & (pid_k == 0))


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _tiles(dtype: torch.dtype):
    return tiles("feature", TILES)[torch.empty((), dtype=dtype).element_size()]


def _check_reduction(reduction: int) -> None:
    if not 0 <= reduction < len(FEATURES.names):
        raise ValueError(f"reduction must be 0 (mean), 1 (sum), 2 (batchmean) or 3 (none), got {reduction}")


def _check(x: Tensor, t: Tensor, weight: Tensor, bias: Optional[Tensor], reduction: int) -> None:
    _check_reduction(reduction)
    if x.dim() != 3 or t.dim() != 3 or x.shape[:2] != t.shape[:2]:
        raise ValueError(f"x and t must be 3-D (B, P, D) with the same (B, P), got {tuple(x.shape)} and "
                         f"{tuple(t.shape)}")
    if weight.shape != (t.shape[2], x.shape[2]):
        raise ValueError(f"weight must be (Dt, Ds) = {(t.shape[2], x.shape[2])}, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (t.shape[2],):
        raise ValueError(f"bias must be (Dt,) = ({t.shape[2]},), got {tuple(bias.shape)}")


def forward(x: Tensor, t: Tensor, weight: Tensor, bias: Optional[Tensor], reduction: int) -> tuple[Tensor, Tensor]:
    """(loss () or, for "none", (B, P); residual (B, P, Dt) in the input dtype and feature.h's layout)."""
    _check(x, t, weight, bias, reduction)
    B, P, Ds = x.shape
    Dt = t.shape[2]
    residual = empty_in_layout(B, P, Dt, feature_major(P, Dt, t.stride(1)), t)
    block_m, block_n, block_k, num_warps = _tiles(x.dtype)
    tiles_p, tiles_n = triton.cdiv(P, block_m), triton.cdiv(Dt, block_n)
    per_row = reduction == FEATURE_NONE
    partial = torch.zeros((B, P, tiles_n) if per_row else (B * tiles_p, tiles_n), dtype=opmath_dtype(x.dtype),
                          device=x.device)
    if partial.numel():
        launch(_projected_mse_fwd_kernel, (B * tiles_p, tiles_n), x, t, weight, weight if bias is None else bias,
               residual, partial, P, Ds, Dt, tiles_p, *x.stride(), *t.stride(), *weight.stride(), *residual.stride(),
               HAS_BIAS=bias is not None, PER_ROW=per_row, ACC=tl_opmath(x.dtype), PRECISION=dot_precision(x.dtype), BLOCK_M=block_m,
               BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=NUM_STAGES)
    if per_row:
        return partial.sum(-1), residual
    return partial.sum() / denominator(reduction, B * P, Dt), residual


def _splits(total_tiles: int, programs: int, device: torch.device) -> int:
    """Row splits for grad_W: enough programs for ~2 waves on the GPU, fewer under the interpreter."""
    if device.type != "cuda":
        return max(1, min(total_tiles, 2))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(total_tiles, MAX_SPLITS, triton.cdiv(2 * sms, max(1, programs))))


def backward(grad_loss: Tensor, x: Tensor, weight: Tensor, residual: Tensor, reduction: int, x_grad: bool,
             t_grad: bool, weight_grad: bool, bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_t, grad_weight, grad_bias); grad_x / grad_t in the residual's layout, an
    unrequested gradient is an empty (0,) tensor. x is read only for grad_weight, weight only for grad_x."""
    _check_reduction(reduction)
    if residual.dim() != 3:
        raise ValueError(f"residual must be 3-D (B, P, Dt), got {tuple(residual.shape)}")
    B, P, Dt = residual.shape
    Ds = weight.shape[1] if x_grad else (x.shape[2] if weight_grad else 0)
    dtype, acc_dtype = residual.dtype, opmath_dtype(residual.dtype)
    fmajor = feature_major(P, Dt, residual.stride(1))
    def empty():  # one per unrequested gradient: custom-op outputs must not alias each other
        return residual.new_empty((0,))

    grad_x = empty_in_layout(B, P, Ds, fmajor, residual) if x_grad else empty()
    grad_t = empty_in_layout(B, P, Dt, fmajor, residual) if t_grad else empty()
    factor = grad_factor(reduction, B * P, Dt)
    per_row = reduction == FEATURE_NONE
    if per_row:  # s = the factor; the kernels scale each position by its grad_loss[b, p] (row_w)
        row_w = grad_loss.to(acc_dtype).reshape(B, P).contiguous()
        s = torch.full((1,), factor, dtype=acc_dtype, device=residual.device)
    else:
        row_w = residual  # not read
        s = (grad_loss.reshape(()).to(acc_dtype) * factor).reshape(1)  # stays on the device: no host sync
    block_m, block_n, block_k, num_warps = _tiles(dtype)
    tiles_p = triton.cdiv(P, block_m)
    ACC, PRECISION = tl_opmath(dtype), dot_precision(dtype)

    if x_grad and B * tiles_p and Ds:
        launch(_projected_mse_grad_x_kernel, (B * tiles_p, triton.cdiv(Ds, block_k)), residual, weight, s, row_w,
               grad_x, grad_t if t_grad else grad_x, P, Ds, Dt, tiles_p, *residual.stride(), *weight.stride(),
               *grad_x.stride(), *(grad_t.stride() if t_grad else grad_x.stride()), WRITE_GT=t_grad, PER_ROW=per_row,
               ACC=ACC, PRECISION=PRECISION,
               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=NUM_STAGES)
    elif x_grad:
        grad_x.zero_()
    if t_grad and not (x_grad and B * tiles_p and Ds):  # no grad_x program wrote it
        if per_row:  # computed in the op-math dtype, rounded once into grad_t
            torch.mul(residual, (row_w * -s).unsqueeze(-1), out=grad_t)
        else:
            torch.mul(residual, -s.reshape(()), out=grad_t)  # a 0-d factor keeps the residual's dtype

    grad_w = empty()
    grad_b = empty()
    w_kernel = weight_grad and Ds > 0
    if w_kernel or bias_grad:
        tiles_n = triton.cdiv(Dt, block_n)
        tiles_k = triton.cdiv(Ds, block_k) if w_kernel else 1
        total = B * tiles_p
        splits = _splits(total, tiles_n * tiles_k, residual.device)
        part_w = torch.zeros((splits, Dt, Ds) if w_kernel else (0,), dtype=acc_dtype, device=residual.device)
        part_b = torch.zeros((splits, Dt) if bias_grad else (0,), dtype=acc_dtype, device=residual.device)
        if total and tiles_n:
            launch(_projected_mse_grad_w_kernel, (tiles_n, tiles_k, splits), residual, x if w_kernel else residual,
                   row_w, part_w, part_b, P, Ds, Dt, tiles_p, total, *residual.stride(),
                   *(x.stride() if w_kernel else residual.stride()), WEIGHT_GRAD=w_kernel, BIAS_GRAD=bias_grad,
                   PER_ROW=per_row, ACC=ACC, PRECISION=PRECISION, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                   num_stages=NUM_STAGES)
        if weight_grad:
            grad_w = (part_w.sum(0) * s).to(dtype) if w_kernel else residual.new_zeros((Dt, Ds))
        if bias_grad:
            grad_b = (part_b.sum(0) * s).to(dtype)
    return grad_x, grad_t, grad_w, grad_b
