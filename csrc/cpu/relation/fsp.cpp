// CPU kernels of the one-pass FSP matrix loss (contract: FSP in kdkernels/ops/relation.py; math in
// kdkernels/fsp.h).
//
// The GEMMs go to BLAS through at::bmm; between them one fused pass, one task per sample: the FSP
// difference D of every (C1, C2) entry, the sample's sum of D^2 (double accumulation), and, when
// gradients are wanted, the gradient operands written over the Gram buffers (the student's g_s over
// G_s, the teacher's g_t over G_t). Then the gradient GEMMs dA = g B, dB = g^T A. 16-bit maps are
// converted to float32 first (BLAS has no bf16 / fp16 GEMM with a float32 result here; the maps are
// the GEMMs' operands either way), so G is accumulated and kept in float32 and the gradients are
// rounded once, at the end. The backward scales the saved gradients in place.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>

#include <tuple>

#include "../huge_pages.h"
#include "../scale_rows.h"
#include "kdkernels/fsp.h"
#include "kdkernels/op_args.h"
#include "kdkernels/relation_args.h"

namespace kdkernels {
namespace cpu {
namespace {

using at::Tensor;

// rows[n] = sum_ij D^2; g_s / g_t (when non-null) overwrite G_s / G_t with the gradient operands
template <typename T>
void fused_difference(T* gs, T* gt, int64_t N, int64_t M, T inv_ss, T inv_st, T weight, bool write_s, bool write_t,
                      T* rows) {
  const T scale_s = weight * inv_ss, scale_t = -weight * inv_st;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* s = gs + n * M;
      T* t = gt + n * M;
      double acc = 0;
      for (int64_t i = 0; i < M; ++i) {
        const T d = fsp::difference(s[i], t[i], inv_ss, inv_st);
        acc += static_cast<double>(d) * d;
        if (write_s) s[i] = fsp::grad_operand(d, scale_s);
        if (write_t) t[i] = fsp::grad_operand(d, scale_t);
      }
      rows[n] = static_cast<T>(acc);
    }
  });
}

// the gradient of one map: g (N, C1, C2) times the other map (transposed for the second's), written
// by BLAS into a fresh (N, C, S) tensor that asks for huge pages (one write in full: 2 MiB pages
// save most of the first-touch page faults, about a tenth of the step at N 64, C 128, 32 x 32)
Tensor map_grad(const Tensor& g, const Tensor& other, bool first, at::ScalarType dtype) {
  const Tensor lhs = first ? g : g.transpose(1, 2);
  Tensor out = at::empty({lhs.size(0), lhs.size(1), other.size(2)}, other.options());
  prefer_huge_pages(out);
  at::bmm_out(out, lhs, other);
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fsp_forward_cpu(
    const Tensor& student_first, const Tensor& student_second, const Tensor& teacher_first,
    const Tensor& teacher_second, const Tensor& weight, bool per_row, bool sf_grad, bool ss_grad, bool tf_grad,
    bool ts_grad) {
  check_fsp_args(student_first, student_second, teacher_first, teacher_second, weight, "fsp_forward");
  TORCH_CHECK(student_first.is_cpu(), "fsp_forward: the maps must be CPU tensors");
  const at::ScalarType dtype = student_first.scalar_type();
  const at::ScalarType opmath = opmath_scalar_type(dtype);
  auto up = [&](const Tensor& x) { return x.scalar_type() == opmath ? x : x.to(opmath); };
  const Tensor as = up(student_first), bs = up(student_second), at_ = up(teacher_first), bt = up(teacher_second);
  const int64_t N = as.size(0), C1 = as.size(1), C2 = bs.size(1);
  Tensor gs = at::bmm(as, bs.transpose(1, 2));  // (N, C1, C2), contiguous
  Tensor gt = at::bmm(at_, bt.transpose(1, 2));
  Tensor rows = at::empty({N}, as.options());
  const Tensor w = weight.to(opmath);
  const bool student_grad = sf_grad || ss_grad, teacher_grad = tf_grad || ts_grad;
  AT_DISPATCH_FLOATING_TYPES(opmath, "fsp_forward", [&] {
    fused_difference<scalar_t>(gs.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), N, C1 * C2,
                               scalar_t(1) / static_cast<scalar_t>(as.size(2)),
                               scalar_t(1) / static_cast<scalar_t>(at_.size(2)), w.item<scalar_t>(), student_grad,
                               teacher_grad, rows.data_ptr<scalar_t>());
  });
  Tensor loss = per_row ? at::mul(rows, w) : at::mul(rows.sum(), w);
  auto grad = [&](bool wanted, const Tensor& g, const Tensor& other, bool first, const Tensor& like) {
    return wanted ? map_grad(g, other, first, dtype) : at::empty({0}, like.options());
  };
  return {loss, grad(sf_grad, gs, bs, true, student_first), grad(ss_grad, gs, as, false, student_second),
          grad(tf_grad, gt, bt, true, teacher_first), grad(ts_grad, gt, at_, false, teacher_second)};
}

void fsp_backward_cpu(const Tensor& grad_loss_in, Tensor& grad_sf, Tensor& grad_ss, Tensor& grad_tf,
                      Tensor& grad_ts) {
  const Tensor* const grads[4] = {&grad_sf, &grad_ss, &grad_tf, &grad_ts};
  check_fsp_backward_args(grad_loss_in, grads, "fsp_backward");
  const Tensor* like = nullptr;
  for (const Tensor* g : grads) {
    if (g->numel() > 0) like = g;
  }
  if (like == nullptr) return;
  TORCH_CHECK(like->is_cpu(), "fsp_backward: CPU tensors");
  const at::ScalarType opmath = opmath_scalar_type(like->scalar_type());
  const Tensor grad_loss = grad_loss_in.scalar_type() == opmath ? grad_loss_in : grad_loss_in.to(opmath);
  for (Tensor* g : {&grad_sf, &grad_ss, &grad_tf, &grad_ts}) scale_samples_(*g, grad_loss);
}

}  // namespace
}  // namespace cpu
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("fsp_forward", &kdkernels::cpu::fsp_forward_cpu);
  m.impl("fsp_backward", &kdkernels::cpu::fsp_backward_cpu);
}
