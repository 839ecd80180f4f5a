// In-place per-row scaling of saved gradients, the backward of the one-pass ops (CPU twin of
// csrc/cuda/scale_rows.cuh): grad[r, :] *= factor[r], or by the one factor of a 0-d factor. A row
// whose factor is exactly 1 (the upstream gradient of an unscaled loss) is not touched.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "kdkernels/op_args.h"

namespace kdkernels {
namespace cpu {

// grad (R, V) contiguous CPU, fp32 / fp64 / fp16 / bf16; factor 0-d or (R,) CPU, in grad's op-math
// dtype (converted otherwise). An empty grad (an ungiven gradient) is skipped.
inline void scale_rows_(at::Tensor& grad, const at::Tensor& factor_in) {
  if (grad.numel() == 0) return;
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.is_contiguous(), "scale_rows_: grad must be a contiguous (R, V) tensor, got ",
                    grad.sizes());
  TORCH_CHECK_VALUE(grad.device().is_cpu(), "scale_rows_ (CPU): grad must be a CPU tensor, got ", grad.device());
  const int64_t R = grad.size(0), V = grad.size(1);
  TORCH_CHECK_VALUE(factor_in.dim() == 0 || (factor_in.dim() == 1 && factor_in.size(0) == R),
                    "scale_rows_: factor must be 0-d or (", R, ",), got ", factor_in.sizes());
  TORCH_CHECK_VALUE(factor_in.device() == grad.device(), "scale_rows_: factor must be on ", grad.device(), ", got ",
                    factor_in.device());
  const at::ScalarType opmath_dtype = opmath_scalar_type(grad.scalar_type());
  const at::Tensor factor = factor_in.scalar_type() == opmath_dtype ? factor_in : factor_in.to(opmath_dtype);
  const int64_t factor_stride = factor.dim() == 0 ? 0 : factor.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t* f = factor.const_data_ptr<opmath_t>();
    if (factor_stride == 0 && f[0] == opmath_t(1)) return;  // one factor, and it is 1
    scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, int64_t{32768} / V);  // ~32k elements per task
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const opmath_t fr = f[r * factor_stride];
        if (fr == opmath_t(1)) continue;
        scalar_t* row = g + r * V;
        for (int64_t v = 0; v < V; ++v) row[v] = static_cast<scalar_t>(static_cast<opmath_t>(row[v]) * fr);
      }
    });
  });
}

}  // namespace cpu
}  // namespace kdkernels
