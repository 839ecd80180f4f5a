"""Inputs of the feature losses: projected MSE (student features, teacher features, weight, bias or
None) and attention transfer (student and teacher feature maps)."""
from __future__ import annotations

import torch


def _features(source, shape: tuple, feature_dim: int, scale: float, requires_grad: bool, channels_last: bool,
              strided: bool) -> torch.Tensor:
    """Dense (contiguous or channels_last) features, or with ``strided`` every other feature of a
    tensor twice as wide (a layout the kernels must take without a copy)."""
    fd = feature_dim % len(shape)
    shape = list(shape)
    if strided:
        shape[fd] *= 2
    a = source.finish(source.normal(shape, scale), False, torch.channels_last if channels_last else None)
    if strided:
        a = a[(slice(None),) * fd + (slice(None, None, 2),)]
    return a.requires_grad_(requires_grad)


def projected_mse_inputs(source, student_shape: tuple, teacher_shape: tuple, feature_dim: int = -1, *,
                         scale: float = 1.0, bias: bool = True, bias_scale: float = 1.0,
                         student_requires_grad: bool = True, teacher_requires_grad: bool = False,
                         weight_requires_grad: bool = True, student_channels_last: bool = False,
                         teacher_channels_last: bool = False,
                         strided: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Student and teacher features (``scale`` times standard normal; the feature dimension is
    ``feature_dim``), a ``(Dt, Ds)`` projection weight of unit fan-in scale, and a ``(Dt,)`` bias of
    ``bias_scale`` (requires grad) unless ``bias`` is False."""
    fd_s, fd_t = feature_dim % len(student_shape), feature_dim % len(teacher_shape)
    ds, dt = student_shape[fd_s], teacher_shape[fd_t]
    x = _features(source, student_shape, feature_dim, scale, student_requires_grad, student_channels_last, strided)
    t = _features(source, teacher_shape, feature_dim, scale, teacher_requires_grad, teacher_channels_last, strided)
    w = source.finish(source.fan_in_normal((dt, ds), ds), weight_requires_grad)
    b = source.finish(source.normal((dt,), bias_scale), True) if bias else None
    return x, t, w, b


def attention_transfer_inputs(source, student_shape: tuple, teacher_shape: tuple, *, scale: float = 1.0,
                              student_requires_grad: bool = True,
                              teacher_requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher feature maps (N, C, *spatial), ``scale`` times standard normal."""
    s = source.finish(source.normal(student_shape, scale), student_requires_grad)
    t = source.finish(source.normal(teacher_shape, scale), teacher_requires_grad)
    return s, t
