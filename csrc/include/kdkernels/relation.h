// Relation-family math (docs/design.md §2.3), written once for the CPU and CUDA kernels.
//
// Every kernel works on centred embeddings e_i = x_i - mean(x) (distances and angles are
// translation invariant; centring shrinks the norms the Gram expansion subtracts) and on squared
// distances sq_ij = n_i + n_j - 2 G_ij, n_i = |e_i|^2, G = E E^T. Where sq_ij is small next to
// n_i + n_j the expansion has lost most of its digits (and an exact duplicate would come out as
// ~1e-5 instead of 0, i.e. a distance of ~3e-3 instead of 1e-6), so those pairs are recomputed
// from the differences; gram_unreliable() is the test, shared by all backends.
//
// RKD distance: d_ij = sqrt(max(sq_ij, eps)) (i != j), d_ii = 0, mu = sum d / (B (B - 1)): the
//   clamp makes every off-diagonal d >= 1e-6 > 0, so the spec's count{d > 0} is B (B - 1).
//   x_ij = d_s/mu_s - d_t/mu_t, loss = sum smooth_l1(x_ij).
//   dL/dd_s_ij = h_ij / mu_s - A / (B (B - 1)), h = smooth_l1'(x), A = sum h_ij d_s_ij / mu_s^2
//   (the second term is the path through mu_s). The clamp passes a gradient only where
//   sq > eps (strictly, as autograd's clamp_min does), and d d_ij / d e_i = (e_i - e_j) / d_ij.
// RKD angle: by polarisation <e_j - e_i, e_k - e_i> = (a + b - c) / 2 with a = sq_ij, b = sq_ik,
//   c = sq_jk, so psi_ijk = (a + b - c) / 2 * r_ij * r_ik with r = 1 / |e_j - e_i|, and r = 0
//   where |e_j - e_i| <= 1e-12 (u_ij = 0 there, as in the spec for coincident points).
// SP: b_ij = G_ij / n_i with n_i = max(|G_i|_2, eps); loss = sum (a_ij - b_ij)^2 (a: teacher).
//   dL/dG_ij = (rho_ij - b_ij gamma_i) / n_i, rho = -2 (a - b), gamma_i = sum_k rho_ik b_ik
//   (0 where the norm is clamped, which passes no gradient).
//
// Per-row losses (reduction "none"): l_i is row i of the distance / SP matrix and anchor i's
// (B, B) slice of the angles. A backward's upstream gradient is then a vector w (B,), the gradient
// of sum_i w_i l_i, instead of a 0-d g (the gradient of g sum_i l_i, i.e. w_i = g):
//   distance: the unordered pair {i, j} is in l_i and l_j, so it weighs w_i + w_j (2 g), and the
//     path through mu_s needs A_w = sum_ij w_i h_ij d_s_ij / mu_s^2 (g A): distance_grad_weight;
//   SP: row i of dL/dG is scaled by w_i before the symmetrisation: w_i W_ij + w_j W_ji;
//   angle: every term of anchor i (its slot-a and slot-c derivatives) is scaled by w_i.
#pragma once
#include <type_traits>

#include "kdkernels/common.h"

