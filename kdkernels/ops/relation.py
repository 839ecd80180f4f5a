"""Relation family ops: RKD distance, RKD angle, similarity-preserving (DESIGN §2.3).

Per loss, two variants with one schema (see csrc/ops.cpp for the argument meanings):
  torch.ops.kdkernels.<loss>_forward / _backward                 C++ CPU and CUDA kernels
  torch.ops.kdkernels.<loss>_forward_triton / _backward_triton   Triton kernels
with <loss> in LOSSES. Inputs are (B, Ds) student and (B, Dt) teacher rows. Each forward returns
the loss summed over all entries (0-d, op-math dtype) and, for distance and SP, O(B) statistics
that the backward uses instead of any B x B intermediate. The backward returns the student's
gradient only: the teacher never gets one.

``rkd_distance_angle_forward`` / ``_backward`` (and ``_triton``) compute both RKD terms from one
set of squared distances (RKDLoss): the forward returns (distance sum, angle sum, distance stats),
the backward takes one upstream gradient per loss.
"""
from __future__ import annotations


import torch
from torch import Tensor

from kdkernels import _native
from kdkernels._dtypes import opmath_dtype
from kdkernels.ops._registration import register_fake_and_autograd

# loss -> shape of the forward's saved statistics for batch size B (None: the forward saves none)
STATS_SHAPE = {
    "rkd_distance": lambda batch: (3,),
    "similarity_preserving": lambda batch: (3, batch),
    "rkd_angle": None,
}
LOSSES = tuple(STATS_SHAPE)


def _check_rows(student: Tensor, teacher: Tensor) -> None:
    torch._check(student.dim() == 2 and teacher.dim() == 2, lambda: "student and teacher must be 2-D (B, D)")
    torch._check(student.shape[0] == teacher.shape[0], lambda: "student and teacher must have the same batch size")
    torch._check(student.dtype == teacher.dtype, lambda: "student and teacher must have the same dtype")


def _forward_fake(loss: str):
    stats_shape = STATS_SHAPE[loss]

    def fake(student, teacher):
        _check_rows(student, teacher)
        loss_value = student.new_empty((), dtype=opmath_dtype(student.dtype))
        if stats_shape is None:
            return loss_value
        return loss_value, student.new_empty(stats_shape(student.shape[0]), dtype=loss_value.dtype)

    return fake


def _backward_fake(grad_loss, student, teacher, *stats):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher = inputs
    if ctx.needs_input_grad[0]:  # the backward needs both sides (and the stats); nothing otherwise
        stats = list(output[1:]) if isinstance(output, tuple) else []
        ctx.save_for_backward(student, teacher, *stats)


def _autograd_backward(backward_op):
    def backward(ctx, grad_loss, *_grad_stats):
        if not ctx.needs_input_grad[0]:
            return None, None
        return backward_op(grad_loss.contiguous(), *ctx.saved_tensors), None

    return backward


# ---- C++ (CPU / CUDA) variant: schemas and kernels come from kdkernels._C / _C_cuda -----------
if _native.cpu_loaded:
    for _loss in LOSSES:
        register_fake_and_autograd(
            f"kdkernels::{_loss}_forward", _forward_fake(_loss),
            f"kdkernels::{_loss}_backward", _backward_fake,
            _setup_context, _autograd_backward(getattr(torch.ops.kdkernels, f"{_loss}_backward").default),
        )

