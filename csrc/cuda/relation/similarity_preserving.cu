// CUDA kernels of the similarity-preserving loss (docs/design.md §2.3). The loops and kernels
// it shares with the other relation ops are in _rows.cuh, the math in kdkernels/relation.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <tuple>

#include "_rows.cuh"

namespace kdkernels {
namespace cuda {
namespace {
using namespace relation;

// ---- similarity preserving -----------------------------------------------------------------------
template <typename T>
__global__ void sp_row_kernel(const T* __restrict__ gs, const T* __restrict__ gt, T* __restrict__ stats,
                              double* __restrict__ row_loss, int64_t r0, int64_t B) {
  const int64_t i = r0 + blockIdx.x;
  const T* s = gs + blockIdx.x * B;
  const T* t = gt + blockIdx.x * B;
  double ss = 0, tt = 0;
  for (int64_t j = threadIdx.x; j < B; j += kThreads)
    ss += static_cast<double>(s[j]) * s[j], tt += static_cast<double>(t[j]) * t[j];
  __shared__ T norms[2];
  ss = block_sum(ss);
  tt = block_sum(tt);
  if (threadIdx.x == 0) norms[0] = sp_row_norm(static_cast<T>(ss)), norms[1] = sp_row_norm(static_cast<T>(tt));
  __syncthreads();
  const T n_s = norms[0], n_t = norms[1];
  double loss = 0, gm = 0;
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {
    const T b = s[j] / n_s, diff = t[j] / n_t - b;
    loss += static_cast<double>(diff) * diff;
    gm += -2.0 * diff * b;
  }
  loss = block_sum(loss);
  gm = block_sum(gm);
  if (threadIdx.x == 0) {
    stats[i] = n_s;
    stats[B + i] = n_t;
    stats[2 * B + i] = sp_norm_active(n_s) ? static_cast<T>(gm) : T(0);
    row_loss[i] = loss;
  }
}

// weights S = g (W + W^T) (PER_ROW: S_ij = w_i W_ij + w_j W_ji) of the block (rows [r0, r0 + rows),
// columns [r0, B)), written over the student's Gram block (relation.h)
template <typename T, bool PER_ROW>
__global__ void sp_weight_kernel(T* __restrict__ gs, const T* __restrict__ gt, const T* __restrict__ stats,
                                 const T* __restrict__ grad_loss, int64_t r0, int64_t rows, int64_t B) {
  const int64_t cols = B - r0;
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= rows * cols) return;
  const int64_t i = r0 + k / cols, j = r0 + k % cols;
  const T *ns = stats, *nt = stats + B, *gam = stats + 2 * B;
  const T w_ij = sp_grad_entry(gs[k], gt[k], ns[i], nt[i], gam[i]);
  const T w_ji = sp_grad_entry(gs[k], gt[k], ns[j], nt[j], gam[j]);
  gs[k] = PER_ROW ? grad_loss[i] * w_ij + grad_loss[j] * w_ji : grad_loss[0] * (w_ij + w_ji);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> sp_forward(const at::Tensor& student, const at::Tensor& teacher, bool per_row) {
  const Rows<T> s(student, false), t(teacher, false);
  const int64_t B = s.B, tile = std::min(B, kTile);
  auto opts = s.e.options();
  at::Tensor buf_s = at::empty({tile, B}, opts), buf_t = at::empty({tile, B}, opts);
  at::Tensor stats = at::empty({3, B}, opts), row_loss = at::empty({B}, opts.dtype(at::kDouble));
  for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
    at::Tensor bs = buf_s.narrow(0, 0, r1 - r0), bt = buf_t.narrow(0, 0, r1 - r0);
    s.gram_rows(r0, r1, bs);
    t.gram_rows(r0, r1, bt);
    sp_row_kernel<T><<<r1 - r0, kThreads, 0, stream()>>>(bs.template const_data_ptr<T>(), bt.template const_data_ptr<T>(),
                                                        stats.template data_ptr<T>(), row_loss.template data_ptr<double>(), r0, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto opmath = c10::CppTypeToScalarType<T>::value;
  return {per_row ? row_loss.to(opmath) : at::sum(row_loss).to(opmath), stats};
}

template <typename T>
at::Tensor sp_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                       const at::Tensor& stats) {
  const Rows<T> s(student, false), t(teacher, false);
  const int64_t B = s.B, tile = std::min(B, kTile);
  auto opts = s.e.options();
  at::Tensor g = grad_loss.contiguous(), st = stats.contiguous();
  at::Tensor buf_s = at::empty({tile * B}, opts), buf_t = at::empty({tile * B}, opts);
  at::Tensor grad = at::zeros({B, s.D}, opts);
  auto weight_kernel = g.dim() == 1 ? sp_weight_kernel<T, true> : sp_weight_kernel<T, false>;
  // S is symmetric: block I forms only its columns j >= r0 (half the Gram work), adds S_IJ F_J to
  // its own rows and S_IJ^T F_I to the rows past it (as the CPU kernel)
  for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0, cols = B - r0;
    at::Tensor bs = buf_s.narrow(0, 0, rows * cols).view({rows, cols});
    at::Tensor bt = buf_t.narrow(0, 0, rows * cols).view({rows, cols});
    at::mm_out(bs, s.e.narrow(0, r0, rows), s.e.narrow(0, r0, cols).t());
    at::mm_out(bt, t.e.narrow(0, r0, rows), t.e.narrow(0, r0, cols).t());
    weight_kernel<<<ceil_div(rows * cols, kThreads), kThreads, 0, stream()>>>(
        bs.template data_ptr<T>(), bt.template const_data_ptr<T>(), st.template const_data_ptr<T>(), g.template const_data_ptr<T>(), r0, rows, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad.narrow(0, r0, rows).addmm_(bs, s.e.narrow(0, r0, cols));
    if (r1 < B) grad.narrow(0, r1, B - r1).addmm_(bs.narrow(1, rows, B - r1).t(), s.e.narrow(0, r0, rows));
  });
  return grad.to(student.scalar_type());
}

// ---- dispatcher entry points ---------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> similarity_preserving_forward_cuda(const at::Tensor& student,
                                                                      const at::Tensor& teacher, bool per_row) {
  check_inputs(student, teacher, "similarity_preserving_forward");
  const OpGuard guard(student);
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "similarity_preserving_forward",
                                    [&] { return sp_forward<scalar_t>(student, teacher, per_row); });
}

at::Tensor similarity_preserving_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                                               const at::Tensor& teacher, const at::Tensor& stats) {
  check_inputs(student, teacher, "similarity_preserving_backward");
  check_relation_grad(grad_loss, student, "grad_loss", "similarity_preserving_backward");
  check_relation_aux(stats, student, "stats", "similarity_preserving_backward");
  const OpGuard guard(student);
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "similarity_preserving_backward",
                                    [&] { return sp_backward<scalar_t>(grad_loss, student, teacher, stats); });
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("similarity_preserving_forward", &kdkernels::cuda::similarity_preserving_forward_cuda);
  m.impl("similarity_preserving_backward", &kdkernels::cuda::similarity_preserving_backward_cuda);
}
