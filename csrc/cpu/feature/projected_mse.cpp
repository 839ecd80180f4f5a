// CPU kernels of the projected MSE (docs/design.md §2.2; math and layout rule in kdkernels/feature.h).
//
// The (B * P) feature vectors are cut into blocks of up to `block` positions of one batch entry.
// Forward, per block: a GEMM into a cache-sized op-math buffer, then one fused, vectorised pass that
// adds the bias, subtracts t, accumulates r^2 and writes r in the input dtype. So y never reaches
// memory and t is read once. Backward, per block, in one pass over r and x: grad_x = s r W (GEMM into
// the cache buffer, scaled on the way out), grad_t = -s r, and per-chunk accumulators for
// grad_W += r^T x (GEMM) and grad_b += sum r. Blocks are split into at most one chunk per thread;
// chunk results are combined in chunk order, so results only depend on the thread count.
// reduction "none": the forward's epilogue writes each position's sum of r^2 instead of adding it to
// the block's; the backward multiplies each position's residual by its grad_loss[b, p] as it copies
// the block into the op-math buffer, and everything after that is the scalar path with s = 2.
//
// bf16 / fp16 blocks are converted to float32 in the cache buffers before their GEMMs: every product
// and sum is in float32 (float64 for float64 inputs).
#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "kdkernels/feature.h"
#include "kdkernels/feature_args.h"

namespace kdkernels {
namespace cpu {
namespace {

using at::Tensor;

// ---- work split --------------------------------------------------------------------------------
struct Blocking {
  int64_t P = 0, block = 1, per_batch = 0, count = 0, chunks = 0;

