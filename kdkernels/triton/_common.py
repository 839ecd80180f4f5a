"""Host-side helpers shared by the Triton launchers of every op: the one launch helper (device guard),
the one tile-override mechanism, and the op-math / dot-precision policies.

Every kernel launch in kdkernels/triton goes through ``launch`` (python_tests/test_triton_launch_guard.py
checks it): Triton launches on the *current* CUDA device, so a launch for tensors on another GPU must
switch to theirs first, and tensors of one launch must all be on one device.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

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


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` on the device of its tensor arguments (all on one device)."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    if not tensors:
        raise ValueError(f"{getattr(kernel, '__name__', kernel)}: a launch needs at least one tensor argument")
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{getattr(kernel, '__name__', kernel)}: tensors on {device} and {t.device} in one launch")
    with device_guard(tensors[0]):
        if tensors[0].is_cuda:
            kernel[grid](*args, **meta)
        else:  # the interpreter computes with numpy, which warns where a GPU silently gives inf / NaN
            import numpy

            with numpy.errstate(all="ignore"):
                kernel[grid](*args, **meta)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` that follows torch's own float32 matmul policy, so a fused
    kernel is as exact as the eager reference: IEEE float32 unless TF32 matmuls are allowed."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"  # ignored by tl.dot for 16-bit and float64 inputs


# ---- tile overrides -------------------------------------------------------------------------------
# Each family's launchers read their tile configuration through ``tiles(family, default)``. Tests
# shrink tiles with ``override_tiles`` to exercise the multi-tile / multi-chunk paths on small
# inputs (and benchmarks could try other sizes) without touching module globals.
_TILE_OVERRIDES: dict[str, Any] = {}


def tiles(family: str, default: Any) -> Any:
    """The tile configuration of ``family``: the active override, else ``default``."""
    return _TILE_OVERRIDES.get(family, default)


@contextlib.contextmanager
def override_tiles(family: str, value: Any) -> Iterator[None]:
    """Within the block, ``tiles(family, ...)`` returns ``value``. The family's keys:

    * ``"response"``: the largest BLOCK_V (int) for 2- and 4-byte inputs (float64 uses half);
    * ``"feature"``: {element size: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps)};
    * ``"attention_transfer"``: (elements per channel x position tile, largest BLOCK_S, largest
      BLOCK_R of the per-sample sweep, num_warps);
    * ``"relation"``: (BLOCK rows, BLOCK_D, ANGLE_BLOCK);
    * ``"fsp"``: (largest BLOCK of (C1, C2) entries per program, num_warps).
    """
    previous = _TILE_OVERRIDES.get(family, _MISSING)
    _TILE_OVERRIDES[family] = value
    try:
        yield
    finally:
        if previous is _MISSING:
            del _TILE_OVERRIDES[family]
        else:
            _TILE_OVERRIDES[family] = previous


_MISSING = object()
