"""Reference relation losses (docs/design.md §2.3): RKD distance, RKD angle, their weighted sum (RKD),
similarity-preserving (SP), and the FSP matrix loss between two layers (§2.6; its own shapes, below).

Shapes: ``student`` (B, ...) and ``teacher`` (B, ...) are flattened from dim 1 to (B, Ds) and
(B, Dt); Ds and Dt may differ. Every loss is a per-row loss l_i (row i of its (B, B) matrix, or
anchor i's (B, B) slice of the angles), reduced by ``kdkernels.reduction.reduce_relation``: "none"
returns the (B,) per-row losses, "sum" their sum, "batchmean" the sum / B and "mean" (the
default) the mean over all matrix entries. The teacher side is computed
detached under ``torch.no_grad()``: it never receives a gradient. Op-math (and the loss dtype) is
float64 if either input is float64, else float32. These materialise the B x B (distance, SP) and
B x B x D / B x B x B (angle) tensors that the fused kernels avoid. No validation here (B >= 2 and
the reductions are checked by ``kdkernels.functional``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels._dtypes import opmath_dtype
from kdkernels.reduction import per_sample_factor, reduce_relation

EPS = 1e-12


def _flatten(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ...), (B, ...) -> (B, Ds) student in the graph, (B, Dt) teacher detached; op-math dtype."""
    dt = opmath_dtype(torch.promote_types(student.dtype, teacher.dtype))
    return student.reshape(student.shape[0], -1).to(dt), teacher.detach().reshape(teacher.shape[0], -1).to(dt)


def normalized_distances(e: torch.Tensor) -> torch.Tensor:
    """(B, D) embeddings -> (B, B) distances ``d / mu``.

    ``d_ij = sqrt(max(||e_i - e_j||^2, 1e-12))`` for i != j and ``d_ii = 0`` exactly. The squared
    distance is the spec's ``||e_i||^2 + ||e_j||^2 - 2 e_i.e_j``, but computed here from the
    differences (``cdist`` without the matmul trick), so it carries no Gram-expansion cancellation:
    this is the accurate value the kernels are held to.

    ``mu = mean{d_ij : d_ij > 0}``. Because of the clamp every off-diagonal d is >= sqrt(1e-12) =
    1e-6 > 0 (also in float32, where that is a normal number), so the set is exactly the B(B-1)
    off-diagonal entries and ``mu >= 1e-6`` is never 0 for finite input. Duplicate rows are at
    distance 1e-6, and if every row is the same, ``mu = 1e-6`` and ``d / mu = 1`` off the diagonal
    (all pairs equally far): finite, and what the original RKD code gives. The count is a tensor
    op (no boolean indexing, no host sync); NaN input gives a NaN loss.
    """
    sq = torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist").square()  # (B, B)
    d = sq.clamp_min(EPS).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    d = d.masked_fill(eye, 0.0)
    mu = d.sum() / (d > 0).sum()
    return d / mu


def angles(e: torch.Tensor) -> torch.Tensor:
    """(B, D) embeddings -> (B, B, B) cosines ``psi[i, j, k] = <u_ij, u_ik>``.

    ``u_ij = (e_j - e_i) / max(||e_j - e_i||, 1e-12)``, so ``u_ii = 0`` and a duplicate pair gives
    ``u_ij = 0``. Such a pair (any pair closer than 1e-12) passes no gradient: differentiating ``x / 1e-12`` through the clamp
    (as ``F.normalize`` does) would give gradients ~1e12 times larger than anywhere else, an
    artefact of eps that no training wants; every backend uses this zero subgradient.
    """
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # (B, B, D): diff[i, j] = e_j - e_i
    far = torch.linalg.vector_norm(diff.detach(), dim=2, keepdim=True) > EPS
    # The norm of the far pairs only: a norm taken at 0 (the diagonal) has a NaN second derivative,
    # which torch.where would still route into a double backward.
    norm = torch.linalg.vector_norm(torch.where(far, diff, torch.ones_like(diff)), dim=2, keepdim=True)
    # value exactly diff / max(norm, eps); below eps the quotient is detached (no gradient)
    u = torch.where(far, diff / norm, (diff / EPS).detach())
    return torch.bmm(u, u.transpose(1, 2))


def normalized_gram(f: torch.Tensor) -> torch.Tensor:
    """(B, D) features -> (B, B) ``G = F F^T`` with row i divided by ``max(||G_i||_2, 1e-12)``.

    L2 row norm (the SP paper's / RepDistiller's form), not torchdistill's L1. An all-zero row of
    ``F`` gives an all-zero row of the result.
    """
    return F.normalize(f @ f.T, p=2.0, dim=1, eps=EPS)


