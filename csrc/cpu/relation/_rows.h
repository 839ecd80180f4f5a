// Loops shared by the CPU kernels of the relation family (docs/design.md §2.3), one op per file
// next to this header: rkd_distance.cpp, similarity_preserving.cpp, rkd_angle.cpp and
// rkd_distance_angle.cpp.
//
// Distance and SP never hold a B x B matrix: they walk row blocks of tile_rows(B) rows, forming the
// block's Gram rows with at::mm (BLAS) and finishing each element in a fused multi-threaded pass;
// the backward forms the block's gradient weights the same way and turns them into the gradient
// with one more GEMM (W E). Angle keeps O(B^2): the squared-distance matrices of both sides
// (AngleSide), which the combined distance + angle op also uses for the distance term.
// The math (and why the embeddings are centred) is in kdkernels/relation.h.
//
// Here: the embedding rows (Rows: centring, squared norms, Gram / squared-distance blocks,
// pair-gradient accumulation), the distance term (DistanceTerm, distance_pair_weights: rkd_distance
// and rkd_distance_angle) and the angle side (AngleSide, angle_loss, angle_pair_weights,
// gradient_from_pair_weights: rkd_angle and rkd_distance_angle).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "kdkernels/relation.h"
#include "kdkernels/relation_args.h"

namespace kdkernels {
namespace cpu {
// The family's shared CPU code; the math of kdkernels/relation.h is visible in it (and, through
// `using namespace relation;`, in the op files).
namespace relation {
using namespace ::kdkernels::relation;

constexpr int64_t kTile = 512;  // rows per block of the angle kernels (which hold B x B anyway)

inline void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const char* op) {
  TORCH_CHECK(student.is_cpu(), op, ": student and teacher must be CPU tensors");
  check_relation_inputs(student, teacher, op);
}

// Rows per scratch block: a (rows, B) op-math tile of about 4 MiB (2^20 elements), 64..512 rows.
inline int64_t tile_rows(int64_t B) {
  return std::min(B, std::max<int64_t>(64, std::min<int64_t>(512, (int64_t{1} << 20) / std::max<int64_t>(B, 1))));
}

// A batch of embeddings in op-math T: contiguous (B, D) rows, optionally minus the column mean,
// and their squared norms. Materialised: e holds the rows (the input itself when it already is
// contiguous op-math and is not centred, else a copy). Lazy (only asked for a centred op-math
// contiguous input): no B x D copy, the centred rows are formed block by block when needed,
// rounded exactly as the copy would be.
template <typename T>
struct Rows {
  at::Tensor e;            // materialised rows; lazy: the (uncentred) input
  std::vector<T> norm2;
  std::vector<double> mean;  // lazy only: the column means
  const T* p = nullptr;
  int64_t B = 0, D = 0;
  bool lazy = false;
  mutable at::Tensor rows_buf, cols_buf;  // lazy scratch: centred row block, centred column block

