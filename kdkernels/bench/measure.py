"""One implementation on one case's inputs: primed, timed and (GPU) its memory measured, into its row.

The first step is untimed (``torch.compile`` compiles there; its time is the compile time) and
counts as the first warm-up step of the others. ``NotImplementedError`` gives "not implemented"; an
allocation failure "OOM"; a failing first step of ``torch.compile`` "unavailable (compile
failed)"; anything else "error: ...". Nothing raises: every failure is a reported status.
"""
from __future__ import annotations

import gc
import time

import torch

from kdkernels.bench import cases as C
from kdkernels.bench import impls as I
from kdkernels.bench import memory as M
from kdkernels.bench.rows import store_memory
from kdkernels.bench.timing import one_step, time_phases


def _failure_status(name: str, stage: str, exc: BaseException) -> str:
    if I.is_not_implemented(exc):
        return "not implemented"
    if I.is_oom(exc):
        return "OOM"
    if name == "compile" and stage == "first step":
        return "unavailable (compile failed)"
    return f"error: {I.describe_error(exc, 100)}"


def time_implementation(name: str, case: C.Case, inputs: C.Inputs, row: dict, preset: C.Preset,
                        device: torch.device, cuda_memory: bool) -> tuple[str, str]:
    """Fill ``row`` with the timings of ``name`` (and with ``cuda_memory``, its GPU memory); return
    the row's (status, detail)."""
    fn = None
    stage = "first step"
    try:
        fn = I.make_callable(name, case)
        t0 = time.perf_counter()
        one_step(fn, inputs)
        if name == "compile":
            row["compile_s"] = time.perf_counter() - t0
        stage = "timing"
        # the first step above is the first warm-up step, except for torch.compile (it compiled)
        warmup = preset.warmup if name == "compile" else max(0, preset.warmup - 1)
        t = time_phases(fn, inputs, device, warmup, preset.min_repeats, preset.max_repeats, preset.budget_s,
                        cap_s=preset.max_case_s / 2)
        if t.repeats < preset.min_repeats:
            row["note"] += f"slow step: {t.repeats} timed repeat(s) only; "
        row.update(fwd_ms=t.fwd_ms, bwd_ms=t.bwd_ms, step_ms=t.step_ms, step_min_ms=t.step_min_ms,
                   step_max_ms=t.step_max_ms, repeats=t.repeats)
        if cuda_memory:
            stage = "memory"
            store_memory(row, M.cuda_extra(fn, inputs, device))
        return "ok", ""
    except Exception as e:  # noqa: BLE001 - every failure is a reported status
        status = _failure_status(name, stage, e)
        return status, (f"{stage}: {I.describe_error(e)}" if status != "not implemented" else "")
    finally:
        inputs.zero_grad()
        del fn
        if name == "compile":
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
