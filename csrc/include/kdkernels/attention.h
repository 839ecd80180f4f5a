// Attention-transfer math (docs/design.md §2.2; the op's contract: ATTENTION_TRANSFER in
// kdkernels/ops/feature.py), written once for the CPU and CUDA kernels.
//
// Per sample: a[k] = (1/C) sum_c |F[c, k]|^p, v = a / max(||a||, eps), d = v_s - v_t,
// l = sum d^2 (squared) or ||d|| (not squared). Backward through the chain:
//   g_v = weight * 2 d (squared) or weight * d / ||d|| (0 where ||d|| = 0); the teacher's is -g_v;
//   g_a = (g_v - v <v, g_v>) / nrm where ||a|| > eps, else g_v / eps (the clamp passes nothing);
//   dF[c, k] = g_a[k] / C * p |F|^(p-1) sign(F), 0 where F = 0 (also for p = 1: |x|' at 0 is 0).
// Power kinds: p = 1 and p = 2 are the common cases and get exact, vectorisable forms.
#pragma once
#include <cmath>

#include "kdkernels/common.h"

namespace kdkernels {
namespace attention {

constexpr double kEps = 1e-12;  // F.normalize's clamp on the attention norm

enum PowerKind : int { kPowerOne = 1, kPowerTwo = 2, kPowerAny = 0 };

inline int power_kind(double p) { return p == 1.0 ? kPowerOne : (p == 2.0 ? kPowerTwo : kPowerAny); }

// |x|^p
template <int KIND, typename T>
KDK_HD T abs_pow(T x, T p) {
  if constexpr (KIND == kPowerTwo) {
    return x * x;
  } else if constexpr (KIND == kPowerOne) {
    return std::fabs(x);
  } else {
    const T ax = std::fabs(x);
    return ax == T(0) ? T(0) : std::pow(ax, p);
  }
}

// d |x|^p / dx = p |x|^(p-1) sign(x); 0 at x = 0
template <int KIND, typename T>
KDK_HD T abs_pow_grad(T x, T p) {
  if constexpr (KIND == kPowerTwo) {
    return T(2) * x;
  } else if constexpr (KIND == kPowerOne) {
    return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0));
  } else {
    const T ax = std::fabs(x);
    const T g = ax == T(0) ? T(0) : p * std::pow(ax, p - T(1));
    return x < T(0) ? -g : g;
  }
}

// max(||a||, eps) from sum a^2 (NaN stays NaN)
template <typename T>
KDK_HD T clamped_norm(T sumsq) {
  const T n = std::sqrt(sumsq);
  return !(n <= T(kEps)) ? n : T(kEps);
}

// whether the normaliser passes a gradient (the norm was not clamped)
template <typename T>
KDK_HD bool norm_active(T nrm) {
  return nrm > T(kEps);
}

// l from sum d^2
template <typename T>
KDK_HD T sample_loss(T sum_d2, bool squared) {
  return squared ? sum_d2 : std::sqrt(sum_d2);
}

// g_v = factor * d: 2 (squared) or 1 / ||d|| (0 where ||d|| = 0), times the weight
template <typename T>
KDK_HD T grad_v_factor(T sum_d2, bool squared, T weight) {
  if (squared) return T(2) * weight;
  return sum_d2 > T(0) ? weight / std::sqrt(sum_d2) : T(0);
}

// g_a[k] from g_v[k], v[k], the sample's <v, g_v> and its norm
template <typename T>
KDK_HD T grad_a(T gv, T v, T v_dot_gv, T nrm) {
  return norm_active(nrm) ? (gv - v * v_dot_gv) / nrm : gv / T(kEps);
}

}  // namespace attention
}  // namespace kdkernels
