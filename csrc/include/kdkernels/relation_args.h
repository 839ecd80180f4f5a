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
