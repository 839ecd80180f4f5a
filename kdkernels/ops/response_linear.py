"""Fused linear + softmax-KL ops (docs/design.md §2.1, issue 12): the LM head and the loss in chunks.

Two ops, one chunk loop (csrc/include/kdkernels/fused_linear.h; Triton: kdkernels/triton/response/
_linear_chunks.py), because the two kinds of reduction differentiate differently:

* ``fused_linear_softmax_kl`` (scalar reductions): the forward computes the loss and, chunk by chunk,
  the gradients of the hidden states, the weight and the bias for an upstream of 1 (the reduction's
  factor ``scale`` folded in); the backward only scales them in place, as the one-pass step.
* ``fused_linear_softmax_kl_rows`` (reduction "none"): the upstream gradient differs per row, and
  the weight gradient sum_r g_r G_r^T h_r cannot be rescaled afterwards, so the forward returns the
  per-row losses only and the backward runs the chunks again with each row's gradient scaled by g_r.
"""
from __future__ import annotations

import torch

from kdkernels._dtypes import opmath_dtype
from kdkernels.ops._spec import OpDef, register
from kdkernels.ops import _one_pass as one_pass

_INPUTS = ("Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_logits, Tensor? teacher_hidden, "
           "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? labels")
_OPTIONS = "float temperature, int divergence, float beta, int ignore_index, bool t2_scale, int chunk_size"
_GRADS = "bool hidden_grad, bool weight_grad, bool bias_grad"
N_TENSORS, N_OPTIONS = 8, 6


def auto_chunk_rows(rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk when the user gives none: an eighth of the rows (the (chunk, V) buffers then
    hold ~1/4 of the logits' size, a few % of an eager step's temporaries), a power of two, but at
    least 256 rows: thinner GEMMs waste the BLAS (measured on 2 CPU cores at H = 1024, V = 32000: 512
    rows in chunks of 64 took 1.55 s, of 256 1.1 s, of 512 1.0 s; 4096 rows in chunks of 128 9.5 s,
    of 512 7.9 s). At most ``rows``; ``vocab`` and ``hidden`` do not change it today."""
    chunk = 256
    while chunk * 2 <= rows // 8:
        chunk *= 2
    return max(1, min(chunk, rows))


def _grads_fake(hidden, weight, bias, hidden_grad, weight_grad, bias_grad):
    empty = hidden.new_empty((0,))
    return (torch.empty_like(hidden) if hidden_grad else empty, torch.empty_like(weight) if weight_grad else empty,
            torch.empty_like(bias) if bias_grad and bias is not None else empty)


def _check_fake(hidden, weight):
    torch._check(hidden.dim() == 2, lambda: "hidden must be 2-D (rows, hidden)")
    torch._check(weight.dim() == 2 and weight.shape[1] == hidden.shape[1], lambda: "weight must be (vocab, hidden)")


def _forward_fake(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels, scale,
                  temperature, divergence, beta, ignore_index, t2_scale, chunk_size, hidden_grad, weight_grad,
                  bias_grad):
    _check_fake(hidden, weight)
    loss = hidden.new_empty((), dtype=opmath_dtype(hidden.dtype))
    return (loss,) + _grads_fake(hidden, weight, bias, hidden_grad, weight_grad, bias_grad)


FUSED_LINEAR_SOFTMAX_KL = register(OpDef(
    name="fused_linear_softmax_kl",
    forward_schema=f"({_INPUTS}, Tensor scale, {_OPTIONS}, {_GRADS}) -> (Tensor, Tensor, Tensor, Tensor)",
    backward_schema="(Tensor grad_loss, Tensor(a!) grad_hidden, Tensor(b!) grad_weight, Tensor(c!) grad_bias) -> ()",
    forward_fake=_forward_fake,
    backward_fake=lambda grad_loss, grad_hidden, grad_weight, grad_bias: None,
    setup_context=one_pass.setup_context,
    backward=one_pass.backward,
    triton_module="kdkernels.triton.response.fused_linear_softmax_kl",
    doc="""Fused linear + softmax-KL for the scalar reductions: loss and gradients in one chunked pass.

    forward: hidden (R, H), weight (V, H), bias (V,) or None, contiguous, one dtype; the teacher as
    teacher_logits (R, V), or teacher_hidden (R, Ht) + teacher_weight (V, Ht) + teacher_bias (V,) or
    None (the other None); labels (R,) int64 or None; scale 0-d op-math, the reduction's factor
    (kdkernels.reduction.row_weight); temperature, divergence (DIVERGENCE_CODES), beta, ignore_index,
    t2_scale as softmax_kl; chunk_size >= 1 rows per chunk. Returns (loss, grad_hidden, grad_weight,
    grad_bias): loss = scale * sum_r l_r (0-d op-math) with l_r the softmax_kl row loss of
    z = hidden weight^T + bias against the teacher logits; the gradients of that loss (an upstream
    of 1) in the inputs' dtypes (the weight's and bias's accumulated over the chunks in op-math) where
    hidden_grad / weight_grad / bias_grad, an empty (0,) tensor otherwise. The teacher gets none.
    backward: grad_loss 0-d op-math; scales the three saved gradients in place (nothing where it is 1).""",
))


def _rows_forward_fake(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels,
                       temperature, divergence, beta, ignore_index, t2_scale, chunk_size):
    _check_fake(hidden, weight)
    return hidden.new_empty((hidden.shape[0],), dtype=opmath_dtype(hidden.dtype))


def _rows_backward_fake(grad_loss, hidden, weight, bias, *rest):
    hidden_grad, weight_grad, bias_grad = rest[-3:]
    return _grads_fake(hidden, weight, bias, hidden_grad, weight_grad, bias_grad)


def _rows_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:N_TENSORS])
    ctx.options = inputs[N_TENSORS:]


def _rows_backward(backward_op, ctx, grad_rows):
    tensors = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = backward_op(grad_rows.contiguous(), *tensors, *ctx.options, need[0], need[1],
                        need[2] and tensors[2] is not None)
    return tuple(g if n else None for g, n in zip(grads, need[:3])) + (None,) * (N_TENSORS - 3 + N_OPTIONS)


FUSED_LINEAR_SOFTMAX_KL_ROWS = register(OpDef(
    name="fused_linear_softmax_kl_rows",
    forward_schema=f"({_INPUTS}, {_OPTIONS}) -> Tensor",
    backward_schema=f"(Tensor grad_loss, {_INPUTS}, {_OPTIONS}, {_GRADS}) -> (Tensor, Tensor, Tensor)",
    forward_fake=_rows_forward_fake,
    backward_fake=_rows_backward_fake,
    setup_context=_rows_setup_context,
    backward=_rows_backward,
    triton_module="kdkernels.triton.response.fused_linear_softmax_kl_rows",
    doc="""Fused linear + softmax-KL for reduction "none": per-row losses, gradients recomputed.

    forward: the inputs and options of fused_linear_softmax_kl (no scale); returns the per-row losses
    l_r (R,) op-math. backward: grad_loss (R,) op-math; runs the chunks again, row r's logit gradient
    scaled by grad_loss[r], and returns (grad_hidden, grad_weight, grad_bias) as the forward of
    fused_linear_softmax_kl does (an empty (0,) tensor where not requested).""",
))
