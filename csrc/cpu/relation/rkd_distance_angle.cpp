// CPU kernels of RKD distance + angle together (RKDLoss) (docs/design.md §2.3). The loops it shares with the other
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

// ---- RKD distance + angle (RKDLoss) ----------------------------------------------------------
// Both terms from one AngleSide per input: the distance passes read the whole (B, B) squared
// distances instead of re-forming blocks, and the backward adds the distance's pair weights to
// the angle's before the one gradient GEMM.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> distance_angle_forward(const at::Tensor& student,
                                                                      const at::Tensor& teacher) {
  const AngleSide<T> s(student), t(teacher);
  const int64_t B = s.rows.B;
  DistanceTerm<T> term(B);
  term.add_mu_rows(s.psq, t.psq, 0, B, 0);
  term.finish_mu();
  term.add_loss_rows(s.psq, t.psq, 0, B, 0);
  auto [distance, stats] = term.finish(s.rows.e.options());
  at::Tensor angle = at::empty({}, s.rows.e.options());
  angle.data_ptr<T>()[0] = static_cast<T>(angle_loss(s, t));
  return {distance, angle, stats};
}

template <typename T>
at::Tensor distance_angle_backward(const at::Tensor& grad_distance, const at::Tensor& grad_angle,
                                   const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats) {
  const AngleSide<T> s(student), t(teacher);
  const int64_t B = s.rows.B;
  at::Tensor weights = angle_pair_weights(s, t, scalar_of<T>(grad_angle));
  const at::Tensor st = stats.contiguous();
  distance_pair_weights(s.psq, t.psq, 0, B, 0, B, scalar_of<T>(grad_distance), st.const_data_ptr<T>(),
                        weights.data_ptr<T>(), /*accumulate=*/true);
  return gradient_from_pair_weights(s, weights, student);
}

// ---- dispatcher entry points ---------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_distance_angle_forward_cpu(const at::Tensor& student,
                                                                              const at::Tensor& teacher) {
  check_inputs(student, teacher, "rkd_distance_angle_forward");
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_distance_angle_forward",
                                    [&] { return distance_angle_forward<scalar_t>(student, teacher); });
}

at::Tensor rkd_distance_angle_backward_cpu(const at::Tensor& grad_distance, const at::Tensor& grad_angle,
                                           const at::Tensor& student, const at::Tensor& teacher,
                                           const at::Tensor& stats) {
  check_inputs(student, teacher, "rkd_distance_angle_backward");
  check_relation_aux(grad_distance, student, "grad_distance", "rkd_distance_angle_backward");
  check_relation_aux(grad_angle, student, "grad_angle", "rkd_distance_angle_backward");
  check_relation_aux(stats, student, "stats", "rkd_distance_angle_backward");
  return AT_DISPATCH_FLOATING_TYPES(
      opmath_scalar_type(student.scalar_type()), "rkd_distance_angle_backward",
      [&] { return distance_angle_backward<scalar_t>(grad_distance, grad_angle, student, teacher, stats); });
}

}  // namespace
}  // namespace cpu
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("rkd_distance_angle_forward", &kdkernels::cpu::rkd_distance_angle_forward_cpu);
  m.impl("rkd_distance_angle_backward", &kdkernels::cpu::rkd_distance_angle_backward_cpu);
}
