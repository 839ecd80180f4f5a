"""Response family ops: temperature softmax-KL (DESIGN §2.1).

Two variants with one schema (see csrc/ops.cpp for the argument meanings):
  torch.ops.kdkernels.softmax_kl_forward / _backward            C++ CPU and CUDA kernels
  torch.ops.kdkernels.softmax_kl_forward_triton / _backward_triton   Triton kernels
The forward returns (loss (R,), stats (R, 6) = [m_s, log_sum_s, m_t, log_sum_t, c_s, c_t]); the
backward recomputes probabilities from the logits and the O(R) stats, so no (R, V) intermediate is
saved between forward and backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdkernels import _native
from kdkernels._dtypes import opmath_dtype
from kdkernels.ops._registration import register_fake_and_autograd

DIVERGENCE_CODES = {"forward": 0, "reverse": 1, "jsd": 2}


def _forward_fake(student, teacher, labels, temperature, divergence, beta, ignore_index, t2_scale):
    torch._check(student.dim() == 2, lambda: "student must be 2-D (rows, vocab)")
    torch._check(student.shape == teacher.shape, lambda: "student and teacher must have the same shape")
    rows, dt = student.shape[0], opmath_dtype(student.dtype)
    return student.new_empty((rows,), dtype=dt), student.new_empty((rows, 6), dtype=dt)


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


def _autograd_backward(backward_op):
    def backward(ctx, grad_loss, _grad_stats):
        student, teacher, labels, stats = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_s, grad_t = backward_op(grad_loss.contiguous(), student, teacher, labels, stats, *ctx.options,
                                     need_s, need_t)
        return (grad_s if need_s else None, grad_t if need_t else None) + (None,) * 6

    return backward


# ---- C++ (CPU / CUDA) variant: schemas and kernels come from kdkernels._C / _C_cuda -----------
if _native.cpu_loaded:
    register_fake_and_autograd(
        "kdkernels::softmax_kl_forward", _forward_fake,
        "kdkernels::softmax_kl_backward", _backward_fake,
        _setup_context, _autograd_backward(torch.ops.kdkernels.softmax_kl_backward.default),
    )

# ---- Triton variant ---------------------------------------------------------------------------
if _native.triton_installed:

    @torch.library.custom_op("kdkernels::softmax_kl_forward_triton", mutates_args=())
    def softmax_kl_forward_triton(student: Tensor, teacher: Tensor, labels: Optional[Tensor], temperature: float,
                                  divergence: int, beta: float, ignore_index: int,
                                  t2_scale: bool) -> tuple[Tensor, Tensor]:
        from kdkernels.triton import response as kernels  # lazy: TRITON_INTERPRET is read at import

        return kernels.softmax_kl_forward(student, teacher, labels, temperature, divergence, beta, ignore_index,
                                          t2_scale)

    @torch.library.custom_op("kdkernels::softmax_kl_backward_triton", mutates_args=())
    def softmax_kl_backward_triton(grad_loss: Tensor, student: Tensor, teacher: Tensor, labels: Optional[Tensor],
                                   stats: Tensor, temperature: float, divergence: int, beta: float,
                                   ignore_index: int, t2_scale: bool, student_grad: bool,
                                   teacher_grad: bool) -> tuple[Tensor, Tensor]:
        from kdkernels.triton import response as kernels

        return kernels.softmax_kl_backward(grad_loss, student, teacher, labels, stats, temperature, divergence,
                                           beta, ignore_index, t2_scale, student_grad, teacher_grad)

    register_fake_and_autograd(
        "kdkernels::softmax_kl_forward_triton", _forward_fake,
        "kdkernels::softmax_kl_backward_triton", _backward_fake,
        _setup_context, _autograd_backward(softmax_kl_backward_triton),
    )


def softmax_kl_forward(backend: str, student: Tensor, teacher: Tensor, labels: Optional[Tensor], temperature: float,
                       divergence: int, beta: float, ignore_index: int, t2_scale: bool) -> tuple[Tensor, Tensor]:
    """Run the fused forward on ``backend`` ("cpu", "cuda" or "triton"): (loss (R,), stats (R, 6))."""
    op = torch.ops.kdkernels.softmax_kl_forward_triton if backend == "triton" else torch.ops.kdkernels.softmax_kl_forward
    return op(student, teacher, labels, temperature, divergence, beta, ignore_index, t2_scale)
