// CUDA kernels of the one-pass FSP matrix loss (contract: FSP in kdkernels/ops/relation.py; math in
// kdkernels/fsp.h, shared with the CPU kernel).
//
// The GEMMs go to cuBLAS through ATen (no cuBLAS headers here): G_s = A_s B_s^T and G_t = A_t B_t^T,
// (N, C1, C2), accumulated and kept in float32 for 16-bit maps (at::bmm with an op-math out_dtype).
// Between them ONE kernel, grid (blocks per sample, N): each block turns its entries of one sample
// into D = G_s / S_s - G_t / S_t, writes the block's sum of D^2 into a partial (N, blocks) buffer
// (block_reduce.cuh; summed by ATen: deterministic, no atomics) and, when gradients are wanted, the
// gradient operands g_s = 2 w D / S_s and g_t = -2 w D / S_t: over the G buffers (float32 / float64
// maps) or into input-dtype buffers, cuBLAS' operands for 16-bit maps (g rounded once). Then the
// gradient GEMMs dA = g B, dB = g^T A in the maps' dtype. The weight is read on the device (no host
// sync). The backward scales the saved gradients in place (scale_rows.cuh).
#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../block_reduce.cuh"
#include "../scale_rows.cuh"
#include "kdkernels/fsp.h"
#include "kdkernels/op_args.h"
#include "kdkernels/relation_args.h"

namespace kdkernels {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kPerThread = 8;  // entries per thread and block: 2048 per block
constexpr int64_t kBlockEntries = int64_t{kThreads} * kPerThread;

// gs, gt: (N, M) op-math Gram products; os / ot: the gradient operands (may alias gs / gt: the same
// element is read and written by the same thread), written when WRITE_S / WRITE_T.
template <typename opmath_t, typename out_t>
__global__ void __launch_bounds__(kThreads) fsp_difference_kernel(const opmath_t* gs, const opmath_t* gt, out_t* os,
                                                                  out_t* ot, const opmath_t* __restrict__ weight,
                                                                  opmath_t* __restrict__ partial, int64_t M,
                                                                  opmath_t inv_ss, opmath_t inv_st, bool write_s,
                                                                  bool write_t) {
  const int64_t n = blockIdx.y;
  const int64_t base = n * M;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kBlockEntries;
  const int64_t end = begin + kBlockEntries < M ? begin + kBlockEntries : M;
  const opmath_t w = *weight;
  const opmath_t scale_s = w * inv_ss, scale_t = -w * inv_st;
  opmath_t local = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const opmath_t d = fsp::difference(gs[base + i], gt[base + i], inv_ss, inv_st);
    local += d * d;
    if (write_s) os[base + i] = static_cast<out_t>(fsp::grad_operand(d, scale_s));
    if (write_t) ot[base + i] = static_cast<out_t>(fsp::grad_operand(d, scale_t));
  }
  const opmath_t total = block_sum(local);
  if (threadIdx.x == 0) partial[n * gridDim.x + blockIdx.x] = total;
}

