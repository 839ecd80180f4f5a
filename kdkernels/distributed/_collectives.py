"""The collectives kdkernels.distributed uses, on torch.distributed only (any backend: gloo, NCCL).

* ``agree``: every rank's metadata (shapes, options, and the error its local checks raised, if
  any) gathered on every rank, so that bad input raises the *same* error on every rank instead of
  one rank raising while the others wait in a collective forever.
* ``check_same_on_every_rank``: what ``agree`` gathered must be the same on every rank (rows,
  dtypes, options...): one ValueError naming the key, raised on every rank alike.
* ``replicated_input``: the identity on a tensor every rank holds the same copy of (the hidden
  states entering a vocabulary-sharded LM head); its backward sums the ranks' gradients, so each
  rank's copy gets the full gradient (Megatron's "copy to the tensor-parallel region").
* ``all_reduce_replicated``: a sum that is the final, replicated result (the loss every rank
  returns). Its backward is the identity: each rank back-propagates the same upstream gradient, and
  each rank's input contributes once. (Summing the upstream gradients, as
  ``torch.distributed.nn.all_reduce`` does, would count a replicated loss world-size times.)
* ``all_reduce_shared``: a sum that every rank then uses in its *own* computation (a global
  normaliser each rank applies to its slice, before the slices' terms are summed). Its backward
  sums the upstream gradients over the ranks: d loss / d S collects every rank's use of S.
* ``all_gather_rows``: every rank's rows (uneven counts, 0 allowed) concatenated in group-rank
  order, for a loss every rank then computes, replicated, on the whole gathered batch. Its backward
  is this rank's slice of the upstream gradient, no communication: every rank back-propagates the
  same replicated loss, so its slice already is d loss / d (its rows), and each rank's rows
  contribute once (the identity-style backward of ``all_reduce_replicated``, for a gather).
  Each rank pads its rows to the largest count, so the all_gather has equal sizes (gloo, NCCL).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def check_group(where: str, group) -> int:
    """This rank's rank in ``group``; a clear error when there is no process group or the rank is
    not in it (both are the same on every rank that calls, so raising locally cannot hang)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{where} needs an initialised torch.distributed process group "
                           f"(torch.distributed.init_process_group), got none")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{where}: this rank (global rank {dist.get_rank()}) is not in `group`")
    return rank


def agree(where: str, group, meta: dict[str, Any], error: BaseException | None) -> list[dict[str, Any]]:
    """Every rank's ``meta`` (plus its local error message) on every rank; raises on every rank if any
    rank's local checks failed (the error's type is kept when all ranks agree on it)."""
    meta = dict(meta, error=None if error is None else (type(error).__name__, str(error)))
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, meta, group=group)
    failed = [(r, m["error"]) for r, m in enumerate(gathered) if m["error"] is not None]
    if failed:
        if error is not None:
            raise error
        rank, (kind, message) = failed[0]
        exc = {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)
        raise exc(f"{where}: rank {rank} of the group rejected its input: {message}")
    return gathered


def check_same_on_every_rank(where: str, gathered: list[dict[str, Any]], keys, what: str, why: str) -> None:
    """Raise (on every rank: each sees the same ``gathered``) unless every rank's ``gathered[r][key]``
    is the same, for each (key, description) of ``keys``; ``what`` names the tensors, ``why`` says
    what may differ."""
    first = gathered[0]
    for key, description in keys:
        values = [m[key] for m in gathered]
        if any(x != first[key] for x in values):
            raise ValueError(f"{where}: every rank must pass {what} with the same {description} ({why}), "
                             f"got {values} by rank")


class _ReplicatedInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def replicated_input(x: torch.Tensor, group) -> torch.Tensor:
    """x itself in the forward; the backward all-reduces (sums) the gradient over the ranks (see above)."""
    return _ReplicatedInput.apply(x, group)


class _AllReduceReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, op, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=op, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def all_reduce_replicated(x: torch.Tensor, group) -> torch.Tensor:
    """all_reduce(x, SUM) as a new tensor; differentiable with an identity backward (see above)."""
    return _AllReduceReplicated.apply(x, dist.ReduceOp.SUM, group)


class _AllReduceShared(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_shared(x: torch.Tensor, group) -> torch.Tensor:
    """all_reduce(x, SUM) as a new tensor; differentiable, its backward the all_reduce of the gradients."""
    return _AllReduceShared.apply(x, group)


def _gather_padded(x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """all_gather of (counts[rank], ...) rows padded to max(counts) (>= 1: no empty collective),
    the padding dropped: (sum(counts), ...) in group-rank order."""
    width = max(1, max(counts))
    padded = x.new_zeros((width,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int, group) -> torch.Tensor:
        ctx.lo, ctx.hi = sum(counts[:rank]), sum(counts[: rank + 1])
        return _gather_padded(x.detach(), counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.lo: ctx.hi], None, None, None


def all_gather_rows(x: torch.Tensor, counts: list[int], rank: int, group) -> torch.Tensor:
    """Every rank's (counts[r], ...) rows of ``x`` concatenated in group-rank order (the same
    trailing shape and dtype on every rank; ``counts`` every rank's row count, known to all, e.g.
    from ``agree``). Differentiable: the backward is this rank's slice of the gradient (see above).
    A tensor that does not require grad (a teacher) is gathered without an autograd node."""
    if x.requires_grad and torch.is_grad_enabled():
        return _AllGatherRows.apply(x, counts, rank, group)
    return _gather_padded(x.detach(), counts, group)
