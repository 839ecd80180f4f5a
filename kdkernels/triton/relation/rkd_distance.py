"""Triton kernels of the ``rkd_distance`` op (docs/design.md §2.3): RKD distance on centred rows.

Pass 1 the per-row sums of d (-> mu), pass 2 the loss and ``A`` (the mu path of the gradient),
backward one pass. Each program owns BLOCK rows and walks the column blocks: no (B, B) buffer. The
gradient rows are accumulated in place in a (B, D) op-math buffer (read-modify-write per column
block; no atomics, deterministic). ``distance_row_terms``, ``distance_pair_weight``,
``distance_rows_kernel`` and ``distance_passes`` also serve the combined ``rkd_distance_angle`` op.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels.triton._common import launch
from kdkernels.triton.relation._rows import (EPS, NEAR_RATIO, add_pair_grad, clamped_distance, op_rows,
                                             relation_tiles, smooth_l1, smooth_l1_grad, sq_dist_tile)

@triton.jit
def distance_row_terms(sq_s, sq_t, keep, mu_s, mu_t, LOSS: tl.constexpr, EPS: tl.constexpr):
    """Row sums over a tile of squared distances. Pass 1 (not LOSS): the off-diagonal distances of
    both sides (-> mu). Pass 2 (LOSS): the loss smooth_l1(d_s/mu_s - d_t/mu_t) and the A terms
    smooth_l1'(x) d_s (the mu path of the gradient)."""
    d_s = clamped_distance(sq_s, EPS)
    d_t = clamped_distance(sq_t, EPS)
    if LOSS:
        x = d_s / mu_s - d_t / mu_t
        t1 = smooth_l1(x)
        t2 = smooth_l1_grad(x) * d_s
    else:
        t1 = d_s
        t2 = d_t
    return tl.sum(tl.where(keep, t1, 0.0), axis=1), tl.sum(tl.where(keep, t2, 0.0), axis=1)


@triton.jit
def distance_pair_weight(sq_s, sq_t, keep, g, mu_s, mu_t, through_mu, EPS: tl.constexpr):
    """w_ij with dL/de_i = sum_j w_ij (e_i - e_j): 2 dL/dd_ij / d_ij where the clamp passes a gradient
    (2: d_ji = d_ij)."""
    x = clamped_distance(sq_s, EPS) / mu_s - clamped_distance(sq_t, EPS) / mu_t
    dl_dd = g * (smooth_l1_grad(x) / mu_s - through_mu)
    return tl.where(keep & ~(sq_s <= EPS), 2.0 * dl_dd / clamped_distance(sq_s, EPS), 0.0)


