// Temperature softmax-KL math (docs/design.md §2.1), written once for the CPU and CUDA kernels.
//
// Per row, with a = z_teacher / T and b = z_student / T, m_t = max a, m_s = max b,
// log_sum_t = log sum exp(a - m_t), log_sum_s = log sum exp(b - m_s):
//   log q = (a - m_t) - log_sum_t,  log p = (b - m_s) - log_sum_s          (teacher q, student p)
//   forward  KL(q||p) = sum q (log q - log p)
//   reverse  KL(p||q) = sum p (log p - log q)
//   jsd      log m = logaddexp(log q + log beta, log p + log(1-beta))
//            c_t = beta * KL(q||m),  c_s = (1-beta) * KL(p||m),  loss = c_s + c_t
// The logs are centred: b - m_s is exact for the entries that carry the mass (Sterbenz), so
// logits of magnitude 1e4..1e5 keep full relative precision in p and q. (b - lse_s with lse_s
// rounded to float would carry lse's rounding, ulp(1e4) ~ 1e-3, into every p as a relative error.)
// The kernels must compute a and b the same way in every pass (no FMA contraction of the scaling
// into the subtraction), so that a - m_t is exactly 0 at the max.
// The forward op stores stats[row] = {m_s, log_sum_s, m_t, log_sum_t, c_s, c_t} (forward: c_s = 0,
// c_t = KL; reverse: c_s = KL, c_t = 0), so the per-row loss before T^2 scaling is always
// c_s + c_t and the backward recomputes p, q (and m) from the logits plus these six numbers.
// Ignored rows store six zeros.
//
// Gradients of the unscaled row loss with respect to a and b (multiply by 1/T for the logits):
//   forward: d/db = p - q                      d/da = q (log q - log p - c_t)
//   reverse: d/db = p (log p - log q - c_s)    d/da = q - p
//   jsd:     d/db = p ((1-beta)(log p - log m) - c_s)
//            d/da = q (beta (log q - log m) - c_t)
// Terms with a zero probability factor are exactly 0 (0 log 0 = 0), also where the log is -inf.
#pragma once
#include "kdkernels/common.h"

