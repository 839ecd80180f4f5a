"""Vocab-parallel softmax-KL (issue 13 §1; docs/design.md §2.5): each rank holds the same rows and its
own contiguous slice of the vocabulary (uneven slices allowed, as Megatron's partitioning gives).

Result on every rank: ``softmax_kl_div`` of the concatenated logits; each rank's gradient: its slice
of the full gradient. Only per-row statistics cross ranks, never logits:

1. the local fused forward op gives each row's slice statistics [m_s, log_sum_s, m_t, log_sum_t,
   c_s, c_t] (maxima of z / T, log-sums of exp about them, the slice's divergence parts);
2. one all_reduce(MAX) of the maxima and one all_reduce(SUM) of the rescaled sums give the global
   log-sum-exps (2 x 2 floats per row);
3. the loss, per row: forward KL = sum over slices of Q_r (c_t^r + d_t^r - d_s^r) - log S_t + log S_s,
   with Q_r the teacher's mass in slice r and d^r = (m^r - M) + log_sum^r the slice's log-sum-exp
   relative to the global maximum (so nothing of the logits' magnitude is cancelled); reverse KL the
   same with the roles swapped; JSD needs the global log-probs element by element, so the local
   fused backward op runs once with the global statistics and c = 0, and its row sums are the
   slice's shares of c_s and c_t. One all_reduce(SUM) of 2 floats per row.
4. the backward: the local fused backward op with the global statistics (no communication).

Passes over the local logits: forward / reverse KL two (the forward op, the backward op), JSD three.
``backend="torch"`` runs an eager composition with differentiable collectives, the spec the fused
path is tested against besides the one-process loss.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from kdkernels import _validation as v
from kdkernels import backends, ops
from kdkernels import reduction as red
from kdkernels._dtypes import opmath_dtype
from kdkernels.distributed._collectives import (agree, all_reduce_replicated, all_reduce_shared, check_group,
                                                check_same_on_every_rank)
from kdkernels.ops.response import DIVERGENCE_CODES
from kdkernels.reference.response import divergence_of_log_probs

WHERE = "vocab_parallel_softmax_kl_div"


def vocab_parallel_softmax_kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    group=None,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    reduction: str = "batchmean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    t2_scale: bool = True,
    backend: str = "auto",
) -> Tensor:
    """``softmax_kl_div`` of logits whose vocabulary is sharded over the ranks of ``group``.

    Args:
        student_logits, teacher_logits: (..., V_r) this rank's contiguous vocabulary slice (the
            same rows on every rank; V_r >= 1 may differ between ranks). The slices, in rank order,
            make up the vocabulary.
        group: the torch.distributed process group (None: the default group). Every rank of it must
            call, with the same rows, options and labels (labels are not compared across ranks).
        temperature, divergence, beta, reduction, labels, ignore_index, t2_scale, backend: as
            ``kdkernels.functional.softmax_kl_div`` ("mean" divides by the whole vocabulary).

    Returns the loss of the whole vocabulary, the same on every rank; the gradient a rank gets is its
    slice of the one-process gradient. Bad input on any rank raises on every rank.
    """
    check_group(WHERE, group)
    error, meta, args = None, {}, None
    try:
        args = _check_local(student_logits, teacher_logits, temperature, divergence, beta, reduction, labels,
                            ignore_index, t2_scale, backend)
        s, t, flat_labels, lead, options, chosen = args
        meta = {"lead": lead, "vocab": s.shape[1], "dtype": str(s.dtype), "options": options,
                "labels": flat_labels is not None}
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        error = e
    gathered = agree(WHERE, group, meta, error)
    check_same_on_every_rank(WHERE, gathered, _SAME_ON_EVERY_RANK, "logits", "only the vocabulary is sharded")
    s, t, flat_labels, lead, options, chosen = args
    temperature, divergence, beta, reduction, ignore_index, t2_scale = options
    vocab = sum(m["vocab"] for m in gathered)
    if chosen == "torch":
        rows = _eager_rows(s, t, flat_labels, group, temperature, divergence, beta, ignore_index)
    else:
        rows = _VocabParallelRows.apply(s, t, flat_labels, group, chosen, temperature, divergence, beta, ignore_index)
    return finish_rows(rows, flat_labels, ignore_index, temperature, t2_scale, reduction, lead, vocab)


def _check_local(student_logits, teacher_logits, temperature, divergence, beta, reduction, labels, ignore_index,
                 t2_scale, backend):
    student_logits, teacher_logits, options = v.check_softmax_kl_inputs(
        student_logits, teacher_logits, labels, temperature, divergence, beta, reduction, ignore_index, t2_scale)
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    chosen = backends.resolve("softmax_kl_div", backend, student_logits.device)
    s = student_logits.reshape(-1, vocab).contiguous()
    t = teacher_logits.reshape(-1, vocab).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    return s, t, flat_labels, lead, options, chosen


_SAME_ON_EVERY_RANK = (("lead", "leading shape (rows)"), ("dtype", "dtype"), ("options", "options"),
                      ("labels", "labels given or not"))


# ---- the global statistics ---------------------------------------------------------------------
def _global_normalisers(stats: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """(M, log S, d): global maxima (R, 2) of z/T for [student, teacher], the global log-sums of
    exp(z/T - M), and each slice's log-sum-exp relative to M, d = (m^r - M) + log_sum^r."""
    m = stats[:, [0, 2]]
    log_sum = stats[:, [1, 3]]
    big = m.clone()
    dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
    big = torch.where(big == -math.inf, torch.zeros_like(big), big)  # a row masked everywhere: no shift
    d = (m - big) + log_sum
    total = d.exp()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return big, total.log(), d


