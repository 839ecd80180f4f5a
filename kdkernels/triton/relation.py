"""Triton kernels for the relation losses (DESIGN §2.3): RKD distance, RKD angle, SP, and distance
+ angle together (RKDLoss).

The math is the one of csrc/include/kdkernels/relation.h (the C++ CPU / CUDA kernels), so the
backends agree on the loss, the saved statistics and the gradients:

* embeddings are centred for the (translation invariant) RKD losses, and squared distances come
  from the Gram expansion ``n_i + n_j - 2 <e_i, e_j>`` except where it is unreliable
  (``sq < NEAR_RATIO (n_i + n_j)``): those pairs are recomputed from the differences, and their
  gradient is added from the differences too;
* distance: pass 1 the per-row sums of d (-> mu), pass 2 the loss and ``A`` (the mu path of the
  gradient), backward one pass; SP: pass 1 the row norms of G, pass 2 the loss and ``gamma'``,
  backward one pass that uses G's symmetry to add ``W^T F`` without a transpose pass. Each
  program owns BLOCK_M rows and walks the column blocks: no (B, B) buffer. The gradient rows
  are accumulated in place in a (B, D) op-math buffer (read-modify-write per column block; no
  atomics, deterministic);
* angle keeps the (B, B) squared distances and inverse norms of both sides and walks anchors
  (forward, slot-a gradients) and columns (slot-c gradients), as the CPU kernel does; the
  final ``S -> dL/dE`` step is the distance's pair-gradient kernel;
* distance + angle: the angle's (B, B) squared distances also feed the distance passes (read,
  not re-formed), and the distance's pair weights are added to the angle's ``S`` before the one
  ``S -> dL/dE`` pass.

Gram tiles use ``tl.dot`` in full fp32 (``input_precision="ieee"``; TF32 would lose the
distances' digits); all arithmetic in float32 (float64 for float64 inputs).

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

EPS = 1e-12          # the spec's clamp (relation.h kEps)
NEAR_RATIO = 1.0 / 16  # relation.h kNearRatio

# Tile sizes. Module-level so tests can shrink them to exercise multi-block paths; the
# interpreter runs one program at a time, so small tiles there keep it fast.
BLOCK_ROWS = 64
BLOCK_D = 32
ANGLE_BLOCK = 64


def _interpreting() -> bool:
    from kdkernels.backends import triton_interpreting

    return triton_interpreting()


def _tiles():
    if _interpreting():
        return 16, 16, 16
    return BLOCK_ROWS, BLOCK_D, ANGLE_BLOCK


def _opmath(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(x: Tensor, centre: bool) -> tuple[Tensor, Tensor]:
    """(B, D) rows in op-math, centred if asked (O(B D) memory), and their squared norms."""
    e = x.to(_opmath(x))
    if centre:
        e = e - e.mean(dim=0, keepdim=True)
    e = e.contiguous()
    return e, (e * e).sum(dim=1)


# ---------------------------------------------------------------------------------------------
# helpers (inlined)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _smooth_l1(x):
    ax = tl.abs(x)
    return tl.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


@triton.jit
def _smooth_l1_grad(x):
    # NaN stays NaN: every comparison is false
    return tl.where(tl.abs(x) < 1.0, x, tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x)))


@triton.jit
def _sqrt(x):
    # IEEE-rounded in fp32 (tl.sqrt is the approximate one there); sqrt_rn has no fp64 variant
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _clamped_distance(sq, EPS: tl.constexpr):
    return _sqrt(tl.where(sq <= EPS, EPS, sq))


@triton.jit
def _gram_tile(x_ptr, rows, cols, B, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """<x_i, x_j> for the (BLOCK_M, BLOCK_N) tile rows x cols of contiguous (B, D) rows."""
    rmask = rows < B
    cmask = cols < B
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=x_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        a = tl.load(x_ptr + rows[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(x_ptr + cols[:, None] * D + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision="ieee")
    return acc


@triton.jit
def _sq_dist_tile(e_ptr, n_ptr, rows, cols, B, D, NEAR_RATIO: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """|e_i - e_j|^2 for the tile (0 on the diagonal) and the mask of pairs recomputed directly."""
    rmask = rows < B
    cmask = cols < B
    ni = tl.load(n_ptr + rows, mask=rmask, other=0.0)
    nj = tl.load(n_ptr + cols, mask=cmask, other=0.0)
    g = _gram_tile(e_ptr, rows, cols, B, D, BLOCK_M, BLOCK_N, BLOCK_D)
    sq = ni[:, None] + nj[None, :] - 2.0 * g
    offdiag = rows[:, None] != cols[None, :]
    near = (sq < NEAR_RATIO * (ni[:, None] + nj[None, :])) & offdiag & rmask[:, None] & cmask[None, :]
    if tl.sum(near.to(tl.int32)) > 0:  # rare: only tiles holding close pairs pay for it
        exact = tl.zeros((BLOCK_M, BLOCK_N), dtype=sq.dtype)
        for d in range(0, D):
            a = tl.load(e_ptr + rows * D + d, mask=rmask, other=0.0)
            b = tl.load(e_ptr + cols * D + d, mask=cmask, other=0.0)
            diff = a[:, None] - b[None, :]
            exact += diff * diff
        sq = tl.where(near, exact, sq)
    sq = tl.where(offdiag, sq, 0.0)
    return sq, near


@triton.jit
def _add_pair_grad(grad_ptr, e_ptr, w, near, rows, cols, B, D, BLOCK_D: tl.constexpr):
    """grad_i += sum_j w_ij (e_i - e_j) for the tile: rowsum(w) e_i - w E_j by tl.dot, except the
    ``near`` pairs, added from the differences (large weights would amplify cancellation)."""
    rmask = rows < B
    cmask = cols < B
    w_far = tl.where(near, 0.0, w)
    rs = tl.sum(w_far, axis=1)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        ei = tl.load(e_ptr + rows[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        ej = tl.load(e_ptr + cols[:, None] * D + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        upd = rs[:, None] * ei - tl.dot(w_far, ej, input_precision="ieee")
        ptrs = grad_ptr + rows[:, None] * D + dd[None, :]
        m = rmask[:, None] & dmask[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + upd, mask=m)
    if tl.sum(near.to(tl.int32)) > 0:
        w_near = tl.where(near, w, 0.0)
        for d in range(0, D):
            a = tl.load(e_ptr + rows * D + d, mask=rmask, other=0.0)
            b = tl.load(e_ptr + cols * D + d, mask=cmask, other=0.0)
            upd = tl.sum(w_near * (a[:, None] - b[None, :]), axis=1)
            tl.store(grad_ptr + rows * D + d, tl.load(grad_ptr + rows * D + d, mask=rmask, other=0.0) + upd,
                     mask=rmask)


# ---------------------------------------------------------------------------------------------
# RKD distance
# ---------------------------------------------------------------------------------------------
@triton.jit
def _distance_row_terms(sq_s, sq_t, keep, mu_s, mu_t, LOSS: tl.constexpr, EPS: tl.constexpr):
    """Row sums over a tile of squared distances. Pass 1 (not LOSS): the off-diagonal distances of
    both sides (-> mu). Pass 2 (LOSS): the loss smooth_l1(d_s/mu_s - d_t/mu_t) and the A terms
    smooth_l1'(x) d_s (the mu path of the gradient)."""
    d_s = _clamped_distance(sq_s, EPS)
    d_t = _clamped_distance(sq_t, EPS)
    if LOSS:
        x = d_s / mu_s - d_t / mu_t
        t1 = _smooth_l1(x)
        t2 = _smooth_l1_grad(x) * d_s
    else:
        t1 = d_s
        t2 = d_t
    return tl.sum(tl.where(keep, t1, 0.0), axis=1), tl.sum(tl.where(keep, t2, 0.0), axis=1)


