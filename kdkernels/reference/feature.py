"""Reference projected MSE (docs/design.md §2.2): a FitNets-style hint through a linear / 1x1-conv regressor."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kdkernels._dtypes import opmath_dtype
from kdkernels.reduction import reduce_squared_error


def projected_mse(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    feature_dim: int = -1,
    reduction: str = "mean",
) -> torch.Tensor:
    """``reduce((x W^T + b - t)^2)``, the projection applied along ``feature_dim``.

    Shapes (the feature axis is ``feature_dim``; ``...`` are all the other dims, in order):
      student ``x``: (..., Ds, ...)   teacher ``t``: (..., Dt, ...), same other dims as ``x``
      weight  ``W``: (Dt, Ds)         bias ``b``: (Dt,) or None
      returns: () — a 0-d tensor; for "none" the teacher's shape without ``feature_dim`` (...).
    With ``feature_dim=1`` and an (N, Ds, H, W) map this is a 1x1 convolution per pixel.

    Reductions: "mean" — mean over every element of ``(y - t)^2`` (= ``F.mse_loss``, except that an
    empty input gives 0, not NaN); "sum"; "batchmean" — the sum divided by the number of feature
    vectors ``rows = t.numel() / Dt`` (every dim except ``feature_dim``), clamped to at least 1 like
    the softmax-KL "batchmean"; "none" — one loss per feature vector, ``sum_d (y - t)_d^2`` (not
    elementwise as ``F.mse_loss(reduction="none")``; like the softmax-KL "none", per row). An empty
    input gives 0 with every reduction, as for every loss ("none": zeros, one per feature vector, so
    an empty tensor when there are none).

    Op-math (and the loss dtype) is float64 if any of ``x``, ``t``, ``W``, ``b`` is float64, else
    float32 (bf16 / fp16 inputs are upcast). Gradients reach ``x``, ``W``, ``b`` and ``t`` (when
    they require grad) through autograd, each in its own dtype. No validation here.
    """
    tensors = [student, teacher, weight] + ([] if bias is None else [bias])
    dt = opmath_dtype(functools.reduce(torch.promote_types, [a.dtype for a in tensors]))
    x = student.to(dt).movedim(feature_dim, -1)  # (..., Ds)
    t = teacher.to(dt).movedim(feature_dim, -1)  # (..., Dt)
    y = F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))  # (..., Dt)
    rows = t.numel() // t.shape[-1] if t.shape[-1] else 0
    return reduce_squared_error((y - t).square(), reduction, rows)
