"""The loop over cases and implementations: guards, measurements, ratios, one progress line each.

Per case, in order:

1. For every implementation: is it available here (else "unavailable (...)" / "excluded (...)")?
   Would it need more memory than the machine has free (a coarse model, ``cases.LossSpec``)? Then
   "skipped (would need ~X GiB)". Would it take longer than the preset allows (extrapolated from the
   largest smaller size of the same sweep already measured, else from a work model)? Then
   "skipped (would take ~X s)".
2. CPU: the memory of each remaining implementation, each in a fresh process (``memory``). An
   OOM there marks the implementation "OOM" and its timing is skipped: the bench process never
   tries an allocation known to exhaust the machine.
3. The inputs are built once; each implementation is primed (one untimed step; torch.compile
   compiles here), timed (``timing``) and, on GPU, its memory measured. ``NotImplementedError``
   gives "not implemented"; an allocation failure gives "OOM"; nothing stops the run.
4. Ratios against eager ("torch") and ``torch.compile`` of the same case, the copy floor, the
   achieved bandwidth and (GPU, matmul-bound losses) the tensor-core fraction.
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import subprocess
import sys
import time
from typing import Callable

import torch

from kdkernels.bench import cases as C
from kdkernels.bench import floor as F
from kdkernels.bench import impls as I
from kdkernels.bench import memory as M
from kdkernels.bench.timing import one_step, time_phases

# Dense tensor-core peak assumed for the tensor-core fraction (NVIDIA H200 / H100 SXM datasheet,
# without sparsity): bf16/fp16 989.4 TFLOP/s; fp32 inputs are counted against TF32 (494.7 TFLOP/s).
PEAK_FLOPS = {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12}
MEM_FRACTION = 0.8  # never plan to use more than this share of the memory that is free

ROW_FIELDS = [
    "group", "loss", "case", "dtype", "device", "impl", "status",
    "fwd_ms", "bwd_ms", "step_ms", "step_min_ms", "step_max_ms", "repeats", "compile_s",
    "vs_eager_fwd", "vs_eager_bwd", "vs_eager_step", "vs_compile_fwd", "vs_compile_bwd", "vs_compile_step",
    "vs_liger_step",
    "must_move_bytes", "floor_ms", "x_floor", "achieved_GBps", "floor_frac", "tflops", "tc_frac",
    "inputs_bytes", "grads_bytes", "mem_extra_bytes", "mem_ratio", "mem_status", "mem_method",
    "targets", "note", "dims", "options",
]


def _new_row(case: C.Case, impl: str, device: torch.device, meta_inputs: C.Inputs) -> dict:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(group=case.group, loss=case.loss, case=case.label, dtype=case.dtype, device=device.type,
               impl=impl, status="pending", dims=dict(case.dims), options=dict(case.options),
               inputs_bytes=meta_inputs.nbytes, grads_bytes=meta_inputs.grad_nbytes,
               must_move_bytes=F.must_move_bytes(meta_inputs), note="")
    return row


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


class Runner:
    def __init__(self, preset: C.Preset, losses=None, impls=None, memory: bool | None = None,
                 log: Callable[[str], None] | None = None, on_case: Callable[[dict], None] | None = None):
        self.preset = preset
        self.device = torch.device(preset.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"preset {preset.name!r} needs a CUDA device and none is available")
        self.losses = list(losses) if losses else list(C.LOSSES)
        self.impls = list(impls) if impls else None
        self.memory = preset.memory if memory is None else memory
        self.log = log or (lambda s: print(s, flush=True))
        self.rows: list[dict] = []
        self.bw: F.CopyBandwidth | None = None
        self._log_order: list[dict] = []
        self.on_case = on_case  # called with the partial result after every case (to save it)
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ top level
    def run(self) -> dict:
        t0 = time.perf_counter()
        if self.preset.threads:
            torch.set_num_threads(self.preset.threads)  # the memory workers follow (memory.py)
        meta = environment(self.preset, self.device)
        self.bw = F.copy_bandwidth(self.device, self.preset.copy_mib)
        meta["copy_bandwidth"] = self.bw.as_dict()
        self.log(f"kdkernels bench: preset {self.preset.name} on {meta['device_name']} "
                 f"({meta['threads']} thread(s)); copy bandwidth {self.bw.bytes_per_s / 1e9:.1f} GB/s "
                 f"({self.preset.copy_mib} MiB buffer)")
        for k, v in I.api().errors.items():
            self.log(f"  note: {k} not importable ({v})")
        load = meta.get("loadavg_start")
        if load and load[0] > 0.5 * (os.cpu_count() or 1) and self.device.type == "cpu":
            self.log(f"  WARNING: load average {load[0]:.1f} on {os.cpu_count()} CPUs before the run: "
                     "other processes compete for the cores, CPU timings will be noisy")
        todo, seen = [], set()
        for case in self.preset.cases:
            if case.loss not in self.losses or case.key() in seen:
                continue
            seen.add(case.key())
            todo.append(case)
        self._t0 = t0
        for i, case in enumerate(todo, 1):
            elapsed = time.perf_counter() - t0
            self.log(f"[{i}/{len(todo)} at {elapsed:.0f} s] {case.group}: {case.loss} {case.label}")
            if self._time_up():
                self.skip_case(case, self._time_up())
            else:
                self.run_case(case)
            if self.on_case is not None:
                meta["elapsed_s"] = time.perf_counter() - t0
                self.on_case({"meta": meta, "rows": self.rows})
        meta["elapsed_s"] = time.perf_counter() - t0
        meta["loadavg_end"] = _loadavg()
        return {"meta": meta, "rows": self.rows}

    # ------------------------------------------------------------------ one case
    def _case_rows(self, case: C.Case, meta_inputs: C.Inputs) -> dict:
        names = [n for n in I.candidates(case.loss, self.device) if self.impls is None or n in self.impls]
        if case.group == "scaling":
            names = [n for n in names if n not in self.preset.scaling_skip_impls]
        rows = {n: _new_row(case, n, self.device, meta_inputs) for n in names}
        self._log_order = list(rows.values())  # progress lines come out in this order
        return rows

    def skip_case(self, case: C.Case, status: str) -> list[dict]:
        rows = self._case_rows(case, C.make_inputs(case, "meta"))
        for row in rows.values():
            self._finish(row, status)
        return list(rows.values())

    def run_case(self, case: C.Case) -> list[dict]:
        p, dev = self.preset, self.device
        meta_inputs = C.make_inputs(case, "meta")
        rows = self._case_rows(case, meta_inputs)
        names = list(rows)
        plan = []
        for name in names:
            status = self._plan_status(case, name, rows, meta_inputs)
            if status:
                self._finish(rows[name], status)
            else:
                plan.append(name)
        if dev.type == "cpu" and self._measure_memory(case):
            for name in [n for n in plan if n not in p.memory_skip_impls]:
                mem = M.cpu_extra_subprocess(case, name, int(MEM_FRACTION * M.available_bytes(dev)),
                                             p.worker_timeout_s)
                self._store_mem(rows[name], mem)
                if mem.status == "ok" and name == "compile" and mem.compile_s is not None:
                    rows[name]["note"] += f"compile in worker {mem.compile_s:.1f} s; "
                if mem.status in ("OOM", "not implemented") or mem.status.startswith(("unavailable", "timeout")):
                    plan.remove(name)
                    self._finish(rows[name], mem.status, mem.detail)
        if plan:
            self._time_all(case, plan, rows)
        ordered = list(rows.values())
        self._ratios(ordered)
        self._targets(case, ordered)
        # keep the table in candidate order (baselines first), whatever order they finished in
        ids = {id(r) for r in ordered}
        self.rows = [r for r in self.rows if id(r) not in ids] + ordered
        return ordered

    def _time_up(self) -> str | None:
        """The status of whatever has not started once the preset's time limit has passed, else None."""
        limit = self.preset.time_limit_s
        if limit is not None and time.perf_counter() - self._t0 > limit:
            return f"skipped (time limit of {limit:.0f} s reached)"
        return None

    def _plan_status(self, case: C.Case, name: str, rows: dict, meta_inputs: C.Inputs) -> str | None:
        p, dev = self.preset, self.device
        if self._time_up():
            return self._time_up()
        try:
            I.check_available(name, case, dev)
        except I.Unavailable as e:
            return str(e)
        if any(r["impl"] == name and r["status"] == "not implemented" and r["loss"] == case.loss
               and r["dtype"] == case.dtype and r["options"] == case.options for r in self.rows):
            return "not implemented"  # it said so at another size of the same loss: no need to ask again
        if name == "compile":
            if p.compile_losses is not None and case.loss not in p.compile_losses:
                return f"skipped (preset {p.name} compiles {', '.join(p.compile_losses)} only)"
            if rows.get("torch", {}).get("status") == "not implemented":
                return "not implemented"
        need = C.SPECS[case.loss].est_extra_bytes(case, I.KIND[name]) + meta_inputs.nbytes
        free = M.available_bytes(dev)
        if need > MEM_FRACTION * free:
            return f"skipped (would need ~{_gib(need)}, {_gib(free)} free)"
        pred, how = predict_step_s(case, name, self.rows, p.assumed_flops_per_s)
        steps = max(1, p.warmup) + p.min_repeats + (2 if dev.type == "cpu" and self._measure_memory(case) else 0)
        if pred * steps > p.max_case_s:
            return f"skipped (would take ~{pred * steps:.0f} s, {how})"
        return None

    def _time_all(self, case: C.Case, plan: list[str], rows: dict) -> None:
        p, dev = self.preset, self.device
        try:
            inputs = C.make_inputs(case, dev)
        except Exception as e:  # noqa: BLE001
            for name in plan:
                self._finish(rows[name], "OOM" if I.is_oom(e) else f"error: {I.describe_error(e, 100)}",
                             "building inputs")
            return
        for name in plan:
            row = rows[name]
            if self._time_up():
                self._finish(row, self._time_up())
                continue
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
                warmup = p.warmup if name == "compile" else max(0, p.warmup - 1)
                t = time_phases(fn, inputs, dev, warmup, p.min_repeats, p.max_repeats, p.budget_s,
                                cap_s=p.max_case_s / 2)
                if t.repeats < p.min_repeats:
                    row["note"] += f"slow step: {t.repeats} timed repeat(s) only; "
                row.update(fwd_ms=t.fwd_ms, bwd_ms=t.bwd_ms, step_ms=t.step_ms, step_min_ms=t.step_min_ms,
                           step_max_ms=t.step_max_ms, repeats=t.repeats)
                if dev.type == "cuda" and self._measure_memory(case) and name not in p.memory_skip_impls:
                    stage = "memory"
                    self._store_mem(row, M.cuda_extra(fn, inputs, dev))
                self._finish(row, "ok")
            except Exception as e:  # noqa: BLE001 - every failure is a reported status
                if I.is_not_implemented(e):
                    status = "not implemented"
                elif I.is_oom(e):
                    status = "OOM"
                elif name == "compile" and stage == "first step":
                    status = "unavailable (compile failed)"
                else:
                    status = f"error: {I.describe_error(e, 100)}"
                self._finish(row, status, f"{stage}: {I.describe_error(e)}" if status != "not implemented" else "")
            finally:
                inputs.zero_grad()
                del fn
                if name == "compile":
                    torch._dynamo.reset()
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        del inputs
        gc.collect()

    def _measure_memory(self, case: C.Case) -> bool:
        lim = self.preset.memory_losses
        return self.memory and (lim is None or case.loss in lim)

    # ------------------------------------------------------------------ derived numbers
    def _store_mem(self, row: dict, mem: M.MemResult) -> None:
        row["mem_status"] = mem.status
        row["mem_method"] = mem.method
        if mem.status == "ok" and mem.extra_bytes is not None:
            row["mem_extra_bytes"] = mem.extra_bytes
            row["mem_ratio"] = (row["inputs_bytes"] + mem.extra_bytes) / max(1, row["inputs_bytes"] + row["grads_bytes"])
        elif mem.detail:
            row["note"] += f"memory: {mem.detail}; "

    def _finish(self, row: dict, status: str, detail: str = "") -> None:
        row["status"] = status
        if detail:
            row["note"] += detail + "; "
        if status == "ok":
            self._per_row_numbers(row)
            eager = next((r for r in self.rows if r["loss"] == row["loss"] and r["case"] == row["case"]
                          and r["group"] == row["group"] and r["impl"] == "torch"), None)
            self._ratios([r for r in (eager, row) if r is not None] + [
                r for r in self.rows if r["impl"] == "compile" and r["case"] == row["case"] and r["loss"] == row["loss"]
                and r["group"] == row["group"]])
        self.rows.append(row)
        while self._log_order and self._log_order[0]["status"] != "pending":
            self.log(progress_line(self._log_order.pop(0)))

    def _per_row_numbers(self, row: dict) -> None:
        step_s = row["step_ms"] / 1e3
        row["floor_ms"] = F.floor_ms(row["must_move_bytes"], self.bw)
        row["x_floor"] = row["step_ms"] / row["floor_ms"]
        row["floor_frac"] = row["floor_ms"] / row["step_ms"]
        row["achieved_GBps"] = row["must_move_bytes"] / step_s / 1e9
        case = C.Case(row["loss"], row["dims"], row["dtype"], row["options"])
        flops = C.SPECS[row["loss"]].flops(case)
        if flops:
            row["tflops"] = flops["step"] / step_s / 1e12
            if self.device.type == "cuda":
                row["tc_frac"] = flops["step"] / step_s / PEAK_FLOPS.get(row["dtype"], PEAK_FLOPS["float32"])

    @staticmethod
    def _ratios(rows: list[dict]) -> None:
        base = {r["impl"]: r for r in rows if r["status"] == "ok"}
        for r in rows:
            if r["status"] != "ok":
                continue
            for ref, prefix in (("torch", "vs_eager"), ("compile", "vs_compile")):
                if ref in base:
                    for ph in ("fwd", "bwd", "step"):
                        r[f"{prefix}_{ph}"] = base[ref][f"{ph}_ms"] / r[f"{ph}_ms"]
            if "liger" in base:
                r["vs_liger_step"] = base["liger"]["step_ms"] / r["step_ms"]

    def _targets(self, case: C.Case, rows: list[dict]) -> None:
        if not case.targets:
            return
        for r in rows:
            if r["impl"] not in I.KERNELS or r["status"] != "ok":
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
            self.log(f"    targets {r['impl']}: {r['targets']}")