def _reduce_entries(entries: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, ...) elementwise losses, row i holding l_i's terms, reduced as ``reduction``."""
    if reduction == "none":
        return entries.flatten(1).sum(dim=1)
    return reduce_relation(entries.sum(), reduction, entries.shape[0], entries[0].numel())


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """RKD distance loss: smooth-L1 (beta = 1) between ``d_s / mu_s`` and ``d_t / mu_t``, (B, B) each.

    student (B, ...), teacher (B, ...) -> () or (B,) for "none": l_i = sum_j smooth_l1(d^_s,ij -
    d^_t,ij). "mean" averages over all B^2 entries (the diagonal, 0 vs 0, included). The student's
    ``mu`` (a mean over the whole batch) is part of the graph.
    """
    s, t = _flatten(student, teacher)
    with torch.no_grad():
        dt_hat = normalized_distances(t)
    return _reduce_entries(F.smooth_l1_loss(normalized_distances(s), dt_hat, reduction="none", beta=1.0), reduction)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """RKD angle loss: smooth-L1 (beta = 1) between the (B, B, B) ``psi_s`` and ``psi_t``.

    student (B, ...), teacher (B, ...) -> () or (B,) for "none": l_i = sum_jk smooth_l1(psi_s[i, j, k]
    - psi_t[i, j, k]), anchor i. "mean" averages over all B^3 entries (those with j == i or k == i
    are 0 on both sides and included).
    """
    s, t = _flatten(student, teacher)
    with torch.no_grad():
        psi_t = angles(t)
    return _reduce_entries(F.smooth_l1_loss(angles(s), psi_t, reduction="none", beta=1.0), reduction)


def rkd(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 1.0, angle_weight: float = 2.0,
        reduction: str = "mean") -> torch.Tensor:
    """``distance_weight * rkd_distance + angle_weight * rkd_angle``, each reduced by ``reduction``
    ("none": the weighted per-row losses, (B,)). A term whose weight is 0 is not computed (so it
    cannot turn the sum into NaN)."""
    terms = []
    if distance_weight != 0:
        terms.append(distance_weight * rkd_distance(student, teacher, reduction))
    if angle_weight != 0:
        terms.append(angle_weight * rkd_angle(student, teacher, reduction))
    return sum(terms[1:], terms[0])


def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """SP loss ``||G^_t - G^_s||_F^2`` over the (B, B) row-normalised Gram matrices.

    student (B, ...), teacher (B, ...) -> () or (B,) for "none": l_i = sum_j (G^_t,ij - G^_s,ij)^2.
    "mean" (default) divides the sum by B^2 (the paper's 1 / B^2); "batchmean" by B.
    """
    s, t = _flatten(student, teacher)
    with torch.no_grad():
        g_t = normalized_gram(t)
    return _reduce_entries((g_t - normalized_gram(s)).square(), reduction)


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The FSP ("flow of solution procedure") matrix of two layers' maps: (N, C1, *spatial) and
    (N, C2, *spatial) with the same spatial size -> G = A B^T / S, (N, C1, C2), A (N, C1, S) and
    B (N, C2, S) the maps flattened over their S spatial positions. Op-math dtype."""
    dt = opmath_dtype(torch.promote_types(first.dtype, second.dtype))
    a = first.to(dt).flatten(2)
    b = second.to(dt).flatten(2)
    return torch.matmul(a, b.transpose(1, 2)) / a.shape[2]


def fsp(student_first: torch.Tensor, student_second: torch.Tensor, teacher_first: torch.Tensor,
        teacher_second: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """FSP matrix loss (Yim et al., CVPR 2017): l_n = sum_ij (G_s - G_t)_ij^2 per sample, the squared
    Frobenius distance of ``fsp_matrix`` of the student's and the teacher's pair.

    Reductions (kdkernels.reduction.per_sample_factor with the C1 * C2 matrix entries): "mean"
    sum / (N C1 C2) (= ``F.mse_loss`` of the two matrices), "sum", "batchmean" sum / N (the paper's
    1 / N), "none" (N,). Both sides are differentiable (the teacher's maps get a gradient when they
    require one). Op-math: float64 if any map is float64, else float32."""
    d = fsp_matrix(student_first, student_second) - fsp_matrix(teacher_first, teacher_second)
    rows = d.square().sum(dim=(1, 2))
    if reduction == "none":
        return rows
    return rows.sum() * per_sample_factor(reduction, d.shape[0], d.shape[1] * d.shape[2])
