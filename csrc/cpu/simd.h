// CPU-only helpers for loops the compiler can vectorise: a polynomial exp / log1p (std::exp and
// std::log1p are libm calls, which GCC does not vectorise without -ffast-math), a math policy
// that hands them to the shared header math, and a macro that builds hot functions for several
// x86-64 levels so that one binary runs everywhere and still uses AVX-512 where it exists.
//
// Everything here is branch-free (selects only), so it vectorises under `#pragma omp simd`. With
// GCC, a TU that uses it in hot loops should start with `#pragma GCC optimize("no-trapping-math")`
// (or be built with -fno-trapping-math): otherwise GCC will not if-convert selects whose arms do
// floating-point arithmetic, and such loops stay scalar except on AVX-512 (see csrc/cpu/response/softmax_kl.cpp).
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

// Hot row functions: an AVX-512 clone, an AVX2+FMA clone and a baseline clone, picked once at load
// time (GCC/Clang ifunc); `flatten` inlines everything they call (these helpers and the shared
// header math), without which GCC leaves e.g. the JSD gradient as a call and the loop scalar.
// Elsewhere the function is compiled once, for the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && defined(__linux__)
#define KDK_CPU_HOT __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__)
#define KDK_CPU_HOT __attribute__((flatten))
#else
#define KDK_CPU_HOT
#endif

// The helpers below must be inlined into the loops that use them, or those loops do not vectorise;
// GCC's inliner gives up on them in large functions unless told.
#if defined(__GNUC__)
#define KDK_CPU_INLINE __attribute__((always_inline)) inline
#else
#define KDK_CPU_INLINE inline
#endif

