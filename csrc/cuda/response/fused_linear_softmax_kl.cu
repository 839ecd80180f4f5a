// CUDA kernels of the fused linear + softmax-KL ops (docs/design.md §2.1): the chunk loop of
// kdkernels/fused_linear.h with cuBLAS GEMMs and, per chunk, the CUDA one-pass softmax-KL step
// (compiled here, not yet run on a GPU).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include <c10/cuda/CUDAGuard.h>

#include "../scale_rows.cuh"
#include "kdkernels/fused_linear.h"
#include "step.cuh"

namespace kdkernels {
namespace cuda {
namespace {
namespace fl = kdkernels::fused_linear;

// The step of one chunk: its row losses and its logit gradient into the loop's buffers.
auto chunk_step(const fl::Options& o) {
  return [o](const at::Tensor& z, const at::Tensor& t, const std::optional<at::Tensor>& labels,
             const at::Tensor& weight, const at::Tensor& row_loss, const at::Tensor& grad) {
    response::softmax_kl_step_into(z, t, labels, weight, o.temperature, o.divergence, o.beta, o.ignore_index,
                                   o.t2_scale, row_loss, grad, at::Tensor());
  };
}

void chunk_scale_rows(const at::Tensor& grad, const at::Tensor& factor) {
  at::Tensor g = grad;
  scale_rows_(g, factor);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_softmax_kl_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& teacher_logits, const std::optional<at::Tensor>& teacher_hidden,
    const std::optional<at::Tensor>& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& labels, const at::Tensor& scale, double temperature, int64_t divergence,
    double beta, int64_t ignore_index, bool t2_scale, int64_t chunk_size, bool hidden_grad, bool weight_grad,
    bool bias_grad) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const fl::Inputs in{hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels};
  const fl::Options o{temperature, divergence, beta, ignore_index, t2_scale, chunk_size};
  return fl::forward(in, o, scale, fl::Grads{hidden_grad, weight_grad, bias_grad}, chunk_step(o), chunk_scale_rows);
}

// The saved gradients' last use: scaled in place (rows whose factor is exactly 1 untouched).
void fused_linear_softmax_kl_backward_cuda(const at::Tensor& grad_loss, at::Tensor& grad_hidden, at::Tensor& grad_weight,
                                          at::Tensor& grad_bias) {
  const c10::cuda::CUDAGuard guard(grad_loss.device());
  for (at::Tensor* g : {&grad_hidden, &grad_weight, &grad_bias}) {
    if (g->numel() == 0) continue;
    at::Tensor rows = g->dim() == 1 ? g->view({1, g->size(0)}) : *g;
    scale_rows_(rows, grad_loss.to(opmath_scalar_type(g->scalar_type())));
  }
}

at::Tensor fused_linear_softmax_kl_rows_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& teacher_logits, const std::optional<at::Tensor>& teacher_hidden,
    const std::optional<at::Tensor>& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& labels, double temperature, int64_t divergence, double beta, int64_t ignore_index,
    bool t2_scale, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const fl::Inputs in{hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels};
  const fl::Options o{temperature, divergence, beta, ignore_index, t2_scale, chunk_size};
  return fl::rows_forward(in, o, chunk_step(o), chunk_scale_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_softmax_kl_rows_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& teacher_logits,
    const std::optional<at::Tensor>& teacher_hidden, const std::optional<at::Tensor>& teacher_weight,
    const std::optional<at::Tensor>& teacher_bias, const std::optional<at::Tensor>& labels, double temperature,
    int64_t divergence, double beta, int64_t ignore_index, bool t2_scale, int64_t chunk_size, bool hidden_grad,
    bool weight_grad, bool bias_grad) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const fl::Inputs in{hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, labels};
  const fl::Options o{temperature, divergence, beta, ignore_index, t2_scale, chunk_size};
  return fl::rows_backward(grad_loss, in, o, fl::Grads{hidden_grad, weight_grad, bias_grad}, chunk_step(o),
                           chunk_scale_rows);
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("fused_linear_softmax_kl_forward", &kdkernels::cuda::fused_linear_softmax_kl_forward_cuda);
  m.impl("fused_linear_softmax_kl_backward", &kdkernels::cuda::fused_linear_softmax_kl_backward_cuda);
  m.impl("fused_linear_softmax_kl_rows_forward", &kdkernels::cuda::fused_linear_softmax_kl_rows_forward_cuda);
  m.impl("fused_linear_softmax_kl_rows_backward", &kdkernels::cuda::fused_linear_softmax_kl_rows_backward_cuda);
}
