"""@triton.jit and host helpers shared by the relation family's ops (docs/design.md §2.3).

The math is the one of csrc/include/kdkernels/relation.h (the C++ CPU / CUDA kernels), so the
backends agree on the loss, the saved statistics and the gradients. Every relation op works on
(B, D) rows in op-math (centred for the translation-invariant RKD losses), tile by tile:

* squared distances come from the Gram expansion ``n_i + n_j - 2 <e_i, e_j>`` except where it is
  unreliable (``sq < NEAR_RATIO (n_i + n_j)``): those pairs are recomputed from the differences,
  and their gradient is added from the differences too (``sq_dist_tile``, ``add_pair_grad``);
* Gram tiles use ``tl.dot`` in full fp32 (``input_precision="ieee"``; TF32 would lose the
  distances' digits); all arithmetic in float32 (float64 for float64 inputs).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels._dtypes import opmath_dtype
from kdkernels.triton._common import tiles

EPS = 1e-12          # the spec's clamp (relation.h kEps)
NEAR_RATIO = 1.0 / 16  # relation.h kNearRatio

# (BLOCK rows, BLOCK_D, ANGLE_BLOCK). The interpreter runs one program at a time, so small tiles
# keep it fast there; tests override them with kdkernels.triton._common.override_tiles("relation", ...).
GPU_TILES = (64, 32, 64)
INTERPRETER_TILES = (16, 16, 16)


def relation_tiles() -> tuple[int, int, int]:
    from kdkernels.backends import triton_interpreting

    return tiles("relation", INTERPRETER_TILES if triton_interpreting() else GPU_TILES)


def upstream(grad: Tensor, rows: Tensor) -> Tensor:
    """A backward's upstream gradient, 0-d g or (B,) per-row w (the forward's loss shape), in the
    op-math dtype of ``rows`` (B, D), contiguous; RuntimeError for any other shape, as the C++ ops."""
    batch = rows.shape[0]
    if not (grad.dim() == 0 or tuple(grad.shape) == (batch,)):
        raise RuntimeError(f"the upstream gradient must be 0-d or ({batch},), got {tuple(grad.shape)}")
    return grad.to(rows.dtype).contiguous()


def op_rows(x: Tensor, centre: bool) -> tuple[Tensor, Tensor]:
    """(B, D) rows in op-math, centred if asked (O(B D) memory), and their squared norms."""
    e = x.to(opmath_dtype(x.dtype))
    if centre:
        e = e - e.mean(dim=0, keepdim=True)
    e = e.contiguous()
    return e, (e * e).sum(dim=1)


@triton.jit
def smooth_l1(x):
    ax = tl.abs(x)
    return tl.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


@triton.jit
def smooth_l1_grad(x):
    # NaN stays NaN: every comparison is false
    return tl.where(tl.abs(x) < 1.0, x, tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x)))


@triton.jit
def ieee_sqrt(x):
    # IEEE-rounded in fp32 (tl.sqrt is the approximate one there); sqrt_rn has no fp64 variant
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def clamped_distance(sq, EPS: tl.constexpr):
    return ieee_sqrt(tl.where(sq <= EPS, EPS, sq))


@triton.jit
def gram_tile(x_ptr, rows, cols, B, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
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
def sq_dist_tile(e_ptr, n_ptr, rows, cols, B, D, NEAR_RATIO: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """|e_i - e_j|^2 for the tile (0 on the diagonal) and the mask of pairs recomputed directly."""
    rmask = rows < B
    cmask = cols < B
    ni = tl.load(n_ptr + rows, mask=rmask, other=0.0)
    nj = tl.load(n_ptr + cols, mask=cmask, other=0.0)
    g = gram_tile(e_ptr, rows, cols, B, D, BLOCK_M, BLOCK_N, BLOCK_D)
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
def add_pair_grad(grad_ptr, e_ptr, w, near, rows, cols, B, D, BLOCK_D: tl.constexpr):
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
