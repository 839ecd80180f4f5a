"""Inputs of the relation losses (RKD distance / angle, their sum, similarity-preserving): (student, teacher)."""
from __future__ import annotations

import torch

# "random": independent rows. The others place rows where the kernels take special paths:
# "duplicates" repeats rows (zero distances), "near" puts rows 1e-3 of the scale apart (the Gram
# expansion cancels there, yet gradients flow), "teacher_identical" / "all_identical" collapse one
# or both sides to a single point.
PATTERNS = ("random", "duplicates", "near", "teacher_identical", "all_identical")


def relation_inputs(source, batch: int, ds: int, dt: int, spatial: tuple = (), *, scale: float = 1.0,
                    offset: float = 0.0, pattern: str = "random",
                    teacher_requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Student ``(batch, ds, *spatial)`` (requires grad) and teacher ``(batch, dt, *spatial)``,
    ``scale`` times standard normal plus ``offset`` (shared by every row), arranged by ``pattern``.
    ``teacher_requires_grad``: the tests check that the teacher still gets no gradient."""
    s = source.normal((batch, ds) + spatial, scale)
    t = source.normal((batch, dt) + spatial, scale)
    if offset != 0.0:
        s, t = s + offset, t + offset
    if pattern == "duplicates":  # some repeated rows on both sides (not the same ones)
        s[1] = s[0]
        s[-1] = s[0]
        t[2 % batch] = t[batch - 2]
    elif pattern == "near":
        s[1] = s[0] + 1e-3 * scale * source.normal(s[0].shape)
        s[-1] = s[0] + 1e-3 * scale * source.normal(s[0].shape)
        t[2 % batch] = t[batch - 2] + 1e-3 * scale * source.normal(t[0].shape)
    elif pattern == "teacher_identical":
        t[:] = t[0]
    elif pattern == "all_identical":
        s[:] = s[0]
        t[:] = t[0]
    elif pattern != "random":
        raise ValueError(f"unknown pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
    return source.finish(s, True), source.finish(t, teacher_requires_grad)


def fsp_inputs(source, batch: int, c1: int, c2: int, student_spatial: tuple, teacher_spatial: tuple, *,
               scale: float = 1.0, student_requires_grad: bool = True,
               teacher_requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FSP's four maps: the student's pair ``(batch, c1, *student_spatial)``, ``(batch, c2,
    *student_spatial)`` (both require grad unless ``student_requires_grad`` is False) and the
    teacher's ``(batch, c1, *teacher_spatial)``, ``(batch, c2, *teacher_spatial)``; ``scale`` times
    standard normal."""
    maps = [source.normal((batch, c) + tuple(sp), scale)
            for c, sp in ((c1, student_spatial), (c2, student_spatial), (c1, teacher_spatial), (c2, teacher_spatial))]
    grads = (student_requires_grad, student_requires_grad, teacher_requires_grad, teacher_requires_grad)
    return tuple(source.finish(m, g) for m, g in zip(maps, grads))
