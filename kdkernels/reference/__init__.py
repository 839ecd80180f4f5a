"""Eager PyTorch implementations of every kdkernels loss: the executable specification.

Each function computes in float32 (float64 for float64 inputs) whatever the input dtype, returns
a loss of that dtype, and is differentiated by PyTorch's own autograd. The fused backends are
tested against these; these are tested against textbook float64 loops in python_tests/.
"""
from kdkernels.reference.feature import attention_transfer, projected_mse
from kdkernels.reference.relation import fsp, rkd, rkd_angle, rkd_distance, similarity_preserving
from kdkernels.reference.response import softmax_kl_div
from kdkernels.reference.response_linear import fused_linear_softmax_kl_div
from kdkernels.reference.response_topk import softmax_kl_div_topk

__all__ = ["softmax_kl_div", "softmax_kl_div_topk", "fused_linear_softmax_kl_div", "projected_mse", "attention_transfer", "rkd_distance", "rkd_angle", "rkd", "similarity_preserving", "fsp"]
