// CUDA kernels of the projected MSE (docs/design.md §2.2; math and layout rule in kdkernels/feature.h).
//
// GEMMs go to cuBLAS through ATen (no cuBLAS headers here, so no epilogue fusion inside the GEMM);
// everything around them is one fused kernel per pass:
//   forward:  y = x W^T in the op-math dtype (bf16/fp16 inputs: cuBLAS with float32 output), laid out
//             like the residual; then ONE kernel reads y and t once, adds the bias, writes
//             r = y + b - t in the input dtype (in place over y for float32 / float64) and reduces r^2
//             per block (block_reduce.cuh) into a small partial-sum buffer (no atomics, no host sync).
//             y is freed when the forward returns; only r is kept for the backward.
//   backward: grad_x = (r W) * s and grad_t = -s r, where s = grad_loss * 2 / denominator stays on the
//             device (read by the kernel, never copied to the host); grad_W = s r^T x and grad_b = s sum r
//             by cuBLAS / ATen reductions in float32 (float64).
// reduction "none": the forward's kernel gives each position a team of threads that writes the
// position's sum of r^2 (no atomics); the backward weights each position by g_p = grad_loss[b, p]
// (s = 2): grad_x = s g_p (r W), grad_t = -s g_p r, grad_b = s sum g_p r in the op-math dtype, and
// grad_W = s (g_p r)^T x with g_p r rounded to the input dtype for cuBLAS (no rounding in float32).
#include <array>
#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../block_reduce.cuh"
#include "kdkernels/feature.h"
#include "kdkernels/feature_args.h"

namespace kdkernels {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 2048;  // grid-stride loops beyond this; also the partial-sum buffer size

// y, r: (B * M, N) contiguous (r may alias y). t is read through its (B, M, N) strides. The bias runs
// along N ("columns", row-major blocks) or along M (feature-major blocks). Each block stores the sum of
// its r^2 in partial[blockIdx.x]. threadIdx.x walks a row's columns, threadIdx.y the rows, so the only
// integer division is one per row, not one per element.
template <typename T, typename opmath_t>
__global__ void residual_sq_kernel(const opmath_t* y, const T* __restrict__ t, const T* __restrict__ bias, T* r,
                                   opmath_t* __restrict__ partial, int64_t rows, int64_t M, int64_t N, int64_t tsb,
                                   int64_t tsm, int64_t tsn, bool bias_on_cols) {
  opmath_t local = 0;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += row_step) {
    const int64_t b = row / M, m = row - b * M;
    const T* trow = t + b * tsb + m * tsm;
    const opmath_t* yrow = y + row * N;
    T* rrow = r + row * N;
    const opmath_t row_bias = (bias != nullptr && !bias_on_cols) ? static_cast<opmath_t>(bias[m]) : opmath_t(0);
    for (int64_t c = threadIdx.x; c < N; c += blockDim.x) {
      const opmath_t bb = (bias != nullptr && bias_on_cols) ? static_cast<opmath_t>(bias[c]) : row_bias;
      const opmath_t v = projected_residual(yrow[c], static_cast<opmath_t>(trow[c * tsn]), bb);
      rrow[c] = static_cast<T>(v);  // same element, same thread: safe when r aliases y
      local += v * v;
    }
  }
  const opmath_t total = block_sum(local);
  if (threadIdx.x == 0 && threadIdx.y == 0) partial[blockIdx.x] = total;
}

// "none": a team of `lanes` threads per position q = b * P + p writes row_loss[q] = sum_d r^2 (and r).
// lanes = kWarpSize for row-major storage (the warp walks the position's contiguous features), 1 for
// feature-major storage (consecutive threads take consecutive positions, each walking its features), so
// y, t and r are accessed coalesced either way. Storage offset of (b, p, d): b * P * Dt + p * sp + d * sd
// (y and r alike; r may alias y); t is read through its (B, P, Dt) strides.
template <typename T, typename opmath_t>
__global__ void residual_row_sq_kernel(const opmath_t* y, const T* __restrict__ t, const T* __restrict__ bias, T* r,
                                       opmath_t* __restrict__ row_loss, int64_t positions, int64_t P, int64_t Dt,
                                       int64_t sp, int64_t sd, int64_t tsb, int64_t tsp, int64_t tsd, int lanes) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int64_t team_step = static_cast<int64_t>(gridDim.x) * blockDim.x / lanes;
  // a warp's lanes share q, so the whole warp takes part in each warp_allreduce
  for (int64_t q = thread / lanes; q < positions; q += team_step) {
    const int64_t b = q / P, p = q - b * P;
    const int64_t base = b * P * Dt + p * sp;
    const T* tq = t + b * tsb + p * tsp;
    opmath_t local = 0;
    for (int64_t d = lane; d < Dt; d += lanes) {
      const opmath_t bb = bias != nullptr ? static_cast<opmath_t>(bias[d]) : opmath_t(0);
      const opmath_t v = projected_residual(y[base + d * sd], static_cast<opmath_t>(tq[d * tsd]), bb);
      r[base + d * sd] = static_cast<T>(v);  // same element, same thread: safe when r aliases y
      local += v * v;
    }
    if (lanes == kWarpSize) local = warp_allreduce(local, SumOp{});
    if (lane == 0) row_loss[q] = local;
  }
}

