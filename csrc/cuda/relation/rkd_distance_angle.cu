// CUDA kernels of RKD distance + angle together (RKDLoss) (docs/design.md §2.3). The loops and kernels
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

// ---- RKD distance + angle (RKDLoss) ----------------------------------------------------------------
// Both terms from one AngleSide per input: the distance passes read the (B, B) squared distances
// instead of re-forming blocks, and the backward adds the distance's pair weights to the angle's
// before the one gradient GEMM per row block.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> distance_angle_forward(const at::Tensor& student,
                                                                      const at::Tensor& teacher, bool per_row) {
  const AngleSide<T> s(student), t(teacher);
  const int64_t B = s.rows.B;
  auto [distance, stats] = distance_passes<T>(B, std::min(B, kTile), s.rows.e.options(), per_row,
                                              [&](int64_t r0, int64_t r1) {
    return std::make_tuple(s.sq.narrow(0, r0, r1 - r0), t.sq.narrow(0, r0, r1 - r0), int64_t{0});
  });
  return {distance, angle_forward_from_sides(s, t, per_row), stats};
}

template <typename T>
at::Tensor distance_angle_backward(const at::Tensor& grad_distance, const at::Tensor& grad_angle,
                                   const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats) {
  const AngleSide<T> s(student), t(teacher);
  const int64_t B = s.rows.B;
  at::Tensor weights = angle_pair_weights(s, t, grad_angle.contiguous());
  const at::Tensor g = grad_distance.contiguous(), st = stats.contiguous();
  // a (B,) upstream gradient's A_w from the whole (B, B) matrices: no extra Gram work here
  const at::Tensor through = g.dim() == 1 ? distance_through_mu_weighted<T>(B, std::min(B, kTile), st, g,
                                                                             [&](int64_t r0, int64_t r1) {
    return std::make_tuple(s.sq.narrow(0, r0, r1 - r0), t.sq.narrow(0, r0, r1 - r0));
  }) : st;
  distance_weights<T, true>(s.sq, t.sq, st, g, through, weights, 0, B, B);
  return gradient_from_pair_weights(s, weights, student);
}

// ---- dispatcher entry points ---------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_distance_angle_forward_cuda(const at::Tensor& student,
                                                                               const at::Tensor& teacher, bool per_row) {
  check_inputs(student, teacher, "rkd_distance_angle_forward");
  const OpGuard guard(student);
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_distance_angle_forward",
                                    [&] { return distance_angle_forward<scalar_t>(student, teacher, per_row); });
}

at::Tensor rkd_distance_angle_backward_cuda(const at::Tensor& grad_distance, const at::Tensor& grad_angle,
                                            const at::Tensor& student, const at::Tensor& teacher,
                                            const at::Tensor& stats) {
  check_inputs(student, teacher, "rkd_distance_angle_backward");
  check_relation_grad(grad_distance, student, "grad_distance", "rkd_distance_angle_backward");
  check_relation_grad(grad_angle, student, "grad_angle", "rkd_distance_angle_backward");
  check_relation_aux(stats, student, "stats", "rkd_distance_angle_backward");
  const OpGuard guard(student);
  return AT_DISPATCH_FLOATING_TYPES(
      opmath_scalar_type(student.scalar_type()), "rkd_distance_angle_backward",
      [&] { return distance_angle_backward<scalar_t>(grad_distance, grad_angle, student, teacher, stats); });
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("rkd_distance_angle_forward", &kdkernels::cuda::rkd_distance_angle_forward_cuda);
  m.impl("rkd_distance_angle_backward", &kdkernels::cuda::rkd_distance_angle_backward_cuda);
}
