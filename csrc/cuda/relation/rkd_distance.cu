// CUDA kernels of the RKD distance loss (docs/design.md §2.3). The loops and kernels
// it shares with the other relation ops are in _rows.cuh, the math in kdkernels/relation.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <tuple>

#include "_rows.cuh"

namespace kdkernels {
namespace cuda {
namespace {
using namespace relation;

template <typename T>
std::tuple<at::Tensor, at::Tensor> distance_forward(const at::Tensor& student, const at::Tensor& teacher, bool per_row) {
  const Rows<T> s(student, true), t(teacher, true);
  const int64_t B = s.B, tile = std::min(B, kTile);
  auto opts = s.e.options();
  at::Tensor buf_s = at::empty({tile * B}, opts), buf_t = at::empty({tile * B}, opts);
  return distance_passes<T>(B, tile, opts, per_row, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0, cols = B - r0;  // the sums need the pairs j > i only
    at::Tensor bs = buf_s.narrow(0, 0, rows * cols).view({rows, cols});
    at::Tensor bt = buf_t.narrow(0, 0, rows * cols).view({rows, cols});
    squared_distances(s, r0, r1, bs, r0);
    squared_distances(t, r0, r1, bt, r0);
    return std::make_tuple(bs, bt, r0);
  });
}

template <typename T>
at::Tensor distance_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& stats) {
  const Rows<T> s(student, true), t(teacher, true);
  const int64_t B = s.B, tile = std::min(B, kTile);
  auto opts = s.e.options();
  at::Tensor g = grad_loss.contiguous(), st = stats.contiguous();
  at::Tensor buf_s = at::empty({tile, B}, opts), buf_t = at::empty({tile, B}, opts), w = at::empty({tile, B}, opts);
  PairGradScratch<T> scratch(tile, B, s.D, opts);
  at::Tensor grad = at::zeros({B, s.D}, opts);
  auto block_distances = [&](int64_t r0, int64_t r1) {
    at::Tensor bs = buf_s.narrow(0, 0, r1 - r0), bt = buf_t.narrow(0, 0, r1 - r0);
    squared_distances(s, r0, r1, bs);
    squared_distances(t, r0, r1, bt);
    return std::make_tuple(bs, bt);
  };
  // a (B,) upstream gradient: one more pass, for A_w (every pair's weight needs it; relation.h)
  const at::Tensor through = g.dim() == 1 ? distance_through_mu_weighted<T>(B, tile, st, g, block_distances) : st;
  for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
    auto [bs, bt] = block_distances(r0, r1);
    at::Tensor wb = w.narrow(0, 0, r1 - r0);
    distance_weights<T, false>(bs, bt, st, g, through, wb, r0, r1 - r0, B);
    add_pair_gradient(s, r0, r1, wb, bs.template const_data_ptr<T>(), scratch, grad);
  });
  return grad.to(student.scalar_type());
}

// ---- dispatcher entry points ---------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> rkd_distance_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                             bool per_row) {
  check_inputs(student, teacher, "rkd_distance_forward");
  const OpGuard guard(student);
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_distance_forward",
                                    [&] { return distance_forward<scalar_t>(student, teacher, per_row); });
}

at::Tensor rkd_distance_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                                      const at::Tensor& stats) {
  check_inputs(student, teacher, "rkd_distance_backward");
  check_relation_grad(grad_loss, student, "grad_loss", "rkd_distance_backward");
  check_relation_aux(stats, student, "stats", "rkd_distance_backward");
  const OpGuard guard(student);
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_distance_backward",
                                    [&] { return distance_backward<scalar_t>(grad_loss, student, teacher, stats); });
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("rkd_distance_forward", &kdkernels::cuda::rkd_distance_forward_cuda);
  m.impl("rkd_distance_backward", &kdkernels::cuda::rkd_distance_backward_cuda);
}
