// Every kdkernels op schema, in one place. CPU kernels register in csrc/cpu/, CUDA kernels in
// csrc/cuda/ (a separate module, kdkernels._C_cuda, loaded after this one). Fake (meta) and
// autograd registrations live in Python: kdkernels/ops/<family>.py.
#include <torch/library.h>

TORCH_LIBRARY(kdkernels, m) {
  // ---- response family: temperature softmax-KL (DESIGN §2.1) ------------------------------
  // student, teacher: (R, V) contiguous, same dtype. labels: (R,) int64 or None.
  // divergence: 0 forward KL(q||p), 1 reverse KL(p||q), 2 generalised JSD(beta).
  // Returns loss (R,) in the op-math dtype (float32; float64 for float64 inputs), already T^2-scaled
  // when t2_scale and 0 for ignored rows, and stats (R, 6) = [m_s, log_sum_s, m_t, log_sum_t, c_s, c_t]
  // (row maxes of z/T, log sum exp(z/T - max), divergence parts; see csrc/include/kdkernels/softmax_kl.h)
  // which is all the backward needs besides the logits.
  m.def(
      "softmax_kl_forward(Tensor student, Tensor teacher, Tensor? labels, float temperature, "
      "int divergence, float beta, int ignore_index, bool t2_scale) -> (Tensor, Tensor)");
  // grad_loss: (R,) op-math dtype. Returns (grad_student, grad_teacher); a gradient that is not
  // requested comes back as an empty (0,) tensor.
  m.def(
      "softmax_kl_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? labels, "
      "Tensor stats, float temperature, int divergence, float beta, int ignore_index, bool t2_scale, "
      "bool student_grad, bool teacher_grad) -> (Tensor, Tensor)");

  // ---- feature family: projected MSE (DESIGN §2.2) -----------------------------------------
  // x: (B, P, Ds) student features, t: (B, P, Dt) teacher features, same dtype, any strides:
  // B * P feature vectors ("rows"), P > 1 only when the features were not the last dim (NCHW maps
  // arrive as (N, H*W, C) views, no copy). weight: (Dt, Ds); bias: (Dt,) or None.
  // reduction: 0 "mean" (/ (rows * Dt)), 1 "sum", 2 "batchmean" (/ max(1, rows)).
  // Returns loss () in the op-math dtype and residual = x W^T + b - t, (B, P, Dt) in the input
  // dtype, which is all the backward needs besides x and W (y itself is never stored). Its layout
  // follows t (csrc/include/kdkernels/feature.h, feature_major): (B, P, Dt) contiguous, or for
  // feature-major teachers (stride 1 along P) the transpose of a contiguous (B, Dt, P) tensor.
  m.def("projected_mse_forward(Tensor x, Tensor t, Tensor weight, Tensor? bias, int reduction) -> (Tensor, Tensor)");
  // grad_loss: () op-math dtype. x is read only for grad_weight and weight only for grad_x (pass an
  // empty tensor otherwise). Returns (grad_x, grad_t, grad_weight, grad_bias); grad_x and grad_t have
  // the residual's layout, a gradient that is not requested is an empty (0,) tensor.
  m.def(
      "projected_mse_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor residual, int reduction, "
      "bool x_grad, bool t_grad, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // ---- relation family: RKD distance, RKD angle, similarity-preserving (DESIGN §2.3) --------
  // student (B, Ds), teacher (B, Dt): 2-D, B >= 2, one floating dtype. Each forward returns the
  // loss summed over all entries (B^2 for distance / SP, B^3 for angle) as a 0-d tensor in the
  // op-math dtype (float32; float64 for float64 inputs); the caller divides for "mean" /
  // "batchmean". The teacher never gets a gradient: each backward returns grad_student only,
  // in the student's dtype, given grad_loss (0-d, op-math dtype). No B x B tensor is allocated
  // (B x B x B for angle; angle keeps O(B^2)).
  // rkd_distance stats: (3,) = [mu_s, mu_t, A] (csrc/include/kdkernels/relation.h).
  m.def("rkd_distance_forward(Tensor student, Tensor teacher) -> (Tensor, Tensor)");
  m.def("rkd_distance_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats) -> Tensor");
  // similarity_preserving stats: (3, B) = [row norms n_s, row norms n_t, gamma'] (relation.h).
  m.def("similarity_preserving_forward(Tensor student, Tensor teacher) -> (Tensor, Tensor)");
  m.def("similarity_preserving_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats) -> Tensor");
  // rkd_angle saves nothing: the backward rebuilds the O(B^2) squared distances.
  m.def("rkd_angle_forward(Tensor student, Tensor teacher) -> Tensor");
  m.def("rkd_angle_backward(Tensor grad_loss, Tensor student, Tensor teacher) -> Tensor");
  // RKD distance and angle together (RKDLoss): one set of centred rows and (B, B) squared
  // distances per side serves both terms, forward and backward, and the backward turns the sum of
  // both terms' pair weights into the gradient with one GEMM. Returns the two summed losses
  // (unweighted) and the distance's stats; the backward takes one upstream gradient per loss.
  // O(B^2) memory, as the angle alone.
  m.def("rkd_distance_angle_forward(Tensor student, Tensor teacher) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rkd_distance_angle_backward(Tensor grad_distance, Tensor grad_angle, Tensor student, Tensor teacher, "
      "Tensor stats) -> Tensor");
}
