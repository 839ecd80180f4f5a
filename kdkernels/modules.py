"""``nn.Module`` losses: hold the hyper-parameters (and, for the hint loss, the projection)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from kdkernels import _validation as v
from kdkernels import backends
from kdkernels import functional as F
from kdkernels import reduction as red

__all__ = ["SoftmaxKLDivLoss", "TopKSoftmaxKLDivLoss", "FusedLinearSoftmaxKLDivLoss", "ProjectedMSELoss", "AttentionTransferLoss", "RKDDistanceLoss", "RKDAngleLoss", "SimilarityPreservingLoss",
           "RKDLoss", "FSPLoss"]


class SoftmaxKLDivLoss(nn.Module):
    """Temperature softmax-KL distillation loss; ``forward(student_logits, teacher_logits, labels=None)``.

    See :func:`kdkernels.functional.softmax_kl_div` for the arguments and shapes.
    """

    def __init__(self, temperature: float = 1.0, divergence: str = "forward", beta: float = 0.5,
                 reduction: str = "batchmean", ignore_index: int = -100, t2_scale: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        # checked here, so a bad option fails where it is written, not at the first forward
        (self.temperature, self.divergence, self.beta, self.reduction, self.ignore_index,
         self.t2_scale) = v.check_softmax_kl_options(temperature, divergence, beta, reduction, ignore_index, t2_scale)
        self.backend = backends.check_name(backend)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """The loss between (..., V) student and teacher logits; ``labels`` (...) skips rows equal to
        ``ignore_index``. A 0-d tensor, or (...) for reduction="none"."""
        return F.softmax_kl_div(student_logits, teacher_logits, self.temperature, self.divergence, self.beta,
                                self.reduction, labels, self.ignore_index, self.t2_scale, self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, t2_scale={self.t2_scale}, "
                f"backend={self.backend!r}")


class TopKSoftmaxKLDivLoss(nn.Module):
    """Softmax-KL against a top-k sparse teacher;
    ``forward(student_logits, teacher_topk_logprobs, teacher_topk_indices, labels=None)``.

    See :func:`kdkernels.functional.softmax_kl_div_topk` for the arguments and shapes, and
    :func:`kdkernels.topk_teacher` for making the teacher inputs.
    """

    def __init__(self, temperature: float = 1.0, tail: str = "renormalize", reduction: str = "batchmean",
                 ignore_index: int = -100, t2_scale: bool = True, backend: str = "auto") -> None:
        super().__init__()
        from kdkernels.ops.response import TAIL_CODES

        (self.temperature, _div, _beta, self.reduction, self.ignore_index,
         self.t2_scale) = v.check_softmax_kl_options(temperature, "forward", 0.5, reduction, ignore_index, t2_scale)
        self.tail = v.check_choice("tail", tail, tuple(TAIL_CODES))
        self.backend = backends.check_name(backend)

    def forward(self, student_logits: Tensor, teacher_topk_logprobs: Tensor, teacher_topk_indices: Tensor,
                labels: Optional[Tensor] = None) -> Tensor:
        """The loss of (..., V) student logits against (..., K) teacher log-probs at (..., K) indices."""
        return F.softmax_kl_div_topk(student_logits, teacher_topk_logprobs, teacher_topk_indices,
                                     temperature=self.temperature, tail=self.tail, reduction=self.reduction,
                                     labels=labels, ignore_index=self.ignore_index, t2_scale=self.t2_scale,
                                     backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, tail={self.tail!r}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, t2_scale={self.t2_scale}, backend={self.backend!r}")


class ProjectedMSELoss(nn.Module):
    """FitNets hint loss with a learned (teacher_dim, student_dim) projection, initialised like nn.Linear.

    ``forward(student, teacher)``; with ``feature_dim=1`` an (N, Cs, H, W) map is projected per
    pixel (a 1x1 convolution) to compare with an (N, Ct, H, W) teacher map.
    """

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = True, feature_dim: int = -1,
                 reduction: str = "mean", backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.feature_dim = v.check_int("feature_dim", feature_dim)
        self.reduction = red.FEATURES.check(reduction)
        self.backend = backends.check_name(backend)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(teacher_dim, student_dim, **factory))
        self.bias = nn.Parameter(torch.empty(teacher_dim, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # exactly nn.Linear's initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.student_dim)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The hint loss between student features (student_dim at ``feature_dim``) and teacher
        features (teacher_dim there); a 0-d tensor, or for reduction="none" one loss per feature
        vector (the teacher's shape without ``feature_dim``)."""
        return F.projected_mse(student, teacher, self.weight, self.bias, self.feature_dim, self.reduction,
                               self.backend)

    def extra_repr(self) -> str:
        return (f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, bias={self.bias is not None}, "
                f"feature_dim={self.feature_dim}, reduction={self.reduction!r}, backend={self.backend!r}")


