"""Projected-MSE conventions shared by the functional layer, the op registrations (fake kernels) and
the Triton launchers. The C++ kernels use the same rules from csrc/include/kdkernels/feature.h.

* The ops see the student as x (B, P, Ds) and the teacher as t (B, P, Dt): B * P feature vectors.
  ``rows_3d`` builds these as views of the user's tensors, whatever ``feature_dim`` is.
* Residual / grad_x / grad_t layout: a (B, P, D) tensor is "feature-major" when its P axis has
  stride 1 (an NCHW map); results for a feature-major teacher are transposes of contiguous
  (B, D, P) tensors, so they keep its memory layout, and are contiguous (B, P, D) otherwise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def feature_major(positions: int, features: int, position_stride: int) -> bool:
    return positions > 1 and features > 1 and position_stride == 1


def empty_in_layout(batch: int, positions: int, features: int, fmajor: bool, like: Tensor,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    opts = dict(dtype=like.dtype if dtype is None else dtype, device=like.device)
    if fmajor:
        return torch.empty((batch, features, positions), **opts).transpose(1, 2)
    return torch.empty((batch, positions, features), **opts)


def _flattens(t: Tensor, begin: int, end: int) -> bool:
    """Whether dims [begin, end) of ``t`` flatten into one without a copy."""
    dims = [(size, stride) for size, stride in zip(t.shape[begin:end], t.stride()[begin:end]) if size != 1]
    return all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))


def rows_3d(student: Tensor, teacher: Tensor, feature_dim: int) -> tuple[Tensor, Tensor]:
    """(x (B, P, Ds), t (B, P, Dt)) for features at ``feature_dim`` (already validated).

    The other dims, in order, are split into a B group and a P group that both flatten without a
    copy in both tensors. Preferred: everything in P (B = 1; features last, channels-last maps), then
    the dims before ``feature_dim`` in B and those after it in P (an NCHW map with feature_dim=1
    becomes an (N, H*W, C) view with stride 1 along P), then any other split (sliced inputs). Only
    when no split works is the input copied, once, by ``reshape``. P = 1 with B > 1 is avoided: the
    kernels work on runs of positions.
    """
    fd = feature_dim % student.dim()
    xm, tm = student.movedim(fd, -1), teacher.movedim(fd, -1)
    n = xm.dim() - 1  # dims besides the features
    splits = [k for k in dict.fromkeys([0, fd, *range(1, n)]) if k < n or n == 0]
    chosen = next((k for k in splits if all(_flattens(a, 0, k) and _flattens(a, k, n) for a in (xm, tm))),
                  None)
    if chosen is None:
        chosen = fd if fd < n else 0
    lead = math.prod(xm.shape[:chosen])
    positions = math.prod(xm.shape[chosen:n])
    return xm.reshape(lead, positions, xm.shape[-1]), tm.reshape(lead, positions, tm.shape[-1])
