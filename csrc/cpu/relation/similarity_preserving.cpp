// CPU kernels of the similarity-preserving loss (docs/design.md §2.3). The loops it shares with the other
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

// ---- similarity preserving ------------------------------------------------------------------
// stats (3, B) = [n_s, n_t, gamma'] with gamma'_i = sum_k rho_ik b_ik per unit grad_loss (0 where
// n_s is clamped): the backward forms each row's and column's weights from these.
template <typename T>
std::tuple<at::Tensor, at::Tensor> sp_forward(const at::Tensor& student, const at::Tensor& teacher, bool per_row) {
  const Rows<T> s(student, false), t(teacher, false);
  const int64_t B = s.B, tile = tile_rows(B);
  at::Tensor buf_s = at::empty({tile, B}, s.e.options()), buf_t = at::empty({tile, B}, s.e.options());
  at::Tensor stats = at::empty({3, B}, s.e.options());
  T *ns = stats.data_ptr<T>(), *nt = ns + B, *gam = nt + B;
  std::vector<double> row_loss(B);
  for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
    at::Tensor bs = buf_s.narrow(0, 0, r1 - r0), bt = buf_t.narrow(0, 0, r1 - r0);
    s.gram_rows(r0, r1, bs);
    t.gram_rows(r0, r1, bt);
    const T *ps = bs.const_data_ptr<T>(), *pt = bt.const_data_ptr<T>();
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T *gs = ps + (i - r0) * B, *gt = pt + (i - r0) * B;
        double ss = 0, st = 0;
        for (int64_t j = 0; j < B; ++j) ss += static_cast<double>(gs[j]) * gs[j], st += static_cast<double>(gt[j]) * gt[j];
        const T n_s = sp_row_norm(static_cast<T>(ss)), n_t = sp_row_norm(static_cast<T>(st));
        double loss = 0, gm = 0;
        for (int64_t j = 0; j < B; ++j) {
          const T b = gs[j] / n_s, diff = gt[j] / n_t - b;
          loss += static_cast<double>(diff) * diff;
          gm += -2.0 * diff * b;
        }
        ns[i] = n_s;
        nt[i] = n_t;
        gam[i] = sp_norm_active(n_s) ? static_cast<T>(gm) : T(0);
        row_loss[i] = loss;
      }
    });
  });
  return {loss_output<T>(row_loss, per_row, s.e.options()), stats};
}

template <typename T>
at::Tensor sp_backward(const at::Tensor& grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                       const at::Tensor& stats) {
  const Rows<T> s(student, false), t(teacher, false);
  const int64_t B = s.B, tile = tile_rows(B);
  const at::Tensor up = values_of<T>(grad_loss), st = values_of<T>(stats);
  const T* w = up.const_data_ptr<T>();  // g (0-d) or (B,): row i of dL/dG is scaled by w_i
  const T *ns = st.const_data_ptr<T>(), *nt = ns + B, *gam = nt + B;
  at::Tensor buf_s = at::empty({tile * B}, s.e.options()), buf_t = at::empty({tile * B}, s.e.options());
  at::Tensor grad = at::zeros({B, s.D}, s.e.options());
  // dL/dF = S F with S = g (W + W^T) (per-row: S_ij = w_i W_ij + w_j W_ji), symmetric: block I
  // forms only its columns j >= r0 (half the Gram work of full rows), adds S_IJ F_J to its own rows
  // and S_IJ^T F_I to the rows past it.
  const bool per_row = up.dim() == 1;
  for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0, cols = B - r0;
    at::Tensor bs = buf_s.narrow(0, 0, rows * cols).view({rows, cols});
    at::Tensor bt = buf_t.narrow(0, 0, rows * cols).view({rows, cols});
    s.gram_block(r0, r1, r0, B, bs);
    t.gram_block(r0, r1, r0, B, bt);
    T* ps = bs.data_ptr<T>();
    const T* pt = bt.const_data_ptr<T>();
    // W_ji comes from the same Gram entry with row j's statistics; S overwrites the student's block
    with_per_row(per_row, [&](auto per_row_kind) {
      constexpr bool kPerRow = decltype(per_row_kind)::value;
      at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          T* gs = ps + (i - r0) * cols;
          const T* gt = pt + (i - r0) * cols;
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t j = r0 + c;
            const T w_ij = sp_grad_entry(gs[c], gt[c], ns[i], nt[i], gam[i]);
            const T w_ji = sp_grad_entry(gs[c], gt[c], ns[j], nt[j], gam[j]);
            gs[c] = kPerRow ? w[i] * w_ij + w[j] * w_ji : w[0] * (w_ij + w_ji);
          }
        }
      });
    });
    grad.narrow(0, r0, rows).addmm_(bs, s.e.narrow(0, r0, cols));
    if (r1 < B) grad.narrow(0, r1, B - r1).addmm_(bs.narrow(1, rows, B - r1).t(), s.e.narrow(0, r0, rows));
  });
  return grad.to(student.scalar_type());
}

// ---- dispatcher entry points ---------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> similarity_preserving_forward_cpu(const at::Tensor& student,
                                                                     const at::Tensor& teacher, bool per_row) {
  check_inputs(student, teacher, "similarity_preserving_forward");
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "similarity_preserving_forward",
                                    [&] { return sp_forward<scalar_t>(student, teacher, per_row); });
}

at::Tensor similarity_preserving_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                                              const at::Tensor& teacher, const at::Tensor& stats) {
  check_inputs(student, teacher, "similarity_preserving_backward");
  check_relation_grad(grad_loss, student, "grad_loss", "similarity_preserving_backward");
  check_relation_aux(stats, student, "stats", "similarity_preserving_backward");
  return AT_DISPATCH_FLOATING_TYPES(opmath_scalar_type(student.scalar_type()), "similarity_preserving_backward",
                                    [&] { return sp_backward<scalar_t>(grad_loss, student, teacher, stats); });
}

}  // namespace
}  // namespace cpu
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("similarity_preserving_forward", &kdkernels::cpu::similarity_preserving_forward_cpu);
  m.impl("similarity_preserving_backward", &kdkernels::cpu::similarity_preserving_backward_cpu);
}