class AttentionTransferLoss(nn.Module):
    """Attention transfer between (N, Cs, *spatial) and (N, Ct, *spatial) feature maps; see
    :func:`kdkernels.functional.attention_transfer` (p: channel-pooling power >= 1; squared: the
    authors' code (True) or the paper's Eq. 2 (False); reduction: "mean", "sum", "batchmean", "none")."""

    def __init__(self, p: float = 2.0, squared: bool = True, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.p = v.check_real("p", p)
        if not 1 <= self.p < float("inf"):
            raise ValueError(f"p must be a finite number >= 1, got {p!r}")
        self.squared = v.check_bool("squared", squared)
        self.reduction = red.FEATURES.check(reduction)
        self.backend = backends.check_name(backend)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The loss between the student's and the teacher's maps (same N and spatial size); 0-d, or
        (N,) for reduction="none". The teacher gets a gradient only if it requires one."""
        return F.attention_transfer(student, teacher, p=self.p, squared=self.squared, reduction=self.reduction,
                                    backend=self.backend)

    def extra_repr(self) -> str:
        return f"p={self.p}, squared={self.squared}, reduction={self.reduction!r}, backend={self.backend!r}"


class _RelationLoss(nn.Module):
    """reduction: "mean" (over the matrix entries), "sum", "batchmean" (sum / B) or "none" (the (B,)
    per-row losses); see kdkernels.reduction.RELATION."""
    _fn = None

    def __init__(self, reduction: str = "mean", backend: str = "auto") -> None:
        super().__init__()
        self.reduction = red.RELATION.check(reduction)
        self.backend = backends.check_name(backend)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The loss between (B, ...) student and teacher embeddings (the teacher gets no gradient);
        0-d, or (B,) for reduction="none"."""
        return type(self)._fn(student, teacher, self.reduction, self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"


class RKDDistanceLoss(_RelationLoss):
    """RKD distance loss over a batch of (B, ...) embeddings; see :func:`kdkernels.functional.rkd_distance`."""
    _fn = staticmethod(F.rkd_distance)


class RKDAngleLoss(_RelationLoss):
    """RKD angle loss over a batch of (B, ...) embeddings; see :func:`kdkernels.functional.rkd_angle`."""
    _fn = staticmethod(F.rkd_angle)


class SimilarityPreservingLoss(_RelationLoss):
    """Similarity-preserving loss; see :func:`kdkernels.functional.similarity_preserving`. The default
    "mean" is the paper's sum / B^2 ("batchmean" is sum / B)."""
    _fn = staticmethod(F.similarity_preserving)


class RKDLoss(nn.Module):
    """``distance_weight * rkd_distance + angle_weight * rkd_angle``; see :func:`kdkernels.functional.rkd`.

    Defaults are the RKD paper's weights (lambda_D = 1, lambda_A = 2). The fused backends compute
    both terms in one op that shares the squared distances, forward and backward.
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0, reduction: str = "mean",
                 backend: str = "auto") -> None:
        super().__init__()
        self.distance_weight, self.angle_weight = v.check_rkd_weights(distance_weight, angle_weight)
        self.reduction = red.RELATION.check(reduction)
        self.backend = backends.check_name(backend)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Both RKD terms between (B, ...) student and teacher embeddings (the teacher gets no gradient);
        0-d, or (B,) for reduction="none"."""
        return F.rkd(student, teacher, self.distance_weight, self.angle_weight, self.reduction, self.backend)

    def extra_repr(self) -> str:
        return (f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class FSPLoss(nn.Module):
    """FSP matrix loss over pairs of layers (Yim et al., CVPR 2017): ``forward(student_pairs,
    teacher_pairs)`` with lists of (first, second) feature maps returns sum_i weights[i] *
    :func:`kdkernels.functional.fsp` of pair i (the paper's lambda_i).

    weights: one number per pair (default all 1; the number of pairs is then free); reduction:
    "mean", "sum", "batchmean" (the paper's 1 / N) or "none" ((N,) per sample). The paper's squared
    Frobenius form, not torchdistill's column norms (see :func:`kdkernels.functional.fsp`).
    """

    def __init__(self, weights: Optional[Sequence[float]] = None, reduction: str = "mean",
                 backend: str = "auto") -> None:
        super().__init__()
        if weights is not None:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise TypeError(f"weights must be a sequence of numbers or None, got {type(weights).__name__}")
            weights = [v.check_real(f"weights[{i}]", w) for i, w in enumerate(weights)]
        self.weights = weights
        self.reduction = red.RELATION.check(reduction)
        self.backend = backends.check_name(backend)

    def forward(self, student_pairs: Sequence[tuple[Tensor, Tensor]],
                teacher_pairs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """sum_i weights[i] * fsp(*student_pairs[i], *teacher_pairs[i]); 0-d, or (N,) for "none"."""
        if len(student_pairs) != len(teacher_pairs):
            raise ValueError(f"teacher_pairs must have as many pairs as student_pairs ({len(student_pairs)}), "
                             f"got {len(teacher_pairs)}")
        if len(student_pairs) == 0:
            raise ValueError("student_pairs must hold at least one (first, second) pair")
        weights = self.weights if self.weights is not None else [1.0] * len(student_pairs)
        if len(weights) != len(student_pairs):
            raise ValueError(f"weights has {len(weights)} entries but {len(student_pairs)} pairs were given")
        total = None
        for i, (w, s_pair, t_pair) in enumerate(zip(weights, student_pairs, teacher_pairs)):
            if len(s_pair) != 2 or len(t_pair) != 2:
                raise ValueError(f"pair {i} must be a (first, second) pair of feature maps")
            term = F.fsp(s_pair[0], s_pair[1], t_pair[0], t_pair[1], reduction=self.reduction, backend=self.backend)
            term = term if w == 1 else w * term
            total = term if total is None else total + term
        return total

    def extra_repr(self) -> str:
        return f"weights={self.weights}, reduction={self.reduction!r}, backend={self.backend!r}"


class FusedLinearSoftmaxKLDivLoss(nn.Module):
    """The student's LM head and softmax-KL in one op, without (tokens x vocabulary) logits;
    ``forward(student_hidden, student_weight, student_bias=None, *, teacher_logits=None,
    teacher_hidden=None, teacher_weight=None, teacher_bias=None, labels=None)``.

    The head's weights are passed to ``forward``, so the loss works with a model's own head
    (``model.lm_head.weight``). See :func:`kdkernels.functional.fused_linear_softmax_kl_div`.
    """

    def __init__(self, temperature: float = 1.0, divergence: str = "forward", beta: float = 0.5,
                 reduction: str = "batchmean", ignore_index: int = -100, t2_scale: bool = True,
                 chunk_size: Optional[int] = None, backend: str = "auto") -> None:
        super().__init__()
        (self.temperature, self.divergence, self.beta, self.reduction, self.ignore_index,
         self.t2_scale) = v.check_softmax_kl_options(temperature, divergence, beta, reduction, ignore_index, t2_scale)
        if chunk_size is not None and (v.check_int("chunk_size", chunk_size) < 1):
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.chunk_size = chunk_size
        self.backend = backends.check_name(backend)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor] = None, *,
                teacher_logits: Optional[Tensor] = None, teacher_hidden: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> Tensor:
        return F.fused_linear_softmax_kl_div(
            student_hidden, student_weight, student_bias, teacher_logits=teacher_logits, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_bias=teacher_bias, temperature=self.temperature,
            divergence=self.divergence, beta=self.beta, reduction=self.reduction, labels=labels,
            ignore_index=self.ignore_index, t2_scale=self.t2_scale, chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, t2_scale={self.t2_scale}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}")
