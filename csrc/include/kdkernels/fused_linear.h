// Fused linear + softmax-KL (docs/design.md §2.1, docs/decisions.md "Fused linear + softmax-KL"):
// the chunk loop shared by the CPU and CUDA ops. Host code only (ATen ops): the GEMMs go through
// torch (MKL / cuBLAS); between them, each chunk's loss and logit gradient come from the backend's
// one-pass softmax-KL step, passed in as `Step`, and its row scaling as `ScaleRows`.
//
// Per chunk of rows [r0, r0 + n): z = h W^T (+ b) into a reused (chunk, V) buffer; the teacher's
// logits are a view of the given ones or t = h_t W_t^T (+ b_t) into a second buffer; the step
// writes the rows' losses and G = d loss / d z into a third; then grad_h[r0:] = G W and
// grad_W += G^T h, grad_b += sum_rows G. The (rows x V) logits never exist.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "kdkernels/op_args.h"

namespace kdkernels {
namespace fused_linear {

struct Inputs {
  const at::Tensor& hidden;                          // (R, H)
  const at::Tensor& weight;                          // (V, H)
  const std::optional<at::Tensor>& bias;             // (V,)
  const std::optional<at::Tensor>& teacher_logits;   // (R, V), or
  const std::optional<at::Tensor>& teacher_hidden;   // (R, Ht) with
  const std::optional<at::Tensor>& teacher_weight;   // (V, Ht)
  const std::optional<at::Tensor>& teacher_bias;     // (V,)
  const std::optional<at::Tensor>& labels;           // (R,) int64
};

struct Options {
  double temperature;
  int64_t divergence;
  double beta;
  int64_t ignore_index;
  bool t2_scale;
  int64_t chunk_size;  // rows per chunk, >= 1 (the functional layer picks it: kdkernels.ops.response_linear.auto_chunk_rows)
};

struct Grads {
  bool hidden, weight, bias;
  bool any() const { return hidden || weight || bias; }
};

inline void check_inputs(const Inputs& in, const char* where) {
  const at::Tensor& h = in.hidden;
  const at::Tensor& w = in.weight;
  TORCH_CHECK_VALUE(h.dim() == 2 && h.is_contiguous(), where, ": hidden must be a contiguous (rows, hidden) tensor, got ",
                    h.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == h.size(1) && w.is_contiguous(), where,
                    ": weight must be a contiguous (vocab, hidden) tensor with hidden = ", h.size(1), ", got ", w.sizes());
  const int64_t R = h.size(0), V = w.size(0);
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.scalar_type() == h.scalar_type() && t.device() == h.device(), where, ": ", name,
                      " must have hidden's dtype and device (", h.scalar_type(), ", ", h.device(), "), got ",
                      t.scalar_type(), ", ", t.device());
  };
  same(w, "weight");
  if (in.bias.has_value()) {
    TORCH_CHECK_VALUE(in.bias->dim() == 1 && in.bias->size(0) == V, where, ": bias must be (", V, ",), got ",
                      in.bias->sizes());
    same(*in.bias, "bias");
  }
  TORCH_CHECK_VALUE(in.teacher_logits.has_value() != in.teacher_hidden.has_value(), where,
                    ": give either teacher_logits or teacher_hidden (with teacher_weight)");
  if (in.teacher_logits.has_value()) {
    const at::Tensor& t = *in.teacher_logits;
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == R && t.size(1) == V && t.is_contiguous(), where,
                      ": teacher_logits must be a contiguous (", R, ", ", V, ") tensor, got ", t.sizes());
    same(t, "teacher_logits");
  } else {
    TORCH_CHECK_VALUE(in.teacher_weight.has_value(), where, ": teacher_hidden needs teacher_weight");
    const at::Tensor& th = *in.teacher_hidden;
    const at::Tensor& tw = *in.teacher_weight;
    TORCH_CHECK_VALUE(th.dim() == 2 && th.size(0) == R && th.is_contiguous(), where,
                      ": teacher_hidden must be a contiguous (", R, ", teacher hidden) tensor, got ", th.sizes());
    TORCH_CHECK_VALUE(tw.dim() == 2 && tw.size(0) == V && tw.size(1) == th.size(1) && tw.is_contiguous(), where,
                      ": teacher_weight must be a contiguous (", V, ", ", th.size(1), ") tensor, got ", tw.sizes());
    same(th, "teacher_hidden");
    same(tw, "teacher_weight");
    if (in.teacher_bias.has_value()) {
      TORCH_CHECK_VALUE(in.teacher_bias->dim() == 1 && in.teacher_bias->size(0) == V, where,
                        ": teacher_bias must be (", V, ",), got ", in.teacher_bias->sizes());
      same(*in.teacher_bias, "teacher_bias");
    }
  }
  if (in.labels.has_value()) {
    TORCH_CHECK_VALUE(in.labels->dim() == 1 && in.labels->size(0) == R && in.labels->scalar_type() == at::kLong &&
                          in.labels->is_contiguous(),
                      where, ": labels must be a contiguous (", R, ",) int64 tensor");
  }
}

