"""@triton.jit helpers and host helpers shared by the response family's ops (docs/design.md §2.1).

The softmax-KL family works row by row on (R, V) logits: one program per row, a loop over V in
BLOCK_V chunks. These are the pieces every such op needs: the numerically safe log-space helpers,
the per-row stats layout of csrc/include/kdkernels/softmax_kl.h, loading a chunk of z / T, and the
launch configuration.
"""
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels.triton._common import tiles

# Largest BLOCK_V for 2-byte / 4-byte inputs (float64 uses half of it); tests lower it with
# kdkernels.triton._common.override_tiles("response", ...) to exercise the multi-chunk paths.
MAX_BLOCK_V = 4096


@triton.jit
def log1p_01(e):
    """log(1 + e) for e in [0, 1] without libdevice, accurate for tiny e (Goldberg's trick)."""
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def log_add_exp(u, v):
    """log(exp(u) + exp(v)); -inf + -inf = -inf (not NaN); NaN on either side gives NaN."""
    u_hi = (u > v) | (u != u)  # NaN-propagating max (tl.maximum may drop a NaN)
    hi = tl.where(u_hi, u, v)
    lo = tl.where(u_hi, v, u)
    hi_finite = hi != float("-inf")
    diff = tl.where(hi_finite, lo - hi, float("-inf"))
    return tl.where(hi_finite, hi + log1p_01(tl.exp(diff)), hi)


# numbers per row in the stats tensor: [m_s, log_sum_s, m_t, log_sum_t, c_s, c_t]
ROW_STATS = 6


@triton.jit
def store_row_stats(stats_ptr, row, m_s, log_sum_s, m_t, log_sum_t, c_s, c_t):
    base = stats_ptr + row * 6
    tl.store(base + 0, m_s)
    tl.store(base + 1, log_sum_s)
    tl.store(base + 2, m_t)
    tl.store(base + 3, log_sum_t)
    tl.store(base + 4, c_s)
    tl.store(base + 5, c_t)


@triton.jit
def load_scaled(ptrs, mask, inv_t, DT: tl.constexpr):
    """A chunk of logits divided by T (as z * (1/T)) in the op-math dtype; -inf past the row end."""
    return tl.load(ptrs, mask=mask, other=float("-inf")).to(DT) * inv_t


@triton.jit
def write_ignored_row(loss_ptr, stats_ptr, row, zero):
    """An ignored row: loss 0 and zero stats (its logits are never read)."""
    tl.store(loss_ptr + row, zero)
    store_row_stats(stats_ptr, row, zero, zero, zero, zero, zero, zero)


def launch_config(vocab: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps): chunks of up to MAX_BLOCK_V (half of it for float64), ~16 per thread."""
    cap = tiles("response", MAX_BLOCK_V)
    cap = cap // 2 if dtype == torch.float64 else cap
    block = triton.next_power_of_2(max(1, min(vocab, cap)))
    num_warps = max(1, min(8, block // 256))
    return block, num_warps


def check_rows(student: Tensor, teacher: Tensor, labels) -> None:
    """student / teacher (R, V) of one shape and dtype, labels (R,) or None."""
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(f"student and teacher must be 2-D (rows, vocab) of the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.dtype != teacher.dtype:
        raise TypeError(f"student and teacher must have the same dtype, got {student.dtype} and {teacher.dtype}")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != student.shape[0]):
        raise ValueError(f"labels must have shape ({student.shape[0]},), got {tuple(labels.shape)}")


def jsd_constants(beta: float) -> tuple[float, float, float]:
    """(beta, log beta, log(1 - beta)) for the generalised JSD; logs 0 where JSD is not computed."""
    beta = float(beta)
    if 0.0 < beta < 1.0:
        return beta, math.log(beta), math.log1p(-beta)
    return beta, 0.0, 0.0  # unused unless divergence == 2, where the op layer guarantees 0 < beta < 1
