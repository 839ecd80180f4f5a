// Host-side argument checks and result allocation of the feature ops (projected MSE, attention
// transfer), shared by the CPU (csrc/cpu/feature/*.cpp) and CUDA (csrc/cuda/feature/*.cu) kernels so
// both reject and lay out alike.
#pragma once
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "kdkernels/feature.h"

namespace kdkernels {

inline void check_projected_mse_reduction(int64_t reduction) {
  TORCH_CHECK(valid_feature_reduction(reduction),
              "projected_mse: reduction must be 0 (mean), 1 (sum), 2 (batchmean) or 3 (none), got ", reduction);
}

inline void check_projected_mse_forward_args(const at::Tensor& x, const at::Tensor& t, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, int64_t reduction) {
  check_projected_mse_reduction(reduction);
  TORCH_CHECK(x.dim() == 3 && t.dim() == 3, "projected_mse_forward: x and t must be 3-D (B, P, D), got ", x.sizes(),
              " and ", t.sizes());
  TORCH_CHECK(x.size(0) == t.size(0) && x.size(1) == t.size(1),
              "projected_mse_forward: x and t must share (B, P), got ", x.sizes(), " and ", t.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == t.size(2) && weight.size(1) == x.size(2),
              "projected_mse_forward: weight must be (Dt, Ds) = (", t.size(2), ", ", x.size(2), "), got ",
              weight.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "projected_mse_forward: x, t and weight must share a dtype");
  TORCH_CHECK(t.device() == x.device() && weight.device() == x.device(),
              "projected_mse_forward: x, t and weight must be on one device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == t.size(2), "projected_mse_forward: bias must be (Dt,) = (",
                t.size(2), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "projected_mse_forward: bias must have x's dtype and device");
  }
}

// Checks the backward's arguments and returns Ds (0 when neither grad_x nor grad_weight is asked for:
// x is read only for grad_weight and the weight only for grad_x, either may then be an empty tensor).
inline int64_t check_projected_mse_backward_args(const at::Tensor& grad_loss, const at::Tensor& x,
                                                 const at::Tensor& weight, const at::Tensor& residual,
                                                 int64_t reduction, bool x_grad, bool weight_grad) {
  check_projected_mse_reduction(reduction);
  TORCH_CHECK(residual.dim() == 3, "projected_mse_backward: residual must be 3-D (B, P, Dt), got ", residual.sizes());
  const int64_t B = residual.size(0), P = residual.size(1), Dt = residual.size(2);
  if (reduction == kFeatureNone) {  // one upstream gradient per row
    TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == B && grad_loss.size(1) == P,
                "projected_mse_backward: grad_loss must be (B, P) = (", B, ", ", P, ") for reduction 3 (none), got ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "projected_mse_backward: grad_loss must hold one value, got ",
                grad_loss.sizes());
  }
  TORCH_CHECK(grad_loss.device() == residual.device(), "projected_mse_backward: grad_loss must be on the residual's device ",
              residual.device(), ", got ", grad_loss.device());
  int64_t Ds = 0;
  if (x_grad) {
    TORCH_CHECK(weight.dim() == 2 && weight.size(0) == Dt, "projected_mse_backward: weight must be (", Dt,
                ", Ds) for grad_x, got ", weight.sizes());
    TORCH_CHECK(weight.scalar_type() == residual.scalar_type() && weight.device() == residual.device(),
                "projected_mse_backward: weight must have the residual's dtype and device");
    Ds = weight.size(1);
  }
  if (weight_grad) {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == B && x.size(1) == P && (!x_grad || x.size(2) == Ds),
                "projected_mse_backward: x must be (", B, ", ", P, ", Ds) for grad_weight, got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.device() == residual.device(),
                "projected_mse_backward: x must have the residual's dtype and device");
    Ds = x.size(2);
  }
  return Ds;
}

// Storage for a (B, P, D) result in the layout of feature.h's feature_major rule.
inline at::Tensor empty_in_layout(int64_t B, int64_t P, int64_t D, bool fmajor, const at::TensorOptions& opts) {
  return fmajor ? at::empty({B, D, P}, opts).transpose(1, 2) : at::empty({B, P, D}, opts);
}

}  // namespace kdkernels

namespace kdkernels {

// ---- attention transfer (ATTENTION_TRANSFER in kdkernels/ops/feature.py) -------------------------
// The device-independent checks of the forward's arguments; each backend adds its device rules.
inline void check_attention_transfer_args(const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& weight, double p, const char* op) {
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3, op, ": student and teacher must be 3-D (N, C, S), got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.size(0) == teacher.size(0) && student.size(2) == teacher.size(2), op,
              ": student and teacher must share N and S, got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.size(1) >= 1 && teacher.size(1) >= 1, op, ": at least one channel");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), op, ": one dtype");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), op, ": contiguous inputs");
  TORCH_CHECK(p >= 1.0, op, ": p must be >= 1, got ", p);
  TORCH_CHECK(weight.dim() == 0, op, ": weight must be 0-d");
}

// The backward's: each saved gradient is a contiguous (N, C, S) tensor or empty (not requested,
// skipped); grad_loss is 0-d or (N,). Checked for both gradients before either is scaled in place.
inline void check_attention_transfer_backward_args(const at::Tensor& grad_loss, const at::Tensor& grad_student,
                                                   const at::Tensor& grad_teacher, const char* op) {
  int64_t n = -1;  // the samples of the first non-empty gradient
  for (const at::Tensor* g : {&grad_student, &grad_teacher}) {
    if (g->numel() == 0) continue;
    TORCH_CHECK(g->dim() == 3 && g->is_contiguous(), op, ": a saved gradient must be a contiguous (N, C, S) tensor, got ",
                g->sizes());
    TORCH_CHECK(n < 0 || g->size(0) == n, op, ": the saved gradients disagree on N: ", grad_student.sizes(), " and ",
                grad_teacher.sizes());
    n = g->size(0);
  }
  if (n < 0) return;  // nothing to scale
  TORCH_CHECK(grad_student.numel() == 0 || grad_teacher.numel() == 0 ||
                  grad_student.scalar_type() == grad_teacher.scalar_type(),
              op, ": the saved gradients must share a dtype");
  TORCH_CHECK(grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == n), op,
              ": grad_loss must be 0-d or (", n, ",), got ", grad_loss.sizes());
  TORCH_CHECK(c10::isFloatingType(grad_loss.scalar_type()), op, ": grad_loss must be floating point, got ",
              grad_loss.scalar_type());
}

}  // namespace kdkernels