# ---------------------------------------------------------------------- progress and environment
def _fmt_ms(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def progress_line(r: dict) -> str:
    head = f"  {r['impl']:<8} "
    if r["status"] != "ok":
        return head + r["status"]
    parts = [f"fwd {_fmt_ms(r['fwd_ms'])} ms  bwd {_fmt_ms(r['bwd_ms'])} ms  step {_fmt_ms(r['step_ms'])} ms "
             f"(median of {r['repeats']})"]
    if r["vs_eager_step"] is not None and r["impl"] != "torch":
        parts.append(f"x{r['vs_eager_step']:.2f} eager")
    if r["vs_compile_step"] is not None and r["impl"] not in ("torch", "compile"):
        parts.append(f"x{r['vs_compile_step']:.2f} compile")
    parts.append(f"{r['x_floor']:.2f}x floor")
    if r["tc_frac"] is not None:
        parts.append(f"TC {100 * r['tc_frac']:.1f}%")
    if r["mem_extra_bytes"] is not None:
        parts.append(f"mem +{_fmt_bytes(r['mem_extra_bytes'])} (ratio {r['mem_ratio']:.2f})")
    if r["compile_s"] is not None:
        parts.append(f"compiled in {r['compile_s']:.1f} s")
    return head + " | ".join(parts)


def _git_commit() -> str | None:
    try:
        root = M._package_root()
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(preset: C.Preset, device: torch.device) -> dict:
    a = I.api()
    p = {k: v for k, v in vars(preset).items() if k != "cases"}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "preset": p,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "kdkernels_commit": _git_commit(),
        "liger_kernel": a.liger["version"] if a.liger else None,
        "import_errors": a.errors,
        "peak_flops_assumed": PEAK_FLOPS if device.type == "cuda" else None,
        "mem_fraction": MEM_FRACTION,
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(preset: C.Preset, losses=None, impls=None, memory: bool | None = None, log=None, on_case=None) -> dict:
    return Runner(preset, losses, impls, memory, log, on_case).run()