namespace kdkernels {

enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// ---- streaming log-sum-exp --------------------------------------------------------------
// s = sum exp(x - m) over the values seen; m = their max. Empty / all -inf: {-inf, 0}.
template <typename T>
struct LseState {
  T m;
  T s;
};

template <typename T>
KDK_HD LseState<T> lse_empty() {
  return {neg_inf<T>(), T(0)};
}

template <typename T>
KDK_HD LseState<T> lse_merge(LseState<T> x, LseState<T> y) {
  T m = max_nan(x.m, y.m);
  if (m == neg_inf<T>()) return {m, T(0)};
  T s = (x.s == T(0) ? T(0) : x.s * std::exp(x.m - m)) + (y.s == T(0) ? T(0) : y.s * std::exp(y.m - m));
  if (is_nan(m)) s = m;
  return {m, s};
}

template <typename T>
KDK_HD T lse_value(LseState<T> st) {
  return st.m + std::log(st.s);
}

// ---- streaming weighted log-ratio: one-pass forward / reverse KL -------------------------
// For a weighting row x (whose softmax is w) and another row y (softmax o) accumulates
//   mw = max x, sw = sum exp(x - mw), mo = max y, so = sum exp(y - mo),
//   acc = sum exp(x - mw) * ((x - mw) - (y - mo))
// so that KL(w||o) = acc / sw - log sw + log so. Centring on the maxes keeps the terms small
// even for logits of magnitude 1e4. Forward KL: x = a (teacher), y = b; reverse: x = b, y = a.
template <typename T>
struct LogRatioState {
  T mw, sw, mo, so, acc;
};

template <typename T>
KDK_HD LogRatioState<T> log_ratio_empty() {
  return {neg_inf<T>(), T(0), neg_inf<T>(), T(0), T(0)};
}

// One element's contribution to acc, for maxes (mw, mo) already known for its chunk.
template <typename T, typename M = StdMath>
KDK_HD T log_ratio_term(T x, T mw, T y, T mo) {
  T w = M::exp(x - mw);
  if (!(w > T(0)) && !is_nan(w)) return T(0);  // 0 * log(0 / anything) = 0
  T ly = (y == neg_inf<T>()) ? neg_inf<T>() : y - mo;
  return w * ((x - mw) - ly);
}

// Merge two partial states (chunks, lanes, threads).
template <typename T>
KDK_HD LogRatioState<T> log_ratio_merge(LogRatioState<T> A, LogRatioState<T> B) {
  LogRatioState<T> R;
  R.mw = max_nan(A.mw, B.mw);
  R.mo = max_nan(A.mo, B.mo);
  R.sw = T(0);
  R.acc = T(0);
  R.so = T(0);
  const LogRatioState<T>* parts[2] = {&A, &B};
  for (int i = 0; i < 2; ++i) {
    const LogRatioState<T>& P = *parts[i];
    if (P.sw != T(0)) {
      T aw = std::exp(P.mw - R.mw);
      // an all -inf y in this part already made acc = +inf; its shift is irrelevant
      T shift_o = P.so != T(0) ? (R.mo - P.mo) : T(0);
      R.acc += aw * (P.acc - ((R.mw - P.mw) - shift_o) * P.sw);
      R.sw += aw * P.sw;
    }
    if (P.so != T(0)) R.so += P.so * std::exp(P.mo - R.mo);
  }
  if (is_nan(R.mw) || is_nan(R.mo)) R.acc = R.mw + R.mo;  // NaN in, NaN out
  return R;
}

template <typename T>
KDK_HD T log_ratio_kl(LogRatioState<T> st) {
  return st.acc / st.sw - std::log(st.sw) + std::log(st.so);
}

// ---- JSD second pass ---------------------------------------------------------------------
template <typename T>
struct JsdConstants {
  T beta, one_minus_beta, log_beta, log_one_minus_beta;
};

template <typename T>
KDK_HD JsdConstants<T> jsd_constants(T beta) {
  return {beta, T(1) - beta, std::log(beta), std::log1p(-beta)};
}

template <typename T, typename M = StdMath>
KDK_HD T jsd_log_m(T log_q, T log_p, const JsdConstants<T>& k) {
  return log_add_exp<T, M>(log_q + k.log_beta, log_p + k.log_one_minus_beta);
}

// Adds this element's share of c_s and c_t.
template <typename T, typename M = StdMath>
KDK_HD void jsd_accumulate(T log_q, T log_p, const JsdConstants<T>& k, T& c_s, T& c_t) {
  T lm = jsd_log_m<T, M>(log_q, log_p, k);
  T p = M::exp(log_p), q = M::exp(log_q);
  if (p > T(0) || is_nan(p)) c_s += k.one_minus_beta * p * (log_p - lm);
  if (q > T(0) || is_nan(q)) c_t += k.beta * q * (log_q - lm);
}

// ---- per-element gradient of the unscaled row loss w.r.t. b (student) and a (teacher) ------
// One row's stats, in the order the forward op stores them (see the top of this file).
template <typename T>
struct RowStats {
  T m_s, log_sum_s, m_t, log_sum_t, c_s, c_t;
};
constexpr int kRowStats = 6;  // numbers per row in the stats tensor

template <typename T, typename M = StdMath>
KDK_HD void softmax_kl_grad(int divergence, T a, T b, const RowStats<T>& st, const JsdConstants<T>& k,
                            T& grad_b, T& grad_a) {
  T log_p = (b - st.m_s) - st.log_sum_s, log_q = (a - st.m_t) - st.log_sum_t;
  T p = M::exp(log_p), q = M::exp(log_q);
  bool p_pos = p > T(0) || is_nan(p), q_pos = q > T(0) || is_nan(q);
  if (divergence == kForwardKL) {
    grad_b = p - q;
    grad_a = q_pos ? q * (log_q - log_p - st.c_t) : T(0);
  } else if (divergence == kReverseKL) {
    grad_b = p_pos ? p * (log_p - log_q - st.c_s) : T(0);
    grad_a = q - p;
  } else {
    T lm = jsd_log_m<T, M>(log_q, log_p, k);
    grad_b = p_pos ? p * (k.one_minus_beta * (log_p - lm) - st.c_s) : T(0);
    grad_a = q_pos ? q * (k.beta * (log_q - lm) - st.c_t) : T(0);
  }
}

}  // namespace kdkernels
