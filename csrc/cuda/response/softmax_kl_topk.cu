// CUDA kernels for the one-pass softmax-KL against a top-k sparse teacher (kdkernels/ops/response.py
// SOFTMAX_KL_TOPK, reference kdkernels/reference/response_topk.py): kdkernels::softmax_kl_topk_forward
// computes the loss and the student's gradient from one DRAM read of the student logits,
// kdkernels::softmax_kl_topk_backward scales the saved gradient in place (as softmax_kl_step).
// Per row, one group of threads (a warp for short rows, the block for long ones, as softmax_kl_step):
//   (1) the student's centred log-sum-exp over V (b = z * (1/T) by mul_rn, m = max b,
//       log_sum = log sum exp(b - m)); renormalize also reduces the teacher's K log-probs' log-sum-exp
//       in the same all-reduction;
//   (2) the K gathered log p_{i_k} = (b_{i_k} - m) - log_sum and the teacher log-probs: the row loss
//       renormalize: q~ = softmax_k(lq), l = sum q~ (log q~ - log p_{i_k})
//       bucket:      q = exp(lq), Q = sum q, q_r = max(0, 1 - Q), P = sum p_{i_k}, p_r = 1 - P,
//                    l = sum q (lq - log p_{i_k}) + (q_r > 0 ? q_r (log q_r - log p_r) : 0)
//       (0 log 0 = 0);
//   (3) when the gradient is requested: g * p_j * A over the row (renormalize A = 1; bucket
//       A = Q - c P, c = q_r / p_r, 0 when q_r = 0), a group barrier, then the K entries are
//       overwritten with g * (p_{i_k} A - (w_k - c p_{i_k})) (w = q~ or q), computed in op-math from
//       the gathered logit (not read back from the rounded store).
// g = weight * (T when t2_scale, else 1/T); the row loss is x T^2 when t2_scale.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "kdkernels/op_args.h"
#include "kdkernels/softmax_kl.h"
#include "../scale_rows.cuh"
#include "_rows.cuh"

