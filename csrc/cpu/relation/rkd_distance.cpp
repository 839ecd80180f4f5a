// CPU kernels of the RKD distance loss (docs/design.md §2.3). The loops it shares with the other
// relation ops are in _rows.h, the math in kdkernels/relation.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "_rows.h"

namespace kdkernels {
namespace cpu {
namespace {
using namespace relation;

// Both sides' squared distances of the rows [r0, r1) to the rows [r0, B), as (r1 - r0, B - r0)
// views of the flat scratch buffers: the upper part of a row block, all a symmetric pass needs.
template <typename T>
std::pair<at::Tensor, at::Tensor> upper_squared_distances(const Rows<T>& s, const Rows<T>& t, int64_t r0, int64_t r1,
                                                          const at::Tensor& buf_s, const at::Tensor& buf_t) {
  const int64_t rows = r1 - r0, cols = s.B - r0;
  at::Tensor bs = buf_s.narrow(0, 0, rows * cols).view({rows, cols});
  at::Tensor bt = buf_t.narrow(0, 0, rows * cols).view({rows, cols});
  s.squared_distances(r0, r1, bs, r0);
  t.squared_distances(r0, r1, bt, r0);
  return {bs, bt};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> distance_forward(const at::Tensor& student, const at::Tensor& teacher, bool per_row) {
  // the teacher only enters through its distances: its centred rows are formed block by block
  // (no gradient is alive here, so the forward affords twice the backward's block: fewer, faster GEMMs)
  const Rows<T> s(student, true), t(teacher, true, /*allow_lazy=*/true);
  const int64_t B = s.B, tile = std::min(B, 2 * tile_rows(B));
  at::Tensor buf_s = at::empty({tile * B}, s.e.options()), buf_t = at::empty({tile * B}, s.e.options());
  DistanceTerm<T> term(B, per_row);
  for (int pass = 0; pass < 2; ++pass) {
    // the sums are symmetric: a row block needs only its columns j >= r0 (half the Gram work)
    for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
      at::Tensor bs, bt;
      std::tie(bs, bt) = upper_squared_distances(s, t, r0, r1, buf_s, buf_t);
      const T *ps = bs.const_data_ptr<T>(), *pt = bt.const_data_ptr<T>();
      if (pass == 0) term.add_mu_rows(ps, pt, r0, r1, r0);
      else term.add_loss_rows(ps, pt, r0, r1, r0);
    });
    if (pass == 0) term.finish_mu();
  }
  return term.finish(s.e.options());
}

template <typename T>
at::Tensor distance_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                             const at::Tensor& stats) {
  const Rows<T> s(student, true), t(teacher, true, /*allow_lazy=*/true);
  const int64_t B = s.B, tile = tile_rows(B);
  const at::Tensor up = values_of<T>(grad_loss), st = values_of<T>(stats);
  const T *w = up.const_data_ptr<T>(), *pst = st.const_data_ptr<T>();  // w: g (0-d) or (B,)
  const bool per_row = up.dim() == 1;
  at::Tensor buf_s = at::empty({tile * B}, s.e.options()), buf_t = at::empty({tile * B}, s.e.options());
  at::Tensor scratch = at::empty({tile, s.D}, s.e.options());
  at::Tensor grad = at::zeros({B, s.D}, s.e.options());
  double weighted_a = 0;
  if (per_row) {  // one more pass: every pair's weight needs A_w, a sum over all pairs (relation.h)
    for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
      at::Tensor bs, bt;
      std::tie(bs, bt) = upper_squared_distances(s, t, r0, r1, buf_s, buf_t);
      weighted_a += weighted_a_rows(bs.const_data_ptr<T>(), bt.const_data_ptr<T>(), r0, r1, r0, B, pst, w);
    });
  }
  const T through_mu = distance_through_mu(pst, B, per_row, w[0], weighted_a);
  // the weights are symmetric: a row block forms its columns j >= r0 only (half the Gram work)
  for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
    at::Tensor bs, bt;
    std::tie(bs, bt) = upper_squared_distances(s, t, r0, r1, buf_s, buf_t);
    T* pw = bt.data_ptr<T>();  // the weights overwrite the teacher's block
    distance_pair_weights(bs.const_data_ptr<T>(), pw, r0, r1, r0, B, w, per_row, through_mu, pst, pw,
                          /*accumulate=*/false);
    s.add_symmetric_pair_gradient(r0, r1, bt, bs.const_data_ptr<T>(), scratch, grad.data_ptr<T>());
  });
  // e = x - mean(x): the loss is translation invariant, so the gradient w.r.t. x is the one w.r.t. e.
  return grad.to(student.scalar_type());
}

// ---- dispatcher entry points ---------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> rkd_distance_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                            bool per_row) {
  check_inputs(student, teacher, "rkd_distance_forward");
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_distance_forward",
                                    [&] { return distance_forward<scalar_t>(student, teacher, per_row); });
}

at::Tensor rkd_distance_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                     const at::Tensor& teacher, const at::Tensor& stats) {
  check_inputs(student, teacher, "rkd_distance_backward");
  check_relation_grad(grad_loss, student, "grad_loss", "rkd_distance_backward");
  check_relation_aux(stats, student, "stats", "rkd_distance_backward");
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "rkd_distance_backward",
                                    [&] { return distance_backward<scalar_t>(grad_loss, student, teacher, stats); });
}

}  // namespace
}  // namespace cpu
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("rkd_distance_forward", &kdkernels::cpu::rkd_distance_forward_cpu);
  m.impl("rkd_distance_backward", &kdkernels::cpu::rkd_distance_backward_cpu);
}
