"""Which implementations run a case, and why each of the others does not (its status).

Before anything of a case runs, every implementation is checked in turn: has the preset's time
limit passed? Is it available here (else "unavailable (...)" / "excluded (...)")? Did it say "not
implemented" at another size of the same loss? Would it need more memory than the machine has free
(a coarse model, ``cases.LossSpec``)? Then "skipped (would need ~X GiB)". Would it take longer
than the preset allows (extrapolated from the largest smaller size of the same sweep already
measured, else from a work model)? Then "skipped (would take ~X s)".
"""
from __future__ import annotations

import time

import torch

from kdkernels.bench import cases as C
from kdkernels.bench import impls as I
from kdkernels.bench import memory as M

MEM_FRACTION = 0.8  # never plan to use more than this share of the memory that is free


class Deadline:
    """The preset's time limit, counted from construction."""

    def __init__(self, limit_s: float | None):
        self.limit_s = limit_s
        self.t0 = time.perf_counter()

    def status(self) -> str | None:
        """The status of whatever has not started once the limit has passed, else None."""
        if self.limit_s is not None and time.perf_counter() - self.t0 > self.limit_s:
            return f"skipped (time limit of {self.limit_s:.0f} s reached)"
        return None


def implementations(case: C.Case, preset: C.Preset, device: torch.device, selected: list[str] | None) -> list[str]:
    """The implementations that a case is reported for, in run order (baselines first)."""
    names = [n for n in I.candidates(case.loss, device) if selected is None or n in selected]
    if case.group == "scaling":
        names = [n for n in names if n not in preset.scaling_skip_impls]
    return names


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _same_sweep(a: dict, case: C.Case, scale_dim: str) -> bool:
    return (a["loss"] == case.loss and a["dtype"] == case.dtype and a["options"] == case.options
            and {k: v for k, v in a["dims"].items() if k != scale_dim}
            == {k: v for k, v in case.dims.items() if k != scale_dim})


def predict_step_s(case: C.Case, impl: str, done: list[dict], assumed_flops_per_s: float) -> tuple[float, str]:
    """Predicted seconds of one step, and how it was predicted."""
    spec = C.SPECS[case.loss]
    if spec.scale_dim:
        b = case.dims[spec.scale_dim]
        prior = [r for r in done if r["impl"] == impl and r["status"] == "ok" and r["step_ms"]
                 and _same_sweep(r, case, spec.scale_dim) and r["dims"][spec.scale_dim] < b]
        if prior:
            p = max(prior, key=lambda r: r["dims"][spec.scale_dim])
            b0 = p["dims"][spec.scale_dim]
            return p["step_ms"] / 1e3 * (b / b0) ** spec.scale_power, f"from {spec.scale_dim}={b0}"
    return spec.work(case) / assumed_flops_per_s, "from a work model"


def plan_status(case: C.Case, name: str, *, preset: C.Preset, device: torch.device, deadline: Deadline,
                case_rows: dict, done: list[dict], meta_inputs: C.Inputs, memory_measured: bool) -> str | None:
    """Why ``name`` does not run ``case`` (its final status), or None when it runs.

    ``case_rows``: this case's rows so far, by implementation; ``done``: every finished row of the
    run; ``memory_measured``: the case's CPU memory is measured too (two more steps)."""
    if deadline.status():
        return deadline.status()
    try:
        I.check_available(name, case, device)
    except I.Unavailable as e:
        return str(e)
    if any(r["impl"] == name and r["status"] == "not implemented" and r["loss"] == case.loss
           and r["dtype"] == case.dtype and r["options"] == case.options for r in done):
        return "not implemented"  # it said so at another size of the same loss: no need to ask again
    if name == "compile":
        if preset.compile_losses is not None and case.loss not in preset.compile_losses:
            return f"skipped (preset {preset.name} compiles {', '.join(preset.compile_losses)} only)"
        if case_rows.get("eager", {}).get("status") == "not implemented":
            return "not implemented"
    need = C.SPECS[case.loss].est_extra_bytes(case, I.KIND[name]) + meta_inputs.nbytes
    free = M.available_bytes(device)
    if need > MEM_FRACTION * free:
        return f"skipped (would need ~{_gib(need)}, {_gib(free)} free)"
    pred, how = predict_step_s(case, name, done, preset.assumed_flops_per_s)
    steps = max(1, preset.warmup) + preset.min_repeats + (2 if device.type == "cpu" and memory_measured else 0)
    if pred * steps > preset.max_case_s:
        return f"skipped (would take ~{pred * steps:.0f} s, {how})"
    return None


def case_cost(case: C.Case, preset: C.Preset, device: torch.device, names: list[str], memory: bool) -> float:
    """A-priori seconds of a case, for the ETA only (``progress.Eta`` calibrates it as the run goes)."""
    from kdkernels.bench.progress import COMPILE_S, IMPL_S, WORKER_S

    total = 0.0
    for name in names:
        try:
            I.check_available(name, case, device)
        except I.Unavailable:
            continue
        if name == "compile" and preset.compile_losses is not None and case.loss not in preset.compile_losses:
            continue
        pred, _how = predict_step_s(case, name, [], preset.assumed_flops_per_s)
        steps = max(1, preset.warmup) + preset.min_repeats
        total += IMPL_S + min(pred * steps, preset.max_case_s)
        if name == "compile":
            total += COMPILE_S
        if memory and device.type == "cpu" and name not in preset.memory_skip_impls:
            total += WORKER_S + min(2 * pred, preset.max_case_s) + (COMPILE_S if name == "compile" else 0.0)
    return total
