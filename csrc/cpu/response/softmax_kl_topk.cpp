// CPU kernels of the top-k sparse-teacher softmax-KL (kdkernels::softmax_kl_topk_forward / _backward;
// math in the SOFTMAX_KL_TOPK spec, kdkernels/ops/response.py, and kdkernels/reference/response_topk.py).
// One-pass like softmax_kl_step: per row, pass 1 (the one DRAM read of the student row) keeps the
// scaled logits in a scratch row and finds the max, pass 2 turns them into exp(b - m) and sums
// them, the K teacher entries give the loss, and, when a gradient is needed, the scratch row becomes
// the gradient in op-math (dense p_j A, then the K corrections) before one store in the student's
// dtype. The backward scales the saved gradient in place (scale_rows.h).

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
#include <optional>
#include <tuple>
#include <vector>

#include "../huge_pages.h"
#include "../scale_rows.h"
#include "_rows.h"

namespace kdkernels {
namespace cpu {
namespace {
using namespace response;

enum Tail : int { kRenormalize = 0, kBucket = 1 };

template <typename S>
KDK_CPU_HOT void topk_rows(const S* student, const S* teacher_lq, const int64_t* indices, int64_t K, int tail,
                           const Params<opmath_t<S>>& p, opmath_t<S> g, int64_t r0, int64_t r1, opmath_t<S>* xb,
                           double* wk, opmath_t<S>* loss, S* grad_s) {
  using T = opmath_t<S>;
  constexpr int64_t C = kChunk<T>;
  const int64_t V = p.V;
  const T inv_t = p.inv_t;
  for (int64_t r = r0; r < r1; ++r) {
    S* gs = grad_s == nullptr ? nullptr : grad_s + r * V;
    if (row_ignored(p, r)) {
      loss[r] = T(0);
      if (gs) std::fill(gs, gs + V, S(0));
      continue;
    }
    const S* srow = student + r * V;
    const S* lq = teacher_lq + r * K;
    const int64_t* idx = indices + r * K;
    T ms = neg_inf<T>();
#pragma omp simd reduction(max : ms)
    for (int64_t i = 0; i < V; ++i) {  // pass 1: scaled logits and their max
      const T b = rounded_scale(to_op(srow[i]), inv_t);
      xb[i] = b;
      ms = b > ms ? b : ms;
    }
    const T cs = centre(ms);
    double sum = 0;
    for (int64_t c0 = 0; c0 < V; c0 += C) {  // pass 2: e_j = exp(b_j - m), kept in place
      const int64_t n = std::min(C, V - c0);
      T* bc = xb + c0;
      T part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t i = 0; i < n; ++i) {
        const T e = VecMath::exp(bc[i] - cs);
        bc[i] = e;
        part += e;
      }
      sum += part;
    }
    const double log_sum = std::log(sum);
    // the K teacher entries: log p_k = (b_k - m) - log_sum, with b_k recomputed as pass 1 did
    double mq = -INFINITY;
    for (int64_t k = 0; k < K; ++k) mq = std::max(mq, static_cast<double>(to_op(lq[k])));
    double z = 0, q_sum = 0, p_sum_e = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double l = to_op(lq[k]);
      z += mq == -INFINITY ? 0.0 : std::exp(l - mq);
      q_sum += std::exp(l);
      p_sum_e += xb[idx[k]];
      wk[K + k] = static_cast<double>(xb[idx[k]]) / sum;  // p_k, for the gradient's corrections
    }
    const double log_z = std::log(z);
    double row = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double l = to_op(lq[k]);
      const double log_w = tail == kRenormalize ? (l - mq) - log_z : l;  // log q~_k or log q_k
      const double w = std::exp(log_w);
      const double log_p = (static_cast<double>(rounded_scale(to_op(srow[idx[k]]), inv_t)) - cs) - log_sum;
      if (w > 0 || std::isnan(w)) row += w * (log_w - log_p);
      wk[k] = w;
    }
    double c = 0, a = tail == kBucket ? q_sum : 1.0;  // gradient: p_j a - [j = i_k] (w_k - c p_j)
    if (tail == kBucket && K < V) {  // K = V: no entry is left for the bucket, which is empty
      const double q_r = std::max(0.0, 1.0 - q_sum);
      const double p_r = std::max(0.0, (sum - p_sum_e) / sum);  // the student's mass outside the top-k
      if (q_r > 0) {
        row += q_r * (std::log(q_r) - std::log(p_r));
        c = q_r / p_r;
      }
      a = q_sum - c * (p_sum_e / sum);
    }
    loss[r] = static_cast<T>(row) * p.loss_scale;
    if (gs == nullptr) continue;
    const T dense = static_cast<T>(a / sum) * g;
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) xb[i] *= dense;  // g p_j a, before the corrections
    for (int64_t k = 0; k < K; ++k) xb[idx[k]] -= static_cast<T>((wk[k] - c * wk[K + k]) * g);
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) store(gs + i, xb[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_topk_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher_logprobs, const at::Tensor& indices,
    const std::optional<at::Tensor>& labels, const at::Tensor& weight, double temperature, int64_t tail,
    int64_t ignore_index, bool t2_scale, bool per_row, bool student_grad) {
  TORCH_CHECK_VALUE(student.dim() == 2 && student.is_contiguous() && student.device().is_cpu(),
                    "softmax_kl_topk (CPU): student must be a contiguous (rows, vocab) CPU tensor");
  const int64_t R = student.size(0), V = student.size(1);
  TORCH_CHECK_VALUE(teacher_logprobs.dim() == 2 && teacher_logprobs.size(0) == R && teacher_logprobs.is_contiguous() &&
                        teacher_logprobs.scalar_type() == student.scalar_type(),
                    "softmax_kl_topk: teacher_logprobs must be a contiguous (", R, ", K) tensor of student's dtype");
  const int64_t K = teacher_logprobs.size(1);
  TORCH_CHECK_VALUE(indices.sizes() == teacher_logprobs.sizes() && indices.is_contiguous() &&
                        indices.scalar_type() == at::kLong,
                    "softmax_kl_topk: indices must be a contiguous int64 tensor of teacher_logprobs' shape");
  TORCH_CHECK_VALUE(K >= 1 && K <= std::max<int64_t>(V, 1), "softmax_kl_topk: need 1 <= K <= V, got K = ", K,
                    ", V = ", V);
  TORCH_CHECK_VALUE(tail == kRenormalize || tail == kBucket, "softmax_kl_topk: tail must be 0 or 1, got ", tail);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "softmax_kl_topk: temperature must be > 0");
  const auto op_dt = opmath_scalar_type(student.scalar_type());
  TORCH_CHECK(weight.dim() == 0 && weight.scalar_type() == op_dt && weight.device().is_cpu(),
              "softmax_kl_topk (CPU): weight must be a 0-d ", op_dt, " CPU tensor");
  if (labels.has_value()) {
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == R && labels->scalar_type() == at::kLong,
                      "softmax_kl_topk: labels must be (", R, ",) int64");
  }
  const int64_t* ix = indices.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    TORCH_CHECK_VALUE(ix[i] >= 0 && ix[i] < V, "softmax_kl_topk: teacher_topk_indices must lie in [0, ", V,
                      "), got ", ix[i]);
  }
  at::Tensor row_loss = at::empty({R}, student.options().dtype(op_dt));
  at::Tensor grad_s = student_grad ? at::empty({R, V}, student.options()) : at::empty({0}, student.options());
  prefer_huge_pages(grad_s);
  if (R > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_topk_forward_cpu", [&] {
      using T = opmath_t<scalar_t>;
      const Params<T> p = make_params<T>(student, labels, temperature, kForwardKL, 0.5, ignore_index, t2_scale);
      const T g = *weight.const_data_ptr<T>() * static_cast<T>(t2_scale ? temperature : 1.0 / temperature);
      const scalar_t* s = student.const_data_ptr<scalar_t>();
      const scalar_t* lq = teacher_logprobs.const_data_ptr<scalar_t>();
      T* loss_p = row_loss.mutable_data_ptr<T>();
      scalar_t* gs = student_grad ? grad_s.mutable_data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, R, row_grain(V), [&](int64_t r0, int64_t r1) {
        std::vector<T> scratch(static_cast<size_t>(V));
        std::vector<double> w(2 * static_cast<size_t>(K));  // w_k, then p_k
        topk_rows<scalar_t>(s, lq, ix, K, static_cast<int>(tail), p, g, r0, r1, scratch.data(), w.data(), loss_p, gs);
      });
    });
  }
  at::Tensor loss = per_row ? at::mul(row_loss, weight) : at::mul(row_loss.sum(), weight);
  return {loss, grad_s};
}

void softmax_kl_topk_backward_cpu(const at::Tensor& grad_loss, at::Tensor& grad_student) {
  scale_rows_(grad_student, grad_loss);
}

}  // namespace
}  // namespace cpu
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("softmax_kl_topk_forward", &kdkernels::cpu::softmax_kl_topk_forward_cpu);
  m.impl("softmax_kl_topk_backward", &kdkernels::cpu::softmax_kl_topk_backward_cpu);
}
