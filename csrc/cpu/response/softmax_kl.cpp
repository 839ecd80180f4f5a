// CPU kernels of the temperature softmax-KL ops (docs/design.md §2.1): kdkernels::softmax_kl_forward and
// kdkernels::softmax_kl_backward: the loss-only forward (the loss and O(rows) stats) and the backward
// that recomputes the probabilities from the logits. The row functions are in _rows.h.

#if defined(__GNUC__) && !defined(__clang__)
// Floating-point exceptions are never unmasked here, so GCC may evaluate both arms of a select.
// Without this it will not if-convert the header's `p > 0 ? p * (...) : 0` forms and the hot loops
// stay scalar (except on AVX-512, which has masked arithmetic). Results are unchanged: rounding,
// inf and NaN behave as before. It comes before every include so that all inline functions used in
// the loops carry the same option (GCC does not inline across a mismatch).
#pragma GCC optimize("no-trapping-math")
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../huge_pages.h"
#include "_rows.h"

namespace kdkernels {
namespace cpu {
namespace {
using namespace response;

std::tuple<at::Tensor, at::Tensor> softmax_kl_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                          const std::optional<at::Tensor>& labels, double temperature,
                                                          int64_t divergence, double beta, int64_t ignore_index,
                                                          bool t2_scale) {
  check_common(student, teacher, labels, temperature, divergence, beta);
  const int64_t R = student.size(0), V = student.size(1);
  const auto opts = student.options().dtype(opmath_scalar_type(student.scalar_type()));
  at::Tensor loss = at::empty({R}, opts);
  at::Tensor stats = at::empty({R, kRowStats}, opts);
  if (R == 0) return {loss, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_forward_cpu", [&] {
    using T = opmath_t<scalar_t>;
    const Params<T> p = make_params<T>(student, labels, temperature, divergence, beta, ignore_index, t2_scale);
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    T* loss_p = loss.mutable_data_ptr<T>();
    T* stats_p = stats.mutable_data_ptr<T>();
    with_divergence(divergence, [&](auto div) {
      constexpr int DIV = decltype(div)::value;
      at::parallel_for(0, R, row_grain(V), [&](int64_t r0, int64_t r1) {
        if constexpr (DIV == kJSD) {
          forward_jsd_rows<scalar_t>(s, t, p, r0, r1, loss_p, stats_p);
        } else {
          forward_kl_rows<scalar_t, DIV>(s, t, p, r0, r1, loss_p, stats_p);
        }
      });
    });
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                                           const at::Tensor& teacher,
                                                           const std::optional<at::Tensor>& labels,
                                                           const at::Tensor& stats, double temperature,
                                                           int64_t divergence, double beta, int64_t ignore_index,
                                                           bool t2_scale, bool student_grad, bool teacher_grad) {
  check_common(student, teacher, labels, temperature, divergence, beta);
  const int64_t R = student.size(0), V = student.size(1);
  const auto op_dt = opmath_scalar_type(student.scalar_type());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == R, "softmax_kl_backward: grad_loss must have shape (", R,
              ",), got ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.scalar_type() == op_dt, "softmax_kl_backward: grad_loss must be ", op_dt, ", got ",
              grad_loss.scalar_type());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == R && stats.size(1) == kRowStats,
              "softmax_kl_backward: stats must have shape (", R, ", ", kRowStats, "), got ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == op_dt, "softmax_kl_backward: stats must be ", op_dt, ", got ",
              stats.scalar_type());
  TORCH_CHECK(grad_loss.device().is_cpu() && stats.device().is_cpu(),
              "softmax_kl_backward (CPU): grad_loss and stats must be on the CPU");
  // a gradient that is not asked for comes back as an empty (0,) tensor of its input's dtype
  at::Tensor grad_s = student_grad ? at::empty({R, V}, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_t = teacher_grad ? at::empty({R, V}, teacher.options()) : at::empty({0}, teacher.options());
  prefer_huge_pages(grad_s);
  prefer_huge_pages(grad_t);
  if (R == 0 || !(student_grad || teacher_grad)) return {grad_s, grad_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_backward_cpu", [&] {
    using T = opmath_t<scalar_t>;
    const Params<T> p = make_params<T>(student, labels, temperature, divergence, beta, ignore_index, t2_scale);
    // d loss / d logits = d loss / d (logits / T) / T, times T^2 with t2_scale
    const T grad_scale = static_cast<T>(t2_scale ? temperature : 1.0 / temperature);
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    const T* st = stats.const_data_ptr<T>();
    const T* gl = grad_loss.const_data_ptr<T>();
    scalar_t* gs = student_grad ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt = teacher_grad ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t st0 = stats.stride(0), st1 = stats.stride(1), gl0 = grad_loss.stride(0);
    with_divergence(divergence, [&](auto div) {
      constexpr int DIV = decltype(div)::value;
      at::parallel_for(0, R, row_grain(V), [&](int64_t r0, int64_t r1) {
        backward_rows<scalar_t, DIV>(s, t, st, st0, st1, gl, gl0, grad_scale, p, r0, r1, gs, gt);
      });
    });
  });
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cpu
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("softmax_kl_forward", &kdkernels::cpu::softmax_kl_forward_cpu);
  m.impl("softmax_kl_backward", &kdkernels::cpu::softmax_kl_backward_cpu);
}
