"""Triton kernels of the ``rkd_angle`` op (docs/design.md §2.3): O(B^2) memory.

The op keeps the (B, B) squared distances and inverse norms of both sides and walks anchors
(forward, slot-a gradients) and columns (slot-c gradients), as the CPU kernel does; the final
``S -> dL/dE`` step turns the (B, B) pair weights into row gradients. The forward's partial sums are
per anchor, so the per-row losses are their row sums; a (B,) upstream gradient scales anchor i's
slot-a and slot-c derivatives by w_i. ``angle_side``,
``angle_loss``, ``angle_pair_weights`` and ``gradient_from_pair_weights`` also serve the combined
``rkd_distance_angle`` op.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels.triton._common import launch
from kdkernels.triton.relation._rows import (EPS, NEAR_RATIO, add_pair_grad, op_rows, relation_tiles, smooth_l1,
                                             smooth_l1_grad, sq_dist_tile, upstream)

@triton.jit
def _sq_dist_matrix_kernel(e_ptr, n_ptr, out_ptr, B, D, NEAR_RATIO: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    sq, _ = sq_dist_tile(e_ptr, n_ptr, rows, cols, B, D, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
    tl.store(out_ptr + rows[:, None] * B + cols[None, :], sq, mask=(rows[:, None] < B) & (cols[None, :] < B))


@triton.jit
def _angle_anchor_kernel(sqs_ptr, invs_ptr, sqt_ptr, invt_ptr, out_ptr, g_ptr, B, BACKWARD: tl.constexpr,
                         PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Anchor i = program_id(0), j in a block: forward -> partial losses sum_k smooth_l1(psi_s - psi_t);
    backward -> T_a[i, j] = g sum_k h_ijk d psi_ijk / d a_ij (relation.h), g = w_i when PER_ROW."""
    i = tl.program_id(0).to(tl.int64)
    j = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    jm = j < B
    a_s = tl.load(sqs_ptr + i * B + j, mask=jm, other=0.0)[:, None]
    ra_s = tl.load(invs_ptr + i * B + j, mask=jm, other=0.0)[:, None]
    a_t = tl.load(sqt_ptr + i * B + j, mask=jm, other=0.0)[:, None]
    ra_t = tl.load(invt_ptr + i * B + j, mask=jm, other=0.0)[:, None]
    acc = tl.zeros((BLOCK,), dtype=sqs_ptr.dtype.element_ty)
    for k0 in range(0, B, BLOCK):
        k = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
        km = k < B
        m2 = jm[:, None] & km[None, :]
        b_s = tl.load(sqs_ptr + i * B + k, mask=km, other=0.0)[None, :]
        rb_s = tl.load(invs_ptr + i * B + k, mask=km, other=0.0)[None, :]
        b_t = tl.load(sqt_ptr + i * B + k, mask=km, other=0.0)[None, :]
        rb_t = tl.load(invt_ptr + i * B + k, mask=km, other=0.0)[None, :]
        c_s = tl.load(sqs_ptr + j[:, None] * B + k[None, :], mask=m2, other=0.0)
        c_t = tl.load(sqt_ptr + j[:, None] * B + k[None, :], mask=m2, other=0.0)
        psi_s = 0.5 * (a_s + b_s - c_s) * ra_s * rb_s
        psi_t = 0.5 * (a_t + b_t - c_t) * ra_t * rb_t
        if BACKWARD:
            acc += tl.sum(smooth_l1_grad(psi_s - psi_t) * 0.5 * ra_s * (rb_s - psi_s * ra_s), axis=1)
        else:
            acc += tl.sum(smooth_l1(psi_s - psi_t), axis=1)
    if BACKWARD:
        if PER_ROW:
            g = tl.load(g_ptr + i)
        else:
            g = tl.load(g_ptr)
        tl.store(out_ptr + i * B + j, g * acc, mask=jm)
    else:
        tl.store(out_ptr + i * tl.num_programs(1) + tl.program_id(1), tl.sum(acc))


