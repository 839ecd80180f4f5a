"""Triton kernels of the ``rkd_distance`` op (docs/design.md §2.3): RKD distance on centred rows.

Pass 1 the per-row sums of d (-> mu), pass 2 the loss and ``A`` (the mu path of the gradient),
backward one pass. Each program owns BLOCK rows and walks the column blocks: no (B, B) buffer. The
forward's sums are symmetric, so a row sums its pairs j > i only; the per-row losses (``per_row``)
also add each pair to its column's row, by atomics into a (B,) buffer. The gradient rows are
accumulated in place in a (B, D) op-math buffer (read-modify-write per column block; no atomics,
deterministic). A (B,) upstream gradient w costs the backward one more pass, for A_w
(csrc/include/kdkernels/relation.h). ``distance_pair_weight``, ``distance_rows_kernel``,
``distance_passes`` and ``through_mu_weighted`` also serve the combined ``rkd_distance_angle`` op.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels.triton._common import launch
from kdkernels.triton.relation._rows import (EPS, NEAR_RATIO, add_pair_grad, clamped_distance, op_rows,
                                             relation_tiles, smooth_l1, smooth_l1_grad, sq_dist_tile, upstream)

@triton.jit
def distance_pair_weight(sq_s, sq_t, keep, pair_w, mu_s, mu_t, through_mu, EPS: tl.constexpr):
    """v_ij with dL/de_i = sum_j v_ij (e_i - e_j): dL/dd_ij / d_ij where the clamp passes a gradient,
    dL/dd_ij = pair_w h_ij / mu_s - through_mu (relation.h distance_grad_weight): pair_w = w_i + w_j
    (2 g for a 0-d upstream g, d_ji = d_ij), through_mu = 2 A_w / (B (B - 1))."""
    x = clamped_distance(sq_s, EPS) / mu_s - clamped_distance(sq_t, EPS) / mu_t
    dl_dd = pair_w * smooth_l1_grad(x) / mu_s - through_mu
    return tl.where(keep & ~(sq_s <= EPS), dl_dd / clamped_distance(sq_s, EPS), 0.0)


@triton.jit
def distance_rows_kernel(es_ptr, ns_ptr, et_ptr, nt_ptr, sqs_ptr, sqt_ptr, mu_ptr, w_ptr, out1_ptr, out2_ptr, col_ptr,
                         B, Ds, Dt, LOSS: tl.constexpr, FROM_SQ: tl.constexpr, PER_ROW: tl.constexpr,
                         WEIGHTED: tl.constexpr, EPS: tl.constexpr, NEAR_RATIO: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """One pass over the row block, for the pairs j > i only (every sum of the forward is symmetric:
    the caller doubles the totals), so the column loop starts at the block's diagonal tile. Pass 1
    (not LOSS): out1, out2 = the off-diagonal distances of both sides (-> mu). Pass 2 (LOSS): out1
    = the loss smooth_l1(d_s/mu_s - d_t/mu_t), out2 = the A terms smooth_l1'(x) d_s (the mu path of
    the gradient), times w_i + w_j when WEIGHTED (A_w, the per-row backward's pass; w_ptr read only
    then); PER_ROW: each pair's loss is also added to its column's entry of col_ptr (l_j's pairs
    i < j). The squared distances are read from (B, B) matrices (FROM_SQ: the combined distance +
    angle op's; the rows are not read) or formed tile by tile from the rows (the sq pointers are not
    read)."""
    start = tl.program_id(0) * BLOCK
    rows = (start + tl.arange(0, BLOCK)).to(tl.int64)
    if LOSS:
        mu_s = tl.load(mu_ptr)
        mu_t = tl.load(mu_ptr + 1)
    else:  # pass 1 reads no mu
        mu_s = 1.0
        mu_t = 1.0
    if WEIGHTED:
        w_i = tl.load(w_ptr + rows, mask=rows < B, other=0.0)
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
        d_s = clamped_distance(sq_s, EPS)
        d_t = clamped_distance(sq_t, EPS)
        if LOSS:
            x = d_s / mu_s - d_t / mu_t
            t1 = tl.where(keep, smooth_l1(x), 0.0)
            t2 = tl.where(keep, smooth_l1_grad(x) * d_s, 0.0)
        else:
            t1 = tl.where(keep, d_s, 0.0)
            t2 = tl.where(keep, d_t, 0.0)
        if WEIGHTED:
            t2 = t2 * (w_i[:, None] + tl.load(w_ptr + cols, mask=cols < B, other=0.0)[None, :])
        acc1 += tl.sum(t1, axis=1)
        acc2 += tl.sum(t2, axis=1)
        if PER_ROW:
            tl.atomic_add(col_ptr + cols, tl.sum(t1, axis=0), mask=cols < B)
    tl.store(out1_ptr + rows, acc1, mask=rows < B)
    tl.store(out2_ptr + rows, acc2, mask=rows < B)


@triton.jit
def _distance_grad_kernel(g_ptr, es_ptr, ns_ptr, et_ptr, nt_ptr, stats_ptr, through_ptr, grad_ptr, B, Ds, Dt,
                          PER_ROW: tl.constexpr, EPS: tl.constexpr, NEAR_RATIO: tl.constexpr, BLOCK: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """dL/de_i = sum_j v_ij (e_i - e_j), squared distances formed tile by tile. g_ptr: the upstream
    gradient, 0-d or (B,) (PER_ROW; then through_ptr holds its 2 A_w / (B (B - 1)))."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mu_s = tl.load(stats_ptr)
    mu_t = tl.load(stats_ptr + 1)
    if PER_ROW:
        w_i = tl.load(g_ptr + rows, mask=rows < B, other=0.0)
        through_mu = tl.load(through_ptr)
    else:
        g = tl.load(g_ptr)
        through_mu = 2.0 * g * tl.load(stats_ptr + 2) / (B * (B - 1.0))
    for c0 in range(0, B, BLOCK):
        cols = (c0 + tl.arange(0, BLOCK)).to(tl.int64)
        keep = (rows[:, None] != cols[None, :]) & (rows[:, None] < B) & (cols[None, :] < B)
        sq_s, near = sq_dist_tile(es_ptr, ns_ptr, rows, cols, B, Ds, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
        sq_t, _ = sq_dist_tile(et_ptr, nt_ptr, rows, cols, B, Dt, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
        if PER_ROW:
            pair_w = w_i[:, None] + tl.load(g_ptr + cols, mask=cols < B, other=0.0)[None, :]
        else:
            pair_w = 2.0 * g
        w = distance_pair_weight(sq_s, sq_t, keep, pair_w, mu_s, mu_t, through_mu, EPS)
        add_pair_grad(grad_ptr, es_ptr, w, near, rows, cols, B, Ds, BLOCK_D)


def distance_passes(run_pass, batch: int, like: Tensor, per_row: bool) -> tuple[Tensor, Tensor]:
    """The two passes of the distance term; ``run_pass(mu, out1, out2, loss=, col=None, weights=None)``
    runs one over all rows (col: the per-row column sums, weights: the A_w pass's upstream), each
    row summing its pairs j > i (so every total counts twice). Returns the loss (the per-row (B,) or
    the summed 0-d) and stats = [mu_s, mu_t, A]."""
    out1 = torch.empty(batch, dtype=like.dtype, device=like.device)
    out2 = torch.empty_like(out1)
    run_pass(out1, out1, out2, loss=False)  # pass 1 reads no mu
    mu = torch.stack([out1.sum(), out2.sum()]) * (2.0 / (batch * (batch - 1)))
    col = torch.zeros_like(out1) if per_row else None
    run_pass(mu, out1, out2, loss=True, col=col)
    stats = torch.cat([mu, (2.0 * out2.sum() / (mu[0] * mu[0])).reshape(1)])
    return (out1 + col if per_row else 2.0 * out1.sum()), stats


def through_mu_weighted(run_pass, batch: int, stats: Tensor, weights: Tensor) -> Tensor:
    """2 A_w / (B (B - 1)) for a (B,) upstream gradient: one more loss pass, weighted (1-element)."""
    out1 = torch.empty(batch, dtype=stats.dtype, device=stats.device)
    out2 = torch.empty_like(out1)
    run_pass(stats, out1, out2, loss=True, weights=weights)
    # the pairs j > i weighted by w_i + w_j: both entries of each pair, the full sum
    return (2.0 / (batch * (batch - 1.0)) * out2.sum() / (stats[0] * stats[0])).reshape(1)


def _row_pass(es, ns, et, nt, block, block_d):
    """run_pass for distance_passes / through_mu_weighted on rows formed tile by tile."""
    batch = es.shape[0]

    def run_pass(mu, out1, out2, loss, col=None, weights=None):
        launch(distance_rows_kernel, (triton.cdiv(batch, block),), es, ns, et, nt, es, et, mu,
               out1 if weights is None else weights, out1, out2, out1 if col is None else col, batch, es.shape[1],
               et.shape[1], loss, False, col is not None, weights is not None, EPS, NEAR_RATIO, block, block_d)

    return run_pass


def forward(student: Tensor, teacher: Tensor, per_row: bool) -> tuple[Tensor, Tensor]:
    block, block_d, _ = relation_tiles()
    es, ns = op_rows(student, True)
    et, nt = op_rows(teacher, True)
    return distance_passes(_row_pass(es, ns, et, nt, block, block_d), es.shape[0], es, per_row)


def backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, stats: Tensor) -> Tensor:
    block, block_d, _ = relation_tiles()
    es, ns = op_rows(student, True)
    et, nt = op_rows(teacher, True)
    batch = es.shape[0]
    g = upstream(grad_loss, es)
    stats = stats.contiguous()
    per_row = g.dim() == 1
    through = through_mu_weighted(_row_pass(es, ns, et, nt, block, block_d), batch, stats, g) if per_row else stats
    grad = torch.zeros_like(es)
    launch(_distance_grad_kernel, (triton.cdiv(batch, block),), g, es, ns, et, nt, stats, through, grad, batch,
           es.shape[1], et.shape[1], per_row, EPS, NEAR_RATIO, block, block_d)
    # e = x - mean(x) and the loss is translation invariant: dL/dx = dL/de
    return grad.to(student.dtype)
