"""Vocab-parallel fused linear + softmax-KL (issue 13 §1; docs/design.md §2.5): a vocabulary-sharded LM
head (each rank holds its rows of the weight: Megatron's column-parallel head) and the softmax-KL of its
logits, without any rank materialising (rows x V) or even (rows x V_r) logits.

Exactly ``fused_linear_softmax_kl_div`` of the concatenated head (the weights' rows in rank order), as
``vocab_parallel_softmax_kl_div`` is ``softmax_kl_div`` of the concatenated logits. Per chunk of rows:

1. the chunk's slice logits z_s = h W_r^T + b_r (and the teacher's, given as logits or hidden + head
   slice) with a torch GEMM into a (chunk, V_r) buffer;
2. ``vocab_parallel.global_rows``: the local fused softmax-KL forward op, O(chunk) statistics
   all-reduced, the chunk's row losses of the whole vocabulary and its global statistics;
3. the local fused backward op with those statistics gives the chunk's logit gradient G, turned at
   once into grad h = G W_r and grad W_r += G^T h, grad b_r += sum G: in the forward for the scalar
   reductions (the backward only scales them, as the one-process op), in a backward that recomputes
   1 for reduction "none" (the per-row upstream gradient is not known before).

Why the chunk loop is here and not in the C++ / Triton loop of ``fused_linear_softmax_kl``: each chunk
needs a collective between its logits and its gradient (the global log-sum-exps), which the one-process
loop cannot wait for. The cost of that: two passes over each chunk's logits (forward op, backward
op) instead of the one-pass step's one (three for JSD).

student_hidden is the same on every rank (replicated); its gradient sums the slices' contributions
over the ranks (one all_reduce of rows x H in the backward, as Megatron's copy to the tensor-parallel
region does), so every rank's hidden gets the full one-process gradient. The weight and bias get
their slice of it. The teacher gets none.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkernels import _validation as v
from kdkernels import backends, ops
from kdkernels import reduction as red
from kdkernels._dtypes import opmath_dtype
from kdkernels.distributed._collectives import agree, check_group, check_same_on_every_rank, replicated_input
from kdkernels.distributed.vocab_parallel import finish_rows, global_rows, vocab_parallel_softmax_kl_div
from kdkernels.ops._one_pass import graph_kept
from kdkernels.ops.response import DIVERGENCE_CODES
from kdkernels.ops.response_linear import auto_chunk_rows

WHERE = "vocab_parallel_fused_linear_softmax_kl_div"
_SAME_ON_EVERY_RANK = (("lead", "leading shape (rows)"), ("hidden", "hidden sizes (student, teacher)"),
                       ("dtype", "dtype"), ("options", "options"), ("given", "optional tensors given or not"))


def vocab_parallel_fused_linear_softmax_kl_div(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Optional[Tensor] = None,
    *,
    teacher_logits: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    group=None,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    reduction: str = "batchmean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    t2_scale: bool = True,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """``fused_linear_softmax_kl_div`` of an LM head whose vocabulary is sharded over the ranks of ``group``.

    Args:
        student_hidden: (..., H) the same hidden states on every rank; gets the full gradient on every
            rank (the ranks' contributions are all-reduced in the backward: do not reduce it again).
        student_weight: (V_r, H) this rank's contiguous rows of the head's weight (V_r >= 1 may differ
            between ranks; in rank order they make up the vocabulary); gets its slice of the gradient.
        student_bias: (V_r,) this rank's slice of the bias, or None (on every rank).
        teacher_logits: (..., V_r) this rank's slice of the teacher's logits, or None when the teacher
            is given as teacher_hidden (..., Ht) (the same on every rank) with teacher_weight (V_r, Ht)
            and teacher_bias (V_r,) or None, this rank's slices of its head. No gradient to the teacher.
        group: the torch.distributed process group (None: the default group). Every rank of it calls,
            with the same rows, options and labels (labels are not compared across ranks).
        temperature, divergence, beta, reduction, labels, ignore_index, t2_scale, chunk_size, backend:
            as ``kdkernels.functional.fused_linear_softmax_kl_div`` ("mean" divides by the whole
            vocabulary); chunk_size None: the one-process rule on the rows.

    Returns the loss of the whole vocabulary, the same on every rank. Bad input on any rank raises on
    every rank. Communication: O(rows) statistics per chunk in the forward, and the all-reduce of the
    hidden states' gradient (rows x H) in the backward; never logits.
    """
    check_group(WHERE, group)
    error, meta, args = None, {}, None
    try:
        args = _check_local(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
                            teacher_weight, teacher_bias, labels, chunk_size, temperature, divergence, beta,
                            reduction, ignore_index, t2_scale, backend)
        tensors, options, chunk_size, chosen = args
        hidden, weight, bias, z_t, h_t, w_t, b_t = tensors
        meta = {"lead": tuple(hidden.shape[:-1]), "dtype": str(hidden.dtype), "options": options + (chunk_size,),
                "hidden": (hidden.shape[-1], None if h_t is None else h_t.shape[-1]), "vocab": weight.shape[0],
                "given": tuple(x is not None for x in (bias, z_t, b_t, labels))}
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        error = e
    gathered = agree(WHERE, group, meta, error)
    check_same_on_every_rank(WHERE, gathered, _SAME_ON_EVERY_RANK, "inputs", "only the vocabulary is sharded")
    tensors, options, chunk_size, chosen = args
    temperature, divergence, beta, reduction, ignore_index, t2_scale = options
    hidden, weight, bias, z_t, h_t, w_t, b_t = tensors
    if chosen == "torch":  # the eager composition: (rows x V_r) logits, differentiable collectives
        student_logits = F.linear(replicated_input(hidden, group), weight, bias)
        teacher = z_t if z_t is not None else F.linear(h_t, w_t, b_t)
        return vocab_parallel_softmax_kl_div(student_logits, teacher, group=group, temperature=temperature,
                                             divergence=divergence, beta=beta, reduction=reduction, labels=labels,
                                             ignore_index=ignore_index, t2_scale=t2_scale, backend="torch")
    lead, width = tuple(hidden.shape[:-1]), hidden.shape[-1]
    flat = hidden.reshape(-1, width)
    rows = flat.shape[0]
    teacher = (None if z_t is None else z_t.reshape(rows, -1).contiguous(),
               None if h_t is None else h_t.reshape(rows, -1).contiguous(), w_t, b_t)
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    chunk = chunk_size if chunk_size is not None else auto_chunk_rows(rows, weight.shape[0], width)
    vocab = sum(m["vocab"] for m in gathered)
    inputs = (replicated_input(flat, group), weight, bias, teacher, flat_labels)
    options = (group, chosen, chunk, temperature, divergence, beta, ignore_index)
    if reduction == "none":
        row_losses = _VocabParallelLinear.apply(*inputs, None, *options)
        return finish_rows(row_losses, flat_labels, ignore_index, temperature, t2_scale, reduction, lead, vocab)
    scale = red.row_weight(reduction, flat_labels, ignore_index, rows, vocab,
                           flat.new_empty((), dtype=opmath_dtype(flat.dtype)))
    if t2_scale:
        scale = scale * (temperature * temperature)
    return _VocabParallelLinear.apply(*inputs, scale, *options)


def _check_local(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight,
                 teacher_bias, labels, chunk_size, temperature, divergence, beta, reduction, ignore_index, t2_scale,
                 backend):
    tensors, options, chunk_size = v.check_fused_linear_softmax_kl_inputs(
        student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
        labels, chunk_size, temperature, divergence, beta, reduction, ignore_index, t2_scale)
    chosen = backends.resolve("fused_linear_softmax_kl_div", backend, student_hidden.device)
    return tensors, options, chunk_size, chosen


def _chunk_logits(hidden, weight, bias, teacher, r0: int, r1: int) -> tuple[Tensor, Tensor]:
    """The chunk's (r1 - r0, V_r) slice logits of the student and the teacher (torch GEMMs, no graph)."""
    z_t, h_t, w_t, b_t = teacher
    z_s = F.linear(hidden[r0:r1], weight, bias)
    z_teacher = z_t[r0:r1] if z_t is not None else F.linear(h_t[r0:r1], w_t, b_t)
    return z_s.contiguous(), z_teacher.contiguous()


def _chunk_gradients(g, hidden, weight, r0, r1, grad_h, grad_w, grad_b) -> None:
    """Turn a chunk's logit gradient g (r1 - r0, V_r) into its rows of grad_h and add to grad_w, grad_b
    (each None where not wanted)."""
    g = g.to(hidden.dtype)
    if grad_h is not None:
        torch.mm(g, weight, out=grad_h[r0:r1])
    if grad_w is not None:
        grad_w += (g.t() @ hidden[r0:r1]).to(grad_w.dtype)
    if grad_b is not None:
        grad_b += g.sum(0, dtype=grad_b.dtype)


def _gradient_buffers(hidden, weight, bias, need_h, need_w, need_b):
    acc = torch.promote_types(weight.dtype, torch.float32)  # 16-bit heads accumulate in fp32
    return (torch.empty_like(hidden) if need_h else None,
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None,
            torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None)


class _VocabParallelLinear(torch.autograd.Function):
    """The sharded head's loss over the whole vocabulary, chunk by chunk; gradients to the local
    hidden-state contribution, the weight slice and the bias slice.

    row_scale None (reduction "none"): returns the unscaled per-row losses (R,); the backward
    recomputes each chunk's logits and scales its rows by the upstream gradient. row_scale a 0-d
    tensor (the reduction's factor times T^2): returns row_scale * sum of the kept rows' losses and,
    when a gradient is wanted, forms the gradients in the same chunk loop (upstream 1); the backward
    only scales them, as the one-process fused op does."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, labels, row_scale, group, backend, chunk, temperature, divergence,
                beta, ignore_index):
        rows = hidden.shape[0]
        code = DIVERGENCE_CODES[divergence]
        need = ctx.needs_input_grad[:3] if row_scale is not None else (False,) * 3
        grad_h, grad_w, grad_b = _gradient_buffers(hidden, weight, bias, *need)
        losses, stats = [], []
        with torch.no_grad():
            for r0 in range(0, rows, chunk):
                r1 = min(rows, r0 + chunk)
                z_s, z_t = _chunk_logits(hidden, weight, bias, teacher, r0, r1)
                lab = None if labels is None else labels[r0:r1]
                chunk_rows, chunk_stats = global_rows(z_s, z_t, lab, group, backend, temperature, divergence, beta,
                                                      ignore_index)
                losses.append(chunk_rows)
                stats.append(chunk_stats)
                if any(need):  # ignored rows get a zero gradient from the op
                    g, _ = ops.SOFTMAX_KL.backward_ops[backend](
                        row_scale.expand(r1 - r0).contiguous(), z_s, z_t, lab, chunk_stats, temperature, code, beta,
                        ignore_index, False, True, False)
                    _chunk_gradients(g, hidden, weight, r0, r1, grad_h, grad_w, grad_b)
                del z_s, z_t
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        row_losses = torch.cat(losses) if losses else hidden.new_zeros((0,), dtype=dtype)
        ctx.options = (backend, chunk, temperature, code, beta, ignore_index)
        if row_scale is None:
            ctx.save_for_backward(hidden, weight, bias, *teacher, labels)
            ctx.stats = stats
            return row_losses
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))
        if labels is not None:
            row_losses = torch.where(labels != ignore_index, row_losses, torch.zeros_like(row_losses))
        return row_losses.sum() * row_scale

    @staticmethod
    def backward(ctx, grad_out):
        nones = (None,) * 10
        if hasattr(ctx, "grads"):  # scalar reduction: the gradients are formed already, scale them
            if graph_kept():  # a later backward needs them as they are
                return tuple(None if x is None else x * grad_out.to(x.dtype) for x in ctx.grads) + nones
            return tuple(None if x is None else x.mul_(grad_out.to(x.dtype)) for x in ctx.grads) + nones
        hidden, weight, bias, z_t, h_t, w_t, b_t, labels = ctx.saved_tensors
        backend, chunk, temperature, code, beta, ignore_index = ctx.options
        need = ctx.needs_input_grad[:3]
        if not any(need):
            return (None,) * 3 + nones
        grad_h, grad_w, grad_b = _gradient_buffers(hidden, weight, bias, *need)
        with torch.no_grad():
            for i, r0 in enumerate(range(0, hidden.shape[0], chunk)):
                r1 = min(hidden.shape[0], r0 + chunk)
                z_s, z_teacher = _chunk_logits(hidden, weight, bias, (z_t, h_t, w_t, b_t), r0, r1)
                lab = None if labels is None else labels[r0:r1]
                stats = ctx.stats[i]
                # the rows are unscaled (T^2 and the reduction are applied outside): t2_scale=False
                g, _ = ops.SOFTMAX_KL.backward_ops[backend](
                    grad_out[r0:r1].to(stats.dtype).contiguous(), z_s, z_teacher, lab, stats, temperature, code,
                    beta, ignore_index, False, True, False)
                del z_s, z_teacher
                _chunk_gradients(g, hidden, weight, r0, r1, grad_h, grad_w, grad_b)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype)) + nones
