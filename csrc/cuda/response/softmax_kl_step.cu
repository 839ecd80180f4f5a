// CUDA kernels for the one-pass softmax-KL step (docs/design.md §2.5, kdkernels/ops/response.py
// SOFTMAX_KL_STEP): kdkernels::softmax_kl_step_forward computes the loss and its gradients from one
// DRAM read of the logits, kdkernels::softmax_kl_step_backward scales the saved gradients in place.
// Per row: the stats pass of softmax_kl_forward (row_stats, _rows.cuh), then a second walk over the
// same row (it hits L2) writing softmax_kl_backward's per-element gradient times weight * grad_scale.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "kdkernels/softmax_kl.h"
#include "../scale_rows.cuh"
#include "_rows.cuh"
#include "step.cuh"

namespace kdkernels {
namespace cuda {
namespace {
using namespace response;

template <typename scalar_t>
struct StepArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* student;
  const scalar_t* teacher;
  const int64_t* labels;     // null: no labels
  const opmath_t* weight;    // 0-d: the reduction's factor, read on the device
  opmath_t* loss;            // (R,): weight * l_r when per_row, else l_r (summed by the launcher)
  scalar_t* grad_student;    // null: not requested
  scalar_t* grad_teacher;    // null: not requested
  int64_t R, V, ignore_index;
  opmath_t inv_t, loss_scale, grad_scale;  // grad_scale = T (t2_scale) or 1/T
  JsdConstants<opmath_t> jsd;
  int group;  // threads per row: kWarpSize or blockDim.x
  bool vec_ok;
  bool per_row;
};

template <typename scalar_t, int kDivergence>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm) softmax_kl_step_kernel(const StepArgs<scalar_t> a) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ alignas(16) unsigned char smem[kReduceSmemBytes];
  const int G = a.group;
  const int rows_per_block = static_cast<int>(blockDim.x) / G;
  const int t = static_cast<int>(threadIdx.x) % G;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  const opmath_t w = *a.weight;
  const opmath_t g = w * a.grad_scale;  // as softmax_kl_backward's grad_loss[row] * grad_scale
  const bool any_grad = a.grad_student != nullptr || a.grad_teacher != nullptr;
  // row is uniform over a group, so every barrier inside row_stats is reached by the whole block
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / G; row < a.R;
       row += row_step) {
    const scalar_t* srow = a.student + row * a.V;
    const scalar_t* trow = a.teacher + row * a.V;
    scalar_t* gs = a.grad_student != nullptr ? a.grad_student + row * a.V : nullptr;
    scalar_t* gt = a.grad_teacher != nullptr ? a.grad_teacher + row * a.V : nullptr;
    const RowLayout L = RowLayout::make(srow, a.V, a.vec_ok);  // shared by all four rows when vec_ok
    if (a.labels != nullptr && a.labels[row] == a.ignore_index) {
      if (t == 0) a.loss[row] = opmath_t(0);
      if (gs != nullptr) zero_row(gs, L, t, G);
      if (gt != nullptr) zero_row(gt, L, t, G);
      continue;
    }
    const RowStats<opmath_t> st =
        row_stats<scalar_t, opmath_t, kDivergence == kJSD>(srow, trow, L, t, G, a.inv_t, kDivergence, a.jsd, smem);
    if (t == 0) {
      const opmath_t l = (st.c_s + st.c_t) * a.loss_scale;  // softmax_kl_forward's row loss
      a.loss[row] = a.per_row ? w * l : l;
    }
    if (any_grad) {
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
}

}  // namespace

