"""Inputs of the response losses (softmax-KL / JSD): (student logits, teacher logits, labels or None)."""
from __future__ import annotations

import math

import torch

MASKS = ("none", "shared", "one-sided")
LABELS = ("none", "some", "all")
IGNORE_INDEX = -100


def softmax_kl_inputs(source, shape: tuple, *, scale: float = 1.0, offset: float = 0.0, mask: str = "none",
                      divergence: str = "forward", labels: str = "none",
                      teacher_requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Student and teacher logits of ``shape`` (rows..., vocab): ``scale`` times standard normal plus
    ``offset`` (large-magnitude rows that are not one-hot). The student requires grad.

    ``mask``: "shared" sets about 30 % of the logits to -inf in both, "one-sided" in one only -- the
    side that keeps the ``divergence`` finite (the student for "reverse", else the teacher); the
    first logit of every row stays finite. ``labels``: "some" ignores about 40 % of the rows
    (``IGNORE_INDEX``), "all" every row; "none" gives no labels.
    """
    vocab, lead = shape[-1], tuple(shape[:-1])
    s = source.normal(shape, scale)
    t = source.normal(shape, scale)
    if offset != 0.0:
        s, t = s + offset, t + offset
    if mask != "none" and vocab > 1:
        masked = source.uniform(shape) < 0.3
        masked[..., 0] = False
        if mask == "shared":
            s, t = s.masked_fill(masked, -math.inf), t.masked_fill(masked, -math.inf)
        elif divergence == "reverse":  # p = 0 where q > 0 keeps KL(p||q) finite
            s = s.masked_fill(masked, -math.inf)
        else:  # q = 0 where p > 0 keeps KL(q||p) and the JSD finite
            t = t.masked_fill(masked, -math.inf)
    targets = None
    if labels != "none":
        targets = source.integers(max(vocab, 2), lead)
        drop = source.uniform(lead) < (0.4 if labels == "some" else 2.0)
        targets = source.finish_index(targets.masked_fill(drop, IGNORE_INDEX))
    return source.finish(s, True), source.finish(t, teacher_requires_grad), targets
