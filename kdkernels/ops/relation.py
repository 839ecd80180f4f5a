"""Relation family ops: RKD distance, RKD angle, both at once, similarity-preserving (docs/design.md §2.3),
and FSP (§2.6: relations between two layers; its own contract, at the end of this file).

Every op but FSP takes student (B, Ds) and teacher (B, Dt) rows: 2-D, B >= 2, one floating dtype, and a
last argument ``per_row``. Each forward returns the loss in the op-math dtype (float32; float64 for
float64 inputs): the per-row losses l_i, shape (B,), when ``per_row`` (row i of the (B, B) matrix;
anchor i for angle), else their sum over all entries (B^2 for distance and SP, B^3 for angle) as a
0-d tensor; the functional layer applies the reduction (kdkernels.reduction). The teacher never
gets a gradient: each backward returns grad_student only, in the student's dtype, given the
upstream gradient in the op-math dtype and of the forward loss's shape: 0-d g (the gradient of
g * sum_i l_i) or (B,) w (of sum_i w_i l_i); the kernels branch on its dim. No B x B tensor is
allocated (B x B x B for angle, which keeps O(B^2)).
"""
from __future__ import annotations

import torch

from kdkernels._dtypes import opmath_dtype
from kdkernels.ops import _one_pass as one_pass
from kdkernels.ops._spec import OpDef, register


def _check_rows(student, teacher) -> None:
    torch._check(student.dim() == 2 and teacher.dim() == 2, lambda: "student and teacher must be 2-D (B, D)")
    torch._check(student.shape[0] == teacher.shape[0], lambda: "student and teacher must have the same batch size")
    torch._check(student.dtype == teacher.dtype, lambda: "student and teacher must have the same dtype")


def _loss(student, per_row: bool):
    """The forward's loss output: (B,) per-row losses or the 0-d sum."""
    return student.new_empty((student.shape[0],) if per_row else (), dtype=opmath_dtype(student.dtype))


def _grad_like(student, *grads):
    """The backward's fake result, after checking each upstream gradient is 0-d or (B,)."""
    for grad in grads:
        torch._check(grad.dim() == 0 or tuple(grad.shape) == (student.shape[0],),
                     lambda: f"the upstream gradient must be 0-d or ({student.shape[0]},), got {tuple(grad.shape)}")
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _save_rows_and(stats_outputs: slice):
    """setup_context that saves (student, teacher, *output[stats_outputs]) when the student needs a grad."""

    def setup_context(ctx, inputs, output):
        student, teacher, _per_row = inputs
        if ctx.needs_input_grad[0]:  # the backward needs both sides (and the stats); nothing otherwise
            stats = output[stats_outputs] if isinstance(output, tuple) else ()
            ctx.save_for_backward(student, teacher, *stats)

    return setup_context


def _one_loss_backward(backward_op, ctx, grad_loss, *_grad_stats):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return backward_op(grad_loss.contiguous(), *ctx.saved_tensors), None, None


# ---- RKD distance ----------------------------------------------------------------------------
def _distance_forward_fake(student, teacher, per_row):
    _check_rows(student, teacher)
    loss = _loss(student, per_row)
    return loss, student.new_empty((3,), dtype=loss.dtype)


RKD_DISTANCE = register(OpDef(
    name="rkd_distance",
    forward_schema="(Tensor student, Tensor teacher, bool per_row) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats) -> Tensor",
    forward_fake=_distance_forward_fake,
    backward_fake=lambda grad_loss, student, teacher, stats: _grad_like(student, grad_loss),
    setup_context=_save_rows_and(slice(1, 2)),
    backward=_one_loss_backward,
    triton_module="kdkernels.triton.relation.rkd_distance",
    doc="""RKD distance: per-row losses (B,) or their sum over the B^2 entries; stats (3,) =
    [mu_s, mu_t, A] (csrc/include/kdkernels/relation.h), O(1) state for the backward (a (B,)
    upstream gradient recomputes A with its weights in one more pass).""",
))


# ---- similarity-preserving -------------------------------------------------------------------
def _sp_forward_fake(student, teacher, per_row):
    _check_rows(student, teacher)
    loss = _loss(student, per_row)
    return loss, student.new_empty((3, student.shape[0]), dtype=loss.dtype)


SIMILARITY_PRESERVING = register(OpDef(
    name="similarity_preserving",
    forward_schema="(Tensor student, Tensor teacher, bool per_row) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats) -> Tensor",
    forward_fake=_sp_forward_fake,
    backward_fake=lambda grad_loss, student, teacher, stats: _grad_like(student, grad_loss),
    setup_context=_save_rows_and(slice(1, 2)),
    backward=_one_loss_backward,
    triton_module="kdkernels.triton.relation.similarity_preserving",
    doc="""Similarity-preserving loss: per-row losses (B,) or their sum over the B^2 entries; stats (3, B) = [row norms n_s,
    row norms n_t, gamma'] (relation.h), O(B) state for the backward.""",
))


# ---- RKD angle -------------------------------------------------------------------------------
def _angle_forward_fake(student, teacher, per_row):
    _check_rows(student, teacher)
    return _loss(student, per_row)


RKD_ANGLE = register(OpDef(
    name="rkd_angle",
    forward_schema="(Tensor student, Tensor teacher, bool per_row) -> Tensor",
    backward_schema="(Tensor grad_loss, Tensor student, Tensor teacher) -> Tensor",
    forward_fake=_angle_forward_fake,
    backward_fake=lambda grad_loss, student, teacher: _grad_like(student, grad_loss),
    setup_context=_save_rows_and(slice(1, 1)),
    backward=_one_loss_backward,
    triton_module="kdkernels.triton.relation.rkd_angle",
    doc="""RKD angle: per-anchor losses (B,) or their sum over the B^3 entries. Saves nothing: the backward rebuilds the O(B^2)
    squared distances.""",
))