  Rows(const at::Tensor& x, bool centre, bool allow_lazy = false) {
    at::Tensor xc = x.contiguous();
    B = xc.size(0);
    D = xc.size(1);
    const auto opmath = c10::CppTypeToScalarType<T>::value;
    if (!centre && xc.scalar_type() == opmath) {
      e = xc;  // nothing to change: read the input in place
    } else if (centre && allow_lazy && xc.scalar_type() == opmath) {
      lazy = true;
      e = xc;
      const T* in = xc.const_data_ptr<T>();
      mean.assign(D, 0.0);
      at::parallel_for(0, D, 64, [&](int64_t c0, int64_t c1) {
        for (int64_t i = 0; i < B; ++i)
          for (int64_t c = c0; c < c1; ++c) mean[c] += static_cast<double>(in[i * D + c]);
        for (int64_t c = c0; c < c1; ++c) mean[c] /= static_cast<double>(B);
      });
    } else {
    e = at::empty({B, D}, xc.options().dtype(opmath));
    T* out = e.data_ptr<T>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "kdkernels_relation_rows", [&] {
      const scalar_t* in = xc.const_data_ptr<scalar_t>();
      at::parallel_for(0, D, 64, [&](int64_t c0, int64_t c1) {
        std::vector<double> mean(c1 - c0, 0.0);
        if (centre) {
          for (int64_t i = 0; i < B; ++i)
            for (int64_t c = c0; c < c1; ++c) mean[c - c0] += static_cast<double>(in[i * D + c]);
          for (double& m : mean) m /= static_cast<double>(B);
        }
        // the difference is rounded once, so identical rows stay bit-identical
        for (int64_t i = 0; i < B; ++i)
          for (int64_t c = c0; c < c1; ++c) out[i * D + c] = static_cast<T>(static_cast<double>(in[i * D + c]) - mean[c - c0]);
      });
    });
    }
    p = e.const_data_ptr<T>();
    norm2.resize(B);
    at::parallel_for(0, B, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        double s = 0;
        for (int64_t c = 0; c < D; ++c) {
          const T v = value(i, c);
          s += static_cast<double>(v) * v;
        }
        norm2[i] = static_cast<T>(s);
      }
    });
  }

  // element (i, c) of the (centred) rows
  T value(int64_t i, int64_t c) const {
    return lazy ? static_cast<T>(static_cast<double>(p[i * D + c]) - mean[c]) : p[i * D + c];
  }

  // dst (j1 - j0, D) = the rows [j0, j1); lazy mode only
  void fill(int64_t j0, int64_t j1, T* dst) const {
    at::parallel_for(j0, j1, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* in = p + i * D;
        T* o = dst + (i - j0) * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<T>(static_cast<double>(in[c]) - mean[c]);
      }
    });
  }

  const T* row(int64_t i) const { return p + i * D; }

  T direct_sq(int64_t i, int64_t j) const {
    double s = 0;
    if (lazy) {
      for (int64_t c = 0; c < D; ++c) {
        double d = static_cast<double>(value(i, c)) - value(j, c);
        s += d * d;
      }
      return static_cast<T>(s);
    }
    const T *a = row(i), *b = row(j);
    for (int64_t c = 0; c < D; ++c) {
      double d = static_cast<double>(a[c]) - b[c];
      s += d * d;
    }
    return static_cast<T>(s);
  }

  // dst (r1 - r0, c1 - c0) = G_ij for rows i in [r0, r1), columns j in [c0, c1); materialised only
  void gram_block(int64_t r0, int64_t r1, int64_t c0, int64_t c1, at::Tensor dst) const {
    TORCH_CHECK(!lazy, "kdkernels: gram_block needs materialised rows");
    at::mm_out(dst, e.narrow(0, r0, r1 - r0), e.narrow(0, c0, c1 - c0).t());
  }

  // dst (r1 - r0, B - c0) = G_ij for rows i in [r0, r1) and columns j in [c0, B), either kind of rows
  void gram_rows(int64_t r0, int64_t r1, at::Tensor dst, int64_t c0 = 0) const {
    if (!lazy) {
      gram_block(r0, r1, c0, B, dst);
      return;
    }
    // centred row block once, then column blocks of the centred rows, each GEMM written into its
    // columns of dst
    const int64_t chunk = std::min<int64_t>(B, 512);
    if (!rows_buf.defined() || rows_buf.size(0) < r1 - r0) rows_buf = at::empty({r1 - r0, D}, e.options());
    if (!cols_buf.defined()) cols_buf = at::empty({chunk, D}, e.options());
    at::Tensor rb = rows_buf.narrow(0, 0, r1 - r0);
    fill(r0, r1, rb.data_ptr<T>());
    for (int64_t j0 = c0; j0 < B; j0 += chunk) {
      const int64_t j1 = std::min(B, j0 + chunk);
      at::Tensor cb = cols_buf.narrow(0, 0, j1 - j0);
      fill(j0, j1, cb.data_ptr<T>());
      at::Tensor out = dst.narrow(1, j0 - c0, j1 - j0);
      at::mm_out(out, rb, cb.t());
    }
  }

  // dst (r1 - r0, B - c0) = |e_i - e_j|^2 for columns j in [c0, B) (0 on the diagonal), the Gram
  // expansion except where it is unreliable (relation.h), which is recomputed from the differences.
  void squared_distances(int64_t r0, int64_t r1, at::Tensor dst, int64_t c0 = 0) const {
    gram_rows(r0, r1, dst, c0);
    T* sq = dst.data_ptr<T>();
    const int64_t cols = B - c0;
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T* out = sq + (i - r0) * cols;  // out[j - c0] for j in [c0, B)
        for (int64_t j = c0; j < B; ++j) {
          T v = sq_from_gram(norm2[i], norm2[j], out[j - c0]);
          if (i == j) v = T(0);
          else if (gram_unreliable(v, norm2[i], norm2[j])) v = direct_sq(i, j);
          out[j - c0] = v;
        }
      }
    });
  }

  // grad_i += w_ij (e_i - e_j) summed over j, for the rows [r0, r1) and a (r1 - r0, B) weight
  // block w. Pairs where the Gram expansion is unreliable are added from the differences (and
  // removed from w) so that large weights on close pairs do not amplify cancellation; the rest is
  // rowsum(w) e_i - (w E)_i, one GEMM. sq holds the same block's squared distances.
  void add_pair_gradient(int64_t r0, int64_t r1, at::Tensor w, const T* sq, at::Tensor scratch, T* grad) const {
    const std::vector<T> rowsum = take_near_pairs_by_row(r0, r1, 0, w.data_ptr<T>(), sq, grad);
    at::Tensor we = scratch.narrow(0, 0, r1 - r0);
    at::mm_out(we, w, e);
    add_rows(r0, r1, rowsum.data(), we.const_data_ptr<T>(), grad);
  }

  // add_pair_gradient for a symmetric weight matrix of which the block holds the rows [r0, r1) and
  // only the columns [r0, B) (w and sq are (r1 - r0, B - r0)): every entry adds to its row, and
  // the entries right of the diagonal block (j >= r1; their transposes w_ji are in no later
  // block) also add w_ij (e_j - e_i) to row j. The diagonal block holds both (i, j) and (j, i)
  // already. w is overwritten; scratch is (tile, D) with tile >= r1 - r0.
  void add_symmetric_pair_gradient(int64_t r0, int64_t r1, at::Tensor w, const T* sq, at::Tensor scratch,
                                   T* grad) const {
    const int64_t rows = r1 - r0, cols = B - r0;
    T* wp = w.data_ptr<T>();
    // columns j >= r1 first, a thread per column range (it owns those rows of grad): near pairs
    // from the differences, the far weights' column sums for the GEMM part
    std::vector<T> colsum(B - r1, T(0));
    at::parallel_for(r1, B, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t i = r0; i < r1; ++i) {
        const T* wr = wp + (i - r0) * cols;  // wr[j - r0]
        const T* sr = sq + (i - r0) * cols;
        for (int64_t j = j0; j < j1; ++j) {
          const T v = wr[j - r0];
          if (v != T(0) && gram_unreliable(sr[j - r0], norm2[i], norm2[j])) {
            const T *a = row(j), *b = row(i);
            T* g = grad + j * D;
            for (int64_t c = 0; c < D; ++c) g[c] += v * (a[c] - b[c]);
          } else {
            colsum[j - r1] += v;
          }
        }
      }
    });
    // then the rows, as add_pair_gradient (the near pairs leave w here)
    const std::vector<T> rowsum = take_near_pairs_by_row(r0, r1, r0, wp, sq, grad);
    // far pairs: grad_i += rowsum_i e_i - (w E)_i, and grad_j += colsum_j e_j - (w^T E_I)_j
    at::Tensor we = scratch.narrow(0, 0, rows);
    at::mm_out(we, w, e.narrow(0, r0, cols));
    add_rows(r0, r1, rowsum.data(), we.const_data_ptr<T>(), grad);
    const int64_t chunk = scratch.size(0);
    for (int64_t j0 = r1; j0 < B; j0 += chunk) {
      const int64_t j1 = std::min(B, j0 + chunk);
      at::Tensor wt = scratch.narrow(0, 0, j1 - j0);
      at::mm_out(wt, w.narrow(1, j0 - r0, j1 - j0).t(), e.narrow(0, r0, rows));
      add_rows(j0, j1, colsum.data() + (j0 - r1), wt.const_data_ptr<T>(), grad);
    }
  }

  // The row pass of the pair gradients, for rows [r0, r1) of a weight block w (and its squared
  // distances sq) holding the columns [c0, B): zeroes the diagonal (d(e_i - e_i) = 0), adds the
  // pairs where the Gram expansion is unreliable to grad_i from the differences and removes them
  // from w; returns each row's remaining weight sum.
  std::vector<T> take_near_pairs_by_row(int64_t r0, int64_t r1, int64_t c0, T* wp, const T* sq, T* grad) const {
    const int64_t cols = B - c0;
    std::vector<T> rowsum(r1 - r0);
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T* wr = wp + (i - r0) * cols;  // wr[j - c0]
        const T* sr = sq + (i - r0) * cols;
        T* g = grad + i * D;
        T s = 0;
        for (int64_t k = 0; k < cols; ++k) {
          const int64_t j = c0 + k;
          if (j == i) {
            wr[k] = T(0);
            continue;
          }
          if (wr[k] != T(0) && gram_unreliable(sr[k], norm2[i], norm2[j])) {
            const T *a = row(i), *b = row(j);
            for (int64_t c = 0; c < D; ++c) g[c] += wr[k] * (a[c] - b[c]);
            wr[k] = T(0);
          }
          s += wr[k];
        }
        rowsum[i - r0] = s;
      }
    });
    return rowsum;
  }

  // grad_i += s_i e_i - m_i for the rows [i0, i1); s and m (i1 - i0, D) indexed from i0
  void add_rows(int64_t i0, int64_t i1, const T* s, const T* m, T* grad) const {
    at::parallel_for(i0, i1, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t i = k0; i < k1; ++i) {
        const T* a = row(i);
        const T* mi = m + (i - i0) * D;
        T* g = grad + i * D;
        const T si = s[i - i0];
        for (int64_t c = 0; c < D; ++c) g[c] += si * a[c] - mi[c];
      }
    });
  }
};

