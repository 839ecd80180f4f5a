"""@triton.jit helpers and host helpers shared by the response family's ops (docs/design.md §2.1).

The softmax-KL family works row by row on (R, V) logits: one program per row, a loop over V in
BLOCK_V chunks. These are the pieces every such op needs: the numerically safe log-space helpers,
the per-row stats layout of csrc/include/kdkernels/softmax_kl.h, loading a chunk of z / T, the
loops that compute a row's stats (softmax_kl.py's module doc gives the math), the per-element
gradient, and the launch configuration. The two-pass op (softmax_kl) and the one-pass step
(softmax_kl_step) share them, so that they agree to the bit.
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


@triton.jit
def kl_row_stats(w_row, o_row, V, inv_t, DT: tl.constexpr, BLOCK_V: tl.constexpr):
    """One streaming pass over a row pair for KL(w||o) = acc / sw - log sw + log so (module doc of
    softmax_kl.py): returns (max x, log sum exp(x - max), max y, log sum exp(y - max), KL)."""
    zero = tl.full([], 0.0, DT)
    neg_inf = tl.full([], float("-inf"), DT)
    cols = tl.arange(0, BLOCK_V)
    mw = neg_inf
    mo = neg_inf
    sw = zero
    so = zero
    acc = zero
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = load_scaled(w_row + offs, mask, inv_t, DT)
        y = load_scaled(o_row + offs, mask, inv_t, DT)
        new_mw = tl.maximum(mw, tl.max(x, 0))
        new_mo = tl.maximum(mo, tl.max(y, 0))
        # "safe" maxes: 0 while everything seen is -inf, so exp(-inf - 0) = 0 instead of NaN
        cw = tl.where(new_mw == float("-inf"), 0.0, new_mw)
        co = tl.where(new_mo == float("-inf"), 0.0, new_mo)
        alpha_w = tl.exp(mw - cw)
        alpha_o = tl.exp(mo - co)
        # rescale the running state to the new maxes: each old term's log-ratio moves by
        # -(new_mw - mw) + (new_mo - mo). An empty weighting part (sw = 0) has acc = 0; an all -inf
        # other part (so = 0) with mass in w already made acc = +inf, so its shift is irrelevant.
        shift_w = tl.where(sw > 0.0, new_mw - mw, 0.0)
        shift_o = tl.where(so > 0.0, new_mo - mo, 0.0)
        acc = tl.where(alpha_w > 0.0, alpha_w * (acc - (shift_w - shift_o) * sw), 0.0)
        sw = sw * alpha_w
        so = so * alpha_o
        # this chunk's terms, relative to the new maxes; 0 * log(0 / anything) = 0
        w = tl.exp(x - cw)
        term = tl.where(w > 0.0, w * ((x - cw) - (y - co)), 0.0)
        acc += tl.sum(term, 0)
        sw += tl.sum(w, 0)
        so += tl.sum(tl.exp(y - co), 0)
        mw = new_mw
        mo = new_mo
    log_sw = tl.log(sw)
    log_so = tl.log(so)
    return mw, log_sw, mo, log_so, acc / sw - log_sw + log_so


@triton.jit
def jsd_row_stats(s_row, t_row, V, inv_t, b_dt, lb, l1mb, DT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Two passes for the generalised JSD: the log-sum-exps of b = z_s / T and a = z_t / T, then
    c_s = (1-beta) KL(p||m) and c_t = beta KL(q||m) with log m in log space; returns the six stats."""
    zero = tl.full([], 0.0, DT)
    neg_inf = tl.full([], float("-inf"), DT)
    cols = tl.arange(0, BLOCK_V)
    ms = neg_inf
    mt = neg_inf
    ss = zero
    st = zero
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        b = load_scaled(s_row + offs, mask, inv_t, DT)
        a = load_scaled(t_row + offs, mask, inv_t, DT)
        new_ms = tl.maximum(ms, tl.max(b, 0))
        new_mt = tl.maximum(mt, tl.max(a, 0))
        cs = tl.where(new_ms == float("-inf"), 0.0, new_ms)
        ct = tl.where(new_mt == float("-inf"), 0.0, new_mt)
        ss = ss * tl.exp(ms - cs) + tl.sum(tl.exp(b - cs), 0)
        st = st * tl.exp(mt - ct) + tl.sum(tl.exp(a - ct), 0)
        ms = new_ms
        mt = new_mt
    log_sum_s = tl.log(ss)
    log_sum_t = tl.log(st)

    acc_s = zero
    acc_t = zero
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        b = load_scaled(s_row + offs, mask, inv_t, DT)
        a = load_scaled(t_row + offs, mask, inv_t, DT)
        log_p = (b - ms) - log_sum_s
        log_q = (a - mt) - log_sum_t
        log_m = log_add_exp(log_q + lb, log_p + l1mb)
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        acc_s += tl.sum(tl.where((p > 0.0) | (p != p), p * (log_p - log_m), 0.0), 0)
        acc_t += tl.sum(tl.where((q > 0.0) | (q != q), q * (log_q - log_m), 0.0), 0)
    return ms, log_sum_s, mt, log_sum_t, (1.0 - b_dt) * acc_s, b_dt * acc_t


