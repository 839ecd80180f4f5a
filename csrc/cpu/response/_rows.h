// The row functions of the CPU softmax-KL kernels (docs/design.md §2.1), shared by the loss-only
// forward + backward ops (softmax_kl.cpp) and the one-pass step (softmax_kl_step.cpp). The per-element
// math and the meaning of stats come from kdkernels/softmax_kl.h (shared with the CUDA kernels);
// these functions only arrange memory passes, vectorisation and threads.
//
// Each row is processed in chunks: a chunk of both rows is scaled by 1/T into L1 buffers, then
// read from there (so DRAM sees each row once per sweep, whatever V).
//   forward / reverse KL: per chunk, the maxes come with the scaling; one more in-cache pass gives
//     the sum-exps and the centred log-ratio accumulator; chunk states merge with log_ratio_merge.
//     The loss comes out of one DRAM sweep.
//   JSD: the same gives the maxes and log-sums; c_s and c_t need them, so a second sweep of the row
//     (from L2 for usual V) accumulates those.
//   Gradient: one sweep per row, softmax_kl_grad per element.
// Chunk and row states are kept in double (spelled `double` below: a deliberate choice, not the
// op-math type).
//
// A translation unit that includes this must start with `#pragma GCC optimize("no-trapping-math")`
// before any include (see softmax_kl.cpp): without it the hot loops stay scalar.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "kdkernels/softmax_kl.h"
#include "kdkernels/softmax_kl_args.h"
#include "../simd.h"