// A small op-math tensor (grad_loss: 0-d or (B,), stats) that lives on the CPU, contiguous.
template <typename T>
at::Tensor values_of(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == c10::CppTypeToScalarType<T>::value, "expected a ",
              c10::CppTypeToScalarType<T>::value, " tensor, got ", x.scalar_type());
  return x.contiguous();
}

// A forward's loss output from its per-row losses: (B,) when per_row, else their 0-d sum.
template <typename T>
at::Tensor loss_output(const std::vector<double>& rows, bool per_row, const at::TensorOptions& opts) {
  const int64_t B = static_cast<int64_t>(rows.size());
  at::Tensor out = per_row ? at::empty({B}, opts) : at::empty({}, opts);
  T* o = out.data_ptr<T>();
  if (per_row) {
    for (int64_t i = 0; i < B; ++i) o[i] = static_cast<T>(rows[i]);
  } else {
    double total = 0;
    for (double l : rows) total += l;
    o[0] = static_cast<T>(total);
  }
  return out;
}

// Block loop shared by the tiled kernels: fn(r0, r1) for consecutive row blocks.
template <typename F>
void for_each_block(int64_t B, int64_t tile, F&& fn) {
  for (int64_t r0 = 0; r0 < B; r0 += tile) fn(r0, std::min(B, r0 + tile));
}

