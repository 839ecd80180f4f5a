"""Triton kernels of the ``rkd_distance_angle`` op (RKDLoss; docs/design.md §2.3).

One set of (B, B) squared distances per side serves both terms: the angle's matrices also feed the
distance passes (read, not re-formed), and the distance's pair weights are added to the angle's
``S`` before the one ``S -> dL/dE`` pass.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels.triton._common import launch
from kdkernels.triton.relation._rows import EPS, NEAR_RATIO, relation_tiles, upstream
from kdkernels.triton.relation.rkd_angle import angle_loss, angle_pair_weights, angle_side, gradient_from_pair_weights
from kdkernels.triton.relation.rkd_distance import (distance_pair_weight, distance_passes, distance_rows_kernel,
                                                    through_mu_weighted)


@triton.jit
def _add_distance_weights_kernel(sqs_ptr, sqt_ptr, stats_ptr, through_ptr, g_ptr, w_ptr, B, PER_ROW: tl.constexpr,
                                 EPS: tl.constexpr, BLOCK: tl.constexpr):
    """w += the distance term's pair weights, for a (B, B) weight matrix (the combined op's). g_ptr:
    the distance's upstream gradient, 0-d or (B,) (PER_ROW; then through_ptr holds 2 A_w / (B (B - 1)))."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    inside = (rows[:, None] < B) & (cols[None, :] < B)
    keep = inside & (rows[:, None] != cols[None, :])
    offs = rows[:, None] * B + cols[None, :]
    sq_s = tl.load(sqs_ptr + offs, mask=keep, other=1.0)
    sq_t = tl.load(sqt_ptr + offs, mask=keep, other=1.0)
    mu_s = tl.load(stats_ptr)
    if PER_ROW:
        pair_w = (tl.load(g_ptr + rows, mask=rows < B, other=0.0)[:, None]
                  + tl.load(g_ptr + cols, mask=cols < B, other=0.0)[None, :])
        through_mu = tl.load(through_ptr)
    else:
        g = tl.load(g_ptr)
        pair_w = 2.0 * g
        through_mu = 2.0 * g * tl.load(stats_ptr + 2) / (B * (B - 1.0))
    w = distance_pair_weight(sq_s, sq_t, keep, pair_w, mu_s, tl.load(stats_ptr + 1), through_mu, EPS)
    tl.store(w_ptr + offs, tl.load(w_ptr + offs, mask=inside, other=0.0) + w, mask=inside)


def _sq_pass(sq_s, sq_t, block, block_d):
    """run_pass for distance_passes / through_mu_weighted on the (B, B) squared distances."""
    batch = sq_s.shape[0]

    def run_pass(mu, out1, out2, loss, col=None, weights=None):
        launch(distance_rows_kernel, (triton.cdiv(batch, block),), sq_s, out1, sq_t, out1, sq_s, sq_t, mu,
               out1 if weights is None else weights, out1, out2, out1 if col is None else col, batch, 0, 0, loss, True,
               col is not None, weights is not None, EPS, NEAR_RATIO, block, block_d)

    return run_pass


def forward(student: Tensor, teacher: Tensor, per_row: bool) -> tuple[Tensor, Tensor, Tensor]:
    block, block_d, angle_block = relation_tiles()
    _, _, sq_s, inv_s = angle_side(student, block, block_d)
    _, _, sq_t, inv_t = angle_side(teacher, block, block_d)
    distance, stats = distance_passes(_sq_pass(sq_s, sq_t, block, block_d), sq_s.shape[0], sq_s, per_row)
    return distance, angle_loss(sq_s, inv_s, sq_t, inv_t, angle_block, per_row), stats


def backward(grad_distance: Tensor, grad_angle: Tensor, student: Tensor, teacher: Tensor, stats: Tensor) -> Tensor:
    block, block_d, angle_block = relation_tiles()
    e, n, sq_s, inv_s = angle_side(student, block, block_d)
    _, _, sq_t, inv_t = angle_side(teacher, block, block_d)
    batch = e.shape[0]
    weights = angle_pair_weights(sq_s, inv_s, sq_t, inv_t, upstream(grad_angle, e), angle_block)
    g = upstream(grad_distance, e)
    stats = stats.contiguous()
    per_row = g.dim() == 1
    through = through_mu_weighted(_sq_pass(sq_s, sq_t, block, block_d), batch, stats, g) if per_row else stats
    grid = (triton.cdiv(batch, block), triton.cdiv(batch, block))
    launch(_add_distance_weights_kernel, grid, sq_s, sq_t, stats, through, g, weights, batch, per_row, EPS, block)
    return gradient_from_pair_weights(weights, sq_s, e, n, block, block_d).to(student.dtype)