namespace kdkernels {
namespace cpu {
namespace response {


// op-math type: float, double for double inputs
template <typename S>
using opmath_t = at::opmath_type<S>;

// Per-chunk partial sums are in the op-math type (vector lanes); chunk and row states in double,
// which costs nothing (a few scalar operations per chunk) and keeps long rows accurate.

// Elements per chunk: the logits of a chunk of both rows are scaled by 1/T into two op-math
// buffers of 8 KiB each, which the following pass(es) read from L1.
template <typename T>
constexpr int64_t kChunk = 8192 / sizeof(T);

// Element loads and stores in the op-math type; 16-bit floats through the branch-free bit
// conversions of simd.h so that the loops vectorise.
KDK_CPU_INLINE float to_op(float v) {
  return v;
}
KDK_CPU_INLINE double to_op(double v) {
  return v;
}
KDK_CPU_INLINE float to_op(c10::Half v) {
  return half_to_float(v.x);
}
KDK_CPU_INLINE float to_op(c10::BFloat16 v) {
  return bf16_to_float(v.x);
}
KDK_CPU_INLINE void store(float* p, float v) {
  *p = v;
}
KDK_CPU_INLINE void store(double* p, double v) {
  *p = v;
}
KDK_CPU_INLINE void store(c10::Half* p, float v) {
  p->x = float_to_half(v);
}
KDK_CPU_INLINE void store(c10::BFloat16* p, float v) {
  p->x = float_to_bf16(v);
}

template <typename T>
struct Params {
  int64_t V;
  T inv_t;       // a = z_teacher * inv_t, b = z_student * inv_t, forward and backward alike
  T loss_scale;  // T^2 with t2_scale, else 1
  JsdConstants<T> k;
  const int64_t* labels;  // null: no labels
  int64_t label_stride;
  int64_t ignore_index;
};

template <typename T>
KDK_CPU_INLINE bool row_ignored(const Params<T>& p, int64_t r) {
  return p.labels != nullptr && p.labels[r * p.label_stride] == p.ignore_index;
}

// An ignored row: loss 0 and zero stats; its logits are never read.
template <typename T>
KDK_CPU_INLINE void write_ignored_row(T* loss, T* stats) {
  *loss = T(0);
  std::fill(stats, stats + kRowStats, T(0));
}

// a = z * (1/T), rounded to T, the one definition of the scaled logits in the forward and the
// backward. The `+ 0` (which the compiler may not drop: it turns -0 into +0) keeps it from fusing
// the product into the subtraction that follows, as an FMA that would skip this rounding: then
// `a - max a` would not be exactly 0 at the max, and the exact cancellations that keep one-hot
// rows of huge logits (+-1e4) exact, as they are in eager PyTorch, would be lost (errors ~1e-3).
template <typename T>
KDK_CPU_INLINE T rounded_scale(T z, T inv_t) {
  return z * inv_t + T(0);
}

// Scales one chunk of both rows into the buffers (b = z_s / T, a = z_t / T, as rounded_scale
// gives them everywhere) and returns their maxes. A NaN may or may not win the max; it reaches
// the row result through the sums either way.
template <typename S, typename T>
KDK_CPU_INLINE void scale_chunk(const S* s, const S* t, int64_t n, T inv_t, T* bs, T* bt, T& max_s, T& max_t) {
  T ms = neg_inf<T>(), mt = neg_inf<T>();
#pragma omp simd reduction(max : ms, mt)
  for (int64_t i = 0; i < n; ++i) {
    const T b = rounded_scale(to_op(s[i]), inv_t), a = rounded_scale(to_op(t[i]), inv_t);
    bs[i] = b;
    bt[i] = a;
    ms = b > ms ? b : ms;
    mt = a > mt ? a : mt;
  }
  max_s = ms;
  max_t = mt;
}

// A chunk is centred on the running max of its row (this chunk's max if larger): after the first
// chunks it rarely changes, so the merges rarely rescale. A NaN running max stays NaN. A chunk
// whose values are all -inf (masked vocabulary) with nothing finite before it is centred on 0,
// so that exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN; its sums are then 0, which the
// merges read as "empty".
template <typename T>
KDK_CPU_INLINE T running_max(T chunk_max, double row_max) {
  const T r = static_cast<T>(row_max);
  return chunk_max > r ? chunk_max : r;
}

template <typename T>
KDK_CPU_INLINE T centre(T m) {
  return m == neg_inf<T>() ? T(0) : m;
}

// ---- forward: forward / reverse KL, one DRAM pass ------------------------------------------
template <typename S, int DIV>
KDK_CPU_HOT void forward_kl_rows(const S* student, const S* teacher, const Params<opmath_t<S>>& p, int64_t r0,
                                 int64_t r1, opmath_t<S>* loss, opmath_t<S>* stats) {
  using T = opmath_t<S>;
  constexpr int64_t C = kChunk<T>;
  alignas(64) T bs[C];
  alignas(64) T bt[C];
  // x: the weighting row (teacher for forward KL, student for reverse), y: the other one.
  const T* xb = DIV == kForwardKL ? bt : bs;
  const T* yb = DIV == kForwardKL ? bs : bt;
  const int64_t V = p.V;
  for (int64_t r = r0; r < r1; ++r) {
    T* st_out = stats + kRowStats * r;
    if (row_ignored(p, r)) {
      write_ignored_row(loss + r, st_out);
      continue;
    }
    const S* srow = student + r * V;
    const S* trow = teacher + r * V;
    LogRatioState<double> row = log_ratio_empty<double>();
    for (int64_t c0 = 0; c0 < V; c0 += C) {
      const int64_t n = std::min(C, V - c0);
      T ms, mt;
      scale_chunk(srow + c0, trow + c0, n, p.inv_t, bs, bt, ms, mt);
      const T mx = running_max(DIV == kForwardKL ? mt : ms, row.mw);
      const T my = running_max(DIV == kForwardKL ? ms : mt, row.mo);
      const T cx = centre(mx), cy = centre(my);
      T sw = 0, so = 0, acc = 0;
#pragma omp simd reduction(+ : sw, so, acc)
      for (int64_t i = 0; i < n; ++i) {
        const T x = xb[i], y = yb[i];
        sw += VecMath::exp(x - cx);
        so += VecMath::exp(y - cy);
        acc += log_ratio_term<T, VecMath>(x, cx, y, cy);
      }
      LogRatioState<double> part{mx, sw, my, so, acc};
      // a NaN that lost the max above still poisoned the sums: make the merge see it
      if (is_nan(sw) || is_nan(acc)) part.mw = std::numeric_limits<double>::quiet_NaN();
      if (is_nan(so)) part.mo = std::numeric_limits<double>::quiet_NaN();
      row = log_ratio_merge(row, part);
    }
    // the maxes are maxes of op-math values, so exact in T; the backward centres on them
    const T max_x = static_cast<T>(row.mw), log_sum_x = static_cast<T>(std::log(row.sw));
    const T max_y = static_cast<T>(row.mo), log_sum_y = static_cast<T>(std::log(row.so));
    const T kl = static_cast<T>(log_ratio_kl(row));
    if (DIV == kForwardKL) {  // x = teacher, y = student
      st_out[0] = max_y;
      st_out[1] = log_sum_y;
      st_out[2] = max_x;
      st_out[3] = log_sum_x;
      st_out[4] = T(0);
      st_out[5] = kl;
    } else {  // x = student, y = teacher
      st_out[0] = max_x;
      st_out[1] = log_sum_x;
      st_out[2] = max_y;
      st_out[3] = log_sum_y;
      st_out[4] = kl;
      st_out[5] = T(0);
    }
    loss[r] = kl * p.loss_scale;
  }
}

// ---- forward: JSD, maxes and log-sums first, then c_s and c_t ------------------------------
template <typename S>
KDK_CPU_HOT void forward_jsd_rows(const S* student, const S* teacher, const Params<opmath_t<S>>& p, int64_t r0,
                                  int64_t r1, opmath_t<S>* loss, opmath_t<S>* stats) {
  using T = opmath_t<S>;
  constexpr int64_t C = kChunk<T>;
  alignas(64) T bs[C];
  alignas(64) T bt[C];
  const int64_t V = p.V;
  const JsdConstants<T> k = p.k;
  for (int64_t r = r0; r < r1; ++r) {
    T* st_out = stats + kRowStats * r;
    if (row_ignored(p, r)) {
      write_ignored_row(loss + r, st_out);
      continue;
    }
    const S* srow = student + r * V;
    const S* trow = teacher + r * V;
    LseState<double> ls = lse_empty<double>(), lt = lse_empty<double>();
    for (int64_t c0 = 0; c0 < V; c0 += C) {
      const int64_t n = std::min(C, V - c0);
      T ms, mt;
      scale_chunk(srow + c0, trow + c0, n, p.inv_t, bs, bt, ms, mt);
      ms = running_max(ms, ls.m);
      mt = running_max(mt, lt.m);
      const T cs = centre(ms), ct = centre(mt);
      T ss = 0, st = 0;
#pragma omp simd reduction(+ : ss, st)
      for (int64_t i = 0; i < n; ++i) {
        ss += VecMath::exp(bs[i] - cs);
        st += VecMath::exp(bt[i] - ct);
      }
      ls = lse_merge(ls, LseState<double>{is_nan(ss) ? ss : ms, ss});
      lt = lse_merge(lt, LseState<double>{is_nan(st) ? st : mt, st});
    }
    // log p = (b - max) - log(sum): centred, so that logits of magnitude 1e4 keep their precision
    // (b - lse_s with lse_s rounded to float would not). The backward uses the same four numbers.
    const T max_s = static_cast<T>(ls.m), log_sum_s = static_cast<T>(std::log(ls.s));
    const T max_t = static_cast<T>(lt.m), log_sum_t = static_cast<T>(std::log(lt.s));
    double c_s = 0, c_t = 0;
    const T inv_t = p.inv_t;
    for (int64_t c0 = 0; c0 < V; c0 += C) {  // the row again, from L2 for usual V
      const int64_t n = std::min(C, V - c0);
      const S* sc = srow + c0;
      const S* tc = trow + c0;
      T cs = 0, ct = 0;  // partial sums per chunk, added up in double
#pragma omp simd reduction(+ : cs, ct)
      for (int64_t i = 0; i < n; ++i) {
        const T log_p = (rounded_scale(to_op(sc[i]), inv_t) - max_s) - log_sum_s;
        const T log_q = (rounded_scale(to_op(tc[i]), inv_t) - max_t) - log_sum_t;
        T ds = 0, dt = 0;  // per-element locals keep the header's conditional `+=` vectorisable
        jsd_accumulate<T, VecMath>(log_q, log_p, k, ds, dt);
        cs += ds;
        ct += dt;
      }
      c_s += cs;
      c_t += ct;
    }
    st_out[0] = max_s;
    st_out[1] = log_sum_s;
    st_out[2] = max_t;
    st_out[3] = log_sum_t;
    st_out[4] = static_cast<T>(c_s);
    st_out[5] = static_cast<T>(c_t);
    loss[r] = static_cast<T>((c_s + c_t) * p.loss_scale);
  }
}

// ---- backward: one pass per row ------------------------------------------------------------
template <typename S, int DIV, bool WANT_S, bool WANT_T>
KDK_CPU_INLINE void backward_row(const S* srow, const S* trow, const RowStats<opmath_t<S>>& st,
                                 const Params<opmath_t<S>>& p, opmath_t<S> g, S* gs, S* gt) {
  using T = opmath_t<S>;
  const int64_t V = p.V;
  const T inv_t = p.inv_t;
  const JsdConstants<T> k = p.k;
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) {
    T grad_b, grad_a;
    softmax_kl_grad<T, VecMath>(DIV, rounded_scale(to_op(trow[i]), inv_t), rounded_scale(to_op(srow[i]), inv_t), st, k,
                                grad_b, grad_a);
    if (WANT_S) store(gs + i, grad_b * g);
    if (WANT_T) store(gt + i, grad_a * g);
  }
}

template <typename S, int DIV>
KDK_CPU_HOT void backward_rows(const S* student, const S* teacher, const opmath_t<S>* stats, int64_t stats_s0,
                               int64_t stats_s1, const opmath_t<S>* grad_loss, int64_t grad_stride,
                               opmath_t<S> grad_scale, const Params<opmath_t<S>>& p, int64_t r0, int64_t r1,
                               S* grad_s, S* grad_t) {
  using T = opmath_t<S>;
  const int64_t V = p.V;
  for (int64_t r = r0; r < r1; ++r) {
    S* gs = grad_s == nullptr ? nullptr : grad_s + r * V;
    S* gt = grad_t == nullptr ? nullptr : grad_t + r * V;
    if (row_ignored(p, r)) {  // zero gradient, and the row's logits are not read
      if (gs) std::memset(static_cast<void*>(gs), 0, sizeof(S) * V);
      if (gt) std::memset(static_cast<void*>(gt), 0, sizeof(S) * V);
      continue;
    }
    const T* sr = stats + r * stats_s0;
    const RowStats<T> st{sr[0],          sr[stats_s1],     sr[2 * stats_s1],
                         sr[3 * stats_s1], sr[4 * stats_s1], sr[5 * stats_s1]};
    const T g = grad_loss[r * grad_stride] * grad_scale;
    const S* srow = student + r * V;
    const S* trow = teacher + r * V;
    if (gs && gt) {
      backward_row<S, DIV, true, true>(srow, trow, st, p, g, gs, gt);
    } else if (gs) {
      backward_row<S, DIV, true, false>(srow, trow, st, p, g, gs, gt);
    } else if (gt) {
      backward_row<S, DIV, false, true>(srow, trow, st, p, g, gs, gt);
    }
  }
}

// ---- op entry points -----------------------------------------------------------------------
template <typename F>
void with_divergence(int64_t divergence, F&& f) {
  switch (divergence) {
    case kForwardKL:
      f(std::integral_constant<int, kForwardKL>{});
      break;
    case kReverseKL:
      f(std::integral_constant<int, kReverseKL>{});
      break;
    default:
      f(std::integral_constant<int, kJSD>{});
      break;
  }
}


// Rows per parallel task: enough elements that a task outweighs its scheduling.
inline int64_t row_grain(int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
}

inline void check_common(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                         double temperature, int64_t divergence, double beta) {
  check_softmax_kl_args(student, teacher, labels, temperature, divergence, beta);
  TORCH_CHECK_VALUE(student.device().is_cpu(), "softmax_kl (CPU): tensors must be on the CPU");
  TORCH_CHECK_VALUE(student.is_contiguous() && teacher.is_contiguous(),
                    "softmax_kl (CPU): student and teacher must be contiguous");
}

template <typename T>
Params<T> make_params(const at::Tensor& student, const std::optional<at::Tensor>& labels, double temperature,
                      int64_t divergence, double beta, int64_t ignore_index, bool t2_scale) {
  Params<T> p;
  p.V = student.size(1);
  p.inv_t = static_cast<T>(1.0 / temperature);
  p.loss_scale = static_cast<T>(t2_scale ? temperature * temperature : 1.0);
  // only JSD reads them; keep log(beta) finite for the other divergences
  p.k = jsd_constants<T>(static_cast<T>(divergence == kJSD ? beta : 0.5));
  p.labels = labels.has_value() ? labels->data_ptr<int64_t>() : nullptr;
  p.label_stride = labels.has_value() ? labels->stride(0) : 0;
  p.ignore_index = ignore_index;
  return p;
}

}  // namespace response
}  // namespace cpu
}  // namespace kdkernels
