"""Triton launchers of the ``fused_linear_softmax_kl_rows`` op (reduction "none";
kdkernels/ops/response_linear.py): per-row losses forward, the chunks recomputed backward with each
row's gradient scaled by its upstream value.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdkernels._dtypes import opmath_dtype
from kdkernels.triton.response._linear_chunks import run_chunks


def forward(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels, temperature,
            divergence, beta, ignore_index, t2_scale, chunk_size) -> Tensor:
    one = torch.ones((), dtype=opmath_dtype(hidden.dtype), device=hidden.device)
    return run_chunks(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels, one,
                      temperature, divergence, beta, ignore_index, t2_scale, chunk_size, False, False, False)[0]


def backward(grad_loss: Tensor, hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
             labels, temperature, divergence, beta, ignore_index, t2_scale, chunk_size, hidden_grad, weight_grad,
             bias_grad):
    if grad_loss.dim() != 1 or grad_loss.shape[0] != hidden.shape[0]:
        raise ValueError(f"grad_loss must be ({hidden.shape[0]},), got {tuple(grad_loss.shape)}")
    return run_chunks(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels,
                      grad_loss, temperature, divergence, beta, ignore_index, t2_scale, chunk_size, hidden_grad,
                      weight_grad, bias_grad)[1:]
