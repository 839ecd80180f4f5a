// Host-side argument checks of the softmax-KL ops, shared by the CPU (csrc/cpu/response/softmax_kl.cpp)
// and CUDA (csrc/cuda/response/softmax_kl.cu) entry points so both reject alike; each adds its device
// checks.
#pragma once
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kdkernels/op_args.h"
#include "kdkernels/softmax_kl.h"

namespace kdkernels {

inline void check_softmax_kl_args(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& labels, double temperature, int64_t divergence,
                                  double beta) {
  TORCH_CHECK_VALUE(student.dim() == 2, "softmax_kl: student must be 2-D (R, V), got ", student.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "softmax_kl: teacher shape ", teacher.sizes(),
                    " must equal student shape ", student.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(), "softmax_kl: teacher dtype ",
                   teacher.scalar_type(), " must equal student dtype ", student.scalar_type());
  const auto dt = student.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "softmax_kl: logits must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(teacher.device() == student.device(), "softmax_kl: student and teacher must be on one device, got ",
                    student.device(), " and ", teacher.device());
  TORCH_CHECK_VALUE(student.size(0) == 0 || student.size(1) >= 1, "softmax_kl: V must be >= 1");
  TORCH_CHECK_VALUE(temperature > 0.0, "softmax_kl: temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(divergence >= kForwardKL && divergence <= kJSD,
                    "softmax_kl: divergence must be 0 (forward), 1 (reverse) or 2 (jsd), got ", divergence);
  TORCH_CHECK_VALUE(divergence != kJSD || (beta > 0.0 && beta < 1.0), "softmax_kl: beta must be in (0, 1), got ",
                    beta);
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK_TYPE(l.scalar_type() == at::kLong, "softmax_kl: labels must be int64, got ", l.scalar_type());
    TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == student.size(0), "softmax_kl: labels must have shape (",
                      student.size(0), ",), got ", l.sizes());
    TORCH_CHECK_VALUE(l.device() == student.device(), "softmax_kl: labels must be on ", student.device(), ", got ",
                      l.device());
  }
}

}  // namespace kdkernels
