// Loops and kernels shared by the CUDA kernels of the relation family (docs/design.md §2.3), one op
// per file next to this header: rkd_distance.cu, similarity_preserving.cu, rkd_angle.cu and
// rkd_distance_angle.cu.
//
// Same algorithm as csrc/cpu/relation/, with the same math (kdkernels/relation.h): distance and
// SP walk row blocks of kTile rows, forming the block's Gram rows with an ATen GEMM (cuBLAS) into a
// (kTile, B) buffer and finishing them with fused epilogue kernels (one CUDA block per row for the
// row reductions, block_reduce.cuh); the backward turns the block's pair weights into the gradient
// with one more GEMM. Angle keeps the (B, B) squared distances and inverse norms of both sides.
// Scalars (mu, the loss) stay on the device: nothing synchronises with the host.
//
// Here: the embedding rows (Rows: centring, squared norms, squared-distance blocks), the pair
// gradient, the distance term's kernels and passes (rkd_distance, rkd_distance_angle), the angle
// side and its kernels (rkd_angle, rkd_distance_angle), and the entry points' guard and checks.
#pragma once
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../block_reduce.cuh"
#include "kdkernels/relation.h"
#include "kdkernels/relation_args.h"

namespace kdkernels {
namespace cuda {
// The family's shared CUDA code; the math of kdkernels/relation.h is visible in it (and, through
// `using namespace relation;`, in the op files).
namespace relation {
using namespace ::kdkernels::relation;

constexpr int64_t kTile = 256;  // rows per block: every scratch buffer is kTile x B
constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline cudaStream_t stream() {
  return c10::cuda::getCurrentCUDAStream();
}

// ---- rows: op-math copy (optionally centred) and squared norms -----------------------------------
template <typename scalar_t>
__global__ void column_mean_kernel(const scalar_t* __restrict__ x, double* __restrict__ mean, int64_t B, int64_t D) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= D) return;
  double s = 0;
  for (int64_t i = 0; i < B; ++i) s += static_cast<double>(x[i * D + c]);
  mean[c] = s / static_cast<double>(B);
}

// the difference is rounded once, so identical rows stay bit-identical
template <typename scalar_t, typename T>
__global__ void shifted_copy_kernel(const scalar_t* __restrict__ x, const double* __restrict__ mean, T* __restrict__ out,
                                    int64_t B, int64_t D) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= B * D) return;
  const double m = mean == nullptr ? 0.0 : mean[k % D];
  out[k] = static_cast<T>(static_cast<double>(x[k]) - m);
}

// Sums below accumulate in double, as the CPU kernels do: the norms decide which pairs are
// recomputed (gram_unreliable), so both backends should see the same ones.
template <typename T>
__global__ void row_norm2_kernel(const T* __restrict__ e, T* __restrict__ norm2, int64_t D) {
  const T* r = e + blockIdx.x * D;
  double s = 0;
  for (int64_t c = threadIdx.x; c < D; c += kThreads) s += static_cast<double>(r[c]) * r[c];
  s = block_sum(s);
  if (threadIdx.x == 0) norm2[blockIdx.x] = static_cast<T>(s);
}

template <typename T>
struct Rows {
  at::Tensor e, norm2;  // (B, D) op-math, (B,)
  int64_t B = 0, D = 0;

