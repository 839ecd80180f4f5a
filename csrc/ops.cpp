// Every kdkernels op schema, in one place. CPU kernels register in csrc/cpu/, CUDA kernels in
// csrc/cuda/ (a separate module, kdkernels._C_cuda, loaded after this one). Fake (meta) and
// autograd registrations live in Python: kdkernels/ops/<family>.py.
#include <torch/library.h>

TORCH_LIBRARY(kdkernels, m) {
  // ---- response family: temperature softmax-KL (DESIGN §2.1) ------------------------------
  // student, teacher: (R, V) contiguous, same dtype. labels: (R,) int64 or None.
  // divergence: 0 forward KL(q||p), 1 reverse KL(p||q), 2 generalised JSD(beta).
  // Returns loss (R,) in the op-math dtype (float32; float64 for float64 inputs), already T^2-scaled
  // when t2_scale and 0 for ignored rows, and stats (R, 4) = [lse_s, lse_t, c_s, c_t] (see
  // csrc/include/kdkernels/softmax_kl.h) which is all the backward needs besides the logits.
  m.def(
      "softmax_kl_forward(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
      "int divergence, float beta, int ignore_index, bool t2_scale) -> (Tensor, Tensor)");
  // grad_loss: (R,) op-math dtype. Returns (grad_student, grad_teacher); a gradient that is not
  // requested comes back as an empty (0,) tensor.
  m.def(
      "softmax_kl_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, "
      "Tensor stats, float temperature, int divergence, float beta, int ignore_index, bool t2_scale, "
      "bool student_grad, bool teacher_grad) -> (Tensor, Tensor)");
}