namespace kdkernels {
namespace relation {

constexpr double kEps = 1e-12;        // the spec's clamp on squared distances / norms
constexpr double kNearRatio = 1.0 / 16;  // recompute sq_ij directly below this fraction of n_i + n_j

template <typename T>
KDK_HD bool gram_unreliable(T sq, T ni, T nj) {
  return sq < T(kNearRatio) * (ni + nj);
}

template <typename T>
KDK_HD T sq_from_gram(T ni, T nj, T gij) {
  return ni + nj - T(2) * gij;
}

// The clamps below are written !(x <= eps) so that NaN input stays NaN instead of being clamped.

// RKD distance of an off-diagonal pair from its squared distance.
template <typename T>
KDK_HD T clamped_distance(T sq) {
  return !(sq <= T(kEps)) ? std::sqrt(sq) : std::sqrt(T(kEps));
}

// Weight v with dL/de_i += v (e_i - e_j) for d_ij: dL/dd / d where the clamp passes a gradient.
template <typename T>
KDK_HD T distance_pair_weight(T sq, T dl_dd) {
  return !(sq <= T(kEps)) ? dl_dd / std::sqrt(sq) : T(0);
}

// x_ij = d_s / mu_s - d_t / mu_t of an off-diagonal pair, from both sides' squared distances.
template <typename T>
KDK_HD T distance_residual(T sq_s, T sq_t, T mu_s, T mu_t) {
  return clamped_distance(sq_s) / mu_s - clamped_distance(sq_t) / mu_t;
}

// The distance term's weight of the off-diagonal entry (i, j) of the symmetric (B, B) pair-weight
// matrix (dL/de_i = sum_j v_ij (e_i - e_j)): dL/dd_ij / d_ij for the unordered pair {i, j}, whose
// d_ij = d_ji both entries share. pair_w = w_i + w_j (2 g for a 0-d upstream g); through_mu =
// 2 A_w / (B (B - 1)) (2 g A / (B (B - 1))): the path through mu_s, the same for every pair.
template <typename T>
KDK_HD T distance_grad_weight(T sq_s, T x, T mu_s, T pair_w, T through_mu) {
  return distance_pair_weight(sq_s, pair_w * smooth_l1_grad(x) / mu_s - through_mu);
}

// 1 / |e_j - e_i| from sq_ij, 0 where the spec's norm clamp (1e-12) makes u_ij = 0.
template <typename T>
KDK_HD T angle_inv_norm(T sq) {
  return !(sq <= T(kEps * kEps)) ? T(1) / std::sqrt(sq) : T(0);
}

// psi_ijk from a = sq_ij, b = sq_ik, c = sq_jk and r_a = 1/|e_j - e_i|, r_b = 1/|e_k - e_i|.
template <typename T>
KDK_HD T angle_cos(T a, T b, T c, T ra, T rb) {
  return T(0.5) * (a + b - c) * ra * rb;
}

// d psi / d a (d psi / d b is the same with a <-> b) and d psi / d c.
template <typename T>
KDK_HD T angle_cos_grad_a(T psi, T ra, T rb) {
  return T(0.5) * ra * (rb - psi * ra);
}

template <typename T>
KDK_HD T angle_cos_grad_c(T ra, T rb) {
  return T(-0.5) * ra * rb;
}

// SP row normaliser max(|G_i|_2, eps) from the row's sum of squares.
template <typename T>
KDK_HD T sp_row_norm(T sumsq) {
  T n = std::sqrt(sumsq);
  return !(n <= T(kEps)) ? n : T(kEps);
}

// Whether the SP normaliser passes a gradient (the norm was not clamped).
template <typename T>
KDK_HD bool sp_norm_active(T n) {
  return n > T(kEps);
}

// SP: dL/dG_ij per unit upstream gradient of row i, (rho_ij - b_ij gamma_i) / n_i, from the Gram
// entries gs = G_s,ij, gt = G_t,ij and row i's stats n_s, n_t, gamma' (0 where n_s is clamped).
template <typename T>
KDK_HD T sp_grad_entry(T gs, T gt, T ns, T nt, T gamma) {
  const T b = gs / ns;
  return (T(-2) * (gt / nt - b) - b * gamma) / ns;
}

// Host: fn(std::true_type{}) for a (B,) upstream gradient, fn(std::false_type{}) for a 0-d one, so
// that a kernel body is compiled once per kind and the 0-d path keeps no per-element branch.
template <typename F>
decltype(auto) with_per_row(bool per_row, F&& fn) {
  return per_row ? fn(std::true_type{}) : fn(std::false_type{});
}

}  // namespace relation
}  // namespace kdkernels