// out[i] = sign * s * in[i] over n contiguous elements (in may alias out); s is a device scalar.
template <typename T, typename opmath_t>
__global__ void scale_kernel(const T* in, T* out, const opmath_t* __restrict__ s, opmath_t sign, int64_t n) {
  const opmath_t f = sign * *s;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    out[i] = static_cast<T>(f * static_cast<opmath_t>(in[i]));
  }
}

int blocks_for(int64_t work, int64_t per_block) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (work + per_block - 1) / per_block)));
}

// a @ b for 2-D or batched 3-D operands (2-D ones are shared by every batch entry), with an op-math
// result when `out_dtype` differs from the inputs' (cuBLAS accumulates in float32 either way).
Tensor batched_mm(const Tensor& a, const Tensor& b, int64_t batch, at::ScalarType out_dtype) {
  const bool same = a.scalar_type() == out_dtype;
  if (batch == 1) {
    const Tensor a2 = a.dim() == 3 ? a.select(0, 0) : a;
    const Tensor b2 = b.dim() == 3 ? b.select(0, 0) : b;
    return (same ? at::mm(a2, b2) : at::mm(a2, b2, out_dtype)).unsqueeze(0);
  }
  const Tensor a3 = a.dim() == 3 ? a : a.expand({batch, a.size(0), a.size(1)});  // stride-0 batch, no copy
  const Tensor b3 = b.dim() == 3 ? b : b.expand({batch, b.size(0), b.size(1)});
  return same ? at::bmm(a3, b3) : at::bmm(a3, b3, out_dtype);
}

std::tuple<Tensor, Tensor> projected_mse_forward_cuda(const Tensor& x, const Tensor& t, const Tensor& weight,
                                                      const std::optional<Tensor>& bias, int64_t reduction) {
  check_projected_mse_forward_args(x, t, weight, bias, reduction);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the ATen calls below record no autograd
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), P = x.size(1), Dt = t.size(2);
  const bool fmajor = feature_major(P, Dt, t.stride(1));
  const auto opmath_dtype = at::toOpMathType(x.scalar_type());
  // y in the residual's storage order: (B, P, Dt) = x W^T, or (B, Dt, P) = W x^T for feature-major t
  Tensor y = fmajor ? batched_mm(weight, x.transpose(1, 2), B, opmath_dtype)
                    : batched_mm(x, weight.t(), B, opmath_dtype);
  const bool in_place = opmath_dtype == x.scalar_type();
  Tensor storage = in_place ? y : at::empty(y.sizes(), t.options());
  const Tensor residual = fmajor ? storage.transpose(1, 2) : storage;
  const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();

  if (reduction == kFeatureNone) {  // one sum per position instead of partial sums
    Tensor row_loss = at::empty({B, P}, x.options().dtype(opmath_dtype));
    if (B * P > 0) {
      const int lanes = fmajor ? 1 : kWarpSize;
      const auto stream = c10::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "projected_mse_forward_none_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        residual_row_sq_kernel<scalar_t, opmath_t><<<blocks_for(B * P, kThreads / lanes), kThreads, 0, stream>>>(
            y.const_data_ptr<opmath_t>(), t.const_data_ptr<scalar_t>(),
            bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr, storage.mutable_data_ptr<scalar_t>(),
            row_loss.mutable_data_ptr<opmath_t>(), B * P, P, Dt, fmajor ? 1 : Dt, fmajor ? P : 1, t.stride(0),
            t.stride(1), t.stride(2), lanes);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    return {row_loss, residual};
  }

  const int64_t M = fmajor ? Dt : P, N = fmajor ? P : Dt, rows = B * M;
  // t strides in the (B, M, N) order of the storage
  const int64_t tsb = t.stride(0), tsm = fmajor ? t.stride(2) : t.stride(1), tsn = fmajor ? t.stride(1) : t.stride(2);
  int tx = kWarpSize;  // threads along a row: N rounded up to a power of two, within [kWarpSize, kThreads]
  while (tx < kThreads && tx < N) tx *= 2;
  const dim3 block(tx, kThreads / tx);
  const int grid = blocks_for(rows, block.y);
  Tensor partial = at::zeros({grid}, x.options().dtype(opmath_dtype));
  if (rows > 0 && N > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "projected_mse_forward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      residual_sq_kernel<scalar_t, opmath_t><<<grid, block, 0, stream>>>(
          y.const_data_ptr<opmath_t>(), t.const_data_ptr<scalar_t>(),
          bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr, storage.mutable_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<opmath_t>(), rows, M, N, tsb, tsm, tsn, !fmajor);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // "mean" of an empty input divides 0 by 0: NaN, as F.mse_loss
  Tensor loss = partial.sum().div_(projected_mse_denominator(reduction, B * P, Dt));
  return {loss, residual};
}

