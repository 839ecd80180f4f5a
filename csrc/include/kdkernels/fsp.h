// FSP matrix loss math (FSP in kdkernels/ops/relation.py), written once for the CPU and CUDA kernels.
//
// The GEMMs give the raw Gram products G_s = A_s B_s^T and G_t = A_t B_t^T (op-math); the fused
// element step turns one entry of each into the difference of the FSP matrices,
//   D = G_s / S_s - G_t / S_t          (inv_ss = 1 / S_s, inv_st = 1 / S_t),
// whose square the kernel sums per sample, and, when gradients are wanted, into the GEMM operands of
// the gradients: g_s = 2 w D / S_s (dA_s = g_s B_s, dB_s = g_s^T A_s) and g_t = -2 w D / S_t.
#pragma once
#include "kdkernels/common.h"

namespace kdkernels {
namespace fsp {

template <typename T>
KDK_HD T difference(T g_s, T g_t, T inv_ss, T inv_st) {
  return g_s * inv_ss - g_t * inv_st;
}

// the factor of D in the student's (scale = w / S_s) or the teacher's (scale = -w / S_t) operand
template <typename T>
KDK_HD T grad_operand(T d, T scale) {
  return T(2) * scale * d;
}

}  // namespace fsp
}  // namespace kdkernels
