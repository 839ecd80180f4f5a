"""Relation family ops: RKD distance, RKD angle, both at once, similarity-preserving (docs/design.md §2.3).

Every op takes student (B, Ds) and teacher (B, Dt) rows: 2-D, B >= 2, one floating dtype. Each
forward returns the loss summed over all entries (B^2 for distance and SP, B^3 for angle) as a 0-d
tensor in the op-math dtype (float32; float64 for float64 inputs); the functional layer applies the
reduction (kdkernels.reduction). The teacher never gets a gradient: each backward returns
grad_student only, in the student's dtype, given the upstream gradient (0-d, op-math dtype). No
B x B tensor is allocated (B x B x B for angle, which keeps O(B^2)).
"""
from __future__ import annotations

import torch

from kdkernels._dtypes import opmath_dtype
from kdkernels.ops._spec import OpDef, register


def _check_rows(student, teacher) -> None:
    torch._check(student.dim() == 2 and teacher.dim() == 2, lambda: "student and teacher must be 2-D (B, D)")
    torch._check(student.shape[0] == teacher.shape[0], lambda: "student and teacher must have the same batch size")
    torch._check(student.dtype == teacher.dtype, lambda: "student and teacher must have the same dtype")


def _summed_loss(student):
    return student.new_empty((), dtype=opmath_dtype(student.dtype))


def _grad_like(student):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _save_rows_and(stats_outputs: slice):
    """setup_context that saves (student, teacher, *output[stats_outputs]) when the student needs a grad."""

    def setup_context(ctx, inputs, output):
        student, teacher = inputs
        if ctx.needs_input_grad[0]:  # the backward needs both sides (and the stats); nothing otherwise
            stats = output[stats_outputs] if isinstance(output, tuple) else ()
            ctx.save_for_backward(student, teacher, *stats)

    return setup_context


def _one_loss_backward(backward_op, ctx, grad_loss, *_grad_stats):
    if not ctx.needs_input_grad[0]:
        return None, None
    return backward_op(grad_loss.contiguous(), *ctx.saved_tensors), None


# ---- RKD distance ----------------------------------------------------------------------------
def _distance_forward_fake(student, teacher):
    _check_rows(student, teacher)
    loss = _summed_loss(student)
    return loss, student.new_empty((3,), dtype=loss.dtype)


RKD_DISTANCE = register(OpDef(
    name="rkd_distance",
    forward_schema="(Tensor student, Tensor teacher) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats) -> Tensor",
    forward_fake=_distance_forward_fake,
    backward_fake=lambda grad_loss, student, teacher, stats: _grad_like(student),
    setup_context=_save_rows_and(slice(1, 2)),
    backward=_one_loss_backward,
    triton_module="kdkernels.triton.relation.rkd_distance",
    doc="""RKD distance, summed over the B^2 entries; stats (3,) = [mu_s, mu_t, A]
    (csrc/include/kdkernels/relation.h), O(1) state for the backward.""",
))


# ---- similarity-preserving -------------------------------------------------------------------
def _sp_forward_fake(student, teacher):
    _check_rows(student, teacher)
    loss = _summed_loss(student)
    return loss, student.new_empty((3, student.shape[0]), dtype=loss.dtype)


SIMILARITY_PRESERVING = register(OpDef(
    name="similarity_preserving",
    forward_schema="(Tensor student, Tensor teacher) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats) -> Tensor",
    forward_fake=_sp_forward_fake,
    backward_fake=lambda grad_loss, student, teacher, stats: _grad_like(student),
    setup_context=_save_rows_and(slice(1, 2)),
    backward=_one_loss_backward,
    triton_module="kdkernels.triton.relation.similarity_preserving",
    doc="""Similarity-preserving loss, summed over the B^2 entries; stats (3, B) = [row norms n_s,
    row norms n_t, gamma'] (relation.h), O(B) state for the backward.""",
))


# ---- RKD angle -------------------------------------------------------------------------------
def _angle_forward_fake(student, teacher):
    _check_rows(student, teacher)
    return _summed_loss(student)


RKD_ANGLE = register(OpDef(
    name="rkd_angle",
    forward_schema="(Tensor student, Tensor teacher) -> Tensor",
    backward_schema="(Tensor grad_loss, Tensor student, Tensor teacher) -> Tensor",
    forward_fake=_angle_forward_fake,
    backward_fake=lambda grad_loss, student, teacher: _grad_like(student),
    setup_context=_save_rows_and(slice(1, 1)),
    backward=_one_loss_backward,
    triton_module="kdkernels.triton.relation.rkd_angle",
    doc="""RKD angle, summed over the B^3 entries. Saves nothing: the backward rebuilds the O(B^2)
    squared distances.""",
))


# ---- RKD distance + angle in one op (RKDLoss) ------------------------------------------------
def _distance_angle_forward_fake(student, teacher):
    _check_rows(student, teacher)
    loss = _summed_loss(student)
    return loss, _summed_loss(student), student.new_empty((3,), dtype=loss.dtype)


def _distance_angle_backward(backward_op, ctx, grad_distance, grad_angle, _grad_stats):
    if not ctx.needs_input_grad[0]:
        return None, None
    # an output that was not used gets a zero gradient (autograd materialises it)
    return backward_op(grad_distance.contiguous(), grad_angle.contiguous(), *ctx.saved_tensors), None


RKD_DISTANCE_ANGLE = register(OpDef(
    name="rkd_distance_angle",
    forward_schema="(Tensor student, Tensor teacher) -> (Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad_distance, Tensor grad_angle, Tensor student, Tensor teacher, Tensor stats) -> Tensor",
    forward_fake=_distance_angle_forward_fake,
    backward_fake=lambda grad_distance, grad_angle, student, teacher, stats: _grad_like(student),
    setup_context=_save_rows_and(slice(2, 3)),
    backward=_distance_angle_backward,
    triton_module="kdkernels.triton.relation.rkd_distance_angle",
    doc="""RKD distance and angle together (RKDLoss): one set of centred rows and (B, B) squared
    distances per side serves both terms, forward and backward, and the backward turns the sum of
    both terms' pair weights into the gradient with one GEMM. Returns the two summed losses
    (unweighted) and the distance's stats (3,); the backward takes one upstream gradient per loss.
    O(B^2) memory, as the angle alone.""",
))