def _stats(big: Tensor, log_total: Tensor, c_s: Tensor, c_t: Tensor) -> Tensor:
    return torch.stack([big[:, 0], log_total[:, 0], big[:, 1], log_total[:, 1], c_s, c_t], dim=1).contiguous()


def global_rows(s, t, labels, group, backend, temperature, divergence, beta, ignore_index) -> tuple[Tensor, Tensor]:
    """Per-row unscaled losses of the whole vocabulary (R,) and the global statistics (R, 6) the fused
    backward op takes, from this rank's slices s, t (R, V_r) and O(rows) collectives (steps 1-3 above).
    Not differentiable; also the per-chunk step of vocab_parallel_fused_linear_softmax_kl_div."""
    code = DIVERGENCE_CODES[divergence]
    _rows, stats = ops.SOFTMAX_KL.forward(backend, s, t, labels, temperature, code, beta, ignore_index, False)
    big, log_total, d = _global_normalisers(stats, group)
    zero = torch.zeros_like(log_total[:, 0])
    if divergence == "jsd":
        # the slice's shares of c_s, c_t: row sums of the gradient with the global stats and c = 0
        # (d l / d b_j = p_j (1 - beta)(log p_j - log m_j) then; x T undoes the backward's 1/T)
        s_op, t_op = (s, t) if s.dtype == stats.dtype else (s.to(stats.dtype), t.to(stats.dtype))
        g_s, g_t = ops.SOFTMAX_KL.backward_ops[backend](
            torch.ones_like(zero), s_op, t_op, labels, _stats(big, log_total, zero, zero), temperature, code,
            beta, ignore_index, False, True, True)
        shares = torch.stack([g_s.sum(-1, dtype=stats.dtype), g_t.sum(-1, dtype=stats.dtype)], dim=1) * temperature
        del g_s, g_t
        dist.all_reduce(shares, op=dist.ReduceOp.SUM, group=group)
        c_s, c_t = shares[:, 0], shares[:, 1]
        rows = c_s + c_t
    else:
        # forward: the teacher's mass Q_r weights the slice's KL; reverse: the student's P_r
        w_col, o_col, c_col = (1, 0, 5) if divergence == "forward" else (0, 1, 4)
        mass = (d[:, w_col] - log_total[:, w_col]).exp()
        part = torch.where(mass > 0, mass * (stats[:, c_col] + d[:, w_col] - d[:, o_col]), torch.zeros_like(mass))
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        rows = part - log_total[:, w_col] + log_total[:, o_col]
        c_s, c_t = (zero, rows) if divergence == "forward" else (rows, zero)
    return rows, _stats(big, log_total, c_s, c_t)


def finish_rows(rows: Tensor, flat_labels, ignore_index: int, temperature: float, t2_scale: bool, reduction: str,
                lead: tuple, vocab: int) -> Tensor:
    """Unscaled per-row losses -> the loss softmax_kl_div returns (ignored rows 0, T^2, the reduction
    over the whole vocabulary ``vocab``)."""
    if flat_labels is not None:
        rows = torch.where(flat_labels != ignore_index, rows, torch.zeros_like(rows))
    if t2_scale:
        rows = rows * (temperature * temperature)
    return red.reduce_rows(rows, reduction, lead, vocab, flat_labels, ignore_index)


class _VocabParallelRows(torch.autograd.Function):
    """Per-row unscaled losses of the whole vocabulary (R,), from the local fused ops + row statistics."""

    @staticmethod
    def forward(ctx, s, t, labels, group, backend, temperature, divergence, beta, ignore_index):
        rows, stats = global_rows(s, t, labels, group, backend, temperature, divergence, beta, ignore_index)
        ctx.save_for_backward(s, t, labels, stats)
        ctx.options = (backend, temperature, DIVERGENCE_CODES[divergence], beta, ignore_index)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        s, t, labels, stats = ctx.saved_tensors
        backend, temperature, code, beta, ignore_index = ctx.options
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_s or need_t):
            return (None,) * 9
        # the rows are unscaled (T^2 is applied outside): t2_scale=False gives d l / d z
        grad_s, grad_t = ops.SOFTMAX_KL.backward_ops[backend](
            grad_rows.to(stats.dtype).contiguous(), s, t, labels, stats, temperature, code, beta, ignore_index, False,
            need_s, need_t)
        return (grad_s if need_s else None, grad_t if need_t else None) + (None,) * 7


def _eager_rows(s, t, labels, group, temperature, divergence, beta, ignore_index) -> Tensor:
    """The same rows in eager PyTorch: global log-probabilities of the slice, the divergence's terms
    summed over it, summed over the ranks (docs/decisions.md: which collective backward where)."""
    dt = opmath_dtype(s.dtype)
    b, a = s.to(dt) / temperature, t.to(dt) / temperature
    if labels is not None:  # ignored rows: zeros, as the reference (loss and gradient exactly 0)
        keep = (labels != ignore_index).unsqueeze(-1)
        b, a = torch.where(keep, b, torch.zeros_like(b)), torch.where(keep, a, torch.zeros_like(a))
    with torch.no_grad():
        big = torch.stack([b.max(-1).values, a.max(-1).values], dim=1)
        dist.all_reduce(big, op=dist.ReduceOp.MAX, group=group)
        big = torch.where(big == -math.inf, torch.zeros_like(big), big)
    sums = torch.stack([(b - big[:, :1]).exp().sum(-1), (a - big[:, 1:]).exp().sum(-1)], dim=1)
    log_total = all_reduce_shared(sums, group).log()
    log_p = b - big[:, :1] - log_total[:, :1]
    log_q = a - big[:, 1:] - log_total[:, 1:]
    return all_reduce_replicated(divergence_of_log_probs(log_p, log_q, divergence, beta), group)
