"""In-place row scaling: the backward of the one-pass ops (softmax_kl_step, ...).

A one-pass op computes its gradients in the forward for an upstream gradient of 1 and saves them;
its backward only multiplies row r of each saved gradient by the upstream factor (one factor for a
summed loss, one per row for per-row losses). The factor is read on the device (no host sync) and a
program whose factor is exactly 1 returns without touching the row: with a loss that is the last
op of the graph (``loss.backward()``), the backward reads and writes nothing.

grid = (R, cdiv(V, BLOCK)): one program per block of a row, so that a few rows of a large
vocabulary still fill the GPU. int64 offsets; the product in the op-math dtype (float32, float64 for
float64 gradients), stored in the gradient's dtype.
"""
import triton
import triton.language as tl
from torch import Tensor

from kdkernels.triton._common import launch, tl_opmath

BLOCK = 4096  # elements per program: 16 per thread at 8 warps


@triton.jit
def _scale_rows_kernel(grad_ptr, factor_ptr, factor_stride, V, DT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    f = tl.load(factor_ptr + row * factor_stride).to(DT)
    if f == 1.0:  # the usual case (loss.backward() on this loss): nothing to read or write
        return
    offs = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    ptrs = grad_ptr + row * V + offs
    x = tl.load(ptrs, mask=mask).to(DT)
    tl.store(ptrs, (x * f).to(grad_ptr.dtype.element_ty), mask=mask)


def scale_rows_(grad: Tensor, factor: Tensor) -> None:
    """``grad[r] *= factor`` (0-d factor) or ``grad[r] *= factor[r]`` ((R,) factor), in place.

    grad: (R, V) contiguous, any floating dtype; an empty (0,) tensor (a gradient that was not
    requested) is skipped. factor: 0-d or (R,), the op-math dtype of grad.
    """
    if grad.numel() == 0:
        return
    if grad.dim() != 2 or not grad.is_contiguous():
        raise ValueError(f"scale_rows_: grad must be a contiguous (rows, cols) tensor, got shape "
                         f"{tuple(grad.shape)} with strides {grad.stride()}")
    rows, cols = grad.shape
    if factor.dim() == 0:
        factor_stride = 0
    elif factor.dim() == 1 and factor.shape[0] == rows:
        factor_stride = factor.stride(0)
    else:
        raise ValueError(f"scale_rows_: factor must be 0-d or ({rows},), got shape {tuple(factor.shape)}")
    block = triton.next_power_of_2(min(cols, BLOCK))
    launch(_scale_rows_kernel, (rows, triton.cdiv(cols, block)), grad, factor, factor_stride, cols,
           DT=tl_opmath(grad.dtype), BLOCK_V=block, num_warps=max(1, min(8, block // 512)))