namespace kdkernels {
namespace cuda {
namespace {
using namespace response;

enum TopkTail : int { kRenormalize = 0, kBucket = 1 };  // kdkernels/ops/response.py TAIL_CODES

template <typename T>
struct Triple {
  T first, second, third;
};

struct TripleSumOp {
  template <typename T>
  __device__ __forceinline__ Triple<T> operator()(Triple<T> a, Triple<T> b) const {
    return {a.first + b.first, a.second + b.second, a.third + b.third};
  }
};

// Barrier of the threads that own one row: the warp (warps leave the row loop independently) or the
// block. Both order the group's global memory accesses.
__device__ __forceinline__ void group_sync(int group) {
  if (group == kWarpSize) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

template <typename scalar_t>
struct TopkArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* student;   // (R, V)
  const scalar_t* teacher;   // (R, K) log-probs
  const int64_t* indices;    // (R, K)
  const int64_t* labels;     // null: no labels
  const opmath_t* weight;    // 0-d: the reduction's factor, read on the device
  opmath_t* loss;            // (R,): weight * l_r when per_row, else l_r (summed by the launcher)
  scalar_t* grad_student;    // null: not requested
  int64_t R, V, K, ignore_index;
  opmath_t inv_t, loss_scale, grad_scale;  // grad_scale = T (t2_scale) or 1/T
  int group;  // threads per row: kWarpSize or blockDim.x
  bool vec_ok;
  bool per_row;
};

// log p of the student at the k-th index of the row; the index is checked on the device (an
// out-of-range index asserts; were device asserts compiled out, it gives NaN rather than a stray read).
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ opmath_t gather_log_p(const scalar_t* srow, int64_t idx, int64_t V, opmath_t inv_t,
                                                 opmath_t m_s, opmath_t log_sum_s) {
  CUDA_KERNEL_ASSERT(idx >= 0 && idx < V && "softmax_kl_topk: index out of range [0, V)");
  if (idx < 0 || idx >= V) return std::numeric_limits<opmath_t>::quiet_NaN();
  const opmath_t b = mul_rn(static_cast<opmath_t>(srow[idx]), inv_t);
  return (b - m_s) - log_sum_s;
}

template <typename scalar_t, int kTail>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm) softmax_kl_topk_kernel(const TopkArgs<scalar_t> a) {
  using opmath_t = at::opmath_type<scalar_t>;
  using C = Chunk<scalar_t, opmath_t>;
  using LsePair = Pair<LseState<opmath_t>>;
  constexpr int N = Tile<scalar_t>::kChunk;
  __shared__ alignas(16) unsigned char smem[kReduceSmemBytes];
  const int G = a.group;
  const int rows_per_block = static_cast<int>(blockDim.x) / G;
  const int t = static_cast<int>(threadIdx.x) % G;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  const int K = static_cast<int>(a.K);  // K <= V <= kMaxRowLength (host check)
  const opmath_t w = *a.weight;
  const opmath_t g = w * a.grad_scale;
  // row is uniform over a group, so every barrier below is reached by the whole group
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / G; row < a.R;
       row += row_step) {
    const scalar_t* srow = a.student + row * a.V;
    const scalar_t* trow = a.teacher + row * a.K;
    const int64_t* irow = a.indices + row * a.K;
    scalar_t* gs = a.grad_student != nullptr ? a.grad_student + row * a.V : nullptr;
    const RowLayout L = RowLayout::make(srow, a.V, a.vec_ok);  // shared with the gradient row when vec_ok
    if (a.labels != nullptr && a.labels[row] == a.ignore_index) {
      if (t == 0) a.loss[row] = opmath_t(0);
      if (gs != nullptr) zero_row(gs, L, t, G);
      continue;
    }

    // (1) student log-sum-exp over V (the y row of the walk is the same row: its loads are dead);
    // renormalize: the teacher's over K in the same all-reduction
    LsePair ls{lse_empty<opmath_t>(), lse_empty<opmath_t>()};
    for_each_chunk<scalar_t, opmath_t>(srow, srow, L, t, G, a.inv_t, [&](const C& c) {
      ls.first = lse_merge(ls.first, chunk_lse<opmath_t>(N, [&](int j) { return c.x(j); }));
    });
    if constexpr (kTail == kRenormalize) {
      for (int k = t; k < K; k += G) {
        const opmath_t lq = static_cast<opmath_t>(trow[k]);
        ls.second = lse_merge(ls.second, LseState<opmath_t>{lq, lq == neg_inf<opmath_t>() ? opmath_t(0) : opmath_t(1)});
      }
      ls = group_allreduce(ls, LsePairMergeOp{}, LsePair{lse_empty<opmath_t>(), lse_empty<opmath_t>()}, smem, G);
    } else {
      ls.first = group_allreduce(ls.first, LseMergeOp{}, lse_empty<opmath_t>(), smem, G);
    }
    const opmath_t m_s = ls.first.m, log_sum_s = std::log(ls.first.s);
    const opmath_t m_q = ls.second.m, log_sum_q = std::log(ls.second.s);  // renormalize only

    // (2) the row loss from the K entries
    opmath_t l, A, c;  // loss, the gradient's factor of p_j, and c = q_r / p_r
    if constexpr (kTail == kRenormalize) {
      opmath_t acc = opmath_t(0);
      for (int k = t; k < K; k += G) {
        const opmath_t log_p = gather_log_p(srow, irow[k], a.V, a.inv_t, m_s, log_sum_s);
        const opmath_t log_q = (static_cast<opmath_t>(trow[k]) - m_q) - log_sum_q;
        const opmath_t q = std::exp(log_q);
        if (q > opmath_t(0) || is_nan(q)) acc += q * (log_q - log_p);
      }
      l = group_allreduce(acc, SumOp{}, opmath_t(0), smem, G);
      A = K > 0 ? opmath_t(1) : opmath_t(0);  // sum_k q~_k
      c = opmath_t(0);
    } else {
      Triple<opmath_t> s{opmath_t(0), opmath_t(0), opmath_t(0)};  // head, Q, P
      for (int k = t; k < K; k += G) {
        const opmath_t log_p = gather_log_p(srow, irow[k], a.V, a.inv_t, m_s, log_sum_s);
        const opmath_t lq = static_cast<opmath_t>(trow[k]);
        const opmath_t q = std::exp(lq);
        if (q > opmath_t(0) || is_nan(q)) s.first += q * (lq - log_p);
        s.second += q;
        s.third += std::exp(log_p);
      }
      s = group_allreduce(s, TripleSumOp{}, Triple<opmath_t>{opmath_t(0), opmath_t(0), opmath_t(0)}, smem, G);
      const opmath_t Q = s.second, P = s.third;
      const opmath_t one_minus_q = opmath_t(1) - Q;
      const opmath_t q_r = one_minus_q > opmath_t(0) ? one_minus_q : opmath_t(0);
      const opmath_t p_r = P < opmath_t(1) ? opmath_t(1) - P : opmath_t(0);
      l = s.first;
      if (q_r > opmath_t(0) && a.K < a.V) {  // K = V: no entry is left for the bucket (docs/decisions.md)
        l += q_r * (std::log(q_r) - std::log1p(-(P < opmath_t(1) ? P : opmath_t(1))));
        c = q_r / p_r;
      } else {
        c = opmath_t(0);
      }
      A = Q - c * P;
    }
    if (t == 0) {
      const opmath_t lr = l * a.loss_scale;
      a.loss[row] = a.per_row ? w * lr : lr;
    }

    // (3) the gradient: g p_j A over the row, then the K entries
    if (gs != nullptr) {
      const opmath_t gA = g * A;
      map_chunks<scalar_t, opmath_t>(srow, srow, gs, nullptr, L, t, G, a.inv_t,
                                     [&](opmath_t b, opmath_t, opmath_t& gb, opmath_t& unused) {
                                       gb = gA * std::exp((b - m_s) - log_sum_s);
                                       unused = opmath_t(0);
                                     });
      group_sync(G);  // the row's stores above come before the overwrites below
      for (int k = t; k < K; k += G) {
        const int64_t idx = irow[k];
        const opmath_t log_p = gather_log_p(srow, idx, a.V, a.inv_t, m_s, log_sum_s);
        const opmath_t p = std::exp(log_p);
        const opmath_t lq = static_cast<opmath_t>(trow[k]);
        const opmath_t wk = kTail == kRenormalize ? std::exp((lq - m_q) - log_sum_q) : std::exp(lq);
        if (idx >= 0 && idx < a.V) gs[idx] = static_cast<scalar_t>(g * (p * A - (wk - c * p)));
      }
    }
  }
}

void check_topk_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& indices,
                     const std::optional<at::Tensor>& labels, const at::Tensor& weight, double temperature,
                     int64_t tail) {
  TORCH_CHECK_VALUE(student.dim() == 2, "softmax_kl_topk: student must be 2-D (R, V), got ", student.sizes());
  const auto dt = student.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "softmax_kl_topk: logits must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(student.is_cuda(), "softmax_kl_topk (CUDA): tensors must be CUDA tensors, got ", student.device());
  const int64_t R = student.size(0), V = student.size(1);
  TORCH_CHECK_VALUE(V <= kMaxRowLength, "softmax_kl_topk (CUDA): V must be <= ", kMaxRowLength, ", got ", V);
  TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(0) == R, "softmax_kl_topk: teacher_logprobs must be (", R,
                    ", K), got ", teacher.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == teacher.sizes(), "softmax_kl_topk: indices shape ", indices.sizes(),
                    " must equal teacher_logprobs shape ", teacher.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == dt, "softmax_kl_topk: teacher_logprobs dtype ", teacher.scalar_type(),
                   " must equal student dtype ", dt);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "softmax_kl_topk: indices must be int64, got ",
                   indices.scalar_type());
  TORCH_CHECK_VALUE(teacher.device() == student.device() && indices.device() == student.device(),
                    "softmax_kl_topk: teacher_logprobs and indices must be on ", student.device(), ", got ",
                    teacher.device(), " and ", indices.device());
  TORCH_CHECK_VALUE(teacher.size(1) <= V, "softmax_kl_topk: K must be <= V = ", V, ", got ", teacher.size(1));
  TORCH_CHECK_VALUE(temperature > 0.0, "softmax_kl_topk: temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(tail == kRenormalize || tail == kBucket,
                    "softmax_kl_topk: tail must be 0 (renormalize) or 1 (bucket), got ", tail);
  TORCH_CHECK_VALUE(weight.dim() == 0, "softmax_kl_topk: weight must be a 0-d tensor, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.device() == student.device(), "softmax_kl_topk: weight must be on ", student.device(),
                    ", got ", weight.device());
  if (labels.has_value()) {
    const at::Tensor& lb = *labels;
    TORCH_CHECK_TYPE(lb.scalar_type() == at::kLong, "softmax_kl_topk: labels must be int64, got ", lb.scalar_type());
    TORCH_CHECK_VALUE(lb.dim() == 1 && lb.size(0) == R, "softmax_kl_topk: labels must have shape (", R, ",), got ",
                      lb.sizes());
    TORCH_CHECK_VALUE(lb.device() == student.device(), "softmax_kl_topk: labels must be on ", student.device(),
                      ", got ", lb.device());
  }
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_topk_forward_cuda(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& indices_in,
    const std::optional<at::Tensor>& labels_in, const at::Tensor& weight_in, double temperature, int64_t tail,
    int64_t ignore_index, bool t2_scale, bool per_row, bool student_grad) {
  check_topk_args(student_in, teacher_in, indices_in, labels_in, weight_in, temperature, tail);
  c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t R = student.size(0), V = student.size(1), K = teacher.size(1);
  const at::ScalarType opmath_dtype = opmath_scalar_type(student.scalar_type());
  const at::Tensor weight = weight_in.scalar_type() == opmath_dtype ? weight_in : weight_in.to(opmath_dtype);
  at::Tensor rows = at::empty({R}, student.options().dtype(opmath_dtype));
  // a gradient that is not requested is an empty (0,) tensor of the input dtype
  at::Tensor grad_student = student_grad ? at::empty({R, V}, student.options()) : at::empty({0}, student.options());
  at::Tensor labels;
  if (labels_in.has_value()) labels = labels_in->contiguous();

  if (R > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_topk_forward_cuda", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      TopkArgs<scalar_t> a;
      a.student = student.const_data_ptr<scalar_t>();
      a.teacher = teacher.const_data_ptr<scalar_t>();
      a.indices = indices.const_data_ptr<int64_t>();
      a.labels = labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr;
      a.weight = weight.const_data_ptr<opmath_t>();
      a.loss = rows.data_ptr<opmath_t>();
      a.grad_student = student_grad ? grad_student.data_ptr<scalar_t>() : nullptr;
      a.R = R;
      a.V = V;
      a.K = K;
      a.ignore_index = ignore_index;
      a.inv_t = static_cast<opmath_t>(1.0 / temperature);
      a.loss_scale = static_cast<opmath_t>(t2_scale ? temperature * temperature : 1.0);
      a.grad_scale = static_cast<opmath_t>(t2_scale ? temperature : 1.0 / temperature);
      a.per_row = per_row;
      const LaunchConfig cfg = pick_config<scalar_t>(V);
      a.group = cfg.group;
      a.vec_ok = same_alignment({a.student, a.grad_student});
      const unsigned grid = grid_for(R, cfg);
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      if (tail == kRenormalize) {
        softmax_kl_topk_kernel<scalar_t, kRenormalize><<<grid, cfg.block, 0, stream>>>(a);
      } else {
        softmax_kl_topk_kernel<scalar_t, kBucket><<<grid, cfg.block, 0, stream>>>(a);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // weight * sum_r l_r, as reduce_rows' sum then factor; at::sum is deterministic (no atomics)
  at::Tensor loss = per_row ? rows : at::mul(at::sum(rows), weight);
  return {loss, grad_student};
}

void softmax_kl_topk_backward_cuda(const at::Tensor& grad_loss_in, at::Tensor& grad_student) {
  if (grad_student.numel() == 0) return;
  const at::ScalarType opmath_dtype = opmath_scalar_type(grad_student.scalar_type());
  const at::Tensor grad_loss = grad_loss_in.scalar_type() == opmath_dtype ? grad_loss_in : grad_loss_in.to(opmath_dtype);
  scale_rows_(grad_student, grad_loss);
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("softmax_kl_topk_forward", &kdkernels::cuda::softmax_kl_topk_forward_cuda);
  m.impl("softmax_kl_topk_backward", &kdkernels::cuda::softmax_kl_topk_backward_cuda);
}