// ---- RKD distance ------------------------------------------------------------------------
// The distance term on rows [r0, r1) of squared distances ps (student) and pt (teacher), each
// (r1 - r0, B) row-major: a block of the tiled kernels or the whole matrices of the combined op.
// Two passes (mu, then the loss and A); stats = [mu_s, mu_t, A] with A = sum_ij smooth_l1'(x_ij)
// d_s_ij / mu_s^2 (relation.h): all the backward needs besides the inputs.
template <typename T>
struct DistanceTerm {
  int64_t B;
  bool per_row;                      // the forward returns the per-row losses l_i
  std::vector<double> row_a, row_b;  // per-row partial sums of the current pass, over j > i
  std::vector<double> col_loss;      // per_row only: row j's pairs i < j (summed by the rows above)
  T mu_s = 0, mu_t = 0;

  DistanceTerm(int64_t batch, bool per_row_losses)
      : B(batch), per_row(per_row_losses), row_a(batch), row_b(batch), col_loss(per_row_losses ? batch : 0) {}

  double count() const { return static_cast<double>(B) * static_cast<double>(B - 1); }

  // Everything the forward sums is symmetric in (i, j): each row sums its pairs j > i only, and
  // the totals count them twice. ps / pt hold columns [c0, B) of the rows (c0 <= r0).

