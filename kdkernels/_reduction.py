"""Reductions of per-row losses, shared by the reference and the fused backends.

Kept in one place so every backend reduces exactly the same way (DESIGN §2.1):
"none" -> per-row losses in the leading shape; "sum" -> sum of rows; "batchmean" -> sum / max(1, kept
rows); "mean" -> sum / (max(1, kept rows) * V). Counting kept rows is a tensor op (no host sync).
"""
from __future__ import annotations

import torch

ROW_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def kept_row_count(labels: torch.Tensor | None, ignore_index: int, rows: int, like: torch.Tensor) -> torch.Tensor:
    """Number of rows that count, as a tensor of ``like``'s dtype and device, at least 1."""
    if labels is None:
        return torch.full((), max(1, rows), dtype=like.dtype, device=like.device)
    return (labels != ignore_index).sum().to(like.dtype).clamp_min(1)


def reduce_rows(
    row_loss: torch.Tensor,
    reduction: str,
    lead_shape: tuple[int, ...],
    vocab: int,
    labels: torch.Tensor | None,
    ignore_index: int,
) -> torch.Tensor:
    """Reduce flat per-row losses ``row_loss`` (R,) as ``reduction`` says."""
    if reduction == "none":
        return row_loss.reshape(lead_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    kept = kept_row_count(labels, ignore_index, row_loss.numel(), total)
    if reduction == "batchmean":
        return total / kept
    return total / (kept * vocab)  # "mean"
