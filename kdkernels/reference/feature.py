"""Reference feature losses (docs/design.md §2.2): projected MSE (a FitNets-style hint through a linear /
1x1-conv regressor) and attention transfer."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kdkernels._dtypes import opmath_dtype
from kdkernels.reduction import per_sample_factor, reduce_squared_error


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


EPS = 1e-12


def attention_map(feature_map: torch.Tensor, p: float) -> torch.Tensor:
    """(N, C, *spatial) -> (N, S) attention: ``mean_c |F_c|^p`` flattened, L2-normalised per sample
    (``x / max(||x||_2, 1e-12)``, as F.normalize; an all-zero map gives 0). Op-math dtype. The
    gradient of |x| at 0 is 0 (also for p = 1)."""
    a = feature_map.to(opmath_dtype(feature_map.dtype)).abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, p=2.0, dim=1, eps=EPS)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0, squared: bool = True,
                       reduction: str = "mean") -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) between (N, Cs, *spatial) and
    (N, Ct, *spatial) feature maps: l_n = sum_k (v_s - v_t)_k^2 (``squared``, the authors' code) or
    ||v_s - v_t||_2 (the paper's Eq. 2; gradient 0 where it is 0), v = ``attention_map(F, p)``.

    Reductions (kdkernels.reduction.per_sample_factor): "mean" sum / (N S) (the authors'
    ``(at(s) - at(t)).pow(2).mean()``), "sum", "batchmean" sum / N, "none" (N,). Both sides are
    differentiable (the teacher gets a gradient when it requires one)."""
    d = attention_map(student, p) - attention_map(teacher, p)
    sq = d.square().sum(dim=1)
    if squared:
        rows = sq
    else:
        nonzero = sq > 0
        rows = torch.where(nonzero, torch.where(nonzero, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    if reduction == "none":
        return rows
    return rows.sum() * per_sample_factor(reduction, d.shape[0], d.shape[1])
