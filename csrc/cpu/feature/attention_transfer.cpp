// CPU kernels of the one-pass attention-transfer op (contract: ATTENTION_TRANSFER in
// kdkernels/ops/feature.py; math in kdkernels/attention.h).
//
// One task per sample (samples are independent: each has its own normaliser): the channel
// reduction of the student's and the teacher's map into op-math scratch rows a_s, a_t (S,), the
// sample's norms, loss and gradient scalars from those rows, then, when gradients are wanted, one
// more sweep over the sample's map writing dF. A sample's map (C * S elements, e.g. 128 x 1024 fp32
// = 512 KiB) is usually still in L2 from the reduction, so DRAM sees one read of each map and one
// write of each gradient: the teacher's map is pooled first, so the student's, which the gradient
// sweep re-reads, is the one most recently in cache. No (N, C, S) temporary. The backward scales
// the saved gradients in place.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../huge_pages.h"
#include "../scale_rows.h"
#include "../simd.h"
#include "kdkernels/attention.h"
#include "kdkernels/feature_args.h"

namespace kdkernels {
namespace cpu {
namespace {
using namespace attention;

// a[k] = (1/C) sum_c |F[c, k]|^p for one sample's (C, S) map
template <int KIND, typename scalar_t, typename T>
KDK_CPU_HOT void channel_pool(const scalar_t* __restrict f, int64_t C, int64_t S, T p, T* __restrict a) {
  std::fill(a, a + S, T(0));
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* __restrict row = f + c * S;
#pragma omp simd
    for (int64_t k = 0; k < S; ++k) a[k] += abs_pow<KIND>(static_cast<T>(row[k]), p);
  }
  const T inv_c = T(1) / static_cast<T>(C);
  for (int64_t k = 0; k < S; ++k) a[k] *= inv_c;
}

// dF[c, k] = g[k] * |F|^p'(F[c, k]) (g already divided by C)
template <int KIND, typename scalar_t, typename T>
KDK_CPU_HOT void write_gradient(const scalar_t* __restrict f, int64_t C, int64_t S, T p, const T* __restrict g,
                                scalar_t* __restrict out) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* __restrict row = f + c * S;
    scalar_t* __restrict o = out + c * S;
#pragma omp simd
    for (int64_t k = 0; k < S; ++k) o[k] = static_cast<scalar_t>(g[k] * abs_pow_grad<KIND>(static_cast<T>(row[k]), p));
  }
}

#if defined(__SSE2__)
// fp32 gradients larger than the caches: the same values with streaming stores, so the lines about
// to be written in full are not first read from DRAM (read for ownership): 3 units of traffic, not 4.
// Each 64-value chunk is computed (vectorised) into an aligned buffer, then streamed out 16 bytes at
// a time (SSE2: every x86-64 has it).
template <int KIND>
KDK_CPU_HOT void write_gradient_streamed(const float* __restrict f, int64_t C, int64_t S, float p,
                                         const float* __restrict g, float* __restrict out) {
  constexpr int64_t kChunk = 64;
  alignas(64) float buf[kChunk];
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict row = f + c * S;
    float* __restrict o = out + c * S;
    int64_t k = 0;
    for (; k < S && (reinterpret_cast<uintptr_t>(o + k) & 15) != 0; ++k) o[k] = g[k] * abs_pow_grad<KIND>(row[k], p);
    for (; k + kChunk <= S; k += kChunk) {
#pragma omp simd
      for (int64_t j = 0; j < kChunk; ++j) buf[j] = g[k + j] * abs_pow_grad<KIND>(row[k + j], p);
      for (int64_t j = 0; j < kChunk; j += 4) _mm_stream_ps(o + k + j, _mm_load_ps(buf + j));
    }
    for (; k < S; ++k) o[k] = g[k] * abs_pow_grad<KIND>(row[k], p);
  }
  _mm_sfence();  // the streamed stores are visible before the task ends
}
#endif

// dF for one sample: streamed for fp32 gradients too large to stay in cache, else plain stores
template <int KIND, typename scalar_t, typename T>
void write_sample_gradient(const scalar_t* f, int64_t C, int64_t S, T p, const T* g, scalar_t* out, bool stream) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream) return write_gradient_streamed<KIND>(f, C, S, p, g, out);
  }
#endif
  (void)stream;
  write_gradient<KIND>(f, C, S, p, g, out);
}

constexpr int64_t kStreamBytes = int64_t{16} << 20;  // gradients above this go past the caches anyway

