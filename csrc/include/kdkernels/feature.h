// Projected-MSE math and layout rules (docs/design.md §2.2), written once for the CPU and CUDA kernels.
//
// The ops see x as (B, P, Ds) and t as (B, P, Dt): B * P feature vectors ("rows"). Per row
//   y = W x + b,   r = y - t (the residual),   loss = reduce(sum r^2)
// and with g = d loss / d r = grad_loss * 2 / denominator:
//   grad_x = g r W,   grad_W = sum_rows g r x^T,   grad_b = sum_rows g r,   grad_t = -g r.
// kFeatureNone keeps one loss per row, sum_d r_d^2, as a (B, P) tensor; its grad_loss is (B, P) too,
// so g becomes per row: g_row = 2 * grad_loss[b, p] (the denominator is 1).
// The forward saves r (input dtype) for the backward; y is never stored.
#pragma once
#include <cstdint>

#include "kdkernels/common.h"

namespace kdkernels {

// The codes of kdkernels.reduction.FEATURES (its names' indices).
enum FeatureReduction : int { kFeatureMean = 0, kFeatureSum = 1, kFeatureBatchMean = 2, kFeatureNone = 3 };

KDK_HD bool valid_feature_reduction(int64_t reduction) {
  return reduction >= kFeatureMean && reduction <= kFeatureNone;
}

// What the sum of squared residuals is divided by: the element count ("mean") or the row count
// ("batchmean"), at least 1, so an empty input gives loss 0 as every kdkernels loss does
// (docs/decisions.md, "Empty inputs"; F.mse_loss would give NaN). "sum" and each row of "none": 1.
KDK_HD double projected_mse_denominator(int64_t reduction, int64_t rows, int64_t teacher_dim) {
  if (reduction == kFeatureSum || reduction == kFeatureNone) return 1.0;
  const double count = reduction == kFeatureBatchMean ? static_cast<double>(rows)
                                                      : static_cast<double>(rows) * static_cast<double>(teacher_dim);
  return count > 1.0 ? count : 1.0;
}

// d loss / d r per unit grad_loss: 2 / denominator (an empty residual has no entries to scale). For
// "none" it is per unit grad_loss[b, p], which the kernels apply per row.
KDK_HD double projected_mse_grad_factor(int64_t reduction, int64_t rows, int64_t teacher_dim) {
  return 2.0 / projected_mse_denominator(reduction, rows, teacher_dim);
}

// r = y - t + b in this order on every backend, so they round alike. T: a scalar or a vector type.
template <typename T>
KDK_HD T projected_residual(const T& y, const T& t, const T& bias) {
  return (y - t) + bias;
}

// Layout rule shared by every backend (and by the Python fake kernels): a (B, P, D) tensor is
// "feature-major" when its P axis has stride 1 (NCHW maps viewed as (N, H*W, C)); both P and D must be
// > 1 for the rule to mean anything. The residual, grad_x and grad_t of a feature-major teacher are the
// transposes of contiguous (B, D, P) tensors, so they keep the teacher's memory layout; otherwise they
// are contiguous (B, P, D).
KDK_HD bool feature_major(int64_t positions, int64_t features, int64_t position_stride) {
  return positions > 1 && features > 1 && position_stride == 1;
}

}  // namespace kdkernels
