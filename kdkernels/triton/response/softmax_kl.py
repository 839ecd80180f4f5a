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
from kdkernels.triton.response._rows import (ROW_STATS, check_divergence, check_rows, jsd_constants, jsd_row_stats,
                                             kl_row_stats, launch_config, load_scaled, softmax_kl_grad,
                                             store_row_stats, store_zero_grad_rows, write_ignored_row)


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

    mw, log_sw, mo, log_so, kl = kl_row_stats(w_ptr + row * V, o_ptr + row * V, V, tl.full([], inv_temp, DT),
                                              DT, BLOCK_V)
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

    ms, log_sum_s, mt, log_sum_t, c_s, c_t = jsd_row_stats(
        s_ptr + row * V, t_ptr + row * V, V, tl.full([], inv_temp, DT), tl.full([], beta, DT),
        tl.full([], log_beta, DT), tl.full([], log_one_minus_beta, DT), DT, BLOCK_V)
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
            store_zero_grad_rows(grad_s_ptr + row_off, grad_t_ptr + row_off, V, STUDENT_GRAD, TEACHER_GRAD, DT,
                                 BLOCK_V)
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
        grad_b, grad_a = softmax_kl_grad(a, b, m_s, log_sum_s, m_t, log_sum_t, c_s, c_t, b_dt, lb, l1mb, DIVERGENCE)
        if STUDENT_GRAD:
            tl.store(grad_s_ptr + row_off + offs, (grad_b * g).to(grad_s_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            tl.store(grad_t_ptr + row_off + offs, (grad_a * g).to(grad_t_ptr.dtype.element_ty), mask=mask)


def forward(student: Tensor, teacher: Tensor, labels, temperature: float, divergence: int, beta: float,
            ignore_index: int, t2_scale: bool) -> tuple[Tensor, Tensor]:
    """Per-row loss (R,) (already T^2-scaled when ``t2_scale``) and stats (R, 6) =
    [m_s, log_sum_s, m_t, log_sum_t, c_s, c_t]."""
    check_rows(student, teacher, labels)
    divergence = check_divergence(divergence)
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
    divergence = check_divergence(divergence)
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