@triton.jit
def _angle_slot_c_kernel(sqs_ptr, invs_ptr, sqt_ptr, invt_ptr, out_ptr, g_ptr, B, PER_ROW: tl.constexpr,
                         BLOCK: tl.constexpr):
    """C[j, k] = g sum_i h_ijk d psi_ijk / d c_jk for j = program_id(0) and a block of k; PER_ROW:
    sum_i w_i h_ijk d psi_ijk / d c_jk (anchor i's weight)."""
    j = tl.program_id(0).to(tl.int64)
    k = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    km = k < B
    c_s = tl.load(sqs_ptr + j * B + k, mask=km, other=0.0)[None, :]
    c_t = tl.load(sqt_ptr + j * B + k, mask=km, other=0.0)[None, :]
    acc = tl.zeros((BLOCK,), dtype=sqs_ptr.dtype.element_ty)
    for i0 in range(0, B, BLOCK):
        i = (i0 + tl.arange(0, BLOCK)).to(tl.int64)
        im = i < B
        m2 = im[:, None] & km[None, :]
        a_s = tl.load(sqs_ptr + i * B + j, mask=im, other=0.0)[:, None]  # column j: entry (i, j) exactly
        ra_s = tl.load(invs_ptr + i * B + j, mask=im, other=0.0)[:, None]
        a_t = tl.load(sqt_ptr + i * B + j, mask=im, other=0.0)[:, None]
        ra_t = tl.load(invt_ptr + i * B + j, mask=im, other=0.0)[:, None]
        b_s = tl.load(sqs_ptr + i[:, None] * B + k[None, :], mask=m2, other=0.0)
        rb_s = tl.load(invs_ptr + i[:, None] * B + k[None, :], mask=m2, other=0.0)
        b_t = tl.load(sqt_ptr + i[:, None] * B + k[None, :], mask=m2, other=0.0)
        rb_t = tl.load(invt_ptr + i[:, None] * B + k[None, :], mask=m2, other=0.0)
        psi_s = 0.5 * (a_s + b_s - c_s) * ra_s * rb_s
        psi_t = 0.5 * (a_t + b_t - c_t) * ra_t * rb_t
        h = smooth_l1_grad(psi_s - psi_t)
        if PER_ROW:
            h = h * tl.load(g_ptr + i, mask=im, other=0.0)[:, None]
        acc += tl.sum(h * (-0.5) * ra_s * rb_s, axis=0)
    if PER_ROW:
        tl.store(out_ptr + j * B + k, acc, mask=km)
    else:
        tl.store(out_ptr + j * B + k, tl.load(g_ptr) * acc, mask=km)


