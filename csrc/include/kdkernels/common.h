// Portability macros and small numeric helpers shared by every CPU and CUDA kernel.
#pragma once
#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KDK_HD __host__ __device__ __forceinline__
#else
#define KDK_HD inline
#endif

namespace kdkernels {

template <typename T>
KDK_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
KDK_HD bool is_nan(T x) {
  return x != x;
}

// max that propagates NaN from either side (std::max / fmax would drop it and hide bad input).
template <typename T>
KDK_HD T max_nan(T a, T b) {
  return (is_nan(a) || a > b) ? a : b;
}

// log(exp(a) + exp(b)) without overflow; -inf + -inf = -inf (not NaN).
template <typename T>
KDK_HD T log_add_exp(T a, T b) {
  T hi = max_nan(a, b);
  T lo = (hi == a) ? b : a;
  if (hi == neg_inf<T>()) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// Smooth-L1 (Huber with beta = 1), used by the relation family.
template <typename T>
KDK_HD T smooth_l1(T diff) {
  T ad = std::fabs(diff);
  return ad < T(1) ? T(0.5) * diff * diff : ad - T(0.5);
}

// d smooth_l1 / d diff
template <typename T>
KDK_HD T smooth_l1_grad(T diff) {
  return std::fabs(diff) < T(1) ? diff : (diff > T(0) ? T(1) : (diff < T(0) ? T(-1) : diff));
}

}  // namespace kdkernels
