// Host-side argument checks of the relation ops, shared by the CPU and CUDA entry
// points (the device math is in relation.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kdkernels/op_args.h"

namespace kdkernels {

inline void check_relation_inputs(const at::Tensor& student, const at::Tensor& teacher, const char* op) {
  TORCH_CHECK(student.device() == teacher.device(), op, ": student and teacher must be on one device, got ",
              student.device(), " and ", teacher.device());
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, op, ": student and teacher must be 2-D (B, D), got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.size(0) == teacher.size(0), op, ": student and teacher must have the same batch size, got ",
              student.size(0), " and ", teacher.size(0));
  TORCH_CHECK(student.size(0) >= 2, op, ": needs a batch of at least 2, got ", student.size(0));
  TORCH_CHECK(student.is_floating_point() && student.scalar_type() == teacher.scalar_type(), op,
              ": student and teacher must be floating tensors of one dtype, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
}

// A backward's upstream gradient or saved stats: on the inputs' device (kernels read it there).
inline void check_relation_aux(const at::Tensor& aux, const at::Tensor& student, const char* name, const char* op) {
  TORCH_CHECK(aux.device() == student.device(), op, ": ", name, " must be on the student's device ", student.device(),
              ", got ", aux.device());
}

// A backward's upstream gradient: 0-d (the forward returned the summed loss) or (B,) (the per-row
// losses). Returns whether it is per-row.
inline bool check_relation_grad(const at::Tensor& grad, const at::Tensor& student, const char* name, const char* op) {
  check_relation_aux(grad, student, name, op);
  TORCH_CHECK(grad.dim() == 0 || (grad.dim() == 1 && grad.size(0) == student.size(0)), op, ": ", name,
              " must be 0-d or (", student.size(0), ",), got ", grad.sizes());
  return grad.dim() == 1;
}

}  // namespace kdkernels

namespace kdkernels {

// ---- FSP (FSP in kdkernels/ops/relation.py) ------------------------------------------------------
// The device-independent checks of the forward's arguments; each backend adds its device rules.
// Maps: student A_s (N, C1, S_s), B_s (N, C2, S_s), teacher A_t (N, C1, S_t), B_t (N, C2, S_t).
inline void check_fsp_args(const at::Tensor& as, const at::Tensor& bs, const at::Tensor& at_, const at::Tensor& bt,
                           const at::Tensor& weight, const char* op) {
  TORCH_CHECK(as.dim() == 3 && bs.dim() == 3 && at_.dim() == 3 && bt.dim() == 3, op,
              ": the four maps must be 3-D (N, C, S), got ", as.sizes(), ", ", bs.sizes(), ", ", at_.sizes(), ", ",
              bt.sizes());
  const int64_t N = as.size(0);
  TORCH_CHECK(bs.size(0) == N && at_.size(0) == N && bt.size(0) == N, op, ": the maps must share N");
  TORCH_CHECK(bs.size(2) == as.size(2) && bt.size(2) == at_.size(2), op, ": the maps of a pair must share S, got ",
              as.sizes(), ", ", bs.sizes(), " and ", at_.sizes(), ", ", bt.sizes());
  TORCH_CHECK(at_.size(1) == as.size(1) && bt.size(1) == bs.size(1), op,
              ": student and teacher must share C1 and C2, got ", as.sizes(), ", ", bs.sizes(), " and ", at_.sizes(),
              ", ", bt.sizes());
  TORCH_CHECK(as.size(1) >= 1 && bs.size(1) >= 1 && as.size(2) >= 1 && at_.size(2) >= 1, op,
              ": at least one channel and one position");
  TORCH_CHECK(as.is_floating_point() && bs.scalar_type() == as.scalar_type() &&
                  at_.scalar_type() == as.scalar_type() && bt.scalar_type() == as.scalar_type(),
              op, ": the maps must be floating tensors of one dtype");
  TORCH_CHECK(as.is_contiguous() && bs.is_contiguous() && at_.is_contiguous() && bt.is_contiguous(), op,
              ": contiguous maps");
  TORCH_CHECK(bs.device() == as.device() && at_.device() == as.device() && bt.device() == as.device() &&
                  weight.device() == as.device(),
              op, ": the maps and weight must be on one device");
  TORCH_CHECK(weight.dim() == 0 && weight.is_floating_point(), op, ": weight must be a 0-d floating tensor");
}

// The backward's: each saved gradient is a contiguous 3-D (N, C, S) tensor or empty (not requested,
// skipped), all of one dtype and N, on grad_loss's device; grad_loss is 0-d or (N,), floating.
// Checked for every gradient before any is scaled in place.
inline void check_fsp_backward_args(const at::Tensor& grad_loss, const at::Tensor* const (&grads)[4], const char* op) {
  const at::Tensor* like = nullptr;
  for (const at::Tensor* g : grads) {
    if (g->numel() == 0) continue;
    TORCH_CHECK(g->dim() == 3 && g->is_contiguous(), op,
                ": a saved gradient must be a contiguous (N, C, S) tensor, got ", g->sizes());
    TORCH_CHECK(g->is_floating_point(), op, ": a saved gradient must be floating point, got ", g->scalar_type());
    if (like != nullptr) {
      TORCH_CHECK(g->size(0) == like->size(0), op, ": the saved gradients disagree on N: ", like->sizes(), " and ",
                  g->sizes());
      TORCH_CHECK(g->scalar_type() == like->scalar_type(), op, ": the saved gradients must share a dtype");
    }
    TORCH_CHECK(g->device() == grad_loss.device(), op,
                ": grad_loss and the saved gradients must be on one device, got ", grad_loss.device(), " and ",
                g->device());
    like = g;
  }
  if (like == nullptr) return;  // nothing to scale
  TORCH_CHECK(grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == like->size(0)), op,
              ": grad_loss must be 0-d or (", like->size(0), ",), got ", grad_loss.sizes());
  TORCH_CHECK(c10::isFloatingType(grad_loss.scalar_type()), op, ": grad_loss must be floating point, got ",
              grad_loss.scalar_type());
}

}  // namespace kdkernels