  // pass 1: the distances of both sides
  void add_mu_rows(const T* ps, const T* pt, int64_t r0, int64_t r1, int64_t c0) {
    const int64_t cols = B - c0;
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T *rs = ps + (i - r0) * cols, *rt = pt + (i - r0) * cols;  // rs[j - c0]
        double as = 0, at_ = 0;
        for (int64_t j = i + 1; j < B; ++j) {
          as += clamped_distance(rs[j - c0]);
          at_ += clamped_distance(rt[j - c0]);
        }
        row_a[i] = as;
        row_b[i] = at_;
      }
    });
  }

  void finish_mu() {
    double sum_s = 0, sum_t = 0;
    for (int64_t i = 0; i < B; ++i) sum_s += row_a[i], sum_t += row_b[i];
    mu_s = static_cast<T>(2 * sum_s / count());
    mu_t = static_cast<T>(2 * sum_t / count());
  }

  // pass 2: the loss, and the terms of A
  void add_loss_rows(const T* ps, const T* pt, int64_t r0, int64_t r1, int64_t c0) {
    const int64_t cols = B - c0;
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T *rs = ps + (i - r0) * cols, *rt = pt + (i - r0) * cols;  // rs[j - c0]
        double loss = 0, a = 0;
        for (int64_t j = i + 1; j < B; ++j) {  // the diagonal is 0 vs 0
          const T ds = clamped_distance(rs[j - c0]);
          const T x = ds / mu_s - clamped_distance(rt[j - c0]) / mu_t;
          loss += smooth_l1(x);
          a += smooth_l1_grad(x) * ds;
        }
        row_a[i] = loss;
        row_b[i] = a;
      }
    });
    if (!per_row) return;
    // l_j also holds its pairs i < j, which row i summed: add them to column j (a thread per column
    // range, rows in order: contiguous reads)
    at::parallel_for(r0 + 1, B, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t i = r0; i < r1; ++i) {
        const T *rs = ps + (i - r0) * cols, *rt = pt + (i - r0) * cols;
        for (int64_t j = std::max(j0, i + 1); j < j1; ++j)
          col_loss[j] += smooth_l1(distance_residual(rs[j - c0], rt[j - c0], mu_s, mu_t));
      }
    });
  }

  // the loss (the summed 0-d, or the per-row (B,)) and the stats (3,), after both passes
  std::tuple<at::Tensor, at::Tensor> finish(const at::TensorOptions& opts) const {
    double loss = 0, a = 0;
    for (int64_t i = 0; i < B; ++i) loss += row_a[i], a += row_b[i];
    at::Tensor out;
    if (per_row) {
      std::vector<double> rows(B);
      for (int64_t i = 0; i < B; ++i) rows[i] = row_a[i] + col_loss[i];
      out = loss_output<T>(rows, true, opts);
    } else {
      out = at::empty({}, opts);
      out.data_ptr<T>()[0] = static_cast<T>(2 * loss);
    }
    at::Tensor stats = at::empty({3}, opts);
    T* st = stats.data_ptr<T>();
    st[0] = mu_s;
    st[1] = mu_t;
    st[2] = static_cast<T>(2 * a / (static_cast<double>(mu_s) * mu_s));
    return {out, stats};
  }
};

// A per-row backward's extra pass: sum over the pairs j > i of rows [r0, r1) (columns [c0, B),
// c0 <= r0) of (w_i + w_j) h_ij d_s_ij, i.e. this block's part of A_w mu_s^2 (relation.h).
template <typename T>
double weighted_a_rows(const T* ps, const T* pt, int64_t r0, int64_t r1, int64_t c0, int64_t B, const T* stats,
                       const T* w) {
  const T mu_s = stats[0], mu_t = stats[1];
  const int64_t cols = B - c0;
  std::vector<double> rows(r1 - r0);
  at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T *rs = ps + (i - r0) * cols, *rt = pt + (i - r0) * cols;
      double a = 0;
      for (int64_t j = i + 1; j < B; ++j)
        a += static_cast<double>(w[i] + w[j]) * smooth_l1_grad(distance_residual(rs[j - c0], rt[j - c0], mu_s, mu_t)) *
             clamped_distance(rs[j - c0]);
      rows[i - r0] = a;
    }
  });
  double a = 0;
  for (double v : rows) a += v;
  return a;
}

