"""Response family ops: temperature softmax-KL (docs/design.md §2.1)."""
from __future__ import annotations

import torch

from kdkernels._dtypes import opmath_dtype
from kdkernels.ops import _one_pass as one_pass
from kdkernels.ops._spec import OpDef, register

DIVERGENCE_CODES = {"forward": 0, "reverse": 1, "jsd": 2}
ROW_STATS = 6  # [m_s, log_sum_s, m_t, log_sum_t, c_s, c_t] per row


def _forward_fake(student, teacher, labels, temperature, divergence, beta, ignore_index, t2_scale):
    torch._check(student.dim() == 2, lambda: "student must be 2-D (rows, vocab)")
    torch._check(student.shape == teacher.shape, lambda: "student and teacher must have the same shape")
    rows, dt = student.shape[0], opmath_dtype(student.dtype)
    return student.new_empty((rows,), dtype=dt), student.new_empty((rows, ROW_STATS), dtype=dt)


def _backward_fake(grad_loss, student, teacher, labels, stats, temperature, divergence, beta, ignore_index,
                   t2_scale, student_grad, teacher_grad):
    grad_s = torch.empty_like(student) if student_grad else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    return grad_s, grad_t


def _setup_context(ctx, inputs, output):
    student, teacher, labels, temperature, divergence, beta, ignore_index, t2_scale = inputs
    ctx.save_for_backward(student, teacher, labels, output[1])
    ctx.mark_non_differentiable(output[1])  # stats are saved state, not a result to differentiate
    ctx.options = (temperature, divergence, beta, ignore_index, t2_scale)


def _backward(backward_op, ctx, grad_loss, _grad_stats):
    student, teacher, labels, stats = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_s, grad_t = backward_op(grad_loss.contiguous(), student, teacher, labels, stats, *ctx.options, need_s, need_t)
    return (grad_s if need_s else None, grad_t if need_t else None) + (None,) * 6


SOFTMAX_KL = register(OpDef(
    name="softmax_kl",
    forward_schema="(Tensor student, Tensor teacher, Tensor? labels, float temperature, int divergence, "
                   "float beta, int ignore_index, bool t2_scale) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, Tensor stats, "
                    "float temperature, int divergence, float beta, int ignore_index, bool t2_scale, "
                    "bool student_grad, bool teacher_grad) -> (Tensor, Tensor)",
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
    triton_module="kdkernels.triton.response.softmax_kl",
    doc="""Temperature softmax-KL per row.

    forward: student, teacher (R, V) contiguous, one dtype; labels (R,) int64 or None; divergence is
    DIVERGENCE_CODES' 0 forward KL(q||p), 1 reverse KL(p||q), 2 generalised JSD(beta). Returns the
    per-row loss (R,) in the op-math dtype (float32; float64 for float64 inputs), T^2-scaled when
    t2_scale and 0 for ignored rows, and stats (R, 6) = [m_s, log_sum_s, m_t, log_sum_t, c_s, c_t]
    (row maxes of z/T, log sum exp(z/T - max), divergence parts; csrc/include/kdkernels/softmax_kl.h),
    all the backward needs besides the logits: no (R, V) intermediate is saved.
    backward: grad_loss (R,) op-math dtype; returns (grad_student, grad_teacher), a gradient that is
    not requested comes back as an empty (0,) tensor.""",
))


# ---- one-pass step: the loss and its gradients from one read of the logits -------------------
def _step_forward_fake(student, teacher, labels, weight, temperature, divergence, beta, ignore_index, t2_scale,
                       per_row, student_grad, teacher_grad):
    torch._check(student.dim() == 2, lambda: "student must be 2-D (rows, vocab)")
    torch._check(student.shape == teacher.shape, lambda: "student and teacher must have the same shape")
    loss = student.new_empty((student.shape[0],) if per_row else (), dtype=opmath_dtype(student.dtype))
    grad_s = torch.empty_like(student) if student_grad else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    return loss, grad_s, grad_t


def _step_backward_fake(grad_loss, grad_student, grad_teacher):
    return None


