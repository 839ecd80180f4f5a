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
                                                                      const at::Tensor& teacher, bool per_row) {
  const AngleSide<T> s(student), t(teacher);
  const int64_t B = s.rows.B;
  DistanceTerm<T> term(B, per_row);
  term.add_mu_rows(s.psq, t.psq, 0, B, 0);
  term.finish_mu();
  term.add_loss_rows(s.psq, t.psq, 0, B, 0);
  auto [distance, stats] = term.finish(s.rows.e.options());
  return {distance, loss_output<T>(angle_anchor_losses(s, t), per_row, s.rows.e.options()), stats};
}

template <typename T>
at::Tensor distance_angle_backward(const at::Tensor& grad_distance, const at::Tensor& grad_angle,
                                   const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats) {
  const AngleSide<T> s(student), t(teacher);
  const int64_t B = s.rows.B;
  at::Tensor weights = angle_pair_weights(s, t, grad_angle);
  const at::Tensor up = values_of<T>(grad_distance), st = values_of<T>(stats);
  const T *w = up.const_data_ptr<T>(), *pst = st.const_data_ptr<T>();
  const bool per_row = up.dim() == 1;
  // a per-row upstream's A_w from the whole (B, B) matrices: no extra Gram work here
  const double weighted_a = per_row ? weighted_a_rows(s.psq, t.psq, 0, B, 0, B, pst, w) : 0.0;
  distance_pair_weights(s.psq, t.psq, 0, B, 0, B, w, per_row, distance_through_mu(pst, B, per_row, w[0], weighted_a),
                        pst, weights.data_ptr<T>(), /*accumulate=*/true);
  return gradient_from_pair_weights(s, weights, student);
}

// ---- dispatcher entry points ---------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_distance_angle_forward_cpu(const at::Tensor& student,
                                                                              const at::Tensor& teacher, bool per_row) {
  check_inputs(student, teacher, "rkd_distance_angle_forward");
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_distance_angle_forward",
                                    [&] { return distance_angle_forward<scalar_t>(student, teacher, per_row); });
}

at::Tensor rkd_distance_angle_backward_cpu(const at::Tensor& grad_distance, const at::Tensor& grad_angle,
                                           const at::Tensor& student, const at::Tensor& teacher,
                                           const at::Tensor& stats) {
  check_inputs(student, teacher, "rkd_distance_angle_backward");
  check_relation_grad(grad_distance, student, "grad_distance", "rkd_distance_angle_backward");
  check_relation_grad(grad_angle, student, "grad_angle", "rkd_distance_angle_backward");
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