template <int KIND, typename scalar_t>
void forward_samples(const at::Tensor& student, const at::Tensor& teacher, double p_in, bool squared, double weight_in,
                     at::Tensor& rows, at::Tensor& grad_s, at::Tensor& grad_t) {
  using T = at::opmath_type<scalar_t>;
  const int64_t N = student.size(0), Cs = student.size(1), Ct = teacher.size(1), S = student.size(2);
  const T p = static_cast<T>(p_in), weight = static_cast<T>(weight_in);
  const scalar_t* fs = student.const_data_ptr<scalar_t>();
  const scalar_t* ft = teacher.const_data_ptr<scalar_t>();
  T* loss = rows.data_ptr<T>();
  scalar_t* gs = grad_s.defined() ? grad_s.data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t.defined() ? grad_t.data_ptr<scalar_t>() : nullptr;
  const bool stream_s = grad_s.defined() && grad_s.nbytes() > static_cast<size_t>(kStreamBytes);
  const bool stream_t = grad_t.defined() && grad_t.nbytes() > static_cast<size_t>(kStreamBytes);
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<T> a_s(S), a_t(S);
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* s_map = fs + n * Cs * S;
      const scalar_t* t_map = ft + n * Ct * S;
      channel_pool<KIND>(t_map, Ct, S, p, a_t.data());  // teacher first: the student's map stays in cache
      channel_pool<KIND>(s_map, Cs, S, p, a_s.data());
      double ss = 0, st = 0;
      for (int64_t k = 0; k < S; ++k) {
        ss += static_cast<double>(a_s[k]) * a_s[k];
        st += static_cast<double>(a_t[k]) * a_t[k];
      }
      const T ns = clamped_norm(static_cast<T>(ss)), nt = clamped_norm(static_cast<T>(st));
      double sd2 = 0, vd_s = 0, vd_t = 0;  // sum d^2, <v_s, d>, <v_t, d>
      for (int64_t k = 0; k < S; ++k) {
        const T vs = a_s[k] / ns, vt = a_t[k] / nt, d = vs - vt;
        sd2 += static_cast<double>(d) * d;
        vd_s += static_cast<double>(vs) * d;
        vd_t += static_cast<double>(vt) * d;
      }
      loss[n] = sample_loss(static_cast<T>(sd2), squared);
      if (gs == nullptr && gt == nullptr) continue;
      const T f = grad_v_factor(static_cast<T>(sd2), squared, weight);
      const T inv_cs = T(1) / static_cast<T>(Cs), inv_ct = T(1) / static_cast<T>(Ct);
      // g_a of both sides (divided by C), over the rows a_s, a_t (read before they are overwritten)
      for (int64_t k = 0; k < S; ++k) {
        const T vs = a_s[k] / ns, vt = a_t[k] / nt, gv = f * (vs - vt);
        a_s[k] = grad_a(gv, vs, f * static_cast<T>(vd_s), ns) * inv_cs;
        a_t[k] = grad_a(-gv, vt, -f * static_cast<T>(vd_t), nt) * inv_ct;
      }
      if (gs != nullptr) write_sample_gradient<KIND>(s_map, Cs, S, p, a_s.data(), gs + n * Cs * S, stream_s);
      if (gt != nullptr) write_sample_gradient<KIND>(t_map, Ct, S, p, a_t.data(), gt + n * Ct * S, stream_t);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_transfer_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight, double p, bool squared,
    bool per_row, bool student_grad, bool teacher_grad) {
  check_attention_transfer_args(student, teacher, weight, p, "attention_transfer_forward");
  TORCH_CHECK(student.is_cpu() && teacher.is_cpu() && weight.is_cpu(),
              "attention_transfer_forward: student, teacher and weight must be CPU tensors");
  const auto opmath = at::toOpMathType(student.scalar_type());
  at::Tensor rows = at::empty({student.size(0)}, student.options().dtype(opmath));
  at::Tensor grad_s = student_grad ? at::empty_like(student) : at::Tensor();
  at::Tensor grad_t = teacher_grad ? at::empty_like(teacher) : at::Tensor();
  if (grad_s.defined()) prefer_huge_pages(grad_s);  // written once in full: 2 MiB pages, fewer first-touch faults
  if (grad_t.defined()) prefer_huge_pages(grad_t);
  const at::Tensor w = weight.to(opmath);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "attention_transfer_forward", [&] {
    const double wv = static_cast<double>(w.item<at::opmath_type<scalar_t>>());
    switch (power_kind(p)) {
      case kPowerOne: forward_samples<kPowerOne, scalar_t>(student, teacher, p, squared, wv, rows, grad_s, grad_t); break;
      case kPowerTwo: forward_samples<kPowerTwo, scalar_t>(student, teacher, p, squared, wv, rows, grad_s, grad_t); break;
      default: forward_samples<kPowerAny, scalar_t>(student, teacher, p, squared, wv, rows, grad_s, grad_t);
    }
  });
  at::Tensor loss = per_row ? at::mul(rows, w) : at::mul(rows.sum(), w);
  return {loss, student_grad ? grad_s : at::empty({0}, student.options()),
          teacher_grad ? grad_t : at::empty({0}, teacher.options())};
}

void attention_transfer_backward_cpu(const at::Tensor& grad_loss, at::Tensor& grad_student, at::Tensor& grad_teacher) {
  check_attention_transfer_backward_args(grad_loss, grad_student, grad_teacher, "attention_transfer_backward");
  scale_samples_(grad_student, grad_loss);
  scale_samples_(grad_teacher, grad_loss);
}

}  // namespace
}  // namespace cpu
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("attention_transfer_forward", &kdkernels::cpu::attention_transfer_forward_cpu);
  m.impl("attention_transfer_backward", &kdkernels::cpu::attention_transfer_backward_cpu);
}
