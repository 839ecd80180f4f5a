"""Helpers that register the same fake and autograd formulas on an op's C++ and Triton variants."""
from __future__ import annotations

from collections.abc import Callable

import torch


def register_fake_and_autograd(
    forward_qualname: str,
    forward_fake: Callable,
    backward_qualname: str,
    backward_fake: Callable,
    setup_context: Callable,
    backward: Callable,
) -> None:
    """Fake kernels for a forward/backward op pair and autograd for the forward op."""
    torch.library.register_fake(forward_qualname)(forward_fake)
    torch.library.register_fake(backward_qualname)(backward_fake)
    torch.library.register_autograd(forward_qualname, backward, setup_context=setup_context)