// The path through mu_s of every pair weight, 2 A_w / (B (B - 1)) (relation.h): from the saved A
// for a 0-d upstream g (A_w = g A), from weighted_a (the sum of weighted_a_rows) for a (B,) one.
template <typename T>
T distance_through_mu(const T* stats, int64_t B, bool per_row, T g, double weighted_a = 0) {
  const double count = static_cast<double>(B) * static_cast<double>(B - 1);
  const double mu_s = stats[0];
  return static_cast<T>(per_row ? 2 * weighted_a / (mu_s * mu_s) / count : 2 * static_cast<double>(g) * stats[2] / count);
}

// Pair weights of the distance term for rows [r0, r1) and columns [c0, B): v_ij with dL/de_i =
// sum_j v_ij (e_i - e_j), written to pw (accumulate: added to it); ps, pt and pw are
// (r1 - r0, B - c0). pw may alias pt: element k is read before it is written. w is the upstream
// gradient (B,) when per_row, else w[0] = g; through_mu from distance_through_mu.
template <typename T>
void distance_pair_weights(const T* ps, const T* pt, int64_t r0, int64_t r1, int64_t c0, int64_t B, const T* w,
                           bool per_row, T through_mu, const T* stats, T* pw, bool accumulate) {
  const T mu_s = stats[0], mu_t = stats[1];
  with_per_row(per_row, [&](auto per_row_kind) {
    constexpr bool kPerRow = decltype(per_row_kind)::value;
    const T two_g = T(2) * w[0];  // 0-d: every pair weighs 2 g (d_ij = d_ji)
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = c0; j < B; ++j) {
          const int64_t k = (i - r0) * (B - c0) + (j - c0);
          T v = T(0);
          if (j != i) {
            const T pair_w = kPerRow ? w[i] + w[j] : two_g;
            v = distance_grad_weight(ps[k], distance_residual(ps[k], pt[k], mu_s, mu_t), mu_s, pair_w, through_mu);
          }
          pw[k] = accumulate ? pw[k] + v : v;
        }
      }
    });
  });
}

// ---- RKD angle ------------------------------------------------------------------------------
// Both sides' B x B squared distances (and inverse norms) are kept: O(B^2) memory, no B^3 tensor.
template <typename T>
struct AngleSide {
  Rows<T> rows;
  at::Tensor sq, inv;  // (B, B): |e_i - e_j|^2 and angle_inv_norm of it
  const T *psq = nullptr, *pinv = nullptr;

  explicit AngleSide(const at::Tensor& x) : rows(x, true) {
    const int64_t B = rows.B;
    sq = at::empty({B, B}, rows.e.options());
    inv = at::empty({B, B}, rows.e.options());
    for_each_block(B, std::min(B, kTile), [&](int64_t r0, int64_t r1) { rows.squared_distances(r0, r1, sq.narrow(0, r0, r1 - r0)); });
    psq = sq.const_data_ptr<T>();
    T* pi = inv.data_ptr<T>();
    at::parallel_for(0, B * B, 4096, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) pi[k] = angle_inv_norm(psq[k]);
    });
    pinv = pi;
  }
};

// The angle loss of each anchor i (its B^2 triples (i, j, k)).
template <typename T>
std::vector<double> angle_anchor_losses(const AngleSide<T>& s, const AngleSide<T>& t) {
  const int64_t B = s.rows.B;
  std::vector<double> anchor_loss(B);
  // psi_ijk = psi_ikj: each anchor sums k >= j and counts k > j twice.
  at::parallel_for(0, B, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T *as = s.psq + i * B, *ras = s.pinv + i * B, *at_ = t.psq + i * B, *rat = t.pinv + i * B;
      double loss = 0;
      for (int64_t j = 0; j < B; ++j) {
        if (ras[j] == T(0) && rat[j] == T(0)) continue;  // u_ij = 0 on both sides: psi = 0 vs 0
        const T *cs = s.psq + j * B, *ct = t.psq + j * B;
        double row = 0;
        for (int64_t k = j + 1; k < B; ++k) {
          const T ps = angle_cos(as[j], as[k], cs[k], ras[j], ras[k]);
          const T pt = angle_cos(at_[j], at_[k], ct[k], rat[j], rat[k]);
          row += smooth_l1(ps - pt);
        }
        const T ps = angle_cos(as[j], as[j], T(0), ras[j], ras[j]);
        const T pt = angle_cos(at_[j], at_[j], T(0), rat[j], rat[j]);
        loss += 2 * row + smooth_l1(ps - pt);
      }
      anchor_loss[i] = loss;
    }
  });
  return anchor_loss;
}