  int64_t batch(int64_t i) const { return i / per_batch; }
  int64_t first(int64_t i) const { return (i % per_batch) * block; }
  int64_t size(int64_t i) const { return std::min(block, P - first(i)); }
  int64_t chunk_begin(int64_t c) const { return c * count / chunks; }
};

// `width` = the widest row of a block buffer (max(Ds, Dt)). Blocks hold about 64 Ki op-math values
// (256 KiB in float32, an L2-sized GEMM output), fewer when that would leave a thread without work.
Blocking make_blocking(int64_t B, int64_t P, int64_t width) {
  Blocking bl;
  bl.P = P;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t block = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(width, 1));
  const int64_t fair = (B * P + 4 * threads - 1) / (4 * threads);  // ~4 blocks per thread
  block = std::min(block, std::max<int64_t>(fair, 16));
  bl.block = std::max<int64_t>(1, std::min(block, P));
  bl.per_batch = (P + bl.block - 1) / bl.block;
  bl.count = B * bl.per_batch;
  bl.chunks = std::min(bl.count, threads);
  return bl;
}

// Runs fn(chunk, first_block, end_block) for every chunk, in parallel. The ATen calls in fn (views,
// GEMMs) must not see autograd, also on worker threads, which do not inherit the caller's guards.
template <typename F>
void for_each_chunk(const Blocking& bl, const F& fn) {
  at::parallel_for(0, bl.chunks, 1, [&](int64_t c0, int64_t c1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t c = c0; c < c1; ++c) fn(c, bl.chunk_begin(c), bl.chunk_begin(c + 1));
  });
}

// ---- vector helpers ------------------------------------------------------------------------------
template <typename opmath_t, typename T>
inline at::vec::Vectorized<opmath_t> load_as(const T* p) {
  using Vec = at::vec::Vectorized<opmath_t>;
  if constexpr (std::is_same_v<T, opmath_t>) {
    return Vec::loadu(p);
  } else {
    opmath_t buf[Vec::size()];
    for (int64_t k = 0; k < Vec::size(); ++k) buf[k] = static_cast<opmath_t>(p[k]);
    return Vec::loadu(buf);
  }
}

template <typename opmath_t, typename T>
inline void store_as(const at::vec::Vectorized<opmath_t>& v, T* p) {
  if constexpr (std::is_same_v<T, opmath_t>) {
    v.store(p);
  } else {
    opmath_t buf[at::vec::Vectorized<opmath_t>::size()];
    v.store(buf);
    for (int64_t k = 0; k < at::vec::Vectorized<opmath_t>::size(); ++k) p[k] = static_cast<T>(buf[k]);
  }
}

template <typename opmath_t>
inline opmath_t lane_sum(const at::vec::Vectorized<opmath_t>& v) {
  opmath_t buf[at::vec::Vectorized<opmath_t>::size()];
  v.store(buf);
  opmath_t s = 0;
  for (int64_t k = 0; k < at::vec::Vectorized<opmath_t>::size(); ++k) s += buf[k];
  return s;
}

// ---- forward epilogue ------------------------------------------------------------------------------
// Over an (m x n) block: r = y + bias - t and the sum of r^2. y is the contiguous GEMM output; t has
// strides (t_rs, t_cs); r has row stride r_rs and unit column stride. The bias runs along the columns
// for row-major blocks (positions x features) and along the rows for feature-major ones.
// kPerRow ("none"): the squares go to row_loss instead, one sum per position: entry i of a row-major
// block, entry j of a feature-major one (there added to, so the caller zeroes row_loss); returns 0.
template <bool kPerRow, typename T, typename opmath_t>
opmath_t residual_block(const opmath_t* y, const T* t, int64_t t_rs, int64_t t_cs, const T* bias, bool bias_on_cols,
                     T* r, int64_t r_rs, opmath_t* row_loss, int64_t m, int64_t n) {
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t kW = Vec::size();
  Vec vsum(opmath_t(0));
  opmath_t tail = 0;
  for (int64_t i = 0; i < m; ++i) {
    const opmath_t* yi = y + i * n;
    const T* ti = t + i * t_rs;
    T* ri = r + i * r_rs;
    const opmath_t row_bias = (bias != nullptr && !bias_on_cols) ? static_cast<opmath_t>(bias[i]) : opmath_t(0);
    Vec vrow(opmath_t(0));  // kPerRow, row-major: this position's sum
    opmath_t row_tail = 0;
    int64_t j = 0;
    if (t_cs == 1) {
      const Vec vrow_bias(row_bias);
      for (; j + kW <= n; j += kW) {
        const Vec vb = (bias != nullptr && bias_on_cols) ? load_as<opmath_t>(bias + j) : vrow_bias;
        const Vec v = projected_residual(Vec::loadu(yi + j), load_as<opmath_t>(ti + j), vb);
        store_as(v, ri + j);
        if constexpr (!kPerRow) {
          vsum = vsum + v * v;
        } else if (bias_on_cols) {
          vrow = vrow + v * v;
        } else {
          (Vec::loadu(row_loss + j) + v * v).store(row_loss + j);
        }
      }
    }
    for (; j < n; ++j) {
      const opmath_t b = (bias != nullptr && bias_on_cols) ? static_cast<opmath_t>(bias[j]) : row_bias;
      const opmath_t v = projected_residual(yi[j], static_cast<opmath_t>(ti[j * t_cs]), b);
      ri[j] = static_cast<T>(v);
      if constexpr (!kPerRow) {
        tail += v * v;
      } else if (bias_on_cols) {
        row_tail += v * v;
      } else {
        row_loss[j] += v * v;
      }
    }
    if constexpr (kPerRow) {
      if (bias_on_cols) row_loss[i] += lane_sum(vrow) + row_tail;
    }
  }
  return lane_sum(vsum) + tail;
}

// ---- backward epilogues -----------------------------------------------------------------------------
// dst (row stride d_rs) = T(s * src), src a contiguous (m x n) op-math block.
template <typename T, typename opmath_t>
void scale_store(const opmath_t* src, opmath_t s, T* dst, int64_t d_rs, int64_t m, int64_t n) {
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t kW = Vec::size();
  const Vec vs(s);
  for (int64_t i = 0; i < m; ++i) {
    const opmath_t* si = src + i * n;
    T* di = dst + i * d_rs;
    int64_t j = 0;
    for (; j + kW <= n; j += kW) store_as(Vec::loadu(si + j) * vs, di + j);
    for (; j < n; ++j) di[j] = static_cast<T>(si[j] * s);
  }
}

// One pass over an (m x n) residual block r (row stride r_rs, In = T or its op-math copy):
// grad_t = -s r (row stride g_rs) when grad_t != nullptr, and bias-gradient sums into acc_b (unscaled)
// when acc_b != nullptr: along the columns for row-major blocks, along the rows for feature-major ones.
template <typename T, typename In, typename opmath_t>
void residual_grads_block(const In* r, int64_t r_rs, opmath_t s, T* grad_t, int64_t g_rs, opmath_t* acc_b, bool bias_on_cols,
                          int64_t m, int64_t n) {
  using Vec = at::vec::Vectorized<opmath_t>;
  constexpr int64_t kW = Vec::size();
  const Vec vneg(-s);
  for (int64_t i = 0; i < m; ++i) {
    const In* ri = r + i * r_rs;
    T* gi = grad_t == nullptr ? nullptr : grad_t + i * g_rs;
    Vec vrow(opmath_t(0));
    opmath_t row_tail = 0;
    int64_t j = 0;
    for (; j + kW <= n; j += kW) {
      const Vec v = load_as<opmath_t>(ri + j);
      if (gi != nullptr) store_as(v * vneg, gi + j);
      if (acc_b != nullptr) {
        if (bias_on_cols) {
          (Vec::loadu(acc_b + j) + v).store(acc_b + j);
        } else {
          vrow = vrow + v;
        }
      }
    }
    for (; j < n; ++j) {
      const opmath_t v = static_cast<opmath_t>(ri[j]);
      if (gi != nullptr) gi[j] = static_cast<T>(-s * v);
      if (acc_b != nullptr) {
        if (bias_on_cols) {
          acc_b[j] += v;
        } else {
          row_tail += v;
        }
      }
    }
    if (acc_b != nullptr && !bias_on_cols) acc_b[i] += lane_sum(vrow) + row_tail;
  }
}

// ---- forward -------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> projected_mse_forward_cpu(const Tensor& x, const Tensor& t, const Tensor& weight,
                                                     const std::optional<Tensor>& bias, int64_t reduction) {
  check_projected_mse_forward_args(x, t, weight, bias, reduction);
  // The ATen calls below must not record autograd even if the op is called with grad-requiring tensors
  // (e.g. through the autograd fallback, which re-dispatches without excluding the autograd keys).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t B = x.size(0), P = x.size(1), Ds = x.size(2), Dt = t.size(2);
  const bool fmajor = feature_major(P, Dt, t.stride(1));
  Tensor residual = empty_in_layout(B, P, Dt, fmajor, t.options());
  const auto opmath_dtype = at::toOpMathType(x.scalar_type());
  const bool per_row = reduction == kFeatureNone;
  // "none": (B, P) per-row sums, zeroed because feature-major blocks add to them; otherwise 0-d
  const auto loss_opts = x.options().dtype(opmath_dtype);
  Tensor loss = per_row ? at::zeros({B, P}, loss_opts) : at::empty({}, loss_opts);
  const Tensor w_op = weight.to(opmath_dtype);  // no copy for float32 / float64
  const Tensor bias_c = bias.has_value() ? bias->contiguous() : Tensor();
  const Blocking bl = make_blocking(B, P, std::max(Ds, Dt));
  std::vector<double> partial(static_cast<size_t>(bl.chunks), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "projected_mse_forward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr bool reduced = !std::is_same_v<scalar_t, opmath_t>;
    const scalar_t* t_ptr = t.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* r_ptr = residual.mutable_data_ptr<scalar_t>();
    opmath_t* row_loss = per_row ? loss.mutable_data_ptr<opmath_t>() : nullptr;
    const int64_t ts0 = t.stride(0), ts1 = t.stride(1), ts2 = t.stride(2);

    // one epilogue instantiation per kind: the 0-d reductions keep their loop as it was
    const auto run = [&](auto per_row_kind) {
      constexpr bool kPerRow = decltype(per_row_kind)::value;
      for_each_chunk(bl, [&](int64_t c, int64_t i0, int64_t i1) {
        const auto opmath_opts = x.options().dtype(opmath_dtype);
        Tensor ybuf = at::empty({bl.block * Dt}, opmath_opts);
        Tensor xbuf = reduced ? at::empty({bl.block * Ds}, opmath_opts) : Tensor();
        double sum = 0.0;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = bl.batch(i), p0 = bl.first(i), n = bl.size(i);
          const scalar_t* tb = t_ptr + b * ts0 + p0 * ts1;
          opmath_t* rows_out = kPerRow ? row_loss + b * P + p0 : nullptr;
          if (!fmajor) {  // (n x Ds) @ (Ds x Dt): positions x features
            Tensor xb = x.select(0, b).narrow(0, p0, n);
            if constexpr (reduced) xb = xbuf.narrow(0, 0, n * Ds).view({n, Ds}).copy_(xb);
            Tensor yb = ybuf.narrow(0, 0, n * Dt).view({n, Dt});
            at::mm_out(yb, xb, w_op.t());
            sum += residual_block<kPerRow, scalar_t, opmath_t>(yb.const_data_ptr<opmath_t>(), tb, ts1, ts2, b_ptr,
                                                               true, r_ptr + (b * P + p0) * Dt, Dt, rows_out, n, Dt);
          } else {  // (Dt x Ds) @ (Ds x n): features x positions, the layout of an NCHW map
            Tensor xb = x.select(0, b).narrow(0, p0, n).t();
            if constexpr (reduced) xb = xbuf.narrow(0, 0, Ds * n).view({Ds, n}).copy_(xb);
            Tensor yb = ybuf.narrow(0, 0, Dt * n).view({Dt, n});
            at::mm_out(yb, w_op, xb);
            sum += residual_block<kPerRow, scalar_t, opmath_t>(yb.const_data_ptr<opmath_t>(), tb, ts2, ts1, b_ptr,
                                                               false, r_ptr + b * Dt * P + p0, P, rows_out, Dt, n);
          }
        }
        partial[static_cast<size_t>(c)] = sum;
      });
    };
    if (per_row) {
      run(std::true_type{});
      return;
    }
    run(std::false_type{});
    double total = 0.0;
    for (double p : partial) total += p;
    *loss.mutable_data_ptr<opmath_t>() = static_cast<opmath_t>(total / projected_mse_denominator(reduction, B * P, Dt));
  });
  return {loss, residual};
}