// out = sign * s * in for contiguous tensors of the same dtype
void launch_scale(const Tensor& in, Tensor& out, const Tensor& s, double sign) {
  const int64_t n = in.numel();
  if (n == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "projected_mse_scale_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scale_kernel<scalar_t, opmath_t><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), s.const_data_ptr<opmath_t>(),
        static_cast<opmath_t>(sign), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> projected_mse_backward_cuda(const Tensor& grad_loss, const Tensor& x,
                                                                       const Tensor& weight, const Tensor& residual,
                                                                       int64_t reduction, bool x_grad, bool t_grad,
                                                                       bool weight_grad, bool bias_grad) {
  const int64_t Ds =
      check_projected_mse_backward_args(grad_loss, x, weight, residual, reduction, x_grad, weight_grad);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(residual.device());
  const int64_t B = residual.size(0), P = residual.size(1), Dt = residual.size(2);
  const auto dtype = residual.scalar_type();
  const auto opmath_dtype = at::toOpMathType(dtype);
  const auto opts = residual.options();
  const bool fmajor = feature_major(P, Dt, residual.stride(1));
  // storage order: (B, P, Dt), or (B, Dt, P) for feature-major; the forward's residual already is
  const Tensor rs = fmajor ? residual.transpose(1, 2).contiguous() : residual.contiguous();
  // s = grad_loss * 2 / denominator, a device scalar in the op-math dtype. "none" (weighted): s = 2, and
  // row_w = grad_loss (B, P) weights each position, broadcast along the features of the storage order.
  const bool weighted = reduction == kFeatureNone;
  const double factor = projected_mse_grad_factor(reduction, B * P, Dt);
  const Tensor s = weighted ? at::full({}, factor, opts.dtype(opmath_dtype))
                            : at::mul(grad_loss.reshape({}).to(opmath_dtype), factor);
  const Tensor row_w = weighted ? grad_loss.to(opmath_dtype).unsqueeze(fmajor ? 1 : 2) : Tensor();
  // "none": g_p r in the op-math dtype, read by grad_t, grad_W and grad_b; otherwise r itself
  const Tensor rw = weighted && (t_grad || weight_grad || bias_grad) ? at::mul(rs, row_w) : rs;

  Tensor grad_x = at::empty({0}, opts), grad_t = at::empty({0}, opts);
  Tensor grad_w = at::empty({0}, opts), grad_b = at::empty({0}, opts);
  if (x_grad) {  // (B, P, Ds) = r W, or (B, Ds, P) = W^T r, in the op-math dtype, scaled, rounded once
    // (as the CPU kernel: a 16-bit r W could overflow or round before the small scale is applied)
    Tensor gx = fmajor ? batched_mm(weight.t(), rs, B, opmath_dtype) : batched_mm(rs, weight, B, opmath_dtype);
    if (weighted) gx.mul_(row_w);  // diag(g) r W = diag(g) (r W)
    gx = gx.mul_(s).to(dtype);
    grad_x = fmajor ? gx.transpose(1, 2) : gx;
  }
  if (t_grad) {
    Tensor gt = at::empty(rs.sizes(), opts);
    if (weighted) {
      at::mul_out(gt, rw, s.neg());  // in the op-math dtype, rounded once into gt
    } else {
      launch_scale(rs, gt, s, -1.0);
    }
    grad_t = fmajor ? gt.transpose(1, 2) : gt;
  }
  if (weight_grad) {  // sum over batch entries of r^T x (Dt x Ds), in the op-math dtype
    const Tensor rg = rw.to(dtype);  // cuBLAS takes both operands in the input dtype (no copy unless "none")
    Tensor gw = fmajor ? batched_mm(rg, x, B, opmath_dtype) : batched_mm(rg.transpose(1, 2), x, B, opmath_dtype);
    grad_w = gw.sum(0).mul_(s).to(dtype);
  }
  if (bias_grad) {
    // a named array: torch 2.11's headers find a braced {int, int} ambiguous (IntArrayRef vs DimnameList)
    const std::array<int64_t, 2> batch_and_rows{0, fmajor ? 2 : 1};
    grad_b = at::sum(rw, batch_and_rows, false, opmath_dtype).mul_(s).to(dtype);
  }
  return {grad_x, grad_t, grad_w, grad_b};
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("projected_mse_forward", &kdkernels::cuda::projected_mse_forward_cuda);
  m.impl("projected_mse_backward", &kdkernels::cuda::projected_mse_backward_cuda);
}
