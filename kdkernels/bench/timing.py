"""Forward, backward and full-step timers.

One timed iteration is ``loss = fn(inputs)`` (forward, autograd graph recorded, as in training)
followed by ``loss.backward()``; three marks around them give the forward, the backward and the full
step of the *same* iteration. Gradients are dropped (``grad = None``) before each iteration, outside
the timed region, as ``optimizer.zero_grad(set_to_none=True)`` would. Each phase's result is the
median over the repeats (the step's median is taken over step times, not added up from phases).

CPU: ``time.perf_counter``. GPU: ``torch.cuda.Event`` pairs on the current stream, with the device
synchronised before an iteration starts and after it ends (so no queued work leaks into the next).
The number of repeats adapts to the case: the first timed step sets it to fill ``budget_s``, between
``min_repeats`` and ``max_repeats`` -- and below ``min_repeats`` only for a step so slow that
``min_repeats`` of them would exceed ``cap_s`` (the reference at the largest CPU sizes).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kdkernels.bench.cases import Inputs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CpuClock:
    def __init__(self, device: torch.device):
        self.device = device

    def mark(self):
        return time.perf_counter()

    def finish(self) -> None:
        pass

    @staticmethod
    def ms(a, b) -> float:
        return (b - a) * 1e3


class _CudaClock:
    def __init__(self, device: torch.device):
        self.device = device

    def mark(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def finish(self) -> None:
        torch.cuda.synchronize(self.device)

    @staticmethod
    def ms(a, b) -> float:
        return a.elapsed_time(b)


def clock_for(device: torch.device):
    return _CudaClock(device) if device.type == "cuda" else _CpuClock(device)


@dataclass
class PhaseTimes:
    fwd_ms: float
    bwd_ms: float
    step_ms: float
    repeats: int
    step_min_ms: float
    step_max_ms: float
    samples: list = field(default_factory=list)  # (fwd, bwd, step) per repeat, ms


def one_step(fn: Callable[[Inputs], torch.Tensor], inputs: Inputs) -> None:
    """An untimed forward + backward (warm-up, compilation, memory measurement)."""
    inputs.zero_grad()
    loss = fn(inputs)
    loss.backward()
    del loss


def time_phases(
    fn: Callable[[Inputs], torch.Tensor],
    inputs: Inputs,
    device: torch.device,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 20,
    budget_s: float = 1.0,
    cap_s: float | None = None,
) -> PhaseTimes:
    """Median forward / backward / step times of ``fn`` on ``inputs`` after ``warmup`` untimed steps.

    ``cap_s``: when ``min_repeats`` steps would take longer than this, time only as many as fit
    (at least one); the result's ``repeats`` says how many were taken.
    """
    for _ in range(warmup):
        one_step(fn, inputs)
    synchronize(device)
    clock = clock_for(device)
    samples: list[tuple[float, float, float]] = []
    target = min_repeats
    while len(samples) < target:
        inputs.zero_grad()
        synchronize(device)
        m0 = clock.mark()
        loss = fn(inputs)
        m1 = clock.mark()
        loss.backward()
        m2 = clock.mark()
        clock.finish()
        del loss
        f, b, s = clock.ms(m0, m1), clock.ms(m1, m2), clock.ms(m0, m2)
        samples.append((f, b, s))
        if len(samples) == 1:
            fits = math.ceil(budget_s * 1e3 / max(s, 1e-6))
            target = max(min_repeats, min(max_repeats, fits))
            if cap_s is not None and s * min_repeats > cap_s * 1e3:
                target = max(1, min(min_repeats, math.floor(cap_s * 1e3 / s)))
    inputs.zero_grad()
    steps = [x[2] for x in samples]
    return PhaseTimes(
        fwd_ms=statistics.median(x[0] for x in samples),
        bwd_ms=statistics.median(x[1] for x in samples),
        step_ms=statistics.median(steps),
        repeats=len(samples),
        step_min_ms=min(steps),
        step_max_ms=max(steps),
        samples=samples,
    )