# ---- Triton variant ---------------------------------------------------------------------------
if _native.triton_installed:
    # lazy kernel imports: TRITON_INTERPRET is read when triton is first imported

    @torch.library.custom_op("kdkernels::rkd_distance_forward_triton", mutates_args=())
    def rkd_distance_forward_triton(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        from kdkernels.triton import relation as kernels

        return kernels.rkd_distance_forward(student, teacher)

    @torch.library.custom_op("kdkernels::rkd_distance_backward_triton", mutates_args=())
    def rkd_distance_backward_triton(grad_loss: Tensor, student: Tensor, teacher: Tensor, stats: Tensor) -> Tensor:
        from kdkernels.triton import relation as kernels

        return kernels.rkd_distance_backward(grad_loss, student, teacher, stats)

    @torch.library.custom_op("kdkernels::similarity_preserving_forward_triton", mutates_args=())
    def similarity_preserving_forward_triton(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        from kdkernels.triton import relation as kernels

        return kernels.similarity_preserving_forward(student, teacher)

    @torch.library.custom_op("kdkernels::similarity_preserving_backward_triton", mutates_args=())
    def similarity_preserving_backward_triton(grad_loss: Tensor, student: Tensor, teacher: Tensor,
                                              stats: Tensor) -> Tensor:
        from kdkernels.triton import relation as kernels

        return kernels.similarity_preserving_backward(grad_loss, student, teacher, stats)

    @torch.library.custom_op("kdkernels::rkd_angle_forward_triton", mutates_args=())
    def rkd_angle_forward_triton(student: Tensor, teacher: Tensor) -> Tensor:
        from kdkernels.triton import relation as kernels

        return kernels.rkd_angle_forward(student, teacher)

    @torch.library.custom_op("kdkernels::rkd_angle_backward_triton", mutates_args=())
    def rkd_angle_backward_triton(grad_loss: Tensor, student: Tensor, teacher: Tensor) -> Tensor:
        from kdkernels.triton import relation as kernels

        return kernels.rkd_angle_backward(grad_loss, student, teacher)

    for _loss in LOSSES:
        register_fake_and_autograd(
            f"kdkernels::{_loss}_forward_triton", _forward_fake(_loss),
            f"kdkernels::{_loss}_backward_triton", _backward_fake,
            _setup_context, _autograd_backward(globals()[f"{_loss}_backward_triton"]),
        )


# ---- RKD distance + angle in one op ----------------------------------------------------------
def _combined_forward_fake(student, teacher):
    _check_rows(student, teacher)
    dtype = opmath_dtype(student.dtype)
    return student.new_empty((), dtype=dtype), student.new_empty((), dtype=dtype), student.new_empty((3,), dtype=dtype)


def _combined_backward_fake(grad_distance, grad_angle, student, teacher, stats):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _combined_setup_context(ctx, inputs, output):
    student, teacher = inputs
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(student, teacher, output[2])


def _combined_autograd_backward(backward_op):
    def backward(ctx, grad_distance, grad_angle, _grad_stats):
        if not ctx.needs_input_grad[0]:
            return None, None
        # an output that was not used gets a zero gradient (autograd materialises it)
        return backward_op(grad_distance.contiguous(), grad_angle.contiguous(), *ctx.saved_tensors), None

    return backward


if _native.cpu_loaded:
    register_fake_and_autograd(
        "kdkernels::rkd_distance_angle_forward", _combined_forward_fake,
        "kdkernels::rkd_distance_angle_backward", _combined_backward_fake,
        _combined_setup_context, _combined_autograd_backward(torch.ops.kdkernels.rkd_distance_angle_backward.default),
    )

if _native.triton_installed:

    @torch.library.custom_op("kdkernels::rkd_distance_angle_forward_triton", mutates_args=())
    def rkd_distance_angle_forward_triton(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from kdkernels.triton import relation as kernels

        return kernels.rkd_distance_angle_forward(student, teacher)

    @torch.library.custom_op("kdkernels::rkd_distance_angle_backward_triton", mutates_args=())
    def rkd_distance_angle_backward_triton(grad_distance: Tensor, grad_angle: Tensor, student: Tensor,
                                           teacher: Tensor, stats: Tensor) -> Tensor:
        from kdkernels.triton import relation as kernels

        return kernels.rkd_distance_angle_backward(grad_distance, grad_angle, student, teacher, stats)

    register_fake_and_autograd(
        "kdkernels::rkd_distance_angle_forward_triton", _combined_forward_fake,
        "kdkernels::rkd_distance_angle_backward_triton", _combined_backward_fake,
        _combined_setup_context, _combined_autograd_backward(rkd_distance_angle_backward_triton),
    )


def forward_op(loss: str, backend: str):
    """The forward op of ``loss`` for ``backend`` ("cpu", "cuda" or "triton")."""
    name = f"{loss}_forward_triton" if backend == "triton" else f"{loss}_forward"
    return getattr(torch.ops.kdkernels, name).default


def summed_loss(loss: str, backend: str, student: Tensor, teacher: Tensor) -> Tensor:
    """Run the fused forward of ``loss`` on (B, Ds) / (B, Dt) rows: the loss summed over all entries."""
    out = forward_op(loss, backend)(student, teacher)
    return out if STATS_SHAPE[loss] is None else out[0]


def distance_and_angle_sums(backend: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Both RKD terms of (B, Ds) / (B, Dt) rows from one fused op: (distance sum, angle sum)."""
    name = "rkd_distance_angle_forward_triton" if backend == "triton" else "rkd_distance_angle_forward"
    distance, angle, _stats = getattr(torch.ops.kdkernels, name).default(student, teacher)
    return distance, angle
