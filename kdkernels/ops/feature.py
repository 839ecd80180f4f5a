"""Feature family ops: projected MSE (DESIGN §2.2).

Two variants with one schema (see csrc/ops.cpp for the argument meanings):
  torch.ops.kdkernels.projected_mse_forward / _backward                 C++ CPU and CUDA kernels
  torch.ops.kdkernels.projected_mse_forward_triton / _backward_triton   Triton kernels
The forward returns (loss (), residual (B, P, Dt)); the backward needs only the residual (in the
input dtype), x (for grad_weight) and the weight (for grad_x): the projection y is never saved.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdkernels import _native
from kdkernels._dtypes import opmath_dtype
from kdkernels._feature import REDUCTION_CODES, empty_in_layout, feature_major
from kdkernels.ops._registration import register_fake_and_autograd

__all__ = ["REDUCTION_CODES", "projected_mse_forward"]


def _forward_fake(x, t, weight, bias, reduction):
    torch._check(x.dim() == 3 and t.dim() == 3, lambda: "x and t must be 3-D (B, P, D)")
    torch._check(x.shape[:2] == t.shape[:2], lambda: "x and t must share (B, P)")
    torch._check(weight.shape == (t.shape[2], x.shape[2]), lambda: "weight must be (Dt, Ds)")
    B, P, Dt = t.shape
    residual = empty_in_layout(B, P, Dt, feature_major(P, Dt, t.stride(1)), t)
    return x.new_empty((), dtype=opmath_dtype(x.dtype)), residual


def _backward_fake(grad_loss, x, weight, residual, reduction, x_grad, t_grad, weight_grad, bias_grad):
    B, P, Dt = residual.shape
    Ds = weight.shape[1] if x_grad else (x.shape[2] if weight_grad else 0)
    fmajor = feature_major(P, Dt, residual.stride(1))
    return (
        empty_in_layout(B, P, Ds, fmajor, residual) if x_grad else residual.new_empty((0,)),
        empty_in_layout(B, P, Dt, fmajor, residual) if t_grad else residual.new_empty((0,)),
        residual.new_empty((Dt, Ds)) if weight_grad else residual.new_empty((0,)),
        residual.new_empty((Dt,)) if bias_grad else residual.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    x, t, weight, bias, reduction = inputs
    need_x, _, need_w = ctx.needs_input_grad[:3]
    # x only serves grad_weight and the weight only grad_x; the residual serves every gradient
    ctx.save_for_backward(x if need_w else None, weight if need_x else None, output[1])
    ctx.reduction = reduction
    # The residual is an output only to be saved: without these, autograd hands the backward a
    # materialised (B, P, Dt) zero gradient for it, as large as the residual itself.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _autograd_backward(backward_op):
    def backward(ctx, grad_loss, _grad_residual):
        x, weight, residual = ctx.saved_tensors
        need_x, need_t, need_w, need_b = ctx.needs_input_grad[:4]
        if grad_loss is None:  # the loss took no part in what is being differentiated
            return (None,) * 5
        empty = residual.new_empty((0,))
        grad_x, grad_t, grad_w, grad_b = backward_op(
            grad_loss, empty if x is None else x, empty if weight is None else weight, residual, ctx.reduction,
            need_x, need_t, need_w, need_b)
        return (grad_x if need_x else None, grad_t if need_t else None, grad_w if need_w else None,
                grad_b if need_b else None, None)

    return backward


# ---- C++ (CPU / CUDA) variant: schemas and kernels come from kdkernels._C / _C_cuda -----------
if _native.cpu_loaded:
    register_fake_and_autograd(
        "kdkernels::projected_mse_forward", _forward_fake,
        "kdkernels::projected_mse_backward", _backward_fake,
        _setup_context, _autograd_backward(torch.ops.kdkernels.projected_mse_backward.default),
    )

# ---- Triton variant ---------------------------------------------------------------------------
if _native.triton_installed:

    @torch.library.custom_op("kdkernels::projected_mse_forward_triton", mutates_args=())
    def projected_mse_forward_triton(x: Tensor, t: Tensor, weight: Tensor, bias: Optional[Tensor],
                                     reduction: int) -> tuple[Tensor, Tensor]:
        from kdkernels.triton import feature as kernels  # lazy: TRITON_INTERPRET is read at import

        return kernels.projected_mse_forward(x, t, weight, bias, reduction)

    @torch.library.custom_op("kdkernels::projected_mse_backward_triton", mutates_args=())
    def projected_mse_backward_triton(grad_loss: Tensor, x: Tensor, weight: Tensor, residual: Tensor,
                                      reduction: int, x_grad: bool, t_grad: bool, weight_grad: bool,
                                      bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from kdkernels.triton import feature as kernels

        return kernels.projected_mse_backward(grad_loss, x, weight, residual, reduction, x_grad, t_grad,
                                              weight_grad, bias_grad)

    register_fake_and_autograd(
        "kdkernels::projected_mse_forward_triton", _forward_fake,
        "kdkernels::projected_mse_backward_triton", _backward_fake,
        _setup_context, _autograd_backward(projected_mse_backward_triton),
    )


def projected_mse_forward(backend: str, x: Tensor, t: Tensor, weight: Tensor, bias: Optional[Tensor],
                          reduction: int) -> tuple[Tensor, Tensor]:
    """Run the fused forward on ``backend`` ("cpu", "cuda" or "triton"): (loss (), residual (B, P, Dt))."""
    if backend == "triton":
        op = torch.ops.kdkernels.projected_mse_forward_triton
    else:
        op = torch.ops.kdkernels.projected_mse_forward
    return op(x, t, weight, bias, reduction)