// ---- backward ------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor> projected_mse_backward_cpu(const Tensor& grad_loss, const Tensor& x,
                                                                      const Tensor& weight, const Tensor& residual,
                                                                      int64_t reduction, bool x_grad, bool t_grad,
                                                                      bool weight_grad, bool bias_grad) {
  const int64_t Ds =
      check_projected_mse_backward_args(grad_loss, x, weight, residual, reduction, x_grad, weight_grad);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in the forward
  const int64_t B = residual.size(0), P = residual.size(1), Dt = residual.size(2);
  const auto dtype = residual.scalar_type();
  const bool fmajor = feature_major(P, Dt, residual.stride(1));
  const auto opts = residual.options();
  const auto opmath_dtype = at::toOpMathType(dtype);
  const auto opmath_opts = opts.dtype(opmath_dtype);
  // the forward's residual already has this layout; anything else gets one copy
  const Tensor rs = fmajor ? residual.transpose(1, 2).contiguous() : residual.contiguous();

  Tensor grad_x = x_grad ? empty_in_layout(B, P, Ds, fmajor, opts) : at::empty({0}, opts);
  Tensor grad_t = t_grad ? empty_in_layout(B, P, Dt, fmajor, opts) : at::empty({0}, opts);
  const Blocking bl = make_blocking(B, P, std::max(Ds, Dt));
  Tensor acc_w = weight_grad ? at::zeros({bl.chunks, Dt, Ds}, opmath_opts) : Tensor();
  Tensor acc_b = bias_grad ? at::zeros({bl.chunks, Dt}, opmath_opts) : Tensor();
  // "none" (weighted): each row's r is multiplied by its grad_loss[b, p] on the way into the op-math
  // buffer, and s is the factor alone; otherwise s scales every row alike
  const bool weighted = reduction == kFeatureNone;
  const double s = (weighted ? 1.0 : grad_loss.item<double>()) * projected_mse_grad_factor(reduction, B * P, Dt);
  const Tensor row_w = weighted ? grad_loss.to(opmath_dtype).contiguous() : Tensor();
  const Tensor w_op = x_grad ? weight.to(opmath_dtype) : Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "projected_mse_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr bool reduced = !std::is_same_v<scalar_t, opmath_t>;
    const bool buffered = reduced || weighted;  // r is read from an op-math copy
    const opmath_t sa = static_cast<opmath_t>(s);
    const scalar_t* r_ptr = rs.const_data_ptr<scalar_t>();
    scalar_t* gx_ptr = x_grad ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gt_ptr = t_grad ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;

    for_each_chunk(bl, [&](int64_t c, int64_t i0, int64_t i1) {
      Tensor gbuf = x_grad ? at::empty({bl.block * Ds}, opmath_opts) : Tensor();
      Tensor rbuf = buffered ? at::empty({bl.block * Dt}, opmath_opts) : Tensor();
      Tensor xbuf = (reduced && weight_grad) ? at::empty({bl.block * Ds}, opmath_opts) : Tensor();
      Tensor acc_wc = weight_grad ? acc_w.select(0, c) : Tensor();
      opmath_t* acc_bc = bias_grad ? acc_b.select(0, c).mutable_data_ptr<opmath_t>() : nullptr;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = bl.batch(i), p0 = bl.first(i), n = bl.size(i);
        // rows x cols of this block: (n x Dt) row-major, or (Dt x n) with row stride P
        const int64_t m_rows = fmajor ? Dt : n, n_cols = fmajor ? n : Dt, r_rs = fmajor ? P : Dt;
        const int64_t offset = fmajor ? b * Dt * P + p0 : (b * P + p0) * Dt;
        Tensor rb = fmajor ? rs.select(0, b).narrow(1, p0, n) : rs.select(0, b).narrow(0, p0, n);
        const void* r_in = r_ptr + offset;
        int64_t r_in_rs = r_rs;
        if (buffered) {
          Tensor rv = rbuf.narrow(0, 0, m_rows * n_cols).view({m_rows, n_cols});
          if (weighted) {  // the block's positions run along its rows (row-major) or its columns
            const Tensor wb = row_w.select(0, b).narrow(0, p0, n);
            rb = at::mul_out(rv, rb, fmajor ? wb.unsqueeze(0) : wb.unsqueeze(1));
          } else {
            rb = rv.copy_(rb);
          }
          r_in = rb.const_data_ptr<opmath_t>();
          r_in_rs = n_cols;
        }
        if (x_grad) {  // grad_x = s r W: (n x Dt)(Dt x Ds), or W^T r: (Ds x Dt)(Dt x n)
          Tensor gb = gbuf.narrow(0, 0, n * Ds);
          if (fmajor) {
            gb = gb.view({Ds, n});
            at::mm_out(gb, w_op.t(), rb);
            scale_store<scalar_t, opmath_t>(gb.const_data_ptr<opmath_t>(), sa, gx_ptr + b * Ds * P + p0, P, Ds, n);
          } else {
            gb = gb.view({n, Ds});
            at::mm_out(gb, rb, w_op);
            scale_store<scalar_t, opmath_t>(gb.const_data_ptr<opmath_t>(), sa, gx_ptr + (b * P + p0) * Ds, Ds, n, Ds);
          }
        }
        if (weight_grad) {  // grad_W += r^T x (n positions contracted)
          Tensor xb = x.select(0, b).narrow(0, p0, n);  // (n x Ds)
          if constexpr (reduced) xb = xbuf.narrow(0, 0, n * Ds).view({n, Ds}).copy_(xb);
          acc_wc.addmm_(fmajor ? rb : rb.t(), xb);
        }
        if (t_grad || bias_grad) {
          scalar_t* gt = t_grad ? gt_ptr + offset : nullptr;
          if (buffered) {
            residual_grads_block<scalar_t, opmath_t, opmath_t>(static_cast<const opmath_t*>(r_in), r_in_rs, sa, gt, r_rs,
                                                         acc_bc, !fmajor, m_rows, n_cols);
          } else {
            residual_grads_block<scalar_t, scalar_t, opmath_t>(static_cast<const scalar_t*>(r_in), r_in_rs, sa, gt,
                                                            r_rs, acc_bc, !fmajor, m_rows, n_cols);
          }
        }
      }
    });
  });

  Tensor grad_w = weight_grad ? acc_w.sum(0).mul_(s).to(dtype) : at::empty({0}, opts);
  Tensor grad_b = bias_grad ? acc_b.sum(0).mul_(s).to(dtype) : at::empty({0}, opts);
  return {grad_x, grad_t, grad_w, grad_b};
}

}  // namespace
}  // namespace cpu
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("projected_mse_forward", &kdkernels::cpu::projected_mse_forward_cpu);
  m.impl("projected_mse_backward", &kdkernels::cpu::projected_mse_backward_cpu);
}