@triton.jit
def _distance_pair_weight(sq_s, sq_t, keep, g, mu_s, mu_t, through_mu, EPS: tl.constexpr):
    """w_ij with dL/de_i = sum_j w_ij (e_i - e_j): 2 dL/dd_ij / d_ij where the clamp passes a gradient
    (2: d_ji = d_ij)."""
    x = _clamped_distance(sq_s, EPS) / mu_s - _clamped_distance(sq_t, EPS) / mu_t
    dl_dd = g * (_smooth_l1_grad(x) / mu_s - through_mu)
    return tl.where(keep & ~(sq_s <= EPS), 2.0 * dl_dd / _clamped_distance(sq_s, EPS), 0.0)


@triton.jit
def _distance_rows_kernel(es_ptr, ns_ptr, et_ptr, nt_ptr, sqs_ptr, sqt_ptr, mu_ptr, out1_ptr, out2_ptr, B, Ds, Dt,
                          LOSS: tl.constexpr, FROM_SQ: tl.constexpr, EPS: tl.constexpr, NEAR_RATIO: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One pass of _distance_row_terms over the row block, for the pairs j > i only (every sum of
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
            sq_s, _ = _sq_dist_tile(es_ptr, ns_ptr, rows, cols, B, Ds, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
            sq_t, _ = _sq_dist_tile(et_ptr, nt_ptr, rows, cols, B, Dt, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
        t1, t2 = _distance_row_terms(sq_s, sq_t, keep, mu_s, mu_t, LOSS, EPS)
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
        sq_s, near = _sq_dist_tile(es_ptr, ns_ptr, rows, cols, B, Ds, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
        sq_t, _ = _sq_dist_tile(et_ptr, nt_ptr, rows, cols, B, Dt, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
        w = _distance_pair_weight(sq_s, sq_t, keep, g, mu_s, mu_t, through_mu, EPS)
        _add_pair_grad(grad_ptr, es_ptr, w, near, rows, cols, B, Ds, BLOCK_D)


@triton.jit
def _add_distance_weights_kernel(sqs_ptr, sqt_ptr, stats_ptr, g_ptr, w_ptr, B, EPS: tl.constexpr,
                                 BLOCK: tl.constexpr):
    """w += the distance term's pair weights, for a (B, B) weight matrix (the combined op's)."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    inside = (rows[:, None] < B) & (cols[None, :] < B)
    keep = inside & (rows[:, None] != cols[None, :])
    offs = rows[:, None] * B + cols[None, :]
    sq_s = tl.load(sqs_ptr + offs, mask=keep, other=1.0)
    sq_t = tl.load(sqt_ptr + offs, mask=keep, other=1.0)
    mu_s = tl.load(stats_ptr)
    through_mu = tl.load(stats_ptr + 2) / (B * (B - 1.0))
    w = _distance_pair_weight(sq_s, sq_t, keep, tl.load(g_ptr), mu_s, tl.load(stats_ptr + 1), through_mu, EPS)
    tl.store(w_ptr + offs, tl.load(w_ptr + offs, mask=inside, other=0.0) + w, mask=inside)


def _distance_passes(launch, batch: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """The two passes of the distance term; launch(loss, mu, out1, out2) runs one over all rows,
    each row summing its pairs j > i (so every total counts twice). Returns the summed loss and
    stats = [mu_s, mu_t, A]."""
    out1 = torch.empty(batch, dtype=like.dtype, device=like.device)
    out2 = torch.empty_like(out1)
    launch(False, out1, out1, out2)  # pass 1 reads no mu
    mu = torch.stack([out1.sum(), out2.sum()]) * (2.0 / (batch * (batch - 1)))
    launch(True, mu, out1, out2)
    stats = torch.cat([mu, (2.0 * out2.sum() / (mu[0] * mu[0])).reshape(1)])
    return 2.0 * out1.sum(), stats


def rkd_distance_forward(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    block, block_d, _ = _tiles()
    es, ns = _rows(student, True)
    et, nt = _rows(teacher, True)
    batch = es.shape[0]

    def launch(loss, mu, out1, out2):
        _distance_rows_kernel[(triton.cdiv(batch, block),)](es, ns, et, nt, es, et, mu, out1, out2, batch, es.shape[1],
                                                            et.shape[1], loss, False, EPS, NEAR_RATIO, block, block_d)

    return _distance_passes(launch, batch, es)


def rkd_distance_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, stats: Tensor) -> Tensor:
    block, block_d, _ = _tiles()
    es, ns = _rows(student, True)
    et, nt = _rows(teacher, True)
    batch = es.shape[0]
    grad = torch.zeros_like(es)
    _distance_grad_kernel[(triton.cdiv(batch, block),)](grad_loss.to(es.dtype).contiguous(), es, ns, et, nt,
                                                         stats.contiguous(), grad, batch, es.shape[1], et.shape[1],
                                                         EPS, NEAR_RATIO, block, block_d)
    # e = x - mean(x) and the loss is translation invariant: dL/dx = dL/de
    return grad.to(student.dtype)


# ---------------------------------------------------------------------------------------------
# similarity preserving
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sp_norm_kernel(fs_ptr, ft_ptr, ns_ptr, nt_ptr, B, Ds, Dt, EPS: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Pass 1: row norms max(|G_i|_2, eps) of both Gram matrices."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    acc_s = tl.zeros((BLOCK,), dtype=fs_ptr.dtype.element_ty)
    acc_t = tl.zeros((BLOCK,), dtype=fs_ptr.dtype.element_ty)
    for c0 in range(0, B, BLOCK):
        cols = (c0 + tl.arange(0, BLOCK)).to(tl.int64)
        gs = _gram_tile(fs_ptr, rows, cols, B, Ds, BLOCK, BLOCK, BLOCK_D)
        gt = _gram_tile(ft_ptr, rows, cols, B, Dt, BLOCK, BLOCK, BLOCK_D)
        acc_s += tl.sum(gs * gs, axis=1)
        acc_t += tl.sum(gt * gt, axis=1)
    n_s = _sqrt(acc_s)
    n_t = _sqrt(acc_t)
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
        b = _gram_tile(fs_ptr, rows, cols, B, Ds, BLOCK, BLOCK, BLOCK_D) / n_s[:, None]
        diff = _gram_tile(ft_ptr, rows, cols, B, Dt, BLOCK, BLOCK, BLOCK_D) / n_t[:, None] - b
        acc_l += tl.sum(diff * diff, axis=1)
        acc_g += tl.sum(-2.0 * diff * b, axis=1)
    tl.store(loss_ptr + rows, acc_l, mask=rmask)
    # a clamped norm passes no gradient: gamma' = 0 there
    tl.store(stats_ptr + 2 * B + rows, tl.where(n_s > EPS, acc_g, 0.0), mask=rmask)


@triton.jit
def _sp_grad_kernel(g_ptr, fs_ptr, ft_ptr, stats_ptr, grad_ptr, B, Ds, Dt, BLOCK: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """dL/dF_p = sum_q (W_pq + W_qp) F_q; W_qp from the same (symmetric) Gram tile and q's stats."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rmask = rows < B
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
        gs = _gram_tile(fs_ptr, rows, cols, B, Ds, BLOCK, BLOCK, BLOCK_D)
        gt = _gram_tile(ft_ptr, rows, cols, B, Dt, BLOCK, BLOCK, BLOCK_D)
        b_pq = gs / ns_p
        b_qp = gs / ns_q
        w = (-2.0 * (gt / nt_p - b_pq) - b_pq * gm_p) / ns_p + (-2.0 * (gt / nt_q - b_qp) - b_qp * gm_q) / ns_q
        w = tl.where(rmask[:, None] & cmask[None, :], g * w, 0.0)
        for d0 in range(0, Ds, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < Ds
            fq = tl.load(fs_ptr + cols[:, None] * Ds + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            ptrs = grad_ptr + rows[:, None] * Ds + dd[None, :]
            m = rmask[:, None] & dmask[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + tl.dot(w, fq, input_precision="ieee"), mask=m)


def similarity_preserving_forward(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    block, block_d, _ = _tiles()
    fs, _ = _rows(student, False)
    ft, _ = _rows(teacher, False)
    batch = fs.shape[0]
    grid = (triton.cdiv(batch, block),)
    stats = torch.empty((3, batch), dtype=fs.dtype, device=fs.device)
    _sp_norm_kernel[grid](fs, ft, stats[0], stats[1], batch, fs.shape[1], ft.shape[1], EPS, block, block_d)
    row_loss = torch.empty(batch, dtype=fs.dtype, device=fs.device)
    _sp_loss_kernel[grid](fs, ft, stats, row_loss, batch, fs.shape[1], ft.shape[1], EPS, block, block_d)
    return row_loss.sum(), stats


def similarity_preserving_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, stats: Tensor) -> Tensor:
    block, block_d, _ = _tiles()
    fs, _ = _rows(student, False)
    ft, _ = _rows(teacher, False)
    batch = fs.shape[0]
    grad = torch.zeros_like(fs)
    _sp_grad_kernel[(triton.cdiv(batch, block),)](grad_loss.to(fs.dtype).contiguous(), fs, ft, stats.contiguous(),
                                                  grad, batch, fs.shape[1], ft.shape[1], block, block_d)
    return grad.to(student.dtype)


# ---------------------------------------------------------------------------------------------
# RKD angle: O(B^2) memory
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sq_dist_matrix_kernel(e_ptr, n_ptr, out_ptr, B, D, NEAR_RATIO: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    sq, _ = _sq_dist_tile(e_ptr, n_ptr, rows, cols, B, D, NEAR_RATIO, BLOCK, BLOCK, BLOCK_D)
    tl.store(out_ptr + rows[:, None] * B + cols[None, :], sq, mask=(rows[:, None] < B) & (cols[None, :] < B))


@triton.jit
def _angle_anchor_kernel(sqs_ptr, invs_ptr, sqt_ptr, invt_ptr, out_ptr, g_ptr, B, BACKWARD: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Anchor i = program_id(0), j in a block: forward -> partial losses sum_k smooth_l1(psi_s - psi_t);
    backward -> T_a[i, j] = g sum_k h_ijk d psi_ijk / d a_ij (relation.h)."""
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
            acc += tl.sum(_smooth_l1_grad(psi_s - psi_t) * 0.5 * ra_s * (rb_s - psi_s * ra_s), axis=1)
        else:
            acc += tl.sum(_smooth_l1(psi_s - psi_t), axis=1)
    if BACKWARD:
        tl.store(out_ptr + i * B + j, tl.load(g_ptr) * acc, mask=jm)
    else:
        tl.store(out_ptr + i * tl.num_programs(1) + tl.program_id(1), tl.sum(acc))


@triton.jit
def _angle_slot_c_kernel(sqs_ptr, invs_ptr, sqt_ptr, invt_ptr, out_ptr, g_ptr, B, BLOCK: tl.constexpr):
    """C[j, k] = g sum_i h_ijk d psi_ijk / d c_jk for j = program_id(0) and a block of k."""
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
        acc += tl.sum(_smooth_l1_grad(psi_s - psi_t) * (-0.5) * ra_s * rb_s, axis=0)
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
        _add_pair_grad(grad_ptr, e_ptr, w, near, rows, cols, B, D, BLOCK_D)


def _angle_side(x: Tensor, block: int, block_d: int):
    e, n = _rows(x, True)
    batch = e.shape[0]
    sq = torch.empty((batch, batch), dtype=e.dtype, device=e.device)
    grid = (triton.cdiv(batch, block), triton.cdiv(batch, block))
    _sq_dist_matrix_kernel[grid](e, n, sq, batch, e.shape[1], NEAR_RATIO, block, block_d)
    # 1 / |e_j - e_i|, 0 where the spec's norm clamp makes u_ij = 0 (NaN stays NaN)
    inv = torch.where(sq <= EPS * EPS, torch.zeros_like(sq), sq.rsqrt())
    return e, n, sq, inv


def _angle_loss(sq_s: Tensor, inv_s: Tensor, sq_t: Tensor, inv_t: Tensor, angle_block: int) -> Tensor:
    batch = sq_s.shape[0]
    n_j = triton.cdiv(batch, angle_block)
    partial = torch.empty((batch, n_j), dtype=sq_s.dtype, device=sq_s.device)
    _angle_anchor_kernel[(batch, n_j)](sq_s, inv_s, sq_t, inv_t, partial, partial, batch, False, angle_block)
    return partial.sum()


def _angle_pair_weights(sq_s: Tensor, inv_s: Tensor, sq_t: Tensor, inv_t: Tensor, g: Tensor,
                        angle_block: int) -> Tensor:
    """The angle term's (B, B) symmetric pair weights S: dL/de_i = sum_j S_ij (e_i - e_j)."""
    batch = sq_s.shape[0]
    grid = (batch, triton.cdiv(batch, angle_block))
    slot_a = torch.empty_like(sq_s)
    _angle_anchor_kernel[grid](sq_s, inv_s, sq_t, inv_t, slot_a, g, batch, True, angle_block)
    slot_c = torch.empty_like(sq_s)
    _angle_slot_c_kernel[grid](sq_s, inv_s, sq_t, inv_t, slot_c, g, batch, angle_block)
    # W = 2 T_a + C (slot b mirrors slot a); dL/de = 2 sum_j (W + W^T)_ij (e_i - e_j)
    w = 2.0 * slot_a + slot_c
    del slot_a, slot_c
    return 2.0 * (w + w.t())


def _gradient_from_pair_weights(weights: Tensor, sq: Tensor, e: Tensor, n: Tensor, block: int,
                                block_d: int) -> Tensor:
    batch = e.shape[0]
    grad = torch.zeros_like(e)
    _pair_grad_from_matrix_kernel[(triton.cdiv(batch, block),)](weights, sq, e, n, grad, batch, e.shape[1],
                                                                NEAR_RATIO, block, block_d)
    return grad


def rkd_angle_forward(student: Tensor, teacher: Tensor) -> Tensor:
    block, block_d, angle_block = _tiles()
    _, _, sq_s, inv_s = _angle_side(student, block, block_d)
    _, _, sq_t, inv_t = _angle_side(teacher, block, block_d)
    return _angle_loss(sq_s, inv_s, sq_t, inv_t, angle_block)


def rkd_angle_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor) -> Tensor:
    block, block_d, angle_block = _tiles()
    e, n, sq_s, inv_s = _angle_side(student, block, block_d)
    _, _, sq_t, inv_t = _angle_side(teacher, block, block_d)
    weights = _angle_pair_weights(sq_s, inv_s, sq_t, inv_t, grad_loss.to(e.dtype).contiguous(), angle_block)
    return _gradient_from_pair_weights(weights, sq_s, e, n, block, block_d).to(student.dtype)


# ---------------------------------------------------------------------------------------------
# RKD distance + angle (RKDLoss): one set of (B, B) squared distances per side for both terms
# ---------------------------------------------------------------------------------------------
def rkd_distance_angle_forward(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    block, block_d, angle_block = _tiles()
    _, _, sq_s, inv_s = _angle_side(student, block, block_d)
    _, _, sq_t, inv_t = _angle_side(teacher, block, block_d)
    batch = sq_s.shape[0]

    def launch(loss, mu, out1, out2):
        _distance_rows_kernel[(triton.cdiv(batch, block),)](sq_s, out1, sq_t, out1, sq_s, sq_t, mu, out1, out2, batch,
                                                            0, 0, loss, True, EPS, NEAR_RATIO, block, block_d)

    distance, stats = _distance_passes(launch, batch, sq_s)
    return distance, _angle_loss(sq_s, inv_s, sq_t, inv_t, angle_block), stats


def rkd_distance_angle_backward(grad_distance: Tensor, grad_angle: Tensor, student: Tensor, teacher: Tensor,
                                stats: Tensor) -> Tensor:
    block, block_d, angle_block = _tiles()
    e, n, sq_s, inv_s = _angle_side(student, block, block_d)
    _, _, sq_t, inv_t = _angle_side(teacher, block, block_d)
    batch = e.shape[0]
    weights = _angle_pair_weights(sq_s, inv_s, sq_t, inv_t, grad_angle.to(e.dtype).contiguous(), angle_block)
    grid = (triton.cdiv(batch, block), triton.cdiv(batch, block))
    _add_distance_weights_kernel[grid](sq_s, sq_t, stats.contiguous(), grad_distance.to(e.dtype).contiguous(), weights,
                                       batch, EPS, block)
    return _gradient_from_pair_weights(weights, sq_s, e, n, block, block_d).to(student.dtype)