namespace response {
void softmax_kl_step_into(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                          const at::Tensor& weight_in, double temperature, int64_t divergence, double beta,
                          int64_t ignore_index, bool t2_scale, const at::Tensor& rows, const at::Tensor& grad_student,
                          const at::Tensor& grad_teacher) {
  check_softmax_kl_cuda_args(student, teacher, labels, temperature, divergence, beta);
  TORCH_CHECK_VALUE(weight_in.dim() == 0, "softmax_kl_step: weight must be a 0-d tensor, got shape ", weight_in.sizes());
  TORCH_CHECK_VALUE(weight_in.device() == student.device(), "softmax_kl_step: weight must be on ",
                    student.device(), ", got ", weight_in.device());
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), "softmax_kl_step_into: the logits must be contiguous");
  c10::cuda::CUDAGuard guard(student.device());
  const int64_t R = student.size(0), V = student.size(1);
  const at::ScalarType opmath_dtype = opmath_scalar_type(student.scalar_type());
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == R && rows.is_contiguous() && rows.scalar_type() == opmath_dtype,
              "softmax_kl_step_into: row_loss must be a contiguous (", R, ",) ", opmath_dtype, " tensor");
  for (const at::Tensor* g : {&grad_student, &grad_teacher}) {
    TORCH_CHECK(!g->defined() || (g->sizes() == student.sizes() && g->is_contiguous() &&
                                  g->scalar_type() == student.scalar_type()),
                "softmax_kl_step_into: a gradient output must be a contiguous (", R, ", ", V, ") tensor of the logits' dtype");
  }
  const at::Tensor weight = weight_in.scalar_type() == opmath_dtype ? weight_in : weight_in.to(opmath_dtype);
  at::Tensor labels_c;
  if (labels.has_value()) labels_c = labels->contiguous();
  if (R == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_step_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    StepArgs<scalar_t> a;
    a.student = student.const_data_ptr<scalar_t>();
    a.teacher = teacher.const_data_ptr<scalar_t>();
    a.labels = labels_c.defined() ? labels_c.const_data_ptr<int64_t>() : nullptr;
    a.weight = weight.const_data_ptr<opmath_t>();
    a.loss = rows.data_ptr<opmath_t>();
    a.grad_student = grad_student.defined() ? grad_student.data_ptr<scalar_t>() : nullptr;
    a.grad_teacher = grad_teacher.defined() ? grad_teacher.data_ptr<scalar_t>() : nullptr;
    a.R = R;
    a.V = V;
    a.ignore_index = ignore_index;
    a.inv_t = static_cast<opmath_t>(1.0 / temperature);
    a.loss_scale = static_cast<opmath_t>(t2_scale ? temperature * temperature : 1.0);
    a.grad_scale = static_cast<opmath_t>(t2_scale ? temperature : 1.0 / temperature);
    a.jsd = jsd_constants<opmath_t>(static_cast<opmath_t>(divergence == kJSD ? beta : 0.5));
    a.per_row = false;  // l_r: the callers weight the sum
    const LaunchConfig cfg = pick_config<scalar_t>(V);
    a.group = cfg.group;
    a.vec_ok = same_alignment({a.student, a.teacher, a.grad_student, a.grad_teacher});
    const unsigned grid = grid_for(R, cfg);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (divergence) {
      case kForwardKL:
        softmax_kl_step_kernel<scalar_t, kForwardKL><<<grid, cfg.block, 0, stream>>>(a);
        break;
      case kReverseKL:
        softmax_kl_step_kernel<scalar_t, kReverseKL><<<grid, cfg.block, 0, stream>>>(a);
        break;
      default:
        softmax_kl_step_kernel<scalar_t, kJSD><<<grid, cfg.block, 0, stream>>>(a);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
}  // namespace response

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_step_forward_cuda(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const std::optional<at::Tensor>& labels,
    const at::Tensor& weight_in, double temperature, int64_t divergence, double beta, int64_t ignore_index,
    bool t2_scale, bool per_row, bool student_grad, bool teacher_grad) {
  check_softmax_kl_cuda_args(student_in, teacher_in, labels, temperature, divergence, beta);
  c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const int64_t R = student.size(0), V = student.size(1);
  const at::ScalarType opmath_dtype = opmath_scalar_type(student.scalar_type());
  at::Tensor rows = at::empty({R}, student.options().dtype(opmath_dtype));
  at::Tensor grad_student = student_grad ? at::empty({R, V}, student.options()) : at::Tensor();
  at::Tensor grad_teacher = teacher_grad ? at::empty({R, V}, teacher.options()) : at::Tensor();
  response::softmax_kl_step_into(student, teacher, labels, weight_in, temperature, divergence, beta, ignore_index,
                                 t2_scale, rows, grad_student, grad_teacher);
  const at::Tensor weight = weight_in.to(opmath_dtype);
  // weight * sum_r l_r, as reduce_rows' sum then factor; at::sum is deterministic (no atomics)
  at::Tensor loss = per_row ? at::mul(rows, weight) : at::mul(at::sum(rows), weight);
  // a gradient that is not requested is an empty (0,) tensor of the input dtype
  return {loss, student_grad ? grad_student : at::empty({0}, student.options()),
          teacher_grad ? grad_teacher : at::empty({0}, teacher.options())};
}

void softmax_kl_step_backward_cuda(const at::Tensor& grad_loss_in, at::Tensor& grad_student, at::Tensor& grad_teacher) {
  const at::Tensor& like = grad_student.numel() > 0 ? grad_student : grad_teacher;
  if (like.numel() == 0) return;
  // convert once for both gradients (they share the dtype)
  const at::ScalarType opmath_dtype = opmath_scalar_type(like.scalar_type());
  const at::Tensor grad_loss = grad_loss_in.scalar_type() == opmath_dtype ? grad_loss_in : grad_loss_in.to(opmath_dtype);
  scale_rows_(grad_student, grad_loss);
  scale_rows_(grad_teacher, grad_loss);
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("softmax_kl_step_forward", &kdkernels::cuda::softmax_kl_step_forward_cuda);
  m.impl("softmax_kl_step_backward", &kdkernels::cuda::softmax_kl_step_backward_cuda);
}
