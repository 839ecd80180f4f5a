"""Triton kernels of the ``softmax_kl_step`` op: the one-pass softmax-KL step (docs/design.md §2.1).

When a gradient is needed, one program per row computes the row's stats and loss exactly as the
``softmax_kl`` forward does (forward / reverse KL one streaming pass, JSD two), then, in a second
loop over the same row, its gradient(s) d(weight * loss) / d logits exactly as the ``softmax_kl``
backward does for an upstream gradient of ``weight`` (the jitted helpers of ``_rows``: same
math, same rounding). On a GPU the second loop's reads of the row hit L2, so the logits are read
from DRAM once and no stats / logits are saved for the backward: it only scales the gradients, in
place, by the upstream factor (kdkernels/triton/scale_rows.py), and does nothing where that is 1.

Conventions as softmax_kl.py: enable_fp_fusion=False (``a - m_t`` must be exactly 0 at the max),
``fp64`` scalar annotations, int64 row offsets, op-math arithmetic, ignored rows never read
(loss 0, zero gradient rows). ``weight`` (the reduction's factor, kdkernels.reduction.row_weight)
is a 0-d device tensor read by the kernel: no host sync.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels._dtypes import opmath_dtype
from kdkernels.triton._common import launch, tl_opmath
from kdkernels.triton.response._rows import (check_divergence, check_rows, jsd_constants, jsd_row_stats,
                                             kl_row_stats, launch_config, load_scaled, softmax_kl_grad,
                                             store_zero_grad_rows)
from kdkernels.triton.scale_rows import scale_rows_


@triton.jit
def _softmax_kl_step_kernel(
    s_ptr,
    t_ptr,
    labels_ptr,
    weight_ptr,
    loss_ptr,  # (R,) weight * row loss
    grad_s_ptr,
    grad_t_ptr,
    V,
    ignore_index,
    inv_temp: "fp64",
    loss_scale: "fp64",
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
    row_off = row * V
    zero = tl.full([], 0.0, DT)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            tl.store(loss_ptr + row, zero)
            store_zero_grad_rows(grad_s_ptr + row_off, grad_t_ptr + row_off, V, STUDENT_GRAD, TEACHER_GRAD, DT,
                                 BLOCK_V)
            return

    inv_t = tl.full([], inv_temp, DT)
    b_dt = tl.full([], beta, DT)
    lb = tl.full([], log_beta, DT)
    l1mb = tl.full([], log_one_minus_beta, DT)
    s_row = s_ptr + row_off
    t_row = t_ptr + row_off

    # pass 1 (two for JSD): the row's stats and loss
    if DIVERGENCE == 2:
        m_s, log_sum_s, m_t, log_sum_t, c_s, c_t = jsd_row_stats(s_row, t_row, V, inv_t, b_dt, lb, l1mb, DT, BLOCK_V)
        row_loss = c_s + c_t
    elif DIVERGENCE == 1:  # KL(p||q): the student weights
        m_s, log_sum_s, m_t, log_sum_t, row_loss = kl_row_stats(s_row, t_row, V, inv_t, DT, BLOCK_V)
        c_s = row_loss
        c_t = zero
    else:  # KL(q||p): the teacher weights
        m_t, log_sum_t, m_s, log_sum_s, row_loss = kl_row_stats(t_row, s_row, V, inv_t, DT, BLOCK_V)
        c_s = zero
        c_t = row_loss
    weight = tl.load(weight_ptr).to(DT)
    tl.store(loss_ptr + row, row_loss * tl.full([], loss_scale, DT) * weight)

    # last pass: the gradients, as the softmax_kl backward with an upstream gradient of weight
    if STUDENT_GRAD | TEACHER_GRAD:
        g = weight * tl.full([], grad_scale, DT)
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            b = load_scaled(s_row + offs, mask, inv_t, DT)
            a = load_scaled(t_row + offs, mask, inv_t, DT)
            grad_b, grad_a = softmax_kl_grad(a, b, m_s, log_sum_s, m_t, log_sum_t, c_s, c_t, b_dt, lb, l1mb,
                                             DIVERGENCE)
            if STUDENT_GRAD:
                tl.store(grad_s_ptr + row_off + offs, (grad_b * g).to(grad_s_ptr.dtype.element_ty), mask=mask)
            if TEACHER_GRAD:
                tl.store(grad_t_ptr + row_off + offs, (grad_a * g).to(grad_t_ptr.dtype.element_ty), mask=mask)


def step_into(student: Tensor, teacher: Tensor, labels, weight: Tensor, temperature: float, divergence: int,
              beta: float, ignore_index: int, t2_scale: bool, row_loss: Tensor, grad_s, grad_t) -> None:
    """The step into outputs the caller owns (the fused linear op reuses them chunk after chunk):
    ``row_loss`` (R,) op-math gets weight * l_r; ``grad_s`` / ``grad_t`` ((R, V) contiguous, or None:
    not computed) get d (weight * sum_r l_r) / d logits. student / teacher must be contiguous."""
    rows, vocab = student.shape
    if rows == 0 or vocab == 0:  # no rows, or empty distributions: loss 0, gradients without elements
        row_loss.zero_()
        return
    has_labels = labels is not None
    temperature = float(temperature)
    inv_temp = 1.0 / temperature
    loss_scale = temperature * temperature if t2_scale else 1.0
    grad_scale = temperature if t2_scale else inv_temp  # T^2 loss scale times the 1/T of d(z/T)/dz
    b, lb, l1mb = jsd_constants(beta)
    block, num_warps = launch_config(vocab, student.dtype)
    launch(_softmax_kl_step_kernel, (rows,), student, teacher,
           labels.contiguous() if has_labels else row_loss,  # dummy pointer, never read
           weight, row_loss,
           student if grad_s is None else grad_s,  # dummy pointers are never written
           teacher if grad_t is None else grad_t,
           vocab, int(ignore_index), inv_temp, loss_scale, grad_scale, b, lb, l1mb,
           HAS_LABELS=has_labels, DIVERGENCE=divergence, STUDENT_GRAD=grad_s is not None,
           TEACHER_GRAD=grad_t is not None, DT=tl_opmath(student.dtype), BLOCK_V=block, num_warps=num_warps,
           enable_fp_fusion=False)


def forward(student: Tensor, teacher: Tensor, labels, weight: Tensor, temperature: float, divergence: int,
            beta: float, ignore_index: int, t2_scale: bool, per_row: bool, student_grad: bool,
            teacher_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_student, grad_teacher): loss = weight * sum_r l_r (0-d), or weight * l_r (R,) when
    ``per_row``; the gradients of that loss (of each row's, when ``per_row``) in the logits' dtype,
    an unrequested one an empty (0,) tensor."""
    check_rows(student, teacher, labels)
    divergence = check_divergence(divergence)
    if weight.dim() != 0:
        raise ValueError(f"weight must be a 0-d tensor, got shape {tuple(weight.shape)}")
    student = student.contiguous()
    teacher = teacher.contiguous()
    rows, _vocab = student.shape
    grad_s = torch.empty_like(student) if student_grad else None
    grad_t = torch.empty_like(teacher) if teacher_grad else None
    row_loss = torch.empty((rows,), dtype=opmath_dtype(student.dtype), device=student.device)
    step_into(student, teacher, labels, weight, temperature, divergence, beta, ignore_index, t2_scale, row_loss,
              grad_s, grad_t)
    empty_s, empty_t = student.new_empty((0,)), teacher.new_empty((0,))
    # per-row values summed by torch: deterministic, and one tiny launch
    return (row_loss if per_row else row_loss.sum()), (empty_s if grad_s is None else grad_s), \
        (empty_t if grad_t is None else grad_t)


def backward(grad_loss: Tensor, grad_student: Tensor, grad_teacher: Tensor) -> None:
    """Scales the saved gradients in place, row r by grad_loss (0-d) or grad_loss[r] ((R,))."""
    factor = grad_loss.reshape(-1) if grad_loss.dim() > 1 else grad_loss
    for grad in (grad_student, grad_teacher):
        scale_rows_(grad, factor)  # skips an empty (0,) gradient