@triton.jit
def _pair_grad_from_matrix_kernel(w_ptr, sq_ptr, e_ptr, n_ptr, grad_ptr, B, D, NEAR_RATIO: tl.constexpr,
                                  BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_i += sum_j w_ij (e_i - e_j) for a (B, B) weight matrix, near pairs from the differences."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rmask = rows < B
    ni = tl.load(n_ptr + rows, mask=rmask, other=0.0)
    for c0 in range(0, B, BLOCK):
        cols = (c0 + tl.arange(0, BLOCK)).to(tl.int64)
        cmask = cols < B
        m2 = rmask[:, None] & cmask[None, :] & (rows[:, None] != cols[None, :])
        nj = tl.load(n_ptr + cols, mask=cmask, other=0.0)
        w = tl.load(w_ptr + rows[:, None] * B + cols[None, :], mask=m2, other=0.0)
        sq = tl.load(sq_ptr + rows[:, None] * B + cols[None, :], mask=m2, other=0.0)
        near = m2 & (sq < NEAR_RATIO * (ni[:, None] + nj[None, :]))
        add_pair_grad(grad_ptr, e_ptr, w, near, rows, cols, B, D, BLOCK_D)


def angle_side(x: Tensor, block: int, block_d: int):
    e, n = op_rows(x, True)
    batch = e.shape[0]
    sq = torch.empty((batch, batch), dtype=e.dtype, device=e.device)
    grid = (triton.cdiv(batch, block), triton.cdiv(batch, block))
    launch(_sq_dist_matrix_kernel, grid, e, n, sq, batch, e.shape[1], NEAR_RATIO, block, block_d)
    # 1 / |e_j - e_i|, 0 where the spec's norm clamp makes u_ij = 0 (NaN stays NaN)
    inv = torch.where(sq <= EPS * EPS, torch.zeros_like(sq), sq.rsqrt())
    return e, n, sq, inv


def angle_loss(sq_s: Tensor, inv_s: Tensor, sq_t: Tensor, inv_t: Tensor, angle_block: int, per_row: bool) -> Tensor:
    """The per-anchor losses (B,) when per_row, else their 0-d sum."""
    batch = sq_s.shape[0]
    n_j = triton.cdiv(batch, angle_block)
    partial = torch.empty((batch, n_j), dtype=sq_s.dtype, device=sq_s.device)
    launch(_angle_anchor_kernel, (batch, n_j), sq_s, inv_s, sq_t, inv_t, partial, partial, batch, False, False,
           angle_block)
    return partial.sum(dim=1) if per_row else partial.sum()


def angle_pair_weights(sq_s: Tensor, inv_s: Tensor, sq_t: Tensor, inv_t: Tensor, g: Tensor,
                        angle_block: int) -> Tensor:
    """The angle term's (B, B) symmetric pair weights S for the upstream gradient g (0-d, or (B,)
    per anchor): dL/de_i = sum_j S_ij (e_i - e_j)."""
    batch = sq_s.shape[0]
    grid = (batch, triton.cdiv(batch, angle_block))
    per_row = g.dim() == 1
    slot_a = torch.empty_like(sq_s)
    launch(_angle_anchor_kernel, grid, sq_s, inv_s, sq_t, inv_t, slot_a, g, batch, True, per_row, angle_block)
    slot_c = torch.empty_like(sq_s)
    launch(_angle_slot_c_kernel, grid, sq_s, inv_s, sq_t, inv_t, slot_c, g, batch, per_row, angle_block)
    # W = 2 T_a + C (slot b mirrors slot a); dL/de = 2 sum_j (W + W^T)_ij (e_i - e_j)
    w = 2.0 * slot_a + slot_c
    del slot_a, slot_c
    return 2.0 * (w + w.t())


def gradient_from_pair_weights(weights: Tensor, sq: Tensor, e: Tensor, n: Tensor, block: int,
                                block_d: int) -> Tensor:
    batch = e.shape[0]
    grad = torch.zeros_like(e)
    launch(_pair_grad_from_matrix_kernel, (triton.cdiv(batch, block),), weights, sq, e, n, grad, batch, e.shape[1],
           NEAR_RATIO, block, block_d)
    return grad


def forward(student: Tensor, teacher: Tensor, per_row: bool) -> Tensor:
    block, block_d, angle_block = relation_tiles()
    _, _, sq_s, inv_s = angle_side(student, block, block_d)
    _, _, sq_t, inv_t = angle_side(teacher, block, block_d)
    return angle_loss(sq_s, inv_s, sq_t, inv_t, angle_block, per_row)


def backward(grad_loss: Tensor, student: Tensor, teacher: Tensor) -> Tensor:
    block, block_d, angle_block = relation_tiles()
    e, n, sq_s, inv_s = angle_side(student, block, block_d)
    _, _, sq_t, inv_t = angle_side(teacher, block, block_d)
    weights = angle_pair_weights(sq_s, inv_s, sq_t, inv_t, upstream(grad_loss, e), angle_block)
    return gradient_from_pair_weights(weights, sq_s, e, n, block, block_d).to(student.dtype)
