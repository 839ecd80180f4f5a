// In-place per-row scaling of saved gradients, the backward of the one-pass ops (softmax_kl_step and
// the one-pass ops that follow it): grad[r, :] *= factor[r], or by the one factor of a 0-d factor.
// A row whose factor is exactly 1 (the upstream gradient of an unscaled loss) is not touched, so that
// backward costs a factor load per row; the factor is read on the device (no host sync).
// CPU twin: csrc/cpu/scale_rows.h.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "kdkernels/op_args.h"
#include "row_layout.cuh"

namespace kdkernels {
namespace cuda {
namespace scale_rows_detail {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;         // vectors in flight per thread and step
constexpr int64_t kMaxBlocks = 4096;  // rows and columns are grid-strided: a few waves on any GPU
// Column blocks per row at most: keeps kUnroll * (column stride) < 2^20, the index headroom that
// kMaxRowLength leaves for RowLayout's 32-bit offsets.
constexpr int64_t kMaxColumnBlocks = 1024;

// Threads `group` per row (a power of two, 32..kThreads, kThreads / group rows per block) and
// gridDim.x column blocks splitting each row; rows are strided over gridDim.y.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) scale_rows_kernel(scalar_t* grad, const at::opmath_type<scalar_t>* factor,
                                                              int64_t factor_stride, int64_t R, int64_t V, int group) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = AlignedVec<scalar_t, VecTraits<scalar_t>::kWidth>;
  constexpr int W = VecTraits<scalar_t>::kWidth;
  if (factor_stride == 0 && factor[0] == opmath_t(1)) return;  // one factor, and it is 1
  const int G = group;
  const int rows_per_block = kThreads / G;
  const int t = static_cast<int>(threadIdx.x) % G;
  const int col0 = static_cast<int>(blockIdx.x) * G + t;
  const int col_step = static_cast<int>(gridDim.x) * G;
  const int64_t row_step = static_cast<int64_t>(gridDim.y) * rows_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * rows_per_block + threadIdx.x / G; row < R; row += row_step) {
    const opmath_t f = factor[row * factor_stride];
    if (f == opmath_t(1)) continue;
    scalar_t* g = grad + row * V;
    const RowLayout L = RowLayout::make(g, V, true);  // one tensor: its own layout always fits
    Vec* gv = reinterpret_cast<Vec*>(g + L.head);
    for (int base = col0; base < L.nvec; base += kUnroll * col_step) {
      Vec v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * col_step < L.nvec) v[u] = gv[base + u * col_step];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * col_step < L.nvec) {
#pragma unroll
          for (int j = 0; j < W; ++j) v[u].v[j] = static_cast<scalar_t>(static_cast<opmath_t>(v[u].v[j]) * f);
          gv[base + u * col_step] = v[u];
        }
      }
    }
    for (int si = col0; si < L.nscalar; si += col_step) {
      const int idx = L.scalar_index(si);
      g[idx] = static_cast<scalar_t>(static_cast<opmath_t>(g[idx]) * f);
    }
  }
}

}  // namespace scale_rows_detail

// grad (R, V) contiguous CUDA, any floating dtype of the ops; factor 0-d or (R,) on grad's device, in
// grad's op-math dtype (converted otherwise). An empty grad (an ungiven gradient) is skipped.
inline void scale_rows_(at::Tensor& grad, const at::Tensor& factor_in) {
  using namespace scale_rows_detail;
  if (grad.numel() == 0) return;
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.is_contiguous(), "scale_rows_: grad must be a contiguous (R, V) tensor, got ",
                    grad.sizes());
  TORCH_CHECK_VALUE(grad.is_cuda(), "scale_rows_ (CUDA): grad must be a CUDA tensor, got ", grad.device());
  const int64_t R = grad.size(0), V = grad.size(1);
  TORCH_CHECK_VALUE(V <= kMaxRowLength, "scale_rows_ (CUDA): rows must have at most ", kMaxRowLength,
                    " elements, got ", V);
  TORCH_CHECK_VALUE(factor_in.dim() == 0 || (factor_in.dim() == 1 && factor_in.size(0) == R),
                    "scale_rows_: factor must be 0-d or (", R, ",), got ", factor_in.sizes());
  TORCH_CHECK_VALUE(factor_in.device() == grad.device(), "scale_rows_: factor must be on ", grad.device(), ", got ",
                    factor_in.device());
  c10::cuda::CUDAGuard guard(grad.device());
  const at::ScalarType opmath_dtype = opmath_scalar_type(grad.scalar_type());
  const at::Tensor factor = factor_in.scalar_type() == opmath_dtype ? factor_in : factor_in.to(opmath_dtype);
  const int64_t factor_stride = factor.dim() == 0 ? 0 : factor.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int64_t W = VecTraits<scalar_t>::kWidth;
    const int64_t nvec = (V + W - 1) / W;
    // about kUnroll vectors per thread per row split: a warp for short rows, up to the whole block
    int group = 32;
    while (group < kThreads && group * kUnroll < nvec) group *= 2;
    const int64_t cols = std::clamp<int64_t>(nvec / (int64_t{group} * kUnroll * 4), 1, kMaxColumnBlocks);
    const int64_t rows_per_block = kThreads / group;
    const int64_t row_blocks = std::clamp<int64_t>((R + rows_per_block - 1) / rows_per_block, 1,
                                                   std::min<int64_t>(65535, std::max<int64_t>(1, kMaxBlocks / cols)));
    const dim3 grid(static_cast<unsigned>(cols), static_cast<unsigned>(row_blocks));
    scale_rows_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), factor.const_data_ptr<opmath_t>(), factor_stride, R, V, group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The saved (N, C, S) gradients of a per-sample one-pass op (attention transfer, FSP) scaled per
// sample: scale_rows_ on their (N, C * S) views; an empty (0,) gradient (not requested) is skipped.
inline void scale_samples_(at::Tensor& grad, const at::Tensor& factor) {
  if (grad.numel() == 0) return;
  const std::array<int64_t, 2> shape{grad.size(0), grad.numel() / grad.size(0)};
  at::Tensor rows = grad.view(shape);
  scale_rows_(rows, factor);
}

}  // namespace cuda
}  // namespace kdkernels