// The angle term's (B, B) symmetric pair weights S for the upstream gradient (0-d g, or (B,) w:
// anchor i's terms scaled by w_i): dL/de_i = sum_j S_ij (e_i - e_j).
template <typename T>
at::Tensor angle_pair_weights(const AngleSide<T>& s, const AngleSide<T>& t, const at::Tensor& upstream) {
  const int64_t B = s.rows.B;
  const at::Tensor wt = values_of<T>(upstream);
  const T* w = wt.const_data_ptr<T>();
  return with_per_row(wt.dim() == 1, [&](auto per_row_kind) {
    constexpr bool kPerRow = decltype(per_row_kind)::value;
    // dL/dsq as if every ordered entry were its own variable: W = 2 T_a + C, where T_a[i][j] sums
    // the slot-a derivatives of anchor i (slot b gives the same by the j <-> k symmetry) and
    // C[j][k] the slot-c derivatives over all anchors. Thread j owns column j of T_a and row j of
    // C, so no two threads write one entry and nothing is B^3.
    at::Tensor ta = at::zeros({B, B}, s.rows.e.options()), c = at::zeros({B, B}, s.rows.e.options());
    T *pta = ta.data_ptr<T>(), *pc = c.data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const T *cs = s.psq + j * B, *ct = t.psq + j * B;
        T* cj = pc + j * B;
        for (int64_t i = 0; i < B; ++i) {
          const T ra_s = s.pinv[i * B + j];
          if (ra_s == T(0)) continue;  // psi_s = 0 for every k: no gradient
          const T a_s = s.psq[i * B + j], a_t = t.psq[i * B + j], ra_t = t.pinv[i * B + j];
          const T *bs = s.psq + i * B, *rbs = s.pinv + i * B, *bt = t.psq + i * B, *rbt = t.pinv + i * B;
          T acc = 0;
          for (int64_t k = 0; k < B; ++k) {
            const T ps = angle_cos(a_s, bs[k], cs[k], ra_s, rbs[k]);
            const T h = smooth_l1_grad(ps - angle_cos(a_t, bt[k], ct[k], ra_t, rbt[k]));
            acc += h * angle_cos_grad_a(ps, ra_s, rbs[k]);
            cj[k] += (kPerRow ? w[i] * h : h) * angle_cos_grad_c(ra_s, rbs[k]);
          }
          pta[i * B + j] = kPerRow ? w[i] * acc : acc;
        }
      }
    });
    // S = g (W + W^T) (per-row: the weights are in W already), symmetric, written over C;
    // dL/de = 2 (rowsum(S) e - S E), the 2 folded in.
    const T g = kPerRow ? T(1) : w[0];
    at::parallel_for(0, B, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t q = p; q < B; ++q) {
          const T v = T(2) * g * (T(2) * (pta[p * B + q] + pta[q * B + p]) + pc[p * B + q] + pc[q * B + p]);
          pc[p * B + q] = v;
          pc[q * B + p] = v;
        }
    });
    return c;
  });
}

// dL/de from a (B, B) pair-weight matrix (overwritten), one row block of GEMM at a time.
template <typename T>
at::Tensor gradient_from_pair_weights(const AngleSide<T>& s, at::Tensor weights, const at::Tensor& student) {
  const int64_t B = s.rows.B, D = s.rows.D, tile = std::min(B, kTile);
  at::Tensor grad = at::zeros({B, D}, s.rows.e.options());
  at::Tensor scratch = at::empty({tile, D}, s.rows.e.options());
  for_each_block(B, tile, [&](int64_t r0, int64_t r1) {
    s.rows.add_pair_gradient(r0, r1, weights.narrow(0, r0, r1 - r0), s.psq + r0 * B, scratch, grad.data_ptr<T>());
  });
  return grad.to(student.scalar_type());
}

}  // namespace relation
}  // namespace cpu
}  // namespace kdkernels