@triton.jit
def softmax_kl_grad(a, b, m_s, log_sum_s, m_t, log_sum_t, c_s, c_t, b_dt, lb, l1mb, DIVERGENCE: tl.constexpr):
    """Per-element gradient of the unscaled row loss w.r.t. b = z_s / T and a = z_t / T
    (softmax_kl_grad of softmax_kl.h): returns (grad_b, grad_a)."""
    log_p = (b - m_s) - log_sum_s
    log_q = (a - m_t) - log_sum_t
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    p_pos = (p > 0.0) | (p != p)
    q_pos = (q > 0.0) | (q != q)
    if DIVERGENCE == 0:
        grad_b = p - q
        grad_a = tl.where(q_pos, q * (log_q - log_p - c_t), 0.0)
    elif DIVERGENCE == 1:
        grad_b = tl.where(p_pos, p * (log_p - log_q - c_s), 0.0)
        grad_a = q - p
    else:
        log_m = log_add_exp(log_q + lb, log_p + l1mb)
        grad_b = tl.where(p_pos, p * ((1.0 - b_dt) * (log_p - log_m) - c_s), 0.0)
        grad_a = tl.where(q_pos, q * (b_dt * (log_q - log_m) - c_t), 0.0)
    return grad_b, grad_a


@triton.jit
def store_zero_grad_rows(grad_s_row, grad_t_row, V, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                         DT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Zero gradient rows of an ignored row (its logits are never read)."""
    cols = tl.arange(0, BLOCK_V)
    zeros = tl.zeros([BLOCK_V], DT)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        if STUDENT_GRAD:
            tl.store(grad_s_row + offs, zeros.to(grad_s_row.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            tl.store(grad_t_row + offs, zeros.to(grad_t_row.dtype.element_ty), mask=mask)


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


def check_divergence(divergence) -> int:
    """``divergence`` as an int code (DIVERGENCE_CODES of kdkernels.ops.response); ValueError otherwise."""
    divergence = int(divergence)
    if divergence not in (0, 1, 2):
        raise ValueError(f"divergence must be 0 (forward), 1 (reverse) or 2 (jsd), got {divergence}")
    return divergence


def jsd_constants(beta: float) -> tuple[float, float, float]:
    """(beta, log beta, log(1 - beta)) for the generalised JSD; logs 0 where JSD is not computed."""
    beta = float(beta)
    if 0.0 < beta < 1.0:
        return beta, math.log(beta), math.log1p(-beta)
    return beta, 0.0, 0.0  # unused unless divergence == 2, where the op layer guarantees 0 < beta < 1
