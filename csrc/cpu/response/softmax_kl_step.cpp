// CPU kernels of the one-pass softmax-KL step (docs/design.md §2.1, docs/decisions.md "One-pass
// step"): kdkernels::softmax_kl_step_forward computes each row's loss and then, while the row is
// still in L2, its gradient(s), with the row functions of the two-pass ops (_rows.h), so both paths
// give the same numbers; kdkernels::softmax_kl_step_backward scales the saved gradients in place.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")  // see softmax_kl.cpp: without it the hot loops stay scalar
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../huge_pages.h"
#include "../scale_rows.h"
#include "_rows.h"
#include "step.h"

namespace kdkernels {
namespace cpu {
namespace {
using namespace response;

// ---- the Hinton KD step (forward KL, student gradient only): two exps per element ------------
// The generic path (forward row + gradient row of _rows.h) evaluates exp four times per element:
// twice for the sums, twice more for p and q. Here the row maxes come first (pass 1, the one DRAM
// read, which also keeps the scaled logits in a scratch row), so that exp(b - m_s) and exp(a - m_t)
// are final values: pass 2 sums them and keeps them, pass 3 writes p - q = e_b / S_b - e_a / S_a.
// Passes 2 and 3 run from L2 (scratch: two op-math rows per thread).
template <typename S>
KDK_CPU_HOT void forward_kl_student_step_rows(const S* student, const S* teacher, const Params<opmath_t<S>>& p,
                                              opmath_t<S> g, int64_t r0, int64_t r1, opmath_t<S>* xb,
                                              opmath_t<S>* xa, opmath_t<S>* loss, S* grad_s) {
  using T = opmath_t<S>;
  constexpr int64_t C = kChunk<T>;
  const int64_t V = p.V;
  const T inv_t = p.inv_t;
  for (int64_t r = r0; r < r1; ++r) {
    S* gs = grad_s + r * V;
    if (row_ignored(p, r)) {
      loss[r] = T(0);
      std::memset(static_cast<void*>(gs), 0, sizeof(S) * V);
      continue;
    }
    const S* srow = student + r * V;
    const S* trow = teacher + r * V;
    T ms = neg_inf<T>(), mt = neg_inf<T>(), lo = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : ms, mt) reduction(min : lo)
    for (int64_t i = 0; i < V; ++i) {  // pass 1: scaled logits (rounded_scale, as everywhere) and maxes
      const T b = rounded_scale(to_op(srow[i]), inv_t), a = rounded_scale(to_op(trow[i]), inv_t);
      xb[i] = b;
      xa[i] = a;
      ms = b > ms ? b : ms;
      mt = a > mt ? a : mt;
      const T m = b < a ? b : a;
      lo = m < lo ? m : lo;
    }
    const T cs = centre(ms), ct = centre(mt);
    double sum_s = 0, sum_t = 0, acc = 0;  // acc = sum e_a ((a - m_t) - (b - m_s)): KL's numerator
    // No -inf in the row (no masked vocabulary): every term is a plain product, and the cheaper
    // exp of non-positive arguments keeps the loop on full-width vectors (with the selects of
    // log_ratio_term it does not). Masked rows take the general loop below.
    const bool finite_row = lo > neg_inf<T>();
    for (int64_t c0 = 0; finite_row && c0 < V; c0 += C) {
      const int64_t n = std::min(C, V - c0);
      T* bc = xb + c0;
      T* ac = xa + c0;
      T ss = 0, st = 0, sa = 0;
#pragma omp simd reduction(+ : ss, st, sa)
      for (int64_t i = 0; i < n; ++i) {
        const T db = bc[i] - cs, da = ac[i] - ct;
        const T eb = exp_nonpositive(db), ea = exp_nonpositive(da);
        ss += eb;
        st += ea;
        sa += ea * (da - db);
        bc[i] = eb;
        ac[i] = ea;
      }
      sum_s += ss;
      sum_t += st;
      acc += sa;
    }
    for (int64_t c0 = 0; !finite_row && c0 < V; c0 += C) {  // pass 2: exps, kept in place of the logits
      const int64_t n = std::min(C, V - c0);
      T* bc = xb + c0;
      T* ac = xa + c0;
      T ss = 0, st = 0, sa = 0;
#pragma omp simd reduction(+ : ss, st, sa)
      for (int64_t i = 0; i < n; ++i) {
        const T b = bc[i], a = ac[i];
        const T eb = VecMath::exp(b - cs), ea = VecMath::exp(a - ct);
        ss += eb;
        st += ea;
        sa += log_ratio_term<T, VecMath>(a, ct, b, cs);  // its exp(a - ct) is ea: the compiler reuses it
        bc[i] = eb;
        ac[i] = ea;
      }
      sum_s += ss;
      sum_t += st;
      acc += sa;
    }
    const double kl = acc / sum_t - std::log(sum_t) + std::log(sum_s);
    loss[r] = static_cast<T>(kl) * p.loss_scale;
    const T ps = static_cast<T>(1.0 / sum_s) * g, qs = static_cast<T>(1.0 / sum_t) * g;
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) store(gs + i, xb[i] * ps - xa[i] * qs);  // pass 3: g (p - q)
  }
}

}  // namespace

