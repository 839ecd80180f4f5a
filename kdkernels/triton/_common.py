"""Host-side helpers shared by the Triton launchers of every loss family."""
from __future__ import annotations

import contextlib

import torch
import triton.language as tl
from torch import Tensor

from kdkernels._dtypes import opmath_dtype


def tl_opmath(dtype: torch.dtype):
    """The Triton accumulation dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return tl.float64 if opmath_dtype(dtype) == torch.float64 else tl.float32


def device_guard(t: Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device); nothing to do for CPU tensors."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` that follows torch's own float32 matmul policy, so a fused
    kernel is as exact as the eager reference: IEEE float32 unless TF32 matmuls are allowed."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"  # ignored by tl.dot for 16-bit and float64 inputs
