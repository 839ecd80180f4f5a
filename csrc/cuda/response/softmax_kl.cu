// CUDA kernels for the temperature softmax-KL ops (docs/design.md §2.1): kdkernels::softmax_kl_forward and
// kdkernels::softmax_kl_backward. The per-element / per-state maths is in
// csrc/include/kdkernels/softmax_kl.h; this file only streams rows through it with the row walks of
// _rows.cuh (thread mapping described there).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "kdkernels/softmax_kl.h"
#include "kdkernels/softmax_kl_args.h"
#include "_rows.cuh"

namespace kdkernels {
namespace cuda {
namespace {
using namespace response;

// ---- kernels ----------------------------------------------------------------------------------------
template <typename scalar_t>
struct ForwardArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* student;
  const scalar_t* teacher;
  const int64_t* labels;  // null: no labels
  opmath_t* loss;         // (R,)
  opmath_t* stats;        // (R, kRowStats)
  int64_t R, V, ignore_index;
  opmath_t inv_t, loss_scale;
  JsdConstants<opmath_t> jsd;
  int divergence;
  int group;  // threads per row: kWarpSize or blockDim.x
  bool vec_ok;
};

template <typename scalar_t, bool kJsd>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm) softmax_kl_forward_kernel(const ForwardArgs<scalar_t> a) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ alignas(16) unsigned char smem[kReduceSmemBytes];
  const int G = a.group;
  const int rows_per_block = static_cast<int>(blockDim.x) / G;
  const int t = static_cast<int>(threadIdx.x) % G;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  // row is uniform over a group, so every barrier inside group_allreduce is reached by the whole block
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / G; row < a.R;
       row += row_step) {
    opmath_t* st_out = a.stats + row * kRowStats;
    if (a.labels != nullptr && a.labels[row] == a.ignore_index) {
      if (t == 0) {
        a.loss[row] = opmath_t(0);
#pragma unroll
        for (int i = 0; i < kRowStats; ++i) st_out[i] = opmath_t(0);
      }
      continue;
    }
    const scalar_t* srow = a.student + row * a.V;
    const scalar_t* trow = a.teacher + row * a.V;
    const RowLayout L = RowLayout::make(srow, a.V, a.vec_ok);  // teacher rows share it when vec_ok
    const RowStats<opmath_t> s =
        row_stats<scalar_t, opmath_t, kJsd>(srow, trow, L, t, G, a.inv_t, a.divergence, a.jsd, smem);
    if (t == 0) {
      st_out[0] = s.m_s;
      st_out[1] = s.log_sum_s;
      st_out[2] = s.m_t;
      st_out[3] = s.log_sum_t;
      st_out[4] = s.c_s;
      st_out[5] = s.c_t;
      a.loss[row] = (s.c_s + s.c_t) * a.loss_scale;  // one of them is 0 for forward / reverse KL
    }
  }
}

template <typename scalar_t>
struct BackwardArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t* grad_loss;  // (R,), any stride (an expanded gradient of a sum has stride 0)
  int64_t grad_loss_stride;
  const scalar_t* student;
  const scalar_t* teacher;
  const int64_t* labels;    // null: no labels
  const opmath_t* stats;    // (R, kRowStats) contiguous
  scalar_t* grad_student;   // null: not requested
  scalar_t* grad_teacher;   // null: not requested
  int64_t R, V, ignore_index;
  opmath_t inv_t, grad_scale;  // grad_scale = T (t2_scale) or 1/T
  JsdConstants<opmath_t> jsd;
  int group;
  bool vec_ok;
};

template <typename scalar_t, int kDivergence>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm) softmax_kl_backward_kernel(const BackwardArgs<scalar_t> a) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int G = a.group;
  const int rows_per_block = static_cast<int>(blockDim.x) / G;
  const int t = static_cast<int>(threadIdx.x) % G;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / G; row < a.R;
       row += row_step) {
    const scalar_t* srow = a.student + row * a.V;
    const scalar_t* trow = a.teacher + row * a.V;
    scalar_t* gs = a.grad_student != nullptr ? a.grad_student + row * a.V : nullptr;
    scalar_t* gt = a.grad_teacher != nullptr ? a.grad_teacher + row * a.V : nullptr;
    const RowLayout L = RowLayout::make(srow, a.V, a.vec_ok);  // shared by all four rows when vec_ok
    if (a.labels != nullptr && a.labels[row] == a.ignore_index) {
      if (gs != nullptr) zero_row(gs, L, t, G);
      if (gt != nullptr) zero_row(gt, L, t, G);
      continue;
    }
    const opmath_t* sp = a.stats + row * kRowStats;
    const RowStats<opmath_t> st{sp[0], sp[1], sp[2], sp[3], sp[4], sp[5]};
    const opmath_t g = a.grad_loss[row * a.grad_loss_stride] * a.grad_scale;
    const JsdConstants<opmath_t> k = a.jsd;
    // x = student (b), y = teacher (a); outputs ox -> grad_student, oy -> grad_teacher
    map_chunks<scalar_t, opmath_t>(srow, trow, gs, gt, L, t, G, a.inv_t,
                                   [&](opmath_t b, opmath_t av, opmath_t& gb, opmath_t& ga) {
                                     softmax_kl_grad(kDivergence, av, b, st, k, gb, ga);
                                     gb *= g;
                                     ga *= g;
                                   });
  }
}


