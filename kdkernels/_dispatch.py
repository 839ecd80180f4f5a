"""The one dispatcher: every loss of kdkernels.functional runs through ``run``.

``run`` resolves the backend (kdkernels.backends: "auto", ``KDKERNELS_BACKEND``, availability,
no silent fallback) and calls the loss's implementation for it: the eager reference for "torch",
the fused path (which calls the loss's ops, kdkernels.ops) for "cpu", "cuda" and "triton". Both
take the same validated arguments, so the reference is a backend like the others; both run
outside autocast (the functional layer has already promoted mixed dtypes).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from kdkernels import backends


def run(loss: str, backend: str, device: torch.device, reference: Callable, fused: Callable, *args):
    """``loss`` on ``backend`` for tensors on ``device``: ``reference(*args)`` for "torch",
    ``fused(chosen_backend, *args)`` for a fused backend."""
    chosen = backends.resolve(loss, backend, device)
    # Autocast would run the reference's matmuls (and any ATen op a fused path calls) in bf16 / fp16;
    # a loss is computed in op-math, as autocast's fp32 ops such as F.mse_loss are.
    with torch.autocast(device.type, enabled=False):
        if chosen == "torch":
            return reference(*args)
        return fused(chosen, *args)
