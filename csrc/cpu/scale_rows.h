// The backward of the CPU one-pass ops (softmax_kl_step, ...): their forward already computed the
// gradient for an upstream gradient of 1, so the backward scales it in place by the upstream, row
// by row, and leaves a row alone where its factor is exactly 1 (the usual `loss.backward()`: then
// the backward reads and writes nothing).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>

namespace kdkernels {
namespace cpu {

// grad: (R, V) contiguous, any floating dtype, or empty (skipped); factor: 0-d (every row) or (R,),
// in grad's op-math dtype.
inline void scale_rows_(at::Tensor& grad, const at::Tensor& factor) {
  if (grad.numel() == 0) return;
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "scale_rows_: grad must be a contiguous (R, V) tensor, got ",
              grad.sizes());
  const int64_t R = grad.size(0), V = grad.size(1);
  TORCH_CHECK(factor.dim() == 0 || (factor.dim() == 1 && factor.size(0) == R),
              "scale_rows_: the upstream gradient must be 0-d or (", R, ",), got ", factor.sizes());
  TORCH_CHECK(factor.device().is_cpu() && grad.device().is_cpu(), "scale_rows_ (CPU): tensors must be on the CPU");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_", [&] {
    using T = at::opmath_type<scalar_t>;
    TORCH_CHECK(factor.scalar_type() == c10::CppTypeToScalarType<T>::value, "scale_rows_: the upstream gradient must be ",
                c10::CppTypeToScalarType<T>::value, ", got ", factor.scalar_type());
    const T* f = factor.const_data_ptr<T>();
    const int64_t f_stride = factor.dim() == 0 ? 0 : factor.stride(0);
    if (f_stride == 0 && f[0] == T(1)) return;  // loss.backward(): not even a parallel region to start
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R, std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1)),
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; ++r) {
                         const T s = f[r * f_stride];
                         if (s == T(1)) continue;
                         scalar_t* row = g + r * V;
                         for (int64_t i = 0; i < V; ++i) row[i] = static_cast<scalar_t>(static_cast<T>(row[i]) * s);
                       }
                     });
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

}  // namespace cpu
}  // namespace kdkernels