std::tuple<at::Tensor, at::Tensor> softmax_kl_forward_cuda(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                           const std::optional<at::Tensor>& labels_in,
                                                           double temperature, int64_t divergence, double beta,
                                                           int64_t ignore_index, bool t2_scale) {
  check_softmax_kl_cuda_args(student_in, teacher_in, labels_in, temperature, divergence, beta);
  c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const int64_t R = student.size(0), V = student.size(1);
  const auto opmath_opts = student.options().dtype(opmath_scalar_type(student.scalar_type()));
  at::Tensor loss = at::empty({R}, opmath_opts);
  at::Tensor stats = at::empty({R, kRowStats}, opmath_opts);
  if (R == 0) return {loss, stats};
  at::Tensor labels;
  if (labels_in.has_value()) labels = labels_in->contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    ForwardArgs<scalar_t> a;
    a.student = student.data_ptr<scalar_t>();
    a.teacher = teacher.data_ptr<scalar_t>();
    a.labels = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
    a.loss = loss.data_ptr<opmath_t>();
    a.stats = stats.data_ptr<opmath_t>();
    a.R = R;
    a.V = V;
    a.ignore_index = ignore_index;
    a.inv_t = static_cast<opmath_t>(1.0 / temperature);
    a.loss_scale = static_cast<opmath_t>(t2_scale ? temperature * temperature : 1.0);
    a.jsd = jsd_constants<opmath_t>(static_cast<opmath_t>(divergence == kJSD ? beta : 0.5));
    a.divergence = static_cast<int>(divergence);
    const LaunchConfig cfg = pick_config<scalar_t>(V);
    a.group = cfg.group;
    a.vec_ok = same_alignment({a.student, a.teacher});
    const unsigned grid = grid_for(R, cfg);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (divergence == kJSD) {
      softmax_kl_forward_kernel<scalar_t, true><<<grid, cfg.block, 0, stream>>>(a);
    } else {
      softmax_kl_forward_kernel<scalar_t, false><<<grid, cfg.block, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                                                            const at::Tensor& teacher_in,
                                                            const std::optional<at::Tensor>& labels_in,
                                                            const at::Tensor& stats_in, double temperature,
                                                            int64_t divergence, double beta, int64_t ignore_index,
                                                            bool t2_scale, bool student_grad, bool teacher_grad) {
  check_softmax_kl_cuda_args(student_in, teacher_in, labels_in, temperature, divergence, beta);
  const int64_t R = student_in.size(0), V = student_in.size(1);
  TORCH_CHECK_VALUE(grad_loss_in.dim() == 1 && grad_loss_in.size(0) == R, "softmax_kl_backward: grad_loss must have shape (",
                    R, "), got ", grad_loss_in.sizes());
  TORCH_CHECK_VALUE(stats_in.dim() == 2 && stats_in.size(0) == R && stats_in.size(1) == kRowStats,
                    "softmax_kl_backward: stats must have shape (", R, ", ", kRowStats, "), got ", stats_in.sizes());
  TORCH_CHECK_VALUE(grad_loss_in.device() == student_in.device() && stats_in.device() == student_in.device(),
                    "softmax_kl_backward: grad_loss and stats must be on ", student_in.device());
  c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  // a gradient that is not requested is an empty (0,) tensor of the input dtype
  at::Tensor grad_student = student_grad ? at::empty({R, V}, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher = teacher_grad ? at::empty({R, V}, teacher.options()) : at::empty({0}, teacher.options());
  if (R == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};

  const at::ScalarType opmath_dtype = opmath_scalar_type(student.scalar_type());
  // grad_loss keeps its stride (a broadcast gradient is stride 0); only its dtype is normalised
  const at::Tensor grad_loss = grad_loss_in.scalar_type() == opmath_dtype ? grad_loss_in : grad_loss_in.to(opmath_dtype);
  const at::Tensor stats = stats_in.to(opmath_dtype).contiguous();
  at::Tensor labels;
  if (labels_in.has_value()) labels = labels_in->contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t> a;
    a.grad_loss = grad_loss.data_ptr<opmath_t>();
    a.grad_loss_stride = grad_loss.stride(0);
    a.student = student.data_ptr<scalar_t>();
    a.teacher = teacher.data_ptr<scalar_t>();
    a.labels = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
    a.stats = stats.data_ptr<opmath_t>();
    a.grad_student = student_grad ? grad_student.data_ptr<scalar_t>() : nullptr;
    a.grad_teacher = teacher_grad ? grad_teacher.data_ptr<scalar_t>() : nullptr;
    a.R = R;
    a.V = V;
    a.ignore_index = ignore_index;
    a.inv_t = static_cast<opmath_t>(1.0 / temperature);
    a.grad_scale = static_cast<opmath_t>(t2_scale ? temperature : 1.0 / temperature);
    a.jsd = jsd_constants<opmath_t>(static_cast<opmath_t>(divergence == kJSD ? beta : 0.5));
    const LaunchConfig cfg = pick_config<scalar_t>(V);
    a.group = cfg.group;
    a.vec_ok = same_alignment({a.student, a.teacher, a.grad_student, a.grad_teacher});
    const unsigned grid = grid_for(R, cfg);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (divergence) {
      case kForwardKL:
        softmax_kl_backward_kernel<scalar_t, kForwardKL><<<grid, cfg.block, 0, stream>>>(a);
        break;
      case kReverseKL:
        softmax_kl_backward_kernel<scalar_t, kReverseKL><<<grid, cfg.block, 0, stream>>>(a);
        break;
      default:
        softmax_kl_backward_kernel<scalar_t, kJSD><<<grid, cfg.block, 0, stream>>>(a);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_student, grad_teacher};
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("softmax_kl_forward", &kdkernels::cuda::softmax_kl_forward_cuda);
  m.impl("softmax_kl_backward", &kdkernels::cuda::softmax_kl_backward_cuda);
}
