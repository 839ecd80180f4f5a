// Portability macros and small numeric helpers shared by every CPU and CUDA kernel.
#pragma once
#include <cmath>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KDK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// forced on the host too: the CPU kernels' loops only vectorise with these inlined
#define KDK_HD inline __attribute__((always_inline))
#else
#define KDK_HD inline
#endif

namespace kdkernels {

// The elementary functions the shared math calls. A kernel may pass its own policy with the same
// static members as the `M` template argument (the CPU kernels pass one whose exp vectorises).
struct StdMath {
  template <typename T>
  static KDK_HD T exp(T x) {
    return std::exp(x);
  }
  template <typename T>
  static KDK_HD T log1p(T x) {
    return std::log1p(x);
  }
};

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
template <typename T, typename M = StdMath>
KDK_HD T log_add_exp(T a, T b) {
  T hi = max_nan(a, b);
  T lo = (hi == a) ? b : a;
  if (hi == neg_inf<T>()) return hi;
  return hi + M::log1p(M::exp(lo - hi));
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