// out = x W^T (+ b): the chunk's logits, in x's dtype.
inline void linear_into(const at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  at::Tensor o = out;
  if (b.has_value()) {
    at::addmm_out(o, *b, x, w.t());
  } else {
    at::mm_out(o, x, w.t());
  }
}

// The loop. scale: 0-d (the reduction's factor, handed to the step as its weight) or (R,) (a
// per-row upstream gradient: the step runs with weight 1, then ScaleRows scales each chunk's rows).
// Returns (row losses l_r (R,) op-math, unweighted; grad_hidden; grad_weight; grad_bias), a gradient
// not asked for an empty (0,) tensor.
//   step(z, t, labels_or_none, weight_0d, row_loss_out, grad_out_or_undefined)
//   scale_rows(grad (n, V), factor (n,))
template <class Step, class ScaleRows>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_chunks(const Inputs& in, const Options& o,
                                                                     const at::Tensor& scale, Grads need, Step&& step,
                                                                     ScaleRows&& scale_rows) {
  const at::Tensor& h = in.hidden;
  const at::Tensor& w = in.weight;
  const int64_t R = h.size(0), H = h.size(1), V = w.size(0);
  const at::ScalarType op_dt = opmath_scalar_type(h.scalar_type());
  const auto opts = h.options();
  TORCH_CHECK_VALUE(scale.dim() == 0 || (scale.dim() == 1 && scale.size(0) == R), "fused_linear_softmax_kl: scale must be ",
                    "0-d or (", R, ",), got ", scale.sizes());
  const bool per_row_scale = scale.dim() == 1;
  const at::Tensor step_weight = per_row_scale ? at::ones({}, opts.dtype(op_dt)) : scale.to(op_dt);
  const at::Tensor row_scale = per_row_scale ? scale.to(op_dt).contiguous() : at::Tensor();
  need.bias = need.bias && in.bias.has_value();

  at::Tensor row_loss = at::empty({R}, opts.dtype(op_dt));
  at::Tensor grad_h = need.hidden ? at::empty({R, H}, opts) : at::empty({0}, opts);
  // the weight gradient accumulates over the chunks in op-math (fp32 for 16-bit weights)
  at::Tensor grad_w = need.weight ? at::zeros({V, H}, opts.dtype(op_dt)) : at::empty({0}, opts);
  at::Tensor grad_b = need.bias ? at::zeros({V}, opts.dtype(op_dt)) : at::empty({0}, opts);
  TORCH_CHECK_VALUE(o.chunk_size >= 1, "fused_linear_softmax_kl: chunk_size must be >= 1, got ", o.chunk_size);
  const int64_t chunk = std::min(o.chunk_size, std::max<int64_t>(R, 1));
  if (R > 0) {
    at::Tensor z_buf = at::empty({chunk, V}, opts);
    at::Tensor g_buf = need.any() ? at::empty({chunk, V}, opts) : at::Tensor();
    at::Tensor t_buf = in.teacher_logits.has_value() ? at::Tensor() : at::empty({chunk, V}, opts);
    // a 16-bit chunk's G^T h, added to the op-math accumulator
    at::Tensor w_part = need.weight && op_dt != w.scalar_type() ? at::empty({V, H}, opts) : at::Tensor();
    for (int64_t r0 = 0; r0 < R; r0 += chunk) {
      const int64_t n = std::min(chunk, R - r0);
      const at::Tensor h_c = h.narrow(0, r0, n);
      const at::Tensor z = z_buf.narrow(0, 0, n);
      linear_into(z, h_c, w, in.bias);
      at::Tensor t;
      if (in.teacher_logits.has_value()) {
        t = in.teacher_logits->narrow(0, r0, n);
      } else {
        t = t_buf.narrow(0, 0, n);
        linear_into(t, in.teacher_hidden->narrow(0, r0, n), *in.teacher_weight, in.teacher_bias);
      }
      std::optional<at::Tensor> labels_c;
      if (in.labels.has_value()) labels_c = in.labels->narrow(0, r0, n);
      const at::Tensor g = need.any() ? g_buf.narrow(0, 0, n) : at::Tensor();
      step(z, t, labels_c, step_weight, row_loss.narrow(0, r0, n), g);
      if (!need.any()) continue;
      if (per_row_scale) scale_rows(g, row_scale.narrow(0, r0, n));
      if (need.hidden) {
        at::Tensor gh = grad_h.narrow(0, r0, n);
        at::mm_out(gh, g, w);
      }
      if (need.weight) {
        if (w_part.defined()) {
          at::mm_out(w_part, g.t(), h_c);
          grad_w.add_(w_part);
        } else {
          grad_w.addmm_(g.t(), h_c);
        }
      }
      if (need.bias) grad_b.add_(at::sum(g, {0}, false, op_dt));
    }
  }
  if (need.weight && grad_w.scalar_type() != w.scalar_type()) grad_w = grad_w.to(w.scalar_type());
  if (need.bias && grad_b.scalar_type() != in.bias->scalar_type()) grad_b = grad_b.to(in.bias->scalar_type());
  return {row_loss, grad_h, grad_w, grad_b};
}

