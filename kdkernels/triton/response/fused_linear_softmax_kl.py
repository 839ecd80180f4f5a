"""Triton launchers of the ``fused_linear_softmax_kl`` op (scalar reductions; kdkernels/ops/response_linear.py):
the chunk loop of ``_linear_chunks`` with the step's weight = the reduction's factor, and the backward's
in-place scaling of the three saved gradients.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
from __future__ import annotations

from torch import Tensor

from kdkernels._dtypes import opmath_dtype

from kdkernels.triton.response._linear_chunks import run_chunks
from kdkernels.triton.scale_rows import scale_rows_


def forward(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels, scale: Tensor,
            temperature, divergence, beta, ignore_index, t2_scale, chunk_size, hidden_grad, weight_grad, bias_grad):
    if scale.dim() != 0:
        raise ValueError(f"scale must be a 0-d tensor, got shape {tuple(scale.shape)}")
    rows, grad_h, grad_w, grad_b = run_chunks(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                                              teacher_bias, labels, scale, temperature, divergence, beta,
                                              ignore_index, t2_scale, chunk_size, hidden_grad, weight_grad, bias_grad)
    return rows.sum(), grad_h, grad_w, grad_b  # the step wrote scale * l_r


def backward(grad_loss: Tensor, grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor) -> None:
    for grad in (grad_hidden, grad_weight, grad_bias):
        if grad.numel():
            rows = grad.view(1, -1) if grad.dim() == 1 else grad
            scale_rows_(rows, grad_loss.to(opmath_dtype(rows.dtype)))
