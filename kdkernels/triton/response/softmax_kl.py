"""Triton kernels of the ``softmax_kl`` op (docs/design.md §2.1): forward KL, reverse KL, generalised JSD.

The math is the one of csrc/include/kdkernels/softmax_kl.h (the C++ CPU / CUDA kernels), so the
three backends agree on the loss, on the per-row ``stats`` = [m_s, log_sum_s, m_t, log_sum_t, c_s, c_t]
and on the gradients. With ``a = z_teacher / T``, ``b = z_student / T``, their row maxes ``m_t``,
``m_s`` and ``log_sum = log sum exp(row - m)``, the logs are centred:
``log q = (a - m_t) - log_sum_t`` (teacher) and ``log p = (b - m_s) - log_sum_s`` (student), so
``b - m_s`` is exact for the entries that carry the mass and logits of magnitude 1e4..1e5 keep full
relative precision in p and q (``b - lse_s`` with an fp32 ``lse_s`` would not: ulp(1e4) ~ 1e-3).

* forward / reverse KL take ONE pass over the logits: a streaming "centred log-ratio" state
  ``(mw, sw, mo, so, acc)`` for the weighting row x (softmax w) and the other row y (softmax o):
  ``mw = max x``, ``sw = sum exp(x - mw)``, ``mo = max y``, ``so = sum exp(y - mo)``,
  ``acc = sum exp(x - mw) ((x - mw) - (y - mo))``, so ``KL(w||o) = acc / sw - log sw + log so``.
  Each BLOCK_V chunk rescales the running state to the new maxes and adds its own terms.
* JSD takes two passes: the two log-sum-exps, then ``c_s``/``c_t`` with ``log m`` computed in log
  space (``logaddexp(log q + log beta, log p + log(1 - beta))``), so underflowing probabilities
  never turn a finite loss into inf / NaN.
* the backward takes one pass: it recomputes p, q (and m) from the logits and the six stats.

``a - m_t`` must be exactly 0 at the max: every pass computes ``a = z * (1/T)`` the same way, and the
kernels are launched with ``enable_fp_fusion=False`` so that the compiler does not contract the
scaling into the following subtraction as an FMA (which skips the product's rounding; the NVIDIA
backend contracts mul + add by default). That switch is per kernel, so it also keeps the other
mul + add pairs unfused; the kernels are memory-bound, so this costs nothing measurable. Triton has
no per-operation equivalent of CUDA's ``__fmul_rn`` that also runs under the interpreter.

One program per row (grid = (R,)), a loop over V in BLOCK_V chunks, int64 row offsets. All
arithmetic in float32 (float64 for float64 inputs). Terms with a zero probability are exactly 0
(``0 log 0 = 0``) also where the log is -inf; ``-inf`` logits (masked vocabulary) are legal. NaN
in a row reaches that row's loss through the exp-sums (a NaN element makes ``sw``/``so`` or the
log-sum-exp NaN whatever ``tl.max`` does with NaN), never through ``tl.maximum``.

Rows whose label equals ``ignore_index`` are not read: loss 0, stats 0, gradient rows 0.

Scalar float arguments are annotated ``fp64`` (a plain Python float argument would be passed as
fp32 and cost float64 inputs their precision) and converted once to the op-math dtype with
``tl.full``; under the interpreter they stay Python floats, which ``tl.full`` also takes.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels._dtypes import opmath_dtype
from kdkernels.triton._common import launch, tl_opmath
from kdkernels.triton.response._rows import (ROW_STATS, check_rows, jsd_constants, launch_config, load_scaled,
                                             log_add_exp, store_row_stats, write_ignored_row)


# ---------------------------------------------------------------------------------------------
# forward: forward / reverse KL, one pass
# ---------------------------------------------------------------------------------------------
@triton.jit
def _softmax_kl_fwd_kernel(
    w_ptr,  # weighting row x: teacher for forward KL, student for reverse KL
    o_ptr,  # the other row y
    labels_ptr,
    loss_ptr,
    stats_ptr,
    V,
    ignore_index,
    inv_temp: "fp64",
    loss_scale: "fp64",
    HAS_LABELS: tl.constexpr,
    REVERSE: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zero = tl.full([], 0.0, DT)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            write_ignored_row(loss_ptr, stats_ptr, row, zero)
            return

    inv_t = tl.full([], inv_temp, DT)
    neg_inf = tl.full([], float("-inf"), DT)
    cols = tl.arange(0, BLOCK_V)
    w_row = w_ptr + row * V
    o_row = o_ptr + row * V

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
    kl = acc / sw - log_sw + log_so
    tl.store(loss_ptr + row, kl * tl.full([], loss_scale, DT))
    if REVERSE:  # x = student, y = teacher
        store_row_stats(stats_ptr, row, mw, log_sw, mo, log_so, kl, zero)
    else:  # x = teacher, y = student
        store_row_stats(stats_ptr, row, mo, log_so, mw, log_sw, zero, kl)


# ---------------------------------------------------------------------------------------------
# forward: generalised JSD, two passes
# ---------------------------------------------------------------------------------------------
@triton.jit
def _softmax_jsd_fwd_kernel(
    s_ptr,
    t_ptr,
    labels_ptr,
    loss_ptr,
    stats_ptr,
    V,
    ignore_index,
    inv_temp: "fp64",
    loss_scale: "fp64",
    beta: "fp64",
    log_beta: "fp64",
    log_one_minus_beta: "fp64",
    HAS_LABELS: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zero = tl.full([], 0.0, DT)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            write_ignored_row(loss_ptr, stats_ptr, row, zero)
            return

    inv_t = tl.full([], inv_temp, DT)
    neg_inf = tl.full([], float("-inf"), DT)
    cols = tl.arange(0, BLOCK_V)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V

    # pass 1: streaming log-sum-exp of b = z_s / T and a = z_t / T
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

    # pass 2: c_s = (1-beta) KL(p||m), c_t = beta KL(q||m), with centred logs
    lb = tl.full([], log_beta, DT)
    l1mb = tl.full([], log_one_minus_beta, DT)
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
    b_dt = tl.full([], beta, DT)
    c_s = (1.0 - b_dt) * acc_s
    c_t = b_dt * acc_t
    tl.store(loss_ptr + row, (c_s + c_t) * tl.full([], loss_scale, DT))
    store_row_stats(stats_ptr, row, ms, log_sum_s, mt, log_sum_t, c_s, c_t)


# ---------------------------------------------------------------------------------------------
# backward: one pass
# ---------------------------------------------------------------------------------------------
@triton.jit
def _softmax_kl_bwd_kernel(
    s_ptr,
    t_ptr,
    labels_ptr,
    stats_ptr,
    grad_loss_ptr,
    grad_loss_stride,
    grad_s_ptr,
    grad_t_ptr,
    V,
    ignore_index,
    inv_temp: "fp64",
    grad_scale: "fp64",
    beta: "fp64",
    log_beta: "fp64",
    log_one_minus_beta: "fp64",
    HAS_LABELS: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    row_off = row * V
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            zeros = tl.zeros([BLOCK_V], DT)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                if STUDENT_GRAD:
                    tl.store(grad_s_ptr + row_off + offs, zeros.to(grad_s_ptr.dtype.element_ty), mask=mask)
                if TEACHER_GRAD:
                    tl.store(grad_t_ptr + row_off + offs, zeros.to(grad_t_ptr.dtype.element_ty), mask=mask)
            return

    inv_t = tl.full([], inv_temp, DT)
    stats_row = stats_ptr + row * 6
    m_s = tl.load(stats_row + 0).to(DT)
    log_sum_s = tl.load(stats_row + 1).to(DT)
    m_t = tl.load(stats_row + 2).to(DT)
    log_sum_t = tl.load(stats_row + 3).to(DT)
    c_s = tl.load(stats_row + 4).to(DT)
    c_t = tl.load(stats_row + 5).to(DT)
    g = tl.load(grad_loss_ptr + row * grad_loss_stride).to(DT) * tl.full([], grad_scale, DT)
    b_dt = tl.full([], beta, DT)
    lb = tl.full([], log_beta, DT)
    l1mb = tl.full([], log_one_minus_beta, DT)

    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        b = load_scaled(s_ptr + row_off + offs, mask, inv_t, DT)
        a = load_scaled(t_ptr + row_off + offs, mask, inv_t, DT)
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
        if STUDENT_GRAD:
            tl.store(grad_s_ptr + row_off + offs, (grad_b * g).to(grad_s_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            tl.store(grad_t_ptr + row_off + offs, (grad_a * g).to(grad_t_ptr.dtype.element_ty), mask=mask)


def forward(student: Tensor, teacher: Tensor, labels, temperature: float, divergence: int, beta: float,
            ignore_index: int, t2_scale: bool) -> tuple[Tensor, Tensor]:
    """Per-row loss (R,) (already T^2-scaled when ``t2_scale``) and stats (R, 6) =
    [m_s, log_sum_s, m_t, log_sum_t, c_s, c_t]."""
    check_rows(student, teacher, labels)
    divergence = int(divergence)
    if divergence not in (0, 1, 2):
        raise ValueError(f"divergence must be 0 (forward), 1 (reverse) or 2 (jsd), got {divergence}")
    student = student.contiguous()
    teacher = teacher.contiguous()
    rows, vocab = student.shape
    dt = opmath_dtype(student.dtype)
    loss = torch.empty((rows,), dtype=dt, device=student.device)
    stats = torch.empty((rows, ROW_STATS), dtype=dt, device=student.device)
    if rows == 0:
        return loss, stats
    if vocab == 0:  # empty distributions: nothing to diverge
        loss.zero_()
        stats.zero_()
        stats[:, :4] = float("-inf")  # maxes and log-sums of empty rows
        return loss, stats
    temperature = float(temperature)
    has_labels = labels is not None
    labels_arg = labels.contiguous() if has_labels else loss  # dummy pointer, never read
    inv_temp = 1.0 / temperature
    loss_scale = temperature * temperature if t2_scale else 1.0
    block, num_warps = launch_config(vocab, student.dtype)
    common = dict(HAS_LABELS=has_labels, DT=tl_opmath(student.dtype), BLOCK_V=block, num_warps=num_warps,
                  enable_fp_fusion=False)
    if divergence in (0, 1):
        reverse = divergence == 1
        w, o = (student, teacher) if reverse else (teacher, student)
        launch(_softmax_kl_fwd_kernel, (rows,), w, o, labels_arg, loss, stats, vocab, int(ignore_index), inv_temp,
               loss_scale, REVERSE=reverse, **common)
    else:
        b, lb, l1mb = jsd_constants(beta)
        launch(_softmax_jsd_fwd_kernel, (rows,), student, teacher, labels_arg, loss, stats, vocab, int(ignore_index),
               inv_temp, loss_scale, b, lb, l1mb, **common)
    return loss, stats


def backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, labels, stats: Tensor, temperature: float,
             divergence: int, beta: float, ignore_index: int, t2_scale: bool, student_grad: bool,
             teacher_grad: bool) -> tuple[Tensor, Tensor]:
    """(grad_student, grad_teacher) in the logits' dtype; an unrequested one is an empty (0,) tensor."""
    check_rows(student, teacher, labels)
    divergence = int(divergence)
    if divergence not in (0, 1, 2):
        raise ValueError(f"divergence must be 0 (forward), 1 (reverse) or 2 (jsd), got {divergence}")
    student = student.contiguous()
    teacher = teacher.contiguous()
    rows, vocab = student.shape
    grad_s = torch.empty_like(student) if student_grad else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    if rows == 0 or vocab == 0 or not (student_grad or teacher_grad):
        return grad_s, grad_t
    stats = stats.contiguous()
    if grad_loss.dim() != 1 or grad_loss.shape[0] != rows:
        grad_loss = grad_loss.reshape(rows)
    has_labels = labels is not None
    labels_arg = labels.contiguous() if has_labels else stats  # dummy pointer, never read
    temperature = float(temperature)
    inv_temp = 1.0 / temperature
    grad_scale = temperature if t2_scale else inv_temp  # T^2 loss scale times the 1/T of d(z/T)/dz
    b, lb, l1mb = jsd_constants(beta)
    block, num_warps = launch_config(vocab, student.dtype)
    launch(_softmax_kl_bwd_kernel, (rows,), student, teacher, labels_arg, stats, grad_loss, grad_loss.stride(0),
           grad_s if student_grad else student,  # dummy pointers are never written
           grad_t if teacher_grad else teacher,
           vocab, int(ignore_index), inv_temp, grad_scale, b, lb, l1mb,
           HAS_LABELS=has_labels, DIVERGENCE=divergence, STUDENT_GRAD=bool(student_grad),
           TEACHER_GRAD=bool(teacher_grad), DT=tl_opmath(student.dtype), BLOCK_V=block, num_warps=num_warps,
           enable_fp_fusion=False)
    return grad_s, grad_t