SOFTMAX_KL_STEP = register(OpDef(
    name="softmax_kl_step",
    forward_schema="(Tensor student, Tensor teacher, Tensor? labels, Tensor weight, float temperature, "
                   "int divergence, float beta, int ignore_index, bool t2_scale, bool per_row, "
                   "bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor(a!) grad_student, Tensor(b!) grad_teacher) -> ()",
    forward_fake=_step_forward_fake,
    backward_fake=_step_backward_fake,
    setup_context=one_pass.setup_context,
    backward=one_pass.backward,
    triton_module="kdkernels.triton.response.softmax_kl_step",
    doc="""One-pass temperature softmax-KL step: the loss and its gradients from one read of the logits.

    forward: student, teacher, labels, temperature, divergence, beta, ignore_index, t2_scale as
    softmax_kl; weight is a 0-d op-math tensor, the reduction's factor (kdkernels.reduction.row_weight:
    1 / kept rows for "batchmean", ...). Returns (loss, grad_student, grad_teacher): loss = weight *
    sum_r l_r (0-d), or the per-row weight * l_r (R,) when per_row (reduction "none"), with l_r the
    row loss of softmax_kl (T^2-scaled when t2_scale, 0 for ignored rows); grad_student / grad_teacher
    = d loss / d logits for an upstream gradient of 1 (of every row when per_row), in the input's
    dtype, when student_grad / teacher_grad (an empty (0,) tensor otherwise). Nothing else is saved.
    backward: grad_loss 0-d (or (R,) when per_row) op-math; scales the saved gradients in place, row
    r by grad_loss (or grad_loss[r]), and leaves a row untouched where that factor is exactly 1 (read
    on the device: no host sync). Empty (0,) gradients are skipped.""",
))


# ---- top-k sparse teacher: one-pass, like the step -------------------------------------------
TAIL_CODES = {"renormalize": 0, "bucket": 1}


def _topk_forward_fake(student, teacher_logprobs, indices, labels, weight, temperature, tail, ignore_index, t2_scale,
                       per_row, student_grad):
    torch._check(student.dim() == 2, lambda: "student must be 2-D (rows, vocab)")
    torch._check(teacher_logprobs.shape == indices.shape, lambda: "teacher log-probs and indices must match")
    loss = student.new_empty((student.shape[0],) if per_row else (), dtype=opmath_dtype(student.dtype))
    return loss, torch.empty_like(student) if student_grad else student.new_empty((0,))


def _topk_backward_fake(grad_loss, grad_student):
    return None


SOFTMAX_KL_TOPK = register(OpDef(
    name="softmax_kl_topk",
    forward_schema="(Tensor student, Tensor teacher_logprobs, Tensor indices, Tensor? labels, Tensor weight, "
                   "float temperature, int tail, int ignore_index, bool t2_scale, bool per_row, bool student_grad) "
                   "-> (Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor(a!) grad_student) -> ()",
    forward_fake=_topk_forward_fake,
    backward_fake=_topk_backward_fake,
    setup_context=one_pass.setup_context,
    backward=one_pass.backward,
    triton_module="kdkernels.triton.response.softmax_kl_topk",
    doc="""One-pass softmax-KL against a top-k sparse teacher (kdkernels.reference.response_topk).

    forward: student (R, V) contiguous; teacher_logprobs (R, K) the teacher's full-softmax log-probs
    at T (same dtype as student), indices (R, K) int64 in [0, V), unique per row (not checked),
    K <= V; labels (R,) int64 or None; weight 0-d op-math, the reduction's factor (row_weight);
    tail TAIL_CODES' 0 renormalize, 1 bucket. Returns (loss, grad_student): loss = weight * sum_r l_r
    (0-d) or weight * l_r (R,) when per_row, l_r T^2-scaled when t2_scale and 0 for ignored rows;
    grad_student = d loss / d student for an upstream of 1, in student's dtype, when student_grad
    (an empty (0,) tensor otherwise). With b = z / T, p = softmax(b), per row:
      renormalize: d l / d b_j = p_j - [j = i_k] q~_k
      bucket: with Q = sum q_k, P = sum p_{i_k}, p_r = 1 - P, c = q_r / p_r (0 when q_r = 0):
              d l / d b_j = p_j (Q - c P) - [j = i_k] (q_k - c p_j); with K = V the bucket is empty (c = 0)
    (then x T^2 / T, or 1 / T, and x weight). Out-of-range indices raise (a device-side check on GPU).
    backward: grad_loss 0-d (or (R,) when per_row); scales the saved gradient in place as softmax_kl_step.""",
))
