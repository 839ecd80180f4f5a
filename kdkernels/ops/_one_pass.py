"""The autograd half of every one-pass op (softmax_kl_step, softmax_kl_topk, fused_linear_softmax_kl,
attention_transfer, fsp).

A one-pass forward returns (loss, gradient of input 0, gradient of input 1, ...) for an upstream of
1; the gradients are saved state, not results to differentiate, and the backward op only scales
them (docs/decisions.md, "One-pass step"): in place on their last use (nothing at all where the
upstream is exactly 1), as copies when the graph is kept for a later backward.
"""
from __future__ import annotations

import torch

# The autograd engine's flag for retain_graph / create_graph: whether the graph (so the saved
# gradients) may be used again after this backward. Outside a backward it says True.
graph_kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)


def setup_context(ctx, inputs, output):
    grads = output[1:]
    ctx.mark_non_differentiable(*grads)
    # no zero-filled upstream "gradients" of the gradient outputs: autograd would allocate one of
    # their size for each, in every backward
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*grads)


def _scaled_copy(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad times the upstream: 0-d, or one factor per row / sample along dim 0."""
    if grad.numel() == 0:
        return grad
    factor = grad_loss if grad_loss.dim() == 0 else grad_loss.view(-1, *([1] * (grad.dim() - 1)))
    return (grad * factor).to(grad.dtype)


def backward(backward_op, ctx, grad_loss, *_grad_grads):
    """The saved gradients, scaled by ``grad_loss``, for the op's first inputs; None for the rest."""
    n_inputs = len(ctx.needs_input_grad)
    if grad_loss is None:  # the loss took no part in what is being differentiated
        return (None,) * n_inputs
    grads = ctx.saved_tensors
    if graph_kept():  # a later backward (retain_graph, gradcheck) needs them as they are: scale copies
        grads = tuple(_scaled_copy(g, grad_loss) for g in grads)
    else:  # their last use: in place, nothing to do where the upstream is exactly 1
        backward_op(grad_loss.contiguous(), *grads)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + \
        (None,) * (n_inputs - len(grads))
