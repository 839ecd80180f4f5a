// CPU kernels of the RKD angle loss (docs/design.md §2.3). The loops it shares with the other
// relation ops are in _rows.h, the math in kdkernels/relation.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "_rows.h"

namespace kdkernels {
namespace cpu {
namespace {
using namespace relation;

template <typename T>
at::Tensor angle_forward(const at::Tensor& student, const at::Tensor& teacher, bool per_row) {
  const AngleSide<T> s(student), t(teacher);
  return loss_output<T>(angle_anchor_losses(s, t), per_row, s.rows.e.options());
}

template <typename T>
at::Tensor angle_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher) {
  const AngleSide<T> s(student), t(teacher);
  return gradient_from_pair_weights(s, angle_pair_weights(s, t, grad_loss), student);
}

// ---- dispatcher entry points ---------------------------------------------------------------
at::Tensor rkd_angle_forward_cpu(const at::Tensor& student, const at::Tensor& teacher, bool per_row) {
  check_inputs(student, teacher, "rkd_angle_forward");
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_angle_forward",
                                    [&] { return angle_forward<scalar_t>(student, teacher, per_row); });
}

at::Tensor rkd_angle_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher) {
  check_inputs(student, teacher, "rkd_angle_backward");
  check_relation_grad(grad_loss, student, "grad_loss", "rkd_angle_backward");
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_angle_backward",
                                    [&] { return angle_backward<scalar_t>(grad_loss, student, teacher); });
}

}  // namespace
}  // namespace cpu
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("rkd_angle_forward", &kdkernels::cpu::rkd_angle_forward_cpu);
  m.impl("rkd_angle_backward", &kdkernels::cpu::rkd_angle_backward_cpu);
}
