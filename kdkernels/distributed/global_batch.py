"""Global-batch relation losses (issue 13 §2; docs/design.md §2.5): each rank holds its own rows of
the batch, and the relations (distances, angles, Gram entries) are those of the *global* batch.

Result on every rank: the one-process loss (``kdkernels.functional.rkd_distance``, ``rkd_angle``,
``rkd``, ``similarity_preserving``) of the concatenated global batch, ranks in group-rank order;
each rank's gradient: its rows' slice of that loss's gradient. Uneven row counts are allowed,
0 rows on a rank included (that rank still returns the global loss; its gradient is (0, ...));
only the global batch needs >= 2 samples.

1. one ``all_gather_object`` of every rank's row count, shapes, dtypes, options and local error
   (``agree``): bad input on any rank raises on every rank, and the counts come with it;
2. one all_gather of the student rows and one of the (detached) teacher rows, each padded to the
   largest count (``all_gather_rows``): B_global x (D_s + D_t) values, never a B x B matrix;
3. every rank runs the fused one-process op on the gathered batch (all rows against all rows; the
   fused kernels never allocate B x B, so per-rank memory is O(B_global D + a tile)). The gather's
   backward is this rank's slice of the gradient, with no communication: every rank computes the
   same replicated loss (docs/decisions.md, "Global-batch relation losses").

reduction="none" returns the global per-row losses (B_global,) on every rank, in rank order (rank
r's rows at offset sum of the counts before r); back-propagate the same upstream on every rank.

Gradients and DDP: summing the ranks' gradients gives the exact global gradient; DDP *averages*
them, so a DDP model gets the global gradient / world size (multiply the loss by the world size
to undo that).

Known limitation: the pair work is not split across ranks. Each rank computes all B_global^2 pairs
(B_global^3 triples for the angle), the same work as one process on the whole batch; splitting it
into this rank's rows against all rows needs row-range variants of the relation kernels (a
follow-up), after which each rank would compute B_r x B_global pairs and the loss would be an
all_reduce of the partial sums.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdkernels import _validation as v
from kdkernels import backends, functional
from kdkernels.distributed._collectives import agree, all_gather_rows, check_group, check_same_on_every_rank

__all__ = ["global_rkd_distance", "global_rkd_angle", "global_rkd", "global_similarity_preserving"]


def global_rkd_distance(student: Tensor, teacher: Tensor, *, group=None, reduction: str = "mean",
                        backend: str = "auto") -> Tensor:
    """``kdkernels.functional.rkd_distance`` of the global batch (every rank's rows of ``group``).

    Args:
        student, teacher: (B_r, ...) this rank's rows (B_r >= 0, may differ between ranks; the
            global batch must have >= 2). Every rank must pass the same trailing (feature) shapes
            and dtypes, on the same device type.
        group: the torch.distributed process group (None: the default group); every rank of it calls.
        reduction, backend: as ``rkd_distance``, the same on every rank; "none" gives the global
            (B_global,) per-row losses on every rank, in rank order.

    Returns the global loss, the same on every rank; this rank's gradient is its rows' slice of the
    global gradient. The teacher gets no gradient. Bad input on any rank raises on every rank.
    """
    return _global_relation("global_rkd_distance", "rkd_distance", functional.rkd_distance, student, teacher,
                            group, reduction, backend, {})


def global_rkd_angle(student: Tensor, teacher: Tensor, *, group=None, reduction: str = "mean",
                     backend: str = "auto") -> Tensor:
    """``kdkernels.functional.rkd_angle`` of the global batch; arguments and result as
    ``global_rkd_distance`` (the B_global^3 triples of the whole batch)."""
    return _global_relation("global_rkd_angle", "rkd_angle", functional.rkd_angle, student, teacher, group,
                            reduction, backend, {})


def global_rkd(student: Tensor, teacher: Tensor, *, group=None, distance_weight: float = 1.0,
               angle_weight: float = 2.0, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """``kdkernels.functional.rkd`` (``distance_weight * rkd_distance + angle_weight * rkd_angle``) of
    the global batch; the weights as there (the same on every rank), the rest as ``global_rkd_distance``."""
    return _global_relation("global_rkd", "rkd", functional.rkd, student, teacher, group, reduction, backend,
                            {"distance_weight": distance_weight, "angle_weight": angle_weight})


def global_similarity_preserving(student: Tensor, teacher: Tensor, *, group=None, reduction: str = "mean",
                                 backend: str = "auto") -> Tensor:
    """``kdkernels.functional.similarity_preserving`` of the global batch (the B_global x B_global
    Gram matrices, never formed); arguments and result as ``global_rkd_distance``."""
    return _global_relation("global_similarity_preserving", "similarity_preserving",
                            functional.similarity_preserving, student, teacher, group, reduction, backend, {})


def _global_relation(where, loss, fn, student, teacher, group, reduction, backend, weights) -> Tensor:
    rank = check_group(where, group)
    error, meta = None, {}
    try:
        meta = _check_local(where, loss, student, teacher, reduction, backend, weights)
    except (TypeError, ValueError, RuntimeError, NotImplementedError, Warning) as e:  # Warning: -W error
        error = e
    gathered = agree(where, group, meta, error)
    counts = _check_agreement(where, gathered)
    s = all_gather_rows(student, counts, rank, group)
    with torch.no_grad():  # the teacher is a target: gathered detached, never differentiated
        t = all_gather_rows(teacher.detach(), counts, rank, group)
    return fn(s, t, reduction=reduction, backend=backend, **weights)


def _check_local(where, loss, student, teacher, reduction, backend, weights) -> dict:
    """This rank's checks (all but the global batch size) and the metadata every rank compares."""
    functional._check_relation_tensors(student, teacher, reduction)
    if weights:
        weights = dict(zip(weights, v.check_rkd_weights(weights["distance_weight"], weights["angle_weight"])))
    backends.resolve(loss, backend, student.device)  # an unavailable backend raises here, on this rank
    # the teacher warning (the text functional's checks give) last: an error under -W error is agreed on too
    functional._warn_teacher_requires_grad(where, teacher, stacklevel=4)
    return {"rows": student.shape[0], "student_features": tuple(student.shape[1:]),
            "teacher_features": tuple(teacher.shape[1:]), "dtypes": (str(student.dtype), str(teacher.dtype)),
            "options": (reduction, backend, tuple(sorted(weights.items()))), "device": student.device.type}


_SAME_ON_EVERY_RANK = (("student_features", "student feature shape (all dims but the batch)"),
                       ("teacher_features", "teacher feature shape (all dims but the batch)"),
                       ("dtypes", "(student, teacher) dtypes"), ("options", "options"), ("device", "device type"))


def _check_agreement(where: str, gathered: list[dict]) -> list[int]:
    """Every rank's row count, after checking that everything but the rows is the same on every rank
    (each rank sees the same list: all raise or none)."""
    check_same_on_every_rank(where, gathered, _SAME_ON_EVERY_RANK, "embeddings", "only the batch is split over "
                             "the ranks")
    counts = [m["rows"] for m in gathered]
    if sum(counts) < 2:
        raise ValueError(f"{where}: the global batch must have at least 2 samples for relation losses, got "
                         f"{sum(counts)} (rows by rank: {counts})")
    return counts
