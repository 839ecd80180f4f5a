"""Every reduction of every loss family: its names, its validation and its application.

A loss family reduces one of three things, so it has one of three reduction sets:

* ``ROWS`` (response: softmax-KL) reduces per-row losses (R,) with leading shape ``lead``:
  "none" -> per-row losses of shape ``lead``; "sum" -> sum of rows; "batchmean" -> sum / max(1, kept
  rows); "mean" -> sum / (max(1, kept rows) * V). Kept rows are those whose label is not
  ``ignore_index``; counting them is a tensor op (no host sync).
* ``FEATURES`` (feature: projected MSE) reduces squared residuals of ``rows`` feature vectors of size
  Dt: "mean" -> / max(1, rows * Dt) (``F.mse_loss``, except that an empty input gives 0, not NaN),
  "sum", "batchmean" -> / max(1, rows), "none" -> per-row sums (one per feature vector, not
  per element as ``F.mse_loss(reduction="none")``). The fused kernels apply it inside (they take
  ``FEATURES.code(name)``) with the divisor ``feature_denominator`` gives ("none": each row's
  sum, divided by nothing); the C++ kernels use the same rule from csrc/include/kdkernels/feature.h.
* ``RELATION`` (relation: RKD distance, RKD angle, RKD, SP) reduces the per-row losses l_i of a batch of
  B samples, each row summing ``terms_per_row`` matrix entries (B for distance and SP, whose matrices
  are (B, B); B^2 for angle, (B, B, B)): "mean" -> sum_i l_i / (B terms_per_row), the mean over the
  matrix entries (the default of every relation loss); "sum"; "batchmean" -> sum_i l_i / B;
  "none" -> the per-row losses (B,). The fused ops return either the per-row losses (B,) or their
  total (``per_row``), so "none" is the op's output as is and the other words reduce the total.

The reference (backend "torch") and the fused backends reduce through these functions, so every
backend reduces exactly the same way (docs/design.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Reductions:
    """The reductions one family accepts; ``names[0]`` is the family's default."""

    family: str
    names: tuple[str, ...]

    def check(self, reduction: object) -> str:
        """``reduction`` if it is one of ``names``; ValueError naming the argument otherwise."""
        if not isinstance(reduction, str) or reduction not in self.names:
            raise ValueError(f"reduction must be one of {self.names}, got {reduction!r}")
        return reduction

    def code(self, reduction: str) -> int:
        """The integer a fused kernel takes for ``reduction`` (its index in ``names``)."""
        return self.names.index(reduction)


ROWS = Reductions("response", ("batchmean", "sum", "mean", "none"))
# codes 0..3 are the kernels' ints (feature.h kFeature*): append, never reorder
FEATURES = Reductions("feature", ("mean", "sum", "batchmean", "none"))
FEATURE_NONE = FEATURES.code("none")  # its ops' loss and grad_loss are (B, P) per-row values, not 0-d
RELATION = Reductions("relation", ("mean", "sum", "batchmean", "none"))


# ---- ROWS ------------------------------------------------------------------------------------
def kept_row_count(labels: Tensor | None, ignore_index: int, rows: int, like: Tensor) -> Tensor:
    """Number of rows that count, as a tensor of ``like``'s dtype and device, at least 1."""
    if labels is None:
        return torch.full((), max(1, rows), dtype=like.dtype, device=like.device)
    return (labels != ignore_index).sum().to(like.dtype).clamp_min(1)


def row_weight(reduction: str, labels: Tensor | None, ignore_index: int, rows: int, vocab: int,
               like: Tensor) -> Tensor:
    """The factor ``reduce_rows`` applies to the sum of the per-row losses (1 for "sum" and "none"),
    as a 0-d tensor of ``like``'s dtype and device (no host sync): the fused one-pass step scales
    its loss and its gradients by it."""
    if reduction in ("sum", "none"):
        return torch.ones((), dtype=like.dtype, device=like.device)
    kept = kept_row_count(labels, ignore_index, rows, like)
    return 1 / (kept if reduction == "batchmean" else kept * vocab)


def reduce_rows(row_loss: Tensor, reduction: str, lead_shape: tuple[int, ...], vocab: int,
                labels: Tensor | None, ignore_index: int) -> Tensor:
    """Reduce flat per-row losses ``row_loss`` (R,) as ``reduction`` (one of ``ROWS``) says."""
    if reduction == "none":
        return row_loss.reshape(lead_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    kept = kept_row_count(labels, ignore_index, row_loss.numel(), total)
    if reduction == "batchmean":
        return total / kept
    return total / (kept * vocab)  # "mean"


# ---- FEATURES --------------------------------------------------------------------------------
def feature_denominator(code: int, rows: int, teacher_dim: int) -> float:
    """What a fused projected-MSE kernel divides the sum of squared residuals by, for the reduction
    with ``FEATURES.code`` ``code``: max(1, elements) ("mean"), 1 ("sum"; "none", per row) or
    max(1, rows) ("batchmean"). An empty input gives loss 0, as every loss does (F.mse_loss would give NaN)."""
    name = FEATURES.names[code]
    if name in ("sum", "none"):
        return 1.0
    if name == "batchmean":
        return float(max(1, rows))
    return float(max(1, rows * teacher_dim))


def feature_grad_factor(code: int, rows: int, teacher_dim: int) -> float:
    """d loss / d residual per unit upstream gradient (for "none": per unit gradient of the row's loss)."""
    return 2.0 / feature_denominator(code, rows, teacher_dim)


def reduce_squared_error(squared_error: Tensor, reduction: str, rows: int) -> Tensor:
    """An elementwise squared error (rows feature vectors, features along the last dim) reduced as
    ``reduction`` (``FEATURES``); "none" keeps the leading dims: one sum per feature vector."""
    if reduction == "none":
        return squared_error.sum(-1)
    total = squared_error.sum()
    if reduction == "mean":
        return total / max(1, squared_error.numel())
    return total if reduction == "sum" else total / max(1, rows)


def per_sample_factor(reduction: str, samples: int, positions: int) -> float:
    """The factor a per-sample feature loss (attention transfer: one l_n per sample of ``positions``
    spatial positions) multiplies the sum of its l_n by (``FEATURES`` names): 1 / (N S) "mean" (the
    authors' ``.pow(2).mean()``), 1 / N "batchmean", 1 "sum" and "none". Empty inputs give 0, not NaN."""
    if reduction in ("sum", "none"):
        return 1.0
    return 1.0 / max(1, samples * positions if reduction == "mean" else samples)


# ---- RELATION --------------------------------------------------------------------------------
def reduce_relation(loss: Tensor, reduction: str, batch: int, terms_per_row: int) -> Tensor:
    """A relation loss reduced as ``reduction`` (one of ``RELATION``). ``loss`` is the per-row losses
    (B,) for "none" (returned as is) and their 0-d total otherwise; ``batch`` = B >= 2 (the
    functional layer checks it), ``terms_per_row`` the matrix entries each row sums."""
    if reduction in ("none", "sum"):
        return loss
    if reduction == "batchmean":
        return loss / batch
    return loss / (batch * terms_per_row)  # "mean"