Tensor gram(const Tensor& a, const Tensor& b, at::ScalarType opmath) {
  const Tensor bt = b.transpose(1, 2);
  return a.scalar_type() == opmath ? at::bmm(a, bt) : at::bmm(a, bt, opmath);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fsp_forward_cuda(
    const Tensor& student_first, const Tensor& student_second, const Tensor& teacher_first,
    const Tensor& teacher_second, const Tensor& weight_in, bool per_row, bool sf_grad, bool ss_grad, bool tf_grad,
    bool ts_grad) {
  check_fsp_args(student_first, student_second, teacher_first, teacher_second, weight_in, "fsp_forward");
  TORCH_CHECK(student_first.is_cuda(), "fsp_forward: the maps must be CUDA tensors, got ", student_first.device());
  const int64_t N = student_first.size(0), C1 = student_first.size(1), C2 = student_second.size(1);
  const int64_t M = C1 * C2;
  const int64_t blocks = (M + kBlockEntries - 1) / kBlockEntries;
  TORCH_CHECK(N <= 65535 && blocks <= std::numeric_limits<int32_t>::max(),
              "fsp_forward (CUDA): at most 65535 samples, got ", N);
  c10::cuda::CUDAGuard guard(student_first.device());
  const at::ScalarType dtype = student_first.scalar_type();
  const at::ScalarType opmath = opmath_scalar_type(dtype);
  const bool narrow = dtype != opmath;
  const Tensor weight = weight_in.scalar_type() == opmath ? weight_in : weight_in.to(opmath);
  Tensor gs = gram(student_first, student_second, opmath);  // (N, C1, C2) contiguous, op-math
  Tensor gt = gram(teacher_first, teacher_second, opmath);
  const bool student_grad = sf_grad || ss_grad, teacher_grad = tf_grad || ts_grad;
  Tensor os = student_grad && narrow ? at::empty(gs.sizes(), student_first.options()) : gs;
  Tensor ot = teacher_grad && narrow ? at::empty(gt.sizes(), teacher_first.options()) : gt;
  const std::array<int64_t, 2> partial_shape{N, blocks};
  Tensor partial = at::empty(partial_shape, gs.options());
  const double inv_ss = 1.0 / static_cast<double>(student_first.size(2));
  const double inv_st = 1.0 / static_cast<double>(teacher_first.size(2));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fsp_forward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(N));
      auto stream = c10::cuda::getCurrentCUDAStream();
      if (narrow) {
        fsp_difference_kernel<opmath_t, scalar_t><<<grid, kThreads, 0, stream>>>(
            gs.const_data_ptr<opmath_t>(), gt.const_data_ptr<opmath_t>(),
            student_grad ? os.data_ptr<scalar_t>() : nullptr, teacher_grad ? ot.data_ptr<scalar_t>() : nullptr,
            weight.const_data_ptr<opmath_t>(), partial.data_ptr<opmath_t>(), M, static_cast<opmath_t>(inv_ss),
            static_cast<opmath_t>(inv_st), student_grad, teacher_grad);
      } else {
        fsp_difference_kernel<opmath_t, opmath_t><<<grid, kThreads, 0, stream>>>(
            gs.data_ptr<opmath_t>(), gt.data_ptr<opmath_t>(), gs.data_ptr<opmath_t>(), gt.data_ptr<opmath_t>(),
            weight.const_data_ptr<opmath_t>(), partial.data_ptr<opmath_t>(), M, static_cast<opmath_t>(inv_ss),
            static_cast<opmath_t>(inv_st), student_grad, teacher_grad);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const std::array<int64_t, 1> dims{1};
  const Tensor rows = at::sum(partial, dims);
  // weight * l_n or weight * sum_n l_n, as the CPU kernel; at::sum is deterministic (no atomics)
  Tensor loss = per_row ? at::mul(rows, weight) : at::mul(at::sum(rows), weight);
  const std::array<int64_t, 1> empty_shape{0};
  auto grad = [&](bool wanted, const Tensor& g, const Tensor& other, bool first, const Tensor& like) {
    return wanted ? at::bmm(first ? g : g.transpose(1, 2), other) : at::empty(empty_shape, like.options());
  };
  return {loss, grad(sf_grad, os, student_second, true, student_first),
          grad(ss_grad, os, student_first, false, student_second),
          grad(tf_grad, ot, teacher_second, true, teacher_first),
          grad(ts_grad, ot, teacher_first, false, teacher_second)};
}

void fsp_backward_cuda(const Tensor& grad_loss_in, Tensor& grad_sf, Tensor& grad_ss, Tensor& grad_tf,
                       Tensor& grad_ts) {
  const Tensor* const grads[4] = {&grad_sf, &grad_ss, &grad_tf, &grad_ts};
  check_fsp_backward_args(grad_loss_in, grads, "fsp_backward");
  const Tensor* like = nullptr;
  for (const Tensor* g : grads) {
    if (g->numel() > 0) like = g;
  }
  if (like == nullptr) return;
  TORCH_CHECK(like->is_cuda(), "fsp_backward: CUDA tensors, got ", like->device());
  TORCH_CHECK(like->numel() / like->size(0) <= kMaxRowLength, "fsp_backward (CUDA): at most ", kMaxRowLength,
              " elements per sample and map, got ", like->sizes());
  for (const Tensor* g : grads) {
    TORCH_CHECK(g->numel() == 0 || g->numel() / g->size(0) <= kMaxRowLength, "fsp_backward (CUDA): at most ",
                kMaxRowLength, " elements per sample and map, got ", g->sizes());
  }
  c10::cuda::CUDAGuard guard(like->device());
  // convert once for every gradient (they share the dtype)
  const at::ScalarType opmath = opmath_scalar_type(like->scalar_type());
  const Tensor grad_loss = grad_loss_in.scalar_type() == opmath ? grad_loss_in : grad_loss_in.to(opmath);
  scale_samples_(grad_sf, grad_loss);
  scale_samples_(grad_ss, grad_loss);
  scale_samples_(grad_tf, grad_loss);
  scale_samples_(grad_ts, grad_loss);
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("fsp_forward", &kdkernels::cuda::fsp_forward_cuda);
  m.impl("fsp_backward", &kdkernels::cuda::fsp_backward_cuda);
}
