"""Reference softmax-KL against a top-k sparse teacher (issue 11 §2; docs/design.md §2.1).

The teacher is given as K log-probabilities of its full-vocabulary softmax at the distillation
temperature, log q_k, at int64 indices i_k (any order, unique per row); the student as raw logits
over the whole vocabulary, log p = log_softmax(z_s / T).

* ``tail="renormalize"``: q~ = softmax_k(log q_k); l = sum_k q~_k (log q~_k - log p_{i_k}).
* ``tail="bucket"``: the missing teacher mass is one more event, q_r = max(0, 1 - sum_k q_k),
  p_r = 1 - sum_k p_{i_k} (here as the exact sum over the entries outside the top-k);
  l = sum_k q_k (log q_k - log p_{i_k}) + q_r (log q_r - log p_r), the last term 0 when q_r = 0
  and when K = V (no entry is left for the bucket).

T^2 scaling, labels / ignore_index and the reductions are those of softmax_kl_div ("mean" divides
by V, the student's vocabulary).
"""
from __future__ import annotations

import math

import torch

from kdkernels._dtypes import opmath_dtype
from kdkernels.reduction import reduce_rows
from kdkernels.reference.response import _weighted_log_ratio

TAILS = ("renormalize", "bucket")


def per_row_softmax_kl_topk(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                            teacher_topk_indices: torch.Tensor, temperature: float, tail: str) -> torch.Tensor:
    """Unscaled per-row loss of (R, V) student logits against (R, K) teacher log-probs at (R, K) indices."""
    dt = opmath_dtype(student_logits.dtype)
    log_p = torch.log_softmax(student_logits.to(dt) / temperature, dim=-1)
    log_p_k = log_p.gather(-1, teacher_topk_indices)
    log_q = teacher_topk_logprobs.to(dt)
    if tail == "renormalize":
        log_q = torch.log_softmax(log_q, dim=-1)
        return _weighted_log_ratio(log_q.exp(), log_q, log_p_k)
    head = _weighted_log_ratio(log_q.exp(), log_q, log_p_k)
    if teacher_topk_indices.shape[-1] == student_logits.shape[-1]:
        return head  # K = V: no entry is left for the bucket, which is empty
    q_r = (1 - log_q.exp().sum(-1)).clamp_min(0)
    log_p_r = log_p.scatter(-1, teacher_topk_indices, -math.inf).logsumexp(-1)
    positive = q_r > 0
    safe_q_r = torch.where(positive, q_r, torch.ones_like(q_r))
    tail_term = torch.where(positive, q_r * (safe_q_r.log() - torch.where(positive, log_p_r, torch.zeros_like(log_p_r))),
                            torch.zeros_like(q_r))
    return head + tail_term


def softmax_kl_div_topk(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                        teacher_topk_indices: torch.Tensor, temperature: float = 1.0, tail: str = "renormalize",
                        reduction: str = "batchmean", labels: torch.Tensor | None = None, ignore_index: int = -100,
                        t2_scale: bool = True) -> torch.Tensor:
    """The top-k loss of (..., V) student logits against (..., K) teacher log-probs and indices.

    Rows whose ``labels`` equal ``ignore_index`` are replaced before any arithmetic (zero logits, a
    uniform teacher on the first K entries), so they give exactly 0 loss and 0 gradient.
    """
    lead, vocab, k = tuple(student_logits.shape[:-1]), student_logits.shape[-1], teacher_topk_logprobs.shape[-1]
    s = student_logits.reshape(-1, vocab)
    lq = teacher_topk_logprobs.reshape(-1, k)
    idx = teacher_topk_indices.reshape(-1, k)
    flat_labels = None
    if labels is not None:
        flat_labels = labels.reshape(-1)
        keep = (flat_labels != ignore_index).unsqueeze(-1)
        s = torch.where(keep, s, torch.zeros_like(s))
        lq = torch.where(keep, lq, torch.full_like(lq, -math.log(k)))
        idx = torch.where(keep, idx, torch.arange(k, device=idx.device).expand_as(idx))
    rows = per_row_softmax_kl_topk(s, lq, idx, temperature, tail)
    if labels is not None:
        rows = torch.where(keep.squeeze(-1), rows, torch.zeros_like(rows))
    if t2_scale:
        rows = rows * (temperature * temperature)
    return reduce_rows(rows, reduction, lead, vocab, flat_labels, ignore_index)
