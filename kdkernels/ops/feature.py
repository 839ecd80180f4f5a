"""Feature family ops: projected MSE (docs/design.md §2.2)."""
from __future__ import annotations

import torch

from kdkernels._dtypes import opmath_dtype
from kdkernels._feature import empty_in_layout, feature_major
from kdkernels.ops import _one_pass as one_pass
from kdkernels.ops._spec import OpDef, register
from kdkernels.reduction import FEATURE_NONE


def _forward_fake(x, t, weight, bias, reduction):
    torch._check(x.dim() == 3 and t.dim() == 3, lambda: "x and t must be 3-D (B, P, D)")
    torch._check(x.shape[:2] == t.shape[:2], lambda: "x and t must share (B, P)")
    torch._check(weight.shape == (t.shape[2], x.shape[2]), lambda: "weight must be (Dt, Ds)")
    B, P, Dt = t.shape
    residual = empty_in_layout(B, P, Dt, feature_major(P, Dt, t.stride(1)), t)
    loss_shape = (B, P) if reduction == FEATURE_NONE else ()
    return x.new_empty(loss_shape, dtype=opmath_dtype(x.dtype)), residual


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


def _backward(backward_op, ctx, grad_loss, _grad_residual):
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


PROJECTED_MSE = register(OpDef(
    name="projected_mse",
    forward_schema="(Tensor x, Tensor t, Tensor weight, Tensor? bias, int reduction) -> (Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor x, Tensor weight, Tensor residual, int reduction, bool x_grad, "
                    "bool t_grad, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)",
    forward_fake=_forward_fake,
    backward_fake=_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
    triton_module="kdkernels.triton.feature.projected_mse",
    doc="""Projected MSE with the reduction fused.

    forward: x (B, P, Ds) student features, t (B, P, Dt) teacher features, same dtype, any strides:
    B * P feature vectors ("rows"); P > 1 only when the features were not the last dim (NCHW maps
    arrive as (N, H*W, C) views, no copy). weight (Dt, Ds); bias (Dt,) or None. reduction is
    kdkernels.reduction.FEATURES.code(name) (0 "mean", 1 "sum", 2 "batchmean", 3 "none"). Returns
    loss in the op-math dtype (() reduced, or (B, P) per-row sums of r^2 for "none") and
    residual = x W^T + b - t, (B, P, Dt) in the input dtype: all the backward needs besides x and W
    (y itself is never stored). The residual's layout follows t (kdkernels._feature.feature_major):
    contiguous (B, P, Dt), or for feature-major teachers (stride 1 along P) the transpose of a
    contiguous (B, Dt, P) tensor.
    backward: grad_loss in the op-math dtype, shaped like the loss (() or (B, P) for "none", where
    d loss / d r = 2 * grad_loss[b, p] * r per row). x is read only for grad_weight and weight only for grad_x
    (an empty tensor otherwise). Returns (grad_x, grad_t, grad_weight, grad_bias); grad_x and grad_t
    have the residual's layout; a gradient that is not requested is an empty (0,) tensor.""",
))


# ---- attention transfer: one-pass, like the softmax-KL step ----------------------------------
def _at_forward_fake(student, teacher, weight, p, squared, per_row, student_grad, teacher_grad):
    torch._check(student.dim() == 3 and teacher.dim() == 3, lambda: "student and teacher must be 3-D (N, C, S)")
    torch._check(student.shape[0] == teacher.shape[0] and student.shape[2] == teacher.shape[2],
                 lambda: "student and teacher must share N and S")
    loss = student.new_empty((student.shape[0],) if per_row else (), dtype=opmath_dtype(student.dtype))
    empty = student.new_empty((0,))
    return (loss, torch.empty_like(student, memory_format=torch.contiguous_format) if student_grad else empty,
            torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad else empty)


ATTENTION_TRANSFER = register(OpDef(
    name="attention_transfer",
    forward_schema="(Tensor student, Tensor teacher, Tensor weight, float p, bool squared, bool per_row, "
                   "bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor(a!) grad_student, Tensor(b!) grad_teacher) -> ()",
    forward_fake=_at_forward_fake,
    backward_fake=lambda grad_loss, grad_student, grad_teacher: None,
    setup_context=one_pass.setup_context,
    backward=one_pass.backward,
    triton_module="kdkernels.triton.feature.attention_transfer",
    doc="""One-pass attention transfer (Zagoruyko & Komodakis; kdkernels.reference.attention_transfer):
    the loss and its gradients from one read of each feature map.

    forward: student (N, Cs, S), teacher (N, Ct, S) contiguous, one floating dtype (S = the spatial
    positions flattened, >= 1; Cs, Ct >= 1; N >= 0); weight 0-d op-math, the reduction's factor
    (1 / (N S) "mean", 1 / N "batchmean", 1 "sum" / "none"); p >= 1; squared; per_row.
    Per sample n, in op-math (float32; float64 for float64 inputs):
      a[k] = (1/C) sum_c |F[n, c, k]|^p            (student a_s, teacher a_t: (S,))
      nrm = max(||a||_2, 1e-12), v = a / nrm, d = v_s - v_t
      l_n = sum_k d[k]^2 (squared) or ||d||_2 (not squared)
    Returns (loss, grad_student, grad_teacher): loss = weight * sum_n l_n (0-d), or weight * l_n (N,)
    when per_row; grad_student / grad_teacher = d loss / d F for an upstream gradient of 1 (of every
    sample when per_row), contiguous, in the input's dtype, when student_grad / teacher_grad (an
    empty (0,) tensor otherwise). The gradient, per sample:
      g_v = weight * 2 d (squared) or weight * d / ||d|| (0 where ||d|| = 0)  (teacher: -g_v)
      g_a = (g_v - v <v, g_v>) / nrm where ||a|| > 1e-12, else g_v / 1e-12 (the clamp passes nothing)
      dF[c, k] = g_a[k] * (p / C) * |F|^(p-1) * sign(F)   (0 where F = 0, also for p = 1)
    Nothing else is saved.
    backward: grad_loss 0-d (or (N,) when per_row) op-math; scales the saved gradients in place,
    sample n by grad_loss (or grad_loss[n]), as softmax_kl_step's backward (scale_rows_ on the
    (N, C * S) views; nothing where the factor is exactly 1). Empty (0,) gradients are skipped.""",
))
