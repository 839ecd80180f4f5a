// CUDA kernels of the RKD angle loss (docs/design.md §2.3). The loops and kernels
// it shares with the other relation ops are in _rows.cuh, the math in kdkernels/relation.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <tuple>

#include "_rows.cuh"

namespace kdkernels {
namespace cuda {
namespace {
using namespace relation;

template <typename T>
at::Tensor angle_forward(const at::Tensor& student, const at::Tensor& teacher, bool per_row) {
  const AngleSide<T> s(student), t(teacher);
  return angle_forward_from_sides(s, t, per_row);
}

template <typename T>
at::Tensor angle_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher) {
  const AngleSide<T> s(student), t(teacher);
  return gradient_from_pair_weights(s, angle_pair_weights(s, t, grad_loss.contiguous()), student);
}

// ---- dispatcher entry points ---------------------------------------------------------------------
at::Tensor rkd_angle_forward_cuda(const at::Tensor& student, const at::Tensor& teacher, bool per_row) {
  check_inputs(student, teacher, "rkd_angle_forward");
  const OpGuard guard(student);
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_angle_forward",
                                    [&] { return angle_forward<scalar_t>(student, teacher, per_row); });
}

at::Tensor rkd_angle_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher) {
  check_inputs(student, teacher, "rkd_angle_backward");
  check_relation_grad(grad_loss, student, "grad_loss", "rkd_angle_backward");
  const OpGuard guard(student);
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_angle_backward",
                                    [&] { return angle_backward<scalar_t>(grad_loss, student, teacher); });
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("rkd_angle_forward", &kdkernels::cuda::rkd_angle_forward_cuda);
  m.impl("rkd_angle_backward", &kdkernels::cuda::rkd_angle_backward_cuda);
}
