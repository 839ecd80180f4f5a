"""The chunk loop of the fused linear + softmax-KL ops for the Triton backend (docs/design.md §2.1).

The same loop as the CPU / CUDA ops (csrc/include/kdkernels/fused_linear.h): per chunk of rows,
z = h W^T (+ b) into a reused (chunk, V) buffer (torch GEMM), the teacher's logits a view of the
given ones or one more GEMM into a second buffer, then the Triton one-pass softmax-KL step writes
the chunk's row losses and its logit gradient G into a third; grad_h[chunk] = G W, grad_W += G^T h
(op-math accumulator), grad_b += sum_rows G. The (rows x V) logits never exist.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdkernels._dtypes import opmath_dtype
from kdkernels.triton.response._rows import check_divergence
from kdkernels.triton.response.softmax_kl_step import step_into
from kdkernels.triton.scale_rows import scale_rows_


def _linear_into(out: Tensor, x: Tensor, w: Tensor, b) -> None:
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)


def check_inputs(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels,
                 chunk_size) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"hidden must be (rows, hidden) and weight (vocab, hidden), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if (teacher_logits is None) == (teacher_hidden is None) or (teacher_hidden is not None and teacher_weight is None):
        raise ValueError("give either teacher_logits or teacher_hidden with teacher_weight")
    for name, t in (("weight", weight), ("bias", bias), ("teacher_logits", teacher_logits),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise TypeError(f"{name} must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), got "
                            f"{t.dtype}, {t.device}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def run_chunks(hidden: Tensor, weight: Tensor, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
               labels, scale: Tensor, temperature: float, divergence: int, beta: float, ignore_index: int,
               t2_scale: bool, chunk_size: int, hidden_grad: bool, weight_grad: bool, bias_grad: bool):
    """(row losses (R,) op-math, grad_hidden, grad_weight, grad_bias). scale 0-d: the step's weight
    (the rows come back weighted by it); scale (R,): each row's gradient scaled by it (weight 1)."""
    check_inputs(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels,
                 chunk_size)
    divergence = check_divergence(divergence)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    rows, hid = hidden.shape
    vocab = weight.shape[0]
    op_dt = opmath_dtype(hidden.dtype)
    bias_grad = bias_grad and bias is not None
    need = hidden_grad or weight_grad or bias_grad
    per_row_scale = scale.dim() == 1
    step_weight = torch.ones((), dtype=op_dt, device=hidden.device) if per_row_scale else scale.to(op_dt)
    row_scale = scale.to(op_dt).contiguous() if per_row_scale else None
    empty = hidden.new_empty((0,))
    row_loss = torch.empty((rows,), dtype=op_dt, device=hidden.device)
    grad_h = torch.empty_like(hidden) if hidden_grad else empty
    grad_w = torch.zeros((vocab, hid), dtype=op_dt, device=hidden.device) if weight_grad else empty
    grad_b = torch.zeros((vocab,), dtype=op_dt, device=hidden.device) if bias_grad else empty
    chunk = min(chunk_size, max(rows, 1))
    if rows > 0:
        z_buf = hidden.new_empty((chunk, vocab))
        g_buf = hidden.new_empty((chunk, vocab)) if need else None
        t_buf = hidden.new_empty((chunk, vocab)) if teacher_logits is None else None
        w_part = hidden.new_empty((vocab, hid)) if weight_grad and op_dt != weight.dtype else None
        if teacher_logits is not None:
            teacher_logits = teacher_logits.contiguous()
        flat_labels = None if labels is None else labels.contiguous()
        for r0 in range(0, rows, chunk):
            n = min(chunk, rows - r0)
            h_c = hidden[r0:r0 + n]
            z = z_buf[:n]
            _linear_into(z, h_c, weight, bias)
            if teacher_logits is not None:
                t = teacher_logits[r0:r0 + n]
            else:
                t = t_buf[:n]
                _linear_into(t, teacher_hidden[r0:r0 + n].contiguous(), teacher_weight, teacher_bias)
            g = g_buf[:n] if need else None
            step_into(z, t, None if flat_labels is None else flat_labels[r0:r0 + n], step_weight, temperature,
                      divergence, beta, ignore_index, t2_scale, row_loss[r0:r0 + n], g, None)
            if not need:
                continue
            if per_row_scale:
                scale_rows_(g, row_scale[r0:r0 + n])
            if hidden_grad:
                torch.mm(g, weight, out=grad_h[r0:r0 + n])
            if weight_grad:
                if w_part is not None:
                    torch.mm(g.t(), h_c, out=w_part)
                    grad_w.add_(w_part)
                else:
                    grad_w.addmm_(g.t(), h_c)
            if bias_grad:
                grad_b.add_(g.sum(0, dtype=op_dt))
    if weight_grad and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    if bias_grad and grad_b.dtype != bias.dtype:
        grad_b = grad_b.to(bias.dtype)
    return row_loss, grad_h, grad_w, grad_b