namespace kdkernels {
namespace cpu {

KDK_CPU_INLINE uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
KDK_CPU_INLINE float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
KDK_CPU_INLINE uint64_t bits_of(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
KDK_CPU_INLINE double double_of(uint64_t u) {
  double x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// ---- exp ---------------------------------------------------------------------------------
// exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2] (Cody-Waite: ln2 in
// two parts, the first short enough that n * hi is exact), exp(r) by its Taylor polynomial (degree
// 7 for float, 13 for double: truncation below 0.1 ulp). 2^n is applied as 2^(n/2) * 2^(n - n/2)
// so that results in the subnormal range and just below the overflow threshold come out right,
// both factors being normal numbers. x is clamped first: the clamp bounds already give 0 (below)
// and inf (above), -inf -> 0, +inf -> inf; NaN fails both comparisons and stays NaN.
// Max error ~1-2 ulp (measured in the tests).
// The float core shared by exp_poly and exp_nonpositive: n = round(x / ln2) (as a float) and
// exp(r) for r = x - n ln2, so that exp(x) = exp(r) 2^n. x must already be clamped.
struct ExpParts {
  float nf;  // n, an integer-valued float (NaN for NaN x)
  float p;   // exp(r)
};

KDK_CPU_INLINE ExpParts exp_parts(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;     // 355/512
  constexpr float kLn2Lo = -2.12194440e-4f;  // ln2 - kLn2Hi
  constexpr float kRound = 12582912.0f;      // 1.5 * 2^23: adding it rounds to an integer
  const float nf = (x * kLog2e + kRound) - kRound;
  const float r = (x - nf * kLn2Hi) - nf * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return {nf, p};
}

KDK_CPU_INLINE float exp_poly(float x) {
  x = x < -104.0f ? -104.0f : x;  // exp(-104) < 2^-150 rounds to 0
  x = x > 89.0f ? 89.0f : x;      // exp(89) > FLT_MAX
  const ExpParts e = exp_parts(x);
  // integer n in [-150, 128]; NaN is mapped to 0 here (the product below is NaN anyway)
  const int32_t n = static_cast<int32_t>(e.nf == e.nf ? e.nf : 0.0f);
  const int32_t n1 = n >> 1;
  const int32_t n2 = n - n1;
  const float s1 = float_of(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = float_of(static_cast<uint32_t>(n2 + 127) << 23);
  return e.p * s1 * s2;
}

KDK_CPU_INLINE double exp_poly(double x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln2 with 21 trailing zero bits
  constexpr double kLn2Lo = 1.90821492927058770002e-10;  // ln2 - kLn2Hi
  constexpr double kRound = 6755399441055744.0;          // 1.5 * 2^52
  x = x < -746.0 ? -746.0 : x;  // exp(-746) < 2^-1075 rounds to 0
  x = x > 710.0 ? 710.0 : x;    // exp(710) > DBL_MAX
  const double nf = (x * kLog2e + kRound) - kRound;
  const double r = (x - nf * kLn2Hi) - nf * kLn2Lo;
  // Taylor coefficients 1/k!, k = 13 .. 2
  constexpr double kC[12] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                             1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,     1.0 / 720.0,
                             1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,        0.5};
  double p = kC[0];
  for (int k = 1; k < 12; ++k) p = p * r + kC[k];
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int32_t n = static_cast<int32_t>(nf == nf ? nf : 0.0);  // [-1076, 1025]
  const int32_t n1 = n >> 1;
  const int32_t n2 = n - n1;
  const double s1 = double_of(static_cast<uint64_t>(n1 + 1023) << 52);
  const double s2 = double_of(static_cast<uint64_t>(n2 + 1023) << 52);
  return p * s1 * s2;
}

// exp(x) for x <= 0 or NaN, as the centred softmax arguments b - max b are: exp_poly without the
// upper clamp and with one scale factor, 0 where the result would be subnormal (x < -87: a
// probability below 1e-38 changes no sum it is added to). Bit-identical to exp_poly for x >= -87
// (2^n scales exactly), about a quarter fewer instructions. Float only (the hot Hinton loop).
KDK_CPU_INLINE float exp_nonpositive(float x) {
  const bool tiny = x < -87.0f;
  const ExpParts e = exp_parts(tiny ? -87.0f : x);
  const int32_t n = static_cast<int32_t>(e.nf == e.nf ? e.nf : 0.0f);  // [-126, 0]; NaN: 0 (p is NaN)
  const float v = e.p * float_of(static_cast<uint32_t>(n + 127) << 23);
  return tiny ? 0.0f : v;
}
KDK_CPU_INLINE double exp_nonpositive(double x) {
  return exp_poly(x);
}

// ---- log1p -------------------------------------------------------------------------------
// u = 1 + x = 2^k * m with m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m-1)/(m+1), |s| <
// 0.172, by its odd series; the rounding of 1 + x is put back by (x - (u - 1)) / u. Accurate to
// ~2 ulp for all x > -1; -1 -> -inf, < -1 -> NaN, +inf -> +inf, NaN -> NaN.
KDK_CPU_INLINE float log1p_poly(float x) {
  constexpr float kLn2 = 0.693147180559945309f;
  const float u0 = 1.0f + x;
  // u0 <= 0, +inf and NaN get their answer added at the end; the arithmetic runs on a harmless
  // stand-in instead of being skipped, which keeps the loop branch-free (GCC will not
  // if-convert a division that a select would make conditional).
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const bool special = !(u0 > 0.0f) | (u0 == kInf);
  const float adj =
      !special ? 0.0f : (u0 == 0.0f ? -kInf : (u0 == kInf ? kInf : std::numeric_limits<float>::quiet_NaN()));
  x = special ? 0.0f : x;
  const float u = special ? 1.0f : u0;
  const uint32_t ub = bits_of(u);
  int32_t k = static_cast<int32_t>(ub >> 23) - 127;  // u is a positive normal number here
  float m = float_of((ub & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  k = big ? k + 1 : k;
  const float f = m - 1.0f;  // exact
  const float corr = (x - (u - 1.0f)) / u;
  const float s = f / (2.0f + f);
  const float s2 = s * s;
  // atanh(s)/s - 1 = s^2/3 + s^4/5 + ...; truncation after s^8/9 is below 0.1 ulp
  float q = 1.0f / 9.0f;
  q = q * s2 + 1.0f / 7.0f;
  q = q * s2 + 1.0f / 5.0f;
  q = q * s2 + 1.0f / 3.0f;
  const float two_s = s + s;
  const float r = static_cast<float>(k) * kLn2 + (two_s + (two_s * s2 * q + corr));
  return r + adj;
}

KDK_CPU_INLINE double log1p_poly(double x) {
  constexpr double kLn2 = 0.6931471805599453094;
  const double u0 = 1.0 + x;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const bool special = !(u0 > 0.0) | (u0 == kInf);  // as for float
  const double adj =
      !special ? 0.0 : (u0 == 0.0 ? -kInf : (u0 == kInf ? kInf : std::numeric_limits<double>::quiet_NaN()));
  x = special ? 0.0 : x;
  const double u = special ? 1.0 : u0;
  const uint64_t ub = bits_of(u);
  int32_t k = static_cast<int32_t>(ub >> 52) - 1023;
  double m = double_of((ub & 0x000fffffffffffffull) | 0x3ff0000000000000ull);
  const bool big = m > 1.4142135623730950488;
  m = big ? 0.5 * m : m;
  k = big ? k + 1 : k;
  const double f = m - 1.0;
  const double corr = (x - (u - 1.0)) / u;
  const double s = f / (2.0 + f);
  const double s2 = s * s;
  // s^2/3 + ... + s^20/21: truncation below 0.1 ulp
  constexpr double kC[9] = {1.0 / 19.0, 1.0 / 17.0, 1.0 / 15.0, 1.0 / 13.0, 1.0 / 11.0,
                            1.0 / 9.0,  1.0 / 7.0,  1.0 / 5.0,  1.0 / 3.0};
  double q = 1.0 / 21.0;
  for (int j = 0; j < 9; ++j) q = q * s2 + kC[j];
  const double two_s = s + s;
  const double r = static_cast<double>(k) * kLn2 + (two_s + (two_s * s2 * q + corr));
  return r + adj;
}

// ---- 16-bit floats, as raw bits (c10::Half / c10::BFloat16 hold them in their member `x`) -----
// Branch-free conversions: loops that construct c10::Half / c10::BFloat16 values do not vectorise.
// Rounding is to nearest even, as the hardware instructions do.
KDK_CPU_INLINE float bf16_to_float(uint16_t h) {
  return float_of(static_cast<uint32_t>(h) << 16);
}

KDK_CPU_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);  // NaN stays a (quiet) NaN
}

KDK_CPU_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7fffu;
  // normal: re-bias the exponent (127 - 15 = 112); inf / NaN: exponent all ones; subnormal and
  // zero: mantissa * 2^-24, exact in float
  const uint32_t normal = (mag << 13) + (112u << 23);
  const uint32_t special = (mag << 13) | 0x7f800000u;
  const uint32_t sub = bits_of(static_cast<float>(static_cast<int32_t>(mag)) * 5.9604644775390625e-8f);
  const uint32_t out = mag >= 0x7c00u ? special : (mag >= 0x0400u ? normal : sub);
  return float_of(sign | out);
}

KDK_CPU_INLINE uint16_t float_to_half(float f) {
  const uint32_t u = bits_of(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal result: drop 13 mantissa bits with round-to-nearest-even, re-bias; past the largest
  // finite half the carry lands on the inf pattern, so clamping at 0x7c00 gives inf
  uint32_t normal = (a - (112u << 23) + 0x0fffu + ((a >> 13) & 1u)) >> 13;
  normal = normal > 0x7c00u ? 0x7c00u : normal;
  // subnormal result (|f| < 2^-14): 0.5 + |f| rounds |f| to a multiple of 2^-24 (its ulp there);
  // the mantissa bits that changed are the half's bits (0x400 if it rounds up to the normal min)
  const uint32_t sub = bits_of(0.5f + float_of(a)) - 0x3f000000u;
  uint32_t out = a < 0x38800000u ? sub : normal;
  out = a > 0x7f800000u ? 0x7e00u : out;  // NaN
  return static_cast<uint16_t>(sign | out);
}

// Elementary functions for the shared math headers (their `M` template parameter), so that the
// per-element functions of e.g. kdkernels/softmax_kl.h vectorise in CPU loops.
struct VecMath {
  static KDK_CPU_INLINE float exp(float x) { return exp_poly(x); }
  static KDK_CPU_INLINE double exp(double x) { return exp_poly(x); }
  static KDK_CPU_INLINE float log1p(float x) { return log1p_poly(x); }
  static KDK_CPU_INLINE double log1p(double x) { return log1p_poly(x); }
};

}  // namespace cpu
}  // namespace kdkernels
