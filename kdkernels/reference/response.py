"""Reference temperature softmax-KL (docs/design.md §2.1): forward KL, reverse KL, generalised JSD."""
from __future__ import annotations

import math

import torch

from kdkernels._dtypes import opmath_dtype
from kdkernels.reduction import reduce_rows


def _weighted_log_ratio(w: torch.Tensor, log_w: torch.Tensor, log_o: torch.Tensor) -> torch.Tensor:
    """sum_v w_v (log w_v - log o_v) per row, with 0 * log(0 / x) = 0.

    Both ``where``s are needed: the inner one keeps -inf - -inf (= NaN) out of the product so its
    gradient is not NaN either. NaN in the inputs still propagates (``w > 0`` is False for NaN,
    but the row's log-sum-exp is NaN, hence every log prob is).
    """
    positive = w > 0
    diff = torch.where(positive, log_w - log_o, torch.zeros_like(log_w))
    return torch.where(positive | w.isnan(), w * diff, torch.zeros_like(w)).sum(-1)


def per_row_softmax_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
) -> torch.Tensor:
    """Unscaled per-row divergence, shape = leading dims, in the op-math dtype."""
    dt = opmath_dtype(student_logits.dtype)
    log_p = torch.log_softmax(student_logits.to(dt) / temperature, dim=-1)
    log_q = torch.log_softmax(teacher_logits.to(dt) / temperature, dim=-1)
    return divergence_of_log_probs(log_p, log_q, divergence, beta)


def divergence_of_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str = "forward",
                            beta: float = 0.5) -> torch.Tensor:
    """The divergence summed over the last dim, given the student's and the teacher's log-probabilities
    (also over a slice of the vocabulary: kdkernels.distributed sums the slices' values)."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward":
        return _weighted_log_ratio(q, log_q, log_p)
    if divergence == "reverse":
        return _weighted_log_ratio(p, log_p, log_q)
    # log m = logsumexp(log q + log beta, log p + log(1 - beta)): stays finite where p, q underflow.
    # Where both are -inf (a column masked in both rows) logaddexp's backward is 0 * NaN, so such
    # entries are computed on a placeholder and set to -inf afterwards.
    a, b = log_q + math.log(beta), log_p + math.log1p(-beta)
    both = (a == -math.inf) & (b == -math.inf)
    log_m = torch.where(both, -math.inf, torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)))
    return beta * _weighted_log_ratio(q, log_q, log_m) + (1 - beta) * _weighted_log_ratio(p, log_p, log_m)


def softmax_kl_div(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    reduction: str = "batchmean",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Distillation loss between softened distributions; inputs are raw logits (..., V).

    Rows whose ``labels`` equal ``ignore_index`` are dropped before any arithmetic, so they give
    exactly 0 loss and 0 gradient whatever they hold.
    """
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    flat_labels = None
    if labels is not None:
        flat_labels = labels.reshape(-1)
        keep = (flat_labels != ignore_index).unsqueeze(-1)
        s = torch.where(keep, s, torch.zeros_like(s))
        t = torch.where(keep, t, torch.zeros_like(t))
    rows = per_row_softmax_kl(s, t, temperature, divergence, beta)
    if labels is not None:
        rows = torch.where(keep.squeeze(-1), rows, torch.zeros_like(rows))
    if t2_scale:
        rows = rows * (temperature * temperature)
    return reduce_rows(rows, reduction, lead, vocab, flat_labels, ignore_index)
