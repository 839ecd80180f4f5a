"""kdkernels: fused, memory-lean knowledge-distillation losses for PyTorch.

Response-based (softmax-KL: forward, reverse, JSD), feature-based (projected MSE) and
relation-based (RKD distance / angle, similarity-preserving) losses, each as a functional
(``kdkernels.functional``) and an ``nn.Module``, on the backends "torch" (eager reference),
"cpu" (C++), "cuda" (C++/CUDA) and "triton".
"""
from kdkernels import backends, functional, ops, reference  # noqa: F401  (ops registers the dispatcher ops)
from kdkernels.modules import (
    AttentionTransferLoss,
    FSPLoss,
    FusedLinearSoftmaxKLDivLoss,
    ProjectedMSELoss,
    RKDAngleLoss,
    RKDDistanceLoss,
    RKDLoss,
    SimilarityPreservingLoss,
    SoftmaxKLDivLoss,
    TopKSoftmaxKLDivLoss,
)
from kdkernels.functional import topk_teacher

__version__ = "0.1.0"
__all__ = ["functional", "backends", "reference", "topk_teacher", "SoftmaxKLDivLoss", "TopKSoftmaxKLDivLoss", "FusedLinearSoftmaxKLDivLoss", "ProjectedMSELoss", "AttentionTransferLoss", "RKDDistanceLoss",
           "RKDAngleLoss", "SimilarityPreservingLoss", "RKDLoss", "FSPLoss"]