namespace response {
void softmax_kl_step_into(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                          const at::Tensor& weight, double temperature, int64_t divergence, double beta,
                          int64_t ignore_index, bool t2_scale, const at::Tensor& row_loss, const at::Tensor& grad_s,
                          const at::Tensor& grad_t) {
  check_common(student, teacher, labels, temperature, divergence, beta);
  const int64_t R = student.size(0), V = student.size(1);
  const auto op_dt = opmath_scalar_type(student.scalar_type());
  TORCH_CHECK(weight.dim() == 0 && weight.scalar_type() == op_dt && weight.device().is_cpu(),
              "softmax_kl_step (CPU): weight must be a 0-d ", op_dt, " CPU tensor, got ", weight.sizes(), " ",
              weight.scalar_type());
  TORCH_CHECK(row_loss.dim() == 1 && row_loss.size(0) == R && row_loss.is_contiguous() && row_loss.scalar_type() == op_dt,
              "softmax_kl_step (CPU): row_loss must be a contiguous (", R, ",) ", op_dt, " tensor");
  const bool student_grad = grad_s.defined(), teacher_grad = grad_t.defined();
  for (const at::Tensor* g : {&grad_s, &grad_t}) {
    TORCH_CHECK(!g->defined() || (g->sizes() == student.sizes() && g->is_contiguous() &&
                                  g->scalar_type() == student.scalar_type()),
                "softmax_kl_step (CPU): a gradient output must be a contiguous (", R, ", ", V, ") ",
                student.scalar_type(), " tensor");
  }
  if (R > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_step_forward_cpu", [&] {
      using T = opmath_t<scalar_t>;
      const Params<T> p = make_params<T>(student, labels, temperature, divergence, beta, ignore_index, t2_scale);
      // d (weight * row loss) / d logits: the backward's scale (T^2 / T, or 1 / T) times the weight
      const T grad_scale = static_cast<T>(t2_scale ? temperature : 1.0 / temperature);
      const T w = *weight.const_data_ptr<T>();
      const scalar_t* s = student.const_data_ptr<scalar_t>();
      const scalar_t* t = teacher.const_data_ptr<scalar_t>();
      T* loss_p = row_loss.data_ptr<T>();
      scalar_t* gs = student_grad ? grad_s.data_ptr<scalar_t>() : nullptr;
      scalar_t* gt = teacher_grad ? grad_t.data_ptr<scalar_t>() : nullptr;
      if (divergence == kForwardKL && student_grad && !teacher_grad) {
        at::parallel_for(0, R, row_grain(V), [&](int64_t r0, int64_t r1) {
          std::vector<T> scratch(2 * static_cast<size_t>(V));
          forward_kl_student_step_rows<scalar_t>(s, t, p, w * grad_scale, r0, r1, scratch.data(),
                                                 scratch.data() + V, loss_p, gs);
        });
        return;
      }
      with_divergence(divergence, [&](auto div) {
        constexpr int DIV = decltype(div)::value;
        at::parallel_for(0, R, row_grain(V), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {  // row by row: the gradient pass finds the row in L2
            // the row functions take a range of rows; give them this one as row 0
            Params<T> pr = p;
            if (pr.labels != nullptr) pr.labels += r * pr.label_stride;
            const scalar_t* sr = s + r * V;
            const scalar_t* tr = t + r * V;
            T st[kRowStats];
            if constexpr (DIV == kJSD) {
              forward_jsd_rows<scalar_t>(sr, tr, pr, 0, 1, loss_p + r, st);
            } else {
              forward_kl_rows<scalar_t, DIV>(sr, tr, pr, 0, 1, loss_p + r, st);
            }
            if (gs != nullptr || gt != nullptr) {
              backward_rows<scalar_t, DIV>(sr, tr, st, kRowStats, 1, &w, 0, grad_scale, pr, 0, 1,
                                           gs == nullptr ? nullptr : gs + r * V, gt == nullptr ? nullptr : gt + r * V);
            }
          }
        });
      });
    });
  }
}
}  // namespace response

namespace {
using namespace response;

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_step_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& weight, double temperature, int64_t divergence, double beta, int64_t ignore_index,
    bool t2_scale, bool per_row, bool student_grad, bool teacher_grad) {
  check_common(student, teacher, labels, temperature, divergence, beta);
  const int64_t R = student.size(0), V = student.size(1);
  at::Tensor row_loss = at::empty({R}, student.options().dtype(opmath_scalar_type(student.scalar_type())));
  at::Tensor grad_s = student_grad ? at::empty({R, V}, student.options()) : at::Tensor();
  at::Tensor grad_t = teacher_grad ? at::empty({R, V}, teacher.options()) : at::Tensor();
  if (grad_s.defined()) prefer_huge_pages(grad_s);
  if (grad_t.defined()) prefer_huge_pages(grad_t);
  softmax_kl_step_into(student, teacher, labels, weight, temperature, divergence, beta, ignore_index, t2_scale,
                       row_loss, grad_s, grad_t);
  at::Tensor loss = per_row ? at::mul(row_loss, weight) : at::mul(row_loss.sum(), weight);
  // a gradient that is not requested is an empty (0,) tensor
  return {loss, student_grad ? grad_s : at::empty({0}, student.options()),
          teacher_grad ? grad_t : at::empty({0}, teacher.options())};
}

void softmax_kl_step_backward_cpu(const at::Tensor& grad_loss, at::Tensor& grad_student, at::Tensor& grad_teacher) {
  scale_rows_(grad_student, grad_loss);
  scale_rows_(grad_teacher, grad_loss);
}

}  // namespace
}  // namespace cpu
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("softmax_kl_step_forward", &kdkernels::cpu::softmax_kl_step_forward_cpu);
  m.impl("softmax_kl_step_backward", &kdkernels::cpu::softmax_kl_step_backward_cpu);
}