# ---- RKD distance + angle in one op (RKDLoss) ------------------------------------------------
def _distance_angle_forward_fake(student, teacher, per_row):
    _check_rows(student, teacher)
    loss = _loss(student, per_row)
    return loss, _loss(student, per_row), student.new_empty((3,), dtype=loss.dtype)


def _distance_angle_backward(backward_op, ctx, grad_distance, grad_angle, _grad_stats):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    # an output that was not used gets a zero gradient (autograd materialises it)
    return backward_op(grad_distance.contiguous(), grad_angle.contiguous(), *ctx.saved_tensors), None, None


RKD_DISTANCE_ANGLE = register(OpDef(
    name="rkd_distance_angle",
    forward_schema="(Tensor student, Tensor teacher, bool per_row) -> (Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad_distance, Tensor grad_angle, Tensor student, Tensor teacher, Tensor stats) -> Tensor",
    forward_fake=_distance_angle_forward_fake,
    backward_fake=lambda grad_distance, grad_angle, student, teacher, stats: _grad_like(student, grad_distance,
                                                                                          grad_angle),
    setup_context=_save_rows_and(slice(2, 3)),
    backward=_distance_angle_backward,
    triton_module="kdkernels.triton.relation.rkd_distance_angle",
    doc="""RKD distance and angle together (RKDLoss): one set of centred rows and (B, B) squared
    distances per side serves both terms, forward and backward, and the backward turns the sum of
    both terms' pair weights into the gradient with one GEMM. Returns the two summed losses
    (unweighted) and the distance's stats (3,); the backward takes one upstream gradient per loss.
    O(B^2) memory, as the angle alone. ``per_row`` applies to both losses.""",
))


# ---- FSP matrix loss: one-pass, like attention transfer ----------------------------------------
# Between two layers of one network, not between samples: its inputs are feature maps, and it has
# attention transfer's one-pass structure (docs/decisions.md, "FSP").
FSP_MAPS = ("student_first", "student_second", "teacher_first", "teacher_second")


def _fsp_forward_fake(student_first, student_second, teacher_first, teacher_second, weight, per_row, *grads):
    maps = (student_first, student_second, teacher_first, teacher_second)
    torch._check(all(m.dim() == 3 for m in maps), lambda: "the four maps must be 3-D (N, C, S)")
    torch._check(all(m.shape[0] == student_first.shape[0] for m in maps), lambda: "the maps must share N")
    torch._check(student_first.shape[2] == student_second.shape[2]
                 and teacher_first.shape[2] == teacher_second.shape[2], lambda: "the maps of a pair must share S")
    torch._check(teacher_first.shape[1] == student_first.shape[1]
                 and teacher_second.shape[1] == student_second.shape[1],
                 lambda: "student and teacher must share C1 and C2")
    loss = _loss(student_first, per_row)
    return (loss,) + tuple(torch.empty_like(m, memory_format=torch.contiguous_format) if g else m.new_empty((0,))
                           for m, g in zip(maps, grads))


FSP = register(OpDef(
    name="fsp",
    forward_schema="(Tensor student_first, Tensor student_second, Tensor teacher_first, Tensor teacher_second, "
                   "Tensor weight, bool per_row, bool student_first_grad, bool student_second_grad, "
                   "bool teacher_first_grad, bool teacher_second_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor(a!) grad_student_first, Tensor(b!) grad_student_second, "
                    "Tensor(c!) grad_teacher_first, Tensor(d!) grad_teacher_second) -> ()",
    forward_fake=_fsp_forward_fake,
    backward_fake=lambda grad_loss, *grads: None,
    setup_context=one_pass.setup_context,
    backward=one_pass.backward,
    triton_module="kdkernels.triton.relation.fsp",
    doc="""One-pass FSP matrix loss (Yim et al.; kdkernels.reference.fsp): the loss and its gradients
    in the forward, the GEMMs through torch (BLAS / cuBLAS), everything between them one fused kernel.

    forward: student_first A_s (N, C1, S_s), student_second B_s (N, C2, S_s), teacher_first A_t
    (N, C1, S_t), teacher_second B_t (N, C2, S_t): contiguous, one floating dtype, C1, C2, S >= 1,
    N >= 0. weight 0-d op-math, the reduction's factor (1 / (N C1 C2) "mean", 1 / N "batchmean",
    1 "sum" / "none"); per_row; one bool per map: form its gradient.
      G_s = A_s B_s^T, G_t = A_t B_t^T         (N, C1, C2) GEMMs, accumulated and kept in op-math
      D = G_s / S_s - G_t / S_t,  l_n = sum_ij D_ij^2   (one fused kernel, which also writes
      g_s = 2 weight D / S_s and g_t = -2 weight D / S_t over the G buffers when gradients are wanted)
      dA_s = g_s B_s, dB_s = g_s^T A_s, dA_t = g_t B_t, dB_t = g_t^T A_t   (GEMMs, in the input dtype)
    Returns (loss, grad_student_first, grad_student_second, grad_teacher_first, grad_teacher_second):
    loss = weight * sum_n l_n (0-d), or weight * l_n (N,) when per_row; each gradient d loss / d map
    for an upstream gradient of 1 (of every sample when per_row), contiguous, in the maps' dtype, or
    an empty (0,) tensor when its bool is false. Nothing else is saved.
    backward: grad_loss 0-d (or (N,) when per_row) op-math; scales the saved gradients in place,
    sample n by grad_loss (or grad_loss[n]) (scale_rows_ on the (N, C * S) views; nothing where the
    factor is exactly 1). Empty (0,) gradients are skipped.""",
))
