"""The rows of a bench result: their fields, how one starts, and the numbers derived from its measurements.

A row is one (case, implementation). It starts "pending" with the sizes known before anything runs
(``new_row``); the measurements fill it; ``add_derived_numbers`` adds the floors (copy; GEMM for the
GEMM-bound losses), bandwidth and FLOP rates of an "ok" row; ``add_ratios`` compares the rows of one
case with their baselines: ``vs_<baseline>_<phase> = time(baseline) / time(row)`` for the baselines
of ``impls.RATIO_BASELINES`` (the eager composition, its ``torch.compile``, torchdistill, Liger);
``check_targets`` marks a case's issue targets PASS / FAIL.
"""
from __future__ import annotations

import torch

from kdkernels.bench import cases as C
from kdkernels.bench import floor as F
from kdkernels.bench.impls import KERNELS, RATIO_BASELINES
from kdkernels.bench.memory import MemResult

# Dense tensor-core peak assumed for the tensor-core fraction (NVIDIA H200 / H100 SXM datasheet,
# without sparsity): bf16/fp16 989.4 TFLOP/s; fp32 inputs are counted against TF32 (494.7 TFLOP/s).
PEAK_FLOPS = {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12}

RATIO_FIELDS = [f"vs_{b}_{ph}" for b, phases in RATIO_BASELINES.items() for ph in phases]

ROW_FIELDS = [
    "group", "loss", "case", "dtype", "device", "impl", "status",
    "fwd_ms", "bwd_ms", "step_ms", "step_min_ms", "step_max_ms", "repeats", "compile_s",
    *RATIO_FIELDS,
    "must_move_bytes", "copy_floor_ms", "x_copy_floor", "achieved_GBps", "copy_floor_frac",
    "gemm_floor_ms", "x_gemm_floor", "tflops", "tc_frac",
    "inputs_bytes", "grads_bytes", "mem_extra_bytes", "mem_ratio", "mem_beyond_grads_x_eager", "mem_status", "mem_method",
    "targets", "note", "dims", "options",
]


def new_row(case: C.Case, impl: str, device: torch.device, meta_inputs: C.Inputs) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(group=case.group, loss=case.loss, case=case.label, dtype=case.dtype, device=device.type,
               impl=impl, status="pending", dims=dict(case.dims), options=dict(case.options),
               inputs_bytes=meta_inputs.nbytes, grads_bytes=meta_inputs.grad_nbytes,
               must_move_bytes=F.must_move_bytes(meta_inputs), note="")
    return row


def store_memory(row: dict, mem: MemResult) -> None:
    row["mem_status"] = mem.status
    row["mem_method"] = mem.method
    if mem.status == "ok" and mem.extra_bytes is not None:
        row["mem_extra_bytes"] = mem.extra_bytes
        row["mem_ratio"] = (row["inputs_bytes"] + mem.extra_bytes) / max(1, row["inputs_bytes"] + row["grads_bytes"])
    elif mem.detail:
        row["note"] += f"memory: {mem.detail}; "


def add_derived_numbers(row: dict, bw: F.CopyBandwidth, device: torch.device,
                        gemm: F.GemmFloor | None = None) -> None:
    """Copy floor, achieved bandwidth, GEMM floor, TFLOP/s and (GPU) tensor-core fraction of an "ok" row."""
    step_s = row["step_ms"] / 1e3
    row["copy_floor_ms"] = F.floor_ms(row["must_move_bytes"], bw)
    row["x_copy_floor"] = row["step_ms"] / row["copy_floor_ms"]
    row["copy_floor_frac"] = row["copy_floor_ms"] / row["step_ms"]
    row["achieved_GBps"] = row["must_move_bytes"] / step_s / 1e9
    if gemm is not None:
        row["gemm_floor_ms"] = gemm.ms
        row["x_gemm_floor"] = row["step_ms"] / gemm.ms
    case = C.Case(row["loss"], row["dims"], row["dtype"], row["options"])
    flops = C.SPECS[row["loss"]].flops(case)
    if flops:
        row["tflops"] = flops["step"] / step_s / 1e12
        if device.type == "cuda":
            row["tc_frac"] = flops["step"] / step_s / PEAK_FLOPS.get(row["dtype"], PEAK_FLOPS["float32"])


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups of every "ok" row over the "ok" baseline rows among ``rows`` (one case):
    ``vs_<baseline>_<phase> = time(baseline) / time(row)``."""
    base = {r["impl"]: r for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        for ref, phases in RATIO_BASELINES.items():
            if ref in base and ref != r["impl"]:  # a baseline has no ratio to itself
                for ph in phases:
                    r[f"vs_{ref}_{ph}"] = base[ref][f"{ph}_ms"] / r[f"{ph}_ms"]
    # memory beyond the gradients a step must produce, as a fraction of the eager composition's
    eager = base.get("eager")
    if eager is not None and eager.get("mem_extra_bytes") is not None:
        eager_beyond = eager["mem_extra_bytes"] - eager["grads_bytes"]
        for r in rows:
            if r is not eager and r.get("mem_extra_bytes") is not None and eager_beyond > 0:
                r["mem_beyond_grads_x_eager"] = max(0, r["mem_extra_bytes"] - r["grads_bytes"]) / eager_beyond


def same_case_rows(row: dict, rows: list[dict], impl: str | None = None) -> list[dict]:
    """The rows (of ``impl``, or of every implementation) among ``rows`` that measured the same case as ``row``."""
    return [r for r in rows if (impl is None or r["impl"] == impl) and r is not row and r["loss"] == row["loss"]
            and r["case"] == row["case"] and r["group"] == row["group"]]


def check_targets(case: C.Case, rows: list[dict]) -> list[dict]:
    """Fill ``targets`` ("key value >= goal PASS", ...) of the case's "ok" kdkernels rows; return those rows."""
    if not case.targets:
        return []
    checked = []
    for r in rows:
        if r["impl"] not in KERNELS or r["status"] != "ok":
            continue
        parts = []
        for key, goal in case.targets.items():
            val = r.get(key)
            higher_is_better = key.startswith("vs_")
            if val is None:
                parts.append(f"{key}: n/a")
                continue
            ok = val >= goal if higher_is_better else val <= goal
            parts.append(f"{key} {val:.2f} {'>=' if higher_is_better else '<='} {goal:g} {'PASS' if ok else 'FAIL'}")
        r["targets"] = "; ".join(parts)
        checked.append(r)
    return checked
