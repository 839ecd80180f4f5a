"""The fused ops: one declarative spec (``OpDef``, kdkernels/ops/_spec.py) per op, grouped by family.

Importing this package registers every op with the dispatcher (C++ and Triton variants, fake
kernels, autograd). The functional layer calls them through the ``Op`` entries below.
"""
from kdkernels.ops.feature import ATTENTION_TRANSFER, PROJECTED_MSE
from kdkernels.ops.relation import FSP, RKD_ANGLE, RKD_DISTANCE, RKD_DISTANCE_ANGLE, SIMILARITY_PRESERVING
from kdkernels.ops.response import SOFTMAX_KL, SOFTMAX_KL_STEP, SOFTMAX_KL_TOPK
from kdkernels.ops.response_linear import FUSED_LINEAR_SOFTMAX_KL, FUSED_LINEAR_SOFTMAX_KL_ROWS

ALL_OPS = (SOFTMAX_KL, SOFTMAX_KL_STEP, SOFTMAX_KL_TOPK, FUSED_LINEAR_SOFTMAX_KL, FUSED_LINEAR_SOFTMAX_KL_ROWS, PROJECTED_MSE, ATTENTION_TRANSFER, RKD_DISTANCE, RKD_ANGLE, RKD_DISTANCE_ANGLE, SIMILARITY_PRESERVING, FSP)

__all__ = ["ALL_OPS", "ATTENTION_TRANSFER", "FSP", "FUSED_LINEAR_SOFTMAX_KL", "FUSED_LINEAR_SOFTMAX_KL_ROWS", "PROJECTED_MSE", "RKD_ANGLE", "RKD_DISTANCE", "RKD_DISTANCE_ANGLE", "SIMILARITY_PRESERVING",
           "SOFTMAX_KL", "SOFTMAX_KL_STEP", "SOFTMAX_KL_TOPK"]