  Rows(const at::Tensor& x, bool centre) {
    at::Tensor xc = x.contiguous();
    B = xc.size(0);
    D = xc.size(1);
    auto opts = xc.options().dtype(c10::CppTypeToScalarType<T>::value);
    e = at::empty({B, D}, opts);
    norm2 = at::empty({B}, opts);
    at::Tensor mean = centre ? at::empty({D}, xc.options().dtype(at::kDouble)) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "kdkernels_relation_rows", [&] {
      const scalar_t* in = xc.const_data_ptr<scalar_t>();
      if (centre && D > 0) {
        column_mean_kernel<<<ceil_div(D, kThreads), kThreads, 0, stream()>>>(in, mean.template data_ptr<double>(), B, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (B * D > 0) {
        shifted_copy_kernel<scalar_t, T><<<ceil_div(B * D, kThreads), kThreads, 0, stream()>>>(
            in, centre ? mean.template const_data_ptr<double>() : nullptr, e.template data_ptr<T>(), B, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    row_norm2_kernel<T><<<B, kThreads, 0, stream()>>>(e.template const_data_ptr<T>(), norm2.template data_ptr<T>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void gram_rows(int64_t r0, int64_t r1, at::Tensor dst) const {
    at::mm_out(dst, e.narrow(0, r0, r1 - r0), e.t());
  }
};

// G -> squared distances in place, recomputing the unreliable pairs from the differences; sq holds
// rows [r0, r0 + rows) and columns [c0, B).
template <typename T>
__global__ void sq_from_gram_kernel(T* __restrict__ sq, const T* __restrict__ e, const T* __restrict__ n, int64_t r0,
                                    int64_t rows, int64_t c0, int64_t B, int64_t D) {
  const int64_t cols = B - c0;
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= rows * cols) return;
  const int64_t i = r0 + k / cols, j = c0 + k % cols;
  T v = sq_from_gram(n[i], n[j], sq[k]);
  if (i == j) {
    v = T(0);
  } else if (gram_unreliable(v, n[i], n[j])) {
    double s = 0;
    for (int64_t c = 0; c < D; ++c) {
      const double d = static_cast<double>(e[i * D + c]) - e[j * D + c];
      s += d * d;
    }
    v = static_cast<T>(s);
  }
  sq[k] = v;
}

// dst (r1 - r0, B - c0): the squared distances of rows [r0, r1) to the rows [c0, B)
template <typename T>
void squared_distances(const Rows<T>& s, int64_t r0, int64_t r1, at::Tensor dst, int64_t c0 = 0) {
  at::mm_out(dst, s.e.narrow(0, r0, r1 - r0), s.e.narrow(0, c0, s.B - c0).t());
  const int64_t n = (r1 - r0) * (s.B - c0);
  sq_from_gram_kernel<T><<<ceil_div(n, kThreads), kThreads, 0, stream()>>>(
      dst.template data_ptr<T>(), s.e.template const_data_ptr<T>(), s.norm2.template const_data_ptr<T>(), r0, r1 - r0, c0, s.B,
      s.D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- pair gradient: grad_i += sum_j w_ij (e_i - e_j) for a (rows, B) weight block -----------------
// Pass 1 (one CUDA block per row): moves the weights of unreliable pairs into `near` (zero in w),
// and writes rowsum(w) and whether the row has any near pair.
template <typename T>
__global__ void split_near_kernel(T* __restrict__ w, T* __restrict__ near, const T* __restrict__ sq,
                                  const T* __restrict__ n, T* __restrict__ rowsum, int* __restrict__ any_near,
                                  int64_t r0, int64_t B) {
  const int64_t i = r0 + blockIdx.x;
  T* wr = w + blockIdx.x * B;
  T* nr = near + blockIdx.x * B;
  const T* sr = sq + blockIdx.x * B;
  T s = 0;
  int found = 0;
  for (int64_t j = threadIdx.x; j < B; j += kThreads) {
    T v = j == i ? T(0) : wr[j];
    T m = 0;
    if (v != T(0) && gram_unreliable(sr[j], n[i], n[j])) {
      m = v;
      v = 0;
      found = 1;
    }
    wr[j] = v;
    nr[j] = m;
    s += v;
  }
  s = block_sum(s);
  found = __syncthreads_or(found);
  if (threadIdx.x == 0) {
    rowsum[blockIdx.x] = s;
    any_near[blockIdx.x] = found;
  }
}

// Pass 2: grad_i += rowsum_i e_i - (w E)_i, plus the near pairs from the differences.
template <typename T>
__global__ void pair_grad_epilogue_kernel(T* __restrict__ grad, const T* __restrict__ we, const T* __restrict__ e,
                                          const T* __restrict__ near, const T* __restrict__ rowsum,
                                          const int* __restrict__ any_near, int64_t r0, int64_t B, int64_t D) {
  const int64_t i = r0 + blockIdx.x;
  const T* ei = e + i * D;
  const T* nr = near + blockIdx.x * B;
  const bool has_near = any_near[blockIdx.x] != 0;
  for (int64_t c = threadIdx.x; c < D; c += kThreads) {
    T g = rowsum[blockIdx.x] * ei[c] - we[blockIdx.x * D + c];
    if (has_near)
      for (int64_t j = 0; j < B; ++j)
        if (nr[j] != T(0)) g += nr[j] * (ei[c] - e[j * D + c]);
    grad[i * D + c] += g;
  }
}

template <typename T>
struct PairGradScratch {
  at::Tensor near, rowsum, any_near, we;
  PairGradScratch(int64_t tile, int64_t B, int64_t D, const at::TensorOptions& opts)
      : near(at::empty({tile, B}, opts)),
        rowsum(at::empty({tile}, opts)),
        any_near(at::empty({tile}, opts.dtype(at::kInt))),
        we(at::empty({tile, D}, opts)) {}
};

template <typename T>
void add_pair_gradient(const Rows<T>& s, int64_t r0, int64_t r1, at::Tensor w, const T* sq, PairGradScratch<T>& sc,
                       at::Tensor grad) {
  const int64_t rows = r1 - r0;
  split_near_kernel<T><<<rows, kThreads, 0, stream()>>>(w.template data_ptr<T>(), sc.near.template data_ptr<T>(), sq,
                                                        s.norm2.template const_data_ptr<T>(), sc.rowsum.template data_ptr<T>(),
                                                        sc.any_near.template data_ptr<int>(), r0, s.B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor we = sc.we.narrow(0, 0, rows);
  at::mm_out(we, w, s.e);
  pair_grad_epilogue_kernel<T><<<rows, kThreads, 0, stream()>>>(
      grad.template data_ptr<T>(), we.template const_data_ptr<T>(), s.e.template const_data_ptr<T>(), sc.near.template const_data_ptr<T>(),
      sc.rowsum.template const_data_ptr<T>(), sc.any_near.template const_data_ptr<int>(), r0, s.B, s.D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void for_each_block(int64_t B, int64_t tile, F&& fn) {
  for (int64_t r0 = 0; r0 < B; r0 += tile) fn(r0, std::min(B, r0 + tile));
}

// ---- RKD distance ------------------------------------------------------------------------------
// The forward's sums are symmetric in (i, j): row i sums its pairs j > i only (the totals count
// twice). sq_s / sq_t hold rows [r0, ...) and columns [c0, B), c0 <= r0.
template <typename T>
__global__ void distance_rowsum_kernel(const T* __restrict__ sq_s, const T* __restrict__ sq_t, double* __restrict__ out_s,
                                       double* __restrict__ out_t, int64_t r0, int64_t c0, int64_t B) {
  const int64_t i = r0 + blockIdx.x, row = blockIdx.x * (B - c0) - c0;  // element (i, j) at row + j
  double as = 0, at_ = 0;
  for (int64_t j = i + 1 + threadIdx.x; j < B; j += kThreads) {
    as += clamped_distance(sq_s[row + j]);
    at_ += clamped_distance(sq_t[row + j]);
  }
  as = block_sum(as);
  at_ = block_sum(at_);
  if (threadIdx.x == 0) {
    out_s[i] = as;
    out_t[i] = at_;
  }
}

// mu_s, mu_t are read from the device (stats[0], stats[1]). PER_ROW: each pair's loss is also
// added to col_loss[j] (l_j's pairs i < j, which row i sums).
template <typename T, bool PER_ROW>
__global__ void distance_loss_kernel(const T* __restrict__ sq_s, const T* __restrict__ sq_t, const T* __restrict__ stats,
                                     double* __restrict__ row_loss, double* __restrict__ row_a,
                                     double* __restrict__ col_loss, int64_t r0, int64_t c0, int64_t B) {
  const int64_t i = r0 + blockIdx.x, row = blockIdx.x * (B - c0) - c0;
  const T mu_s = stats[0], mu_t = stats[1];
  double loss = 0, a = 0;
  for (int64_t j = i + 1 + threadIdx.x; j < B; j += kThreads) {
    const T ds = clamped_distance(sq_s[row + j]);
    const T x = ds / mu_s - clamped_distance(sq_t[row + j]) / mu_t;
    const T l = smooth_l1(x);
    loss += l;
    a += smooth_l1_grad(x) * ds;
    if (PER_ROW) atomicAdd(col_loss + j, static_cast<double>(l));
  }
  loss = block_sum(loss);
  a = block_sum(a);
  if (threadIdx.x == 0) {
    row_loss[i] = loss;
    row_a[i] = a;
  }
}

// the distance term's pair weights of the block, full rows (ACCUMULATE: added to w, e.g. the
// angle's). grad_loss: g (0-d) or, PER_ROW, (B,) w with through = 2 A_w / (B (B - 1)) (relation.h).
template <typename T, bool ACCUMULATE, bool PER_ROW>
__global__ void distance_weight_kernel(const T* __restrict__ sq_s, const T* __restrict__ sq_t, const T* __restrict__ stats,
                                       const T* __restrict__ grad_loss, const T* __restrict__ through,
                                       T* __restrict__ w, int64_t r0, int64_t rows, int64_t B) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= rows * B) return;
  const int64_t i = r0 + k / B, j = k % B;
  T v = T(0);
  if (i != j) {
    const T mu_s = stats[0], mu_t = stats[1];
    // 0-d: every pair weighs 2 g (d_ji = d_ij), A_w = g A
    const T pair_w = PER_ROW ? grad_loss[i] + grad_loss[j] : T(2) * grad_loss[0];
    const T through_mu = PER_ROW ? through[0] : T(2) * grad_loss[0] * stats[2] / (T(B) * T(B - 1));
    v = distance_grad_weight(sq_s[k], distance_residual(sq_s[k], sq_t[k], mu_s, mu_t), mu_s, pair_w, through_mu);
  }
  w[k] = ACCUMULATE ? w[k] + v : v;
}

// Launches distance_weight_kernel for the block's (rows, B) squared distances bs / bt into wb.
template <typename T, bool ACCUMULATE>
void distance_weights(const at::Tensor& bs, const at::Tensor& bt, const at::Tensor& stats, const at::Tensor& g,
                      const at::Tensor& through, at::Tensor wb, int64_t r0, int64_t rows, int64_t B) {
  const int64_t n = rows * B;
  auto kernel = g.dim() == 1 ? distance_weight_kernel<T, ACCUMULATE, true> : distance_weight_kernel<T, ACCUMULATE, false>;
  kernel<<<ceil_div(n, kThreads), kThreads, 0, stream()>>>(
      bs.template const_data_ptr<T>(), bt.template const_data_ptr<T>(), stats.template const_data_ptr<T>(),
      g.template const_data_ptr<T>(), through.template const_data_ptr<T>(), wb.template data_ptr<T>(), r0, rows, B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[i] = w_i sum_{j != i} h_ij d_s_ij for the rows of a full-width (rows, B) block: A_w mu_s^2's
// terms (relation.h), the per-row backward's extra pass.
template <typename T>
__global__ void distance_weighted_a_kernel(const T* __restrict__ sq_s, const T* __restrict__ sq_t,
                                           const T* __restrict__ stats, const T* __restrict__ w,
                                           double* __restrict__ out, int64_t r0, int64_t B) {
  const int64_t i = r0 + blockIdx.x;
  const T *rs = sq_s + blockIdx.x * B, *rt = sq_t + blockIdx.x * B;
  const T mu_s = stats[0], mu_t = stats[1];
  double a = 0;
  for (int64_t j = threadIdx.x; j < B; j += kThreads)
    if (j != i) a += smooth_l1_grad(distance_residual(rs[j], rt[j], mu_s, mu_t)) * clamped_distance(rs[j]);
  a = block_sum(a);
  if (threadIdx.x == 0) out[i] = static_cast<double>(w[i]) * a;
}

// through[0] = 2 A_w / count, A_w = sum_a / mu_s^2
template <typename T>
__global__ void distance_through_kernel(T* __restrict__ through, const double* __restrict__ sum_a,
                                        const T* __restrict__ stats, double count) {
  const double mu_s = stats[0];
  through[0] = static_cast<T>(2 * sum_a[0] / (mu_s * mu_s) / count);
}

// A per-row backward's 2 A_w / (B (B - 1)) as a (1,) device tensor (one more pass over the pairs):
// block_fn(r0, r1) returns (bs, bt), the rows [r0, r1) of both sides' squared distances, full width.
template <typename T, typename BlockFn>
at::Tensor distance_through_mu_weighted(int64_t B, int64_t tile, const at::Tensor& stats, const at::Tensor& w,
                                        BlockFn&& block_fn) {
  at::Tensor rows = at::empty({B}, stats.options().dtype(at::kDouble));
  for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
    auto [bs, bt] = block_fn(r0, r1);
    distance_weighted_a_kernel<T><<<r1 - r0, kThreads, 0, stream()>>>(
        bs.template const_data_ptr<T>(), bt.template const_data_ptr<T>(), stats.template const_data_ptr<T>(),
        w.template const_data_ptr<T>(), rows.template data_ptr<double>(), r0, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor sum = at::sum(rows);
  at::Tensor through = at::empty({1}, stats.options());
  distance_through_kernel<T><<<1, 1, 0, stream()>>>(through.template data_ptr<T>(), sum.template const_data_ptr<double>(),
                                                    stats.template const_data_ptr<T>(),
                                                    static_cast<double>(B) * static_cast<double>(B - 1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return through;
}

// stats = [sum_s, sum_t] / count -> [mu_s, mu_t]; A = sum(row_a) / mu_s^2
// the sums are over the pairs j > i: each counts twice
template <typename T>
__global__ void distance_stats_kernel(T* __restrict__ stats, const double* __restrict__ sums, double count) {
  stats[0] = static_cast<T>(2 * sums[0] / count);
  stats[1] = static_cast<T>(2 * sums[1] / count);
}

template <typename T>
__global__ void distance_a_kernel(T* __restrict__ stats, const double* __restrict__ sum_a) {
  stats[2] = static_cast<T>(2 * sum_a[0] / (static_cast<double>(stats[0]) * stats[0]));
}

// The distance term's two passes over squared-distance rows: block_fn(r0, r1) returns (bs, bt, c0),
// the rows [r0, r1) of both sides from column c0 <= r0 on (the tiled op forms columns [r0, B) only,
// the combined op narrows its (B, B) matrices, c0 = 0). Returns the loss (the summed 0-d, or the
// per-row (B,)) and stats = [mu_s, mu_t, A]; everything stays on the device.
template <typename T, typename BlockFn>
std::tuple<at::Tensor, at::Tensor> distance_passes(int64_t B, int64_t tile, const at::TensorOptions& opts,
                                                   bool per_row, BlockFn&& block_fn) {
  at::Tensor rows = at::empty({2, B}, opts.dtype(at::kDouble));
  at::Tensor stats = at::empty({3}, opts);
  at::Tensor col_loss = per_row ? at::zeros({B}, opts.dtype(at::kDouble)) : at::Tensor();
  auto loss_kernel = per_row ? distance_loss_kernel<T, true> : distance_loss_kernel<T, false>;
  at::Tensor sums;
  for (int pass = 0; pass < 2; ++pass) {
    for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
      auto [bs, bt, c0] = block_fn(r0, r1);
      if (pass == 0)
        distance_rowsum_kernel<T><<<r1 - r0, kThreads, 0, stream()>>>(bs.template const_data_ptr<T>(), bt.template const_data_ptr<T>(),
                                                                     rows.template data_ptr<double>(), rows.template data_ptr<double>() + B, r0,
                                                                     c0, B);
      else  // per_row: one more output (l_j's pairs i < j), by atomics
        loss_kernel<<<r1 - r0, kThreads, 0, stream()>>>(
            bs.template const_data_ptr<T>(), bt.template const_data_ptr<T>(), stats.template const_data_ptr<T>(),
            rows.template data_ptr<double>(), rows.template data_ptr<double>() + B,
            per_row ? col_loss.template data_ptr<double>() : nullptr, r0, c0, B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    sums = at::sum(rows, {1});
    if (pass == 0)
      distance_stats_kernel<T><<<1, 1, 0, stream()>>>(stats.template data_ptr<T>(), sums.template const_data_ptr<double>(),
                                                      static_cast<double>(B) * static_cast<double>(B - 1));
    else
      distance_a_kernel<T><<<1, 1, 0, stream()>>>(stats.template data_ptr<T>(), sums.template const_data_ptr<double>() + 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto opmath = c10::CppTypeToScalarType<T>::value;
  if (per_row) return {rows.select(0, 0).add(col_loss).to(opmath), stats};  // l_i: pairs j > i, then i < j
  return {at::mul(sums.select(0, 0), 2.0).to(opmath), stats};  // pairs j > i, twice
}

// ---- RKD angle -------------------------------------------------------------------------------------
template <typename T>
__global__ void inv_norm_kernel(const T* __restrict__ sq, T* __restrict__ inv, int64_t n) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k < n) inv[k] = angle_inv_norm(sq[k]);
}

template <typename T>
struct AngleSide {
  Rows<T> rows;
  at::Tensor sq, inv;  // (B, B)
  explicit AngleSide(const at::Tensor& x) : rows(x, true) {
    const int64_t B = rows.B;
    sq = at::empty({B, B}, rows.e.options());
    inv = at::empty({B, B}, rows.e.options());
    for_each_block(B, std::min(B, kTile), [&](int64_t r0, int64_t r1) { squared_distances(rows, r0, r1, sq.narrow(0, r0, r1 - r0)); });
    inv_norm_kernel<T><<<ceil_div(B * B, kThreads), kThreads, 0, stream()>>>(sq.template const_data_ptr<T>(), inv.template data_ptr<T>(),
                                                                              B * B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Thread (anchor i = blockIdx.x, j): BACKWARD ? T_a[i][j] = g sum_k h d psi/d a (g = w_i when
// PER_ROW) : partial losses (summed in double, as the CPU kernel). The c entries are read as
// sq[k][j] (= sq[j][k]) so that a warp's loads are contiguous.
template <typename T, bool BACKWARD, bool PER_ROW = false, typename Out = std::conditional_t<BACKWARD, T, double>>
__global__ void angle_anchor_kernel(const T* __restrict__ sqs, const T* __restrict__ invs, const T* __restrict__ sqt,
                                    const T* __restrict__ invt, const T* __restrict__ grad_loss, Out* __restrict__ out,
                                    int64_t B) {
  const int64_t i = blockIdx.x, j = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  Out acc = 0;
  if (j < B) {
    const T a_s = sqs[i * B + j], ra_s = invs[i * B + j], a_t = sqt[i * B + j], ra_t = invt[i * B + j];
    if (ra_s != T(0) || ra_t != T(0)) {
      for (int64_t k = 0; k < B; ++k) {
        const T ps = angle_cos(a_s, sqs[i * B + k], sqs[k * B + j], ra_s, invs[i * B + k]);
        const T pt = angle_cos(a_t, sqt[i * B + k], sqt[k * B + j], ra_t, invt[i * B + k]);
        if (BACKWARD)
          acc += smooth_l1_grad(ps - pt) * angle_cos_grad_a(ps, ra_s, invs[i * B + k]);
        else
          acc += smooth_l1(ps - pt);
      }
    }
    if (BACKWARD) out[i * B + j] = grad_loss[PER_ROW ? i : 0] * acc;
  }
  if (!BACKWARD) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[i * gridDim.y + blockIdx.y] = acc;
  }
}

// Thread (j = blockIdx.x, k): C[j][k] = g sum_i h_ijk d psi_ijk / d c_jk; PER_ROW: sum_i w_i h_ijk ...
template <typename T, bool PER_ROW>
__global__ void angle_slot_c_kernel(const T* __restrict__ sqs, const T* __restrict__ invs, const T* __restrict__ sqt,
                                    const T* __restrict__ invt, const T* __restrict__ grad_loss, T* __restrict__ out,
                                    int64_t B) {
  const int64_t j = blockIdx.x, k = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (k >= B) return;
  const T c_s = sqs[j * B + k], c_t = sqt[j * B + k];
  T acc = 0;
  for (int64_t i = 0; i < B; ++i) {
    const T ra_s = invs[i * B + j];
    if (ra_s == T(0)) continue;  // same for the whole block: no divergence
    const T rb_s = invs[i * B + k];
    const T ps = angle_cos(sqs[i * B + j], sqs[i * B + k], c_s, ra_s, rb_s);
    const T pt = angle_cos(sqt[i * B + j], sqt[i * B + k], c_t, invt[i * B + j], invt[i * B + k]);
    const T h = smooth_l1_grad(ps - pt);
    acc += (PER_ROW ? grad_loss[i] * h : h) * angle_cos_grad_c(ra_s, rb_s);
  }
  out[j * B + k] = PER_ROW ? acc : grad_loss[0] * acc;
}

// S = 2 (W + W^T) with W = 2 T_a + C, written over C (each pair (p, q), p <= q, by one thread)
template <typename T>
__global__ void angle_symmetrise_kernel(const T* __restrict__ ta, T* __restrict__ c, int64_t B) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= B * B) return;
  const int64_t p = k / B, q = k % B;
  if (q < p) return;
  const T v = T(2) * (T(2) * (ta[p * B + q] + ta[q * B + p]) + c[p * B + q] + c[q * B + p]);
  c[p * B + q] = v;
  c[q * B + p] = v;
}

// The angle loss per anchor (B,) when per_row, else summed over all B^3 triples (a device scalar).
template <typename T>
at::Tensor angle_forward_from_sides(const AngleSide<T>& s, const AngleSide<T>& t, bool per_row) {
  const int64_t B = s.rows.B;
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(ceil_div(B, kThreads)));
  at::Tensor partial = at::empty({B, static_cast<int64_t>(grid.y)}, s.rows.e.options().dtype(at::kDouble));
  angle_anchor_kernel<T, false><<<grid, kThreads, 0, stream()>>>(
      s.sq.template const_data_ptr<T>(), s.inv.template const_data_ptr<T>(), t.sq.template const_data_ptr<T>(), t.inv.template const_data_ptr<T>(),
      nullptr, partial.template data_ptr<double>(), B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto opmath = c10::CppTypeToScalarType<T>::value;
  return per_row ? at::sum(partial, {1}).to(opmath) : at::sum(partial).to(opmath);
}

// The angle term's (B, B) symmetric pair weights S for the upstream gradient g (on the device: 0-d,
// or (B,), anchor i's terms scaled by w_i).
template <typename T>
at::Tensor angle_pair_weights(const AngleSide<T>& s, const AngleSide<T>& t, const at::Tensor& g) {
  const int64_t B = s.rows.B;
  const bool per_row = g.dim() == 1;
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(ceil_div(B, kThreads)));
  at::Tensor ta = at::empty({B, B}, s.rows.e.options()), c = at::empty({B, B}, s.rows.e.options());
  auto anchor_kernel = per_row ? angle_anchor_kernel<T, true, true> : angle_anchor_kernel<T, true, false>;
  auto slot_c_kernel = per_row ? angle_slot_c_kernel<T, true> : angle_slot_c_kernel<T, false>;
  anchor_kernel<<<grid, kThreads, 0, stream()>>>(
      s.sq.template const_data_ptr<T>(), s.inv.template const_data_ptr<T>(), t.sq.template const_data_ptr<T>(), t.inv.template const_data_ptr<T>(),
      g.template const_data_ptr<T>(), ta.template data_ptr<T>(), B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  slot_c_kernel<<<grid, kThreads, 0, stream()>>>(s.sq.template const_data_ptr<T>(), s.inv.template const_data_ptr<T>(),
                                                          t.sq.template const_data_ptr<T>(), t.inv.template const_data_ptr<T>(),
                                                          g.template const_data_ptr<T>(), c.template data_ptr<T>(), B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  angle_symmetrise_kernel<T><<<ceil_div(B * B, kThreads), kThreads, 0, stream()>>>(ta.template const_data_ptr<T>(),
                                                                                     c.template data_ptr<T>(), B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

// dL/de from a (B, B) pair-weight matrix (overwritten), one row block of GEMM at a time.
template <typename T>
at::Tensor gradient_from_pair_weights(const AngleSide<T>& s, at::Tensor weights, const at::Tensor& student) {
  const int64_t B = s.rows.B, tile = std::min(B, kTile);
  PairGradScratch<T> scratch(tile, B, s.rows.D, s.rows.e.options());
  at::Tensor grad = at::zeros({B, s.rows.D}, s.rows.e.options());
  for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
    add_pair_gradient(s.rows, r0, r1, weights.narrow(0, r0, r1 - r0), s.sq.template const_data_ptr<T>() + r0 * B, scratch, grad);
  });
  return grad.to(student.scalar_type());
}

// ---- entry points: guard and checks --------------------------------------------------------------
// The inputs' device, and IEEE fp32 GEMMs whatever torch's TF32 setting: Gram entries feed
// n_i + n_j - 2 G_ij, where TF32's 10-bit mantissa would lose the distances' digits (the Triton
// kernels use input_precision="ieee" for the same reason).
struct OpGuard {
  c10::cuda::CUDAGuard device;
  at::NoTF32Guard exact_gemms;
  explicit OpGuard(const at::Tensor& x) : device(x.device()) {}
};

inline void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const char* op) {
  TORCH_CHECK(student.is_cuda(), op, ": student and teacher must be CUDA tensors");
  check_relation_inputs(student, teacher, op);
}

}  // namespace relation
}  // namespace cuda
}  // namespace kdkernels
