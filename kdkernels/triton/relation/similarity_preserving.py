"""Triton kernels of the ``similarity_preserving`` op (docs/design.md §2.3).

Pass 1 the row norms of the Gram matrices G = F F^T, pass 2 the per-row losses and ``gamma'``; the
backward takes one pass that uses G's symmetry to add ``W^T F`` without a transpose pass. A (B,)
upstream gradient w scales row p of dL/dG by w_p before the symmetrisation. Each program owns
BLOCK rows and walks the column blocks: no (B, B) buffer.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels.triton._common import launch
from kdkernels.triton.relation._rows import EPS, gram_tile, ieee_sqrt, op_rows, relation_tiles, upstream

@triton.jit
def _sp_norm_kernel(fs_ptr, ft_ptr, ns_ptr, nt_ptr, B, Ds, Dt, EPS: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Pass 1: row norms max(|G_i|_2, eps) of both Gram matrices."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    acc_s = tl.zeros((BLOCK,), dtype=fs_ptr.dtype.element_ty)
    acc_t = tl.zeros((BLOCK,), dtype=fs_ptr.dtype.element_ty)
    for c0 in range(0, B, BLOCK):
        cols = (c0 + tl.arange(0, BLOCK)).to(tl.int64)
        gs = gram_tile(fs_ptr, rows, cols, B, Ds, BLOCK, BLOCK, BLOCK_D)
        gt = gram_tile(ft_ptr, rows, cols, B, Dt, BLOCK, BLOCK, BLOCK_D)
        acc_s += tl.sum(gs * gs, axis=1)
        acc_t += tl.sum(gt * gt, axis=1)
    n_s = ieee_sqrt(acc_s)
    n_t = ieee_sqrt(acc_t)
    tl.store(ns_ptr + rows, tl.where(n_s <= EPS, EPS, n_s), mask=rows < B)
    tl.store(nt_ptr + rows, tl.where(n_t <= EPS, EPS, n_t), mask=rows < B)


@triton.jit
def _sp_loss_kernel(fs_ptr, ft_ptr, stats_ptr, loss_ptr, B, Ds, Dt, EPS: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Pass 2: per-row loss sum_j (a_ij - b_ij)^2 and gamma'_i = sum_j -2 (a_ij - b_ij) b_ij."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rmask = rows < B
    n_s = tl.load(stats_ptr + rows, mask=rmask, other=1.0)
    n_t = tl.load(stats_ptr + B + rows, mask=rmask, other=1.0)
    acc_l = tl.zeros((BLOCK,), dtype=fs_ptr.dtype.element_ty)
    acc_g = tl.zeros((BLOCK,), dtype=fs_ptr.dtype.element_ty)
    for c0 in range(0, B, BLOCK):
        cols = (c0 + tl.arange(0, BLOCK)).to(tl.int64)
        b = gram_tile(fs_ptr, rows, cols, B, Ds, BLOCK, BLOCK, BLOCK_D) / n_s[:, None]
        diff = gram_tile(ft_ptr, rows, cols, B, Dt, BLOCK, BLOCK, BLOCK_D) / n_t[:, None] - b
        acc_l += tl.sum(diff * diff, axis=1)
        acc_g += tl.sum(-2.0 * diff * b, axis=1)
    tl.store(loss_ptr + rows, acc_l, mask=rmask)
    # a clamped norm passes no gradient: gamma' = 0 there
    tl.store(stats_ptr + 2 * B + rows, tl.where(n_s > EPS, acc_g, 0.0), mask=rmask)


@triton.jit
def _sp_grad_entry(gs, gt, ns, nt, gamma):
    """dL/dG_pq per unit upstream gradient of row p (relation.h sp_grad_entry)."""
    b = gs / ns
    return (-2.0 * (gt / nt - b) - b * gamma) / ns


@triton.jit
def _sp_grad_kernel(g_ptr, fs_ptr, ft_ptr, stats_ptr, grad_ptr, B, Ds, Dt, PER_ROW: tl.constexpr,
                    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/dF_p = sum_q (g W_pq + g W_qp) F_q, or (w_p W_pq + w_q W_qp) F_q when PER_ROW; W_qp from the
    same (symmetric) Gram tile and q's stats."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rmask = rows < B
    if PER_ROW:
        w_p = tl.load(g_ptr + rows, mask=rmask, other=0.0)[:, None]
    else:
        g = tl.load(g_ptr)
    ns_p = tl.load(stats_ptr + rows, mask=rmask, other=1.0)[:, None]
    nt_p = tl.load(stats_ptr + B + rows, mask=rmask, other=1.0)[:, None]
    gm_p = tl.load(stats_ptr + 2 * B + rows, mask=rmask, other=0.0)[:, None]
    for c0 in range(0, B, BLOCK):
        cols = (c0 + tl.arange(0, BLOCK)).to(tl.int64)
        cmask = cols < B
        ns_q = tl.load(stats_ptr + cols, mask=cmask, other=1.0)[None, :]
        nt_q = tl.load(stats_ptr + B + cols, mask=cmask, other=1.0)[None, :]
        gm_q = tl.load(stats_ptr + 2 * B + cols, mask=cmask, other=0.0)[None, :]
        gs = gram_tile(fs_ptr, rows, cols, B, Ds, BLOCK, BLOCK, BLOCK_D)
        gt = gram_tile(ft_ptr, rows, cols, B, Dt, BLOCK, BLOCK, BLOCK_D)
        w_pq = _sp_grad_entry(gs, gt, ns_p, nt_p, gm_p)
        w_qp = _sp_grad_entry(gs, gt, ns_q, nt_q, gm_q)
        if PER_ROW:
            w = w_p * w_pq + tl.load(g_ptr + cols, mask=cmask, other=0.0)[None, :] * w_qp
        else:
            w = g * (w_pq + w_qp)
        w = tl.where(rmask[:, None] & cmask[None, :], w, 0.0)
        for d0 in range(0, Ds, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < Ds
            fq = tl.load(fs_ptr + cols[:, None] * Ds + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            ptrs = grad_ptr + rows[:, None] * Ds + dd[None, :]
            m = rmask[:, None] & dmask[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + tl.dot(w, fq, input_precision="ieee"), mask=m)


def forward(student: Tensor, teacher: Tensor, per_row: bool) -> tuple[Tensor, Tensor]:
    block, block_d, _ = relation_tiles()
    fs, _ = op_rows(student, False)
    ft, _ = op_rows(teacher, False)
    batch = fs.shape[0]
    grid = (triton.cdiv(batch, block),)
    stats = torch.empty((3, batch), dtype=fs.dtype, device=fs.device)
    launch(_sp_norm_kernel, grid, fs, ft, stats[0], stats[1], batch, fs.shape[1], ft.shape[1], EPS, block, block_d)
    row_loss = torch.empty(batch, dtype=fs.dtype, device=fs.device)
    launch(_sp_loss_kernel, grid, fs, ft, stats, row_loss, batch, fs.shape[1], ft.shape[1], EPS, block, block_d)
    return (row_loss if per_row else row_loss.sum()), stats


def backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, stats: Tensor) -> Tensor:
    block, block_d, _ = relation_tiles()
    fs, _ = op_rows(student, False)
    ft, _ = op_rows(teacher, False)
    batch = fs.shape[0]
    grad = torch.zeros_like(fs)
    g = upstream(grad_loss, fs)
    launch(_sp_grad_kernel, (triton.cdiv(batch, block),), g, fs, ft, stats.contiguous(), grad, batch, fs.shape[1],
           ft.shape[1], g.dim() == 1, block, block_d)
    return grad.to(student.dtype)