@triton.jit
def distance_rows_kernel(es_ptr, ns_ptr, et_ptr, nt_ptr, sqs_ptr, sqt_ptr, mu_ptr, out1_ptr, out2_ptr, B, Ds, Dt,
                          LOSS: tl.constexpr, FROM_SQ: tl.constexpr, EPS: tl.constexpr, NEAR_RATIO: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pass of distance_row_terms over the row block, for the pairs j > i only (every sum of
    the forward is symmetric: the caller doubles the totals), so the column loop starts at the
    block's diagonal tile. The squared distances are read from (B, B) matrices (FROM_SQ: the
    combined distance + angle op's; the rows are not read) or formed tile by tile from the rows
    (the sq pointers are not read)."""
    start = tl.program_id(0) * BLOCK
    rows = (start + tl.arange(0, BLOCK)).to(tl.int64)
    if LOSS:
        mu_s = tl.load(mu_ptr)
        mu_t = tl.load(mu_ptr + 1)
    else:  # pass 1 reads no mu
        mu_s = 1.0
        mu_t = 1.0
    acc1 = tl.zeros((BLOCK,), dtype=out1_ptr.dtype.element_ty)
    acc2 = tl.zeros((BLOCK,), dtype=out1_ptr.dtype.element_ty)
    for c0 in range(start, B, BLOCK):
        cols = (c0 + tl.arange(0, BLOCK)).to(tl.int64)
        keep = (rows[:, None] < cols[None, :]) & (cols[None, :] < B)
        if FROM_SQ:
            offs = rows[:, None] * B + cols[None, :]
            sq_s = tl.load(sqs_ptr + offs, mask=keep, other=0.0)
            sq_t = tl.load(sqt_ptr + offs, mask=keep, other=0.0)
        else:
            sq_s, _ = sq_dist_tile(es_ptr, ns_ptr, rows, cols, B, Ds, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
            sq_t, _ = sq_dist_tile(et_ptr, nt_ptr, rows, cols, B, Dt, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
        t1, t2 = distance_row_terms(sq_s, sq_t, keep, mu_s, mu_t, LOSS, EPS)
        acc1 += t1
        acc2 += t2
    tl.store(out1_ptr + rows, acc1, mask=rows < B)
    tl.store(out2_ptr + rows, acc2, mask=rows < B)


@triton.jit
def _distance_grad_kernel(g_ptr, es_ptr, ns_ptr, et_ptr, nt_ptr, stats_ptr, grad_ptr, B, Ds, Dt,
                          EPS: tl.constexpr, NEAR_RATIO: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """dL/de_i = sum_j w_ij (e_i - e_j), squared distances formed tile by tile."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    g = tl.load(g_ptr)
    mu_s = tl.load(stats_ptr)
    mu_t = tl.load(stats_ptr + 1)
    through_mu = tl.load(stats_ptr + 2) / (B * (B - 1.0))
    for c0 in range(0, B, BLOCK):
        cols = (c0 + tl.arange(0, BLOCK)).to(tl.int64)
        keep = (rows[:, None] != cols[None, :]) & (rows[:, None] < B) & (cols[None, :] < B)
        sq_s, near = sq_dist_tile(es_ptr, ns_ptr, rows, cols, B, Ds, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
        sq_t, _ = sq_dist_tile(et_ptr, nt_ptr, rows, cols, B, Dt, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
        w = distance_pair_weight(sq_s, sq_t, keep, g, mu_s, mu_t, through_mu, EPS)
        add_pair_grad(grad_ptr, es_ptr, w, near, rows, cols, B, Ds, BLOCK_D)


def distance_passes(run_pass, batch: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """The two passes of the distance term; run_pass(loss, mu, out1, out2) runs one over all rows,
    each row summing its pairs j > i (so every total counts twice). Returns the summed loss and
    stats = [mu_s, mu_t, A]."""
    out1 = torch.empty(batch, dtype=like.dtype, device=like.device)
    out2 = torch.empty_like(out1)
    run_pass(False, out1, out1, out2)  # pass 1 reads no mu
    mu = torch.stack([out1.sum(), out2.sum()]) * (2.0 / (batch * (batch - 1)))
    run_pass(True, mu, out1, out2)
    stats = torch.cat([mu, (2.0 * out2.sum() / (mu[0] * mu[0])).reshape(1)])
    return 2.0 * out1.sum(), stats


def forward(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    block, block_d, _ = relation_tiles()
    es, ns = op_rows(student, True)
    et, nt = op_rows(teacher, True)
    batch = es.shape[0]

    def run_pass(loss, mu, out1, out2):
        launch(distance_rows_kernel, (triton.cdiv(batch, block),), es, ns, et, nt, es, et, mu, out1, out2, batch,
               es.shape[1], et.shape[1], loss, False, EPS, NEAR_RATIO, block, block_d)

    return distance_passes(run_pass, batch, es)


def backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, stats: Tensor) -> Tensor:
    block, block_d, _ = relation_tiles()
    es, ns = op_rows(student, True)
    et, nt = op_rows(teacher, True)
    batch = es.shape[0]
    grad = torch.zeros_like(es)
    launch(_distance_grad_kernel, (triton.cdiv(batch, block),), grad_loss.to(es.dtype).contiguous(), es, ns, et, nt,
           stats.contiguous(), grad, batch, es.shape[1], et.shape[1], EPS, NEAR_RATIO, block, block_d)
    # e = x - mean(x) and the loss is translation invariant: dL/dx = dL/de
    return grad.to(student.dtype)