// ---- the two ops' bodies, given a backend's step and row scaling -------------------------------
// fused_linear_softmax_kl_forward: scalar reductions. loss = scale * sum_r l_r (0-d); the gradients
// for an upstream of 1, which the backward then only scales.
template <class Step, class ScaleRows>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const Inputs& in, const Options& o,
                                                                  const at::Tensor& scale, Grads need, Step&& step,
                                                                  ScaleRows&& scale_rows) {
  check_inputs(in, "fused_linear_softmax_kl");
  TORCH_CHECK_VALUE(scale.dim() == 0, "fused_linear_softmax_kl: scale must be a 0-d tensor, got ", scale.sizes());
  auto [rows, gh, gw, gb] = run_chunks(in, o, scale, need, step, scale_rows);
  const at::Tensor loss = at::mul(rows.sum(), scale.to(rows.scalar_type()));  // sum then factor, as reduce_rows
  return {loss, gh, gw, gb};
}

// fused_linear_softmax_kl_rows_forward: reduction "none", the per-row losses (R,) only.
template <class Step, class ScaleRows>
at::Tensor rows_forward(const Inputs& in, const Options& o, Step&& step, ScaleRows&& scale_rows) {
  check_inputs(in, "fused_linear_softmax_kl_rows");
  const at::Tensor one = at::ones({}, in.hidden.options().dtype(opmath_scalar_type(in.hidden.scalar_type())));
  return std::get<0>(run_chunks(in, o, one, Grads{false, false, false}, step, scale_rows));
}

// fused_linear_softmax_kl_rows_backward: the chunks again, each row's gradient scaled by grad_loss[r].
template <class Step, class ScaleRows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_backward(const at::Tensor& grad_loss, const Inputs& in,
                                                             const Options& o, Grads need, Step&& step,
                                                             ScaleRows&& scale_rows) {
  check_inputs(in, "fused_linear_softmax_kl_rows");
  TORCH_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == in.hidden.size(0),
                    "fused_linear_softmax_kl_rows: grad_loss must be (", in.hidden.size(0), ",), got ", grad_loss.sizes());
  auto [rows, gh, gw, gb] = run_chunks(in, o, grad_loss, need, step, scale_rows);
  return {gh, gw, gb};
}

}  // namespace fused_linear
}  // namespace kdkernels
