"""Reference fused linear + softmax-KL (issue 12; docs/design.md §2.1): the LM head and the loss.

The spec is the composition a user writes: student logits = F.linear(student_hidden,
student_weight, student_bias), teacher logits given or F.linear(teacher_hidden, teacher_weight,
teacher_bias), then ``softmax_kl_div``. Everything in the op-math dtype (float32 for 16-bit
inputs, float64 for float64). The teacher side is a constant: computed under no_grad, it gets no
gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels._dtypes import opmath_dtype
from kdkernels.reference.response import softmax_kl_div


def _linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor:
    return F.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt))


def fused_linear_softmax_kl_div(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                student_bias: torch.Tensor | None = None, teacher_logits: torch.Tensor | None = None,
                                teacher_hidden: torch.Tensor | None = None, teacher_weight: torch.Tensor | None = None,
                                teacher_bias: torch.Tensor | None = None, temperature: float = 1.0,
                                divergence: str = "forward", beta: float = 0.5, reduction: str = "batchmean",
                                labels: torch.Tensor | None = None, ignore_index: int = -100,
                                t2_scale: bool = True) -> torch.Tensor:
    """``softmax_kl_div(F.linear(student_hidden, student_weight, student_bias), teacher logits, ...)``
    with the teacher logits given, or ``F.linear(teacher_hidden, teacher_weight, teacher_bias)``."""
    dt = opmath_dtype(student_hidden.dtype)
    student_logits = _linear(student_hidden, student_weight, student_bias, dt)
    with torch.no_grad():
        if teacher_logits is None:
            teacher_logits = _linear(teacher_hidden, teacher_weight, teacher_bias, dt)
        teacher_logits = teacher_logits.detach().to(dt)
    return softmax_kl_div(student_logits, teacher_logits, temperature, divergence, beta, reduction, labels,
                          ignore_index, t2_scale)
