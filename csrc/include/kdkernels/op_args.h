// Host-side helpers shared by every family's CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>

namespace kdkernels {

// The op-math (accumulation / loss) dtype: float32 for every input dtype but float64.
inline at::ScalarType opmath_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace kdkernels
