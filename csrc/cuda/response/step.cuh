// The CUDA one-pass softmax-KL step (softmax_kl_step.cu) into outputs the caller owns: what the
// fused linear + softmax-KL op (fused_linear_softmax_kl.cu) runs on each chunk of its logits,
// writing into buffers it reuses from chunk to chunk.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace kdkernels {
namespace cuda {
namespace response {

// student, teacher: (R, V) contiguous, one dtype; labels (R,) int64 or none; weight: 0-d op-math.
// row_loss (R,) op-math gets l_r (T^2-scaled when t2_scale, 0 for ignored rows), *not* weighted;
// grad_s / grad_t, (R, V) contiguous in the logits' dtype or undefined (not computed), get
// d (weight * sum_r l_r) / d logits.
void softmax_kl_step_into(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                          const at::Tensor& weight, double temperature, int64_t divergence, double beta,
                          int64_t ignore_index, bool t2_scale, const at::Tensor& row_loss, const at::Tensor& grad_s,
                          const at::Tensor& grad_t);

}  // namespace response
}  // namespace cuda
}  // namespace kdkernels
