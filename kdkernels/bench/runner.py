"""The loop over cases and implementations: one progress line each, rows in candidate order.

Per case, in order:

1. ``plan``: which implementations run it; the others get their status right away.
2. CPU: the memory of each remaining implementation, each in a fresh process (``memory``). An
   OOM there marks the implementation "OOM" and its timing is skipped: the bench process never
   tries an allocation known to exhaust the machine.
3. The inputs are built once; each implementation is primed, timed and, on GPU, its memory
   measured (``measure``). Nothing stops the run.
   GEMM-bound losses also get their GEMM floor timed here (plain ``torch.mm`` of the same FLOPs).
4. ``rows``: ratios against the baselines of the same case (the eager composition, its
   ``torch.compile``, torchdistill, Liger), the copy and GEMM floors, the achieved bandwidth and (GPU,
   matmul-bound losses) the tensor-core fraction; issue targets.

Before each case a line says where the run is, with an ETA (``progress.Eta``).
"""
from __future__ import annotations

import gc
import os
import time
from typing import Callable

import torch

from kdkernels.backends import LOSSES
from kdkernels.bench import cases as C
from kdkernels.bench import floor as F
from kdkernels.bench import impls as I
from kdkernels.bench import memory as M
from kdkernels.bench import plan as P
from kdkernels.bench import rows as R
from kdkernels.bench.environment import environment, loadavg
from kdkernels.bench.measure import time_implementation
from kdkernels.bench.peers import NOTES as PEER_NOTES
from kdkernels.bench.progress import Eta, progress_line


class Runner:
    def __init__(self, preset: C.Preset, losses=None, impls=None, memory: bool | None = None,
                 log: Callable[[str], None] | None = None, on_case: Callable[[dict], None] | None = None):
        self.preset = preset
        self.device = torch.device(preset.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"preset {preset.name!r} needs a CUDA device and none is available")
        self.losses = list(losses) if losses else list(LOSSES)
        self.impls = list(impls) if impls else None
        if self.impls is not None:
            runnable = {n for loss in self.losses for n in I.candidates(loss, self.device)}
            if not runnable & set(self.impls):
                raise RuntimeError(f"none of the backends {','.join(self.impls)} runs on {self.device} "
                                   f"(preset {preset.name!r}); here: {','.join(sorted(runnable))}")
        self.memory = preset.memory if memory is None else memory
        self.log = log or (lambda s: print(s, flush=True))
        self.on_case = on_case  # called with the partial result after every case (to save it)
        self.rows: list[dict] = []
        self.bw: F.CopyBandwidth | None = None
        self.deadline = P.Deadline(preset.time_limit_s)
        self._log_order: list[dict] = []  # this case's rows, in the order their progress lines come out
        self.gemm_floors: dict[str, F.GemmFloor] = {}  # by case key
        self.meta: dict = {}

    # ------------------------------------------------------------------ top level
    def run(self) -> dict:
        self.deadline = P.Deadline(self.preset.time_limit_s)
        t0 = self.deadline.t0
        if self.preset.threads:
            torch.set_num_threads(self.preset.threads)  # the memory workers follow (memory.py)
        meta = self.meta = environment(self.preset, self.device)
        self.bw = F.copy_bandwidth(self.device, self.preset.copy_mib)
        meta["copy_bandwidth"] = self.bw.as_dict()
        meta["gemm_floors"] = {}
        self._log_start(meta)
        todo = self._cases()
        eta = Eta([P.case_cost(c, self.preset, self.device, self._names(c), self._measure_memory(c)) for c in todo],
                  self.preset.time_limit_s)
        for i, case in enumerate(todo, 1):
            start = time.perf_counter()
            self.log(eta.case_line(i, len(todo), start - t0, f"{case.group}: {case.loss} {case.label}"))
            if self.deadline.status():
                self.skip_case(case, self.deadline.status())
            else:
                self.run_case(case)
            eta.finished(i - 1, time.perf_counter() - start)
            if self.on_case is not None:
                meta["elapsed_s"] = time.perf_counter() - t0
                self.on_case({"meta": meta, "rows": self.rows})
        meta["elapsed_s"] = time.perf_counter() - t0
        meta["loadavg_end"] = loadavg()
        return {"meta": meta, "rows": self.rows}

    def _log_start(self, meta: dict) -> None:
        self.log(f"kdkernels bench: preset {self.preset.name} on {meta['device_name']} "
                 f"({meta['threads']} thread(s)); copy bandwidth {self.bw.bytes_per_s / 1e9:.1f} GB/s "
                 f"({self.preset.copy_mib} MiB buffer)")
        for k, v in I.api().errors.items():
            self.log(f"  note: {k} not importable ({v})")
        load = meta.get("loadavg_start")
        if load and load[0] > 0.5 * (os.cpu_count() or 1) and self.device.type == "cpu":
            self.log(f"  WARNING: load average {load[0]:.1f} on {os.cpu_count()} CPUs before the run: "
                     "other processes compete for the cores, CPU timings will be noisy")

    def _cases(self) -> list[C.Case]:
        """The preset's cases of the selected losses, each measurement once."""
        todo, seen = [], set()
        for case in self.preset.cases:
            if case.loss in self.losses and case.key() not in seen:
                seen.add(case.key())
                todo.append(case)
        return todo

    # ------------------------------------------------------------------ one case
    def _names(self, case: C.Case) -> list[str]:
        return P.implementations(case, self.preset, self.device, self.impls)

    def _case_rows(self, case: C.Case, meta_inputs: C.Inputs) -> dict:
        names = self._names(case)
        rows = {n: R.new_row(case, n, self.device, meta_inputs) for n in names}
        for n, row in rows.items():
            if (n, case.loss) in PEER_NOTES:
                row["note"] += PEER_NOTES[(n, case.loss)] + "; "
        self._log_order = list(rows.values())
        return rows

    def skip_case(self, case: C.Case, status: str) -> list[dict]:
        rows = self._case_rows(case, C.make_inputs(case, "meta"))
        for row in rows.values():
            self._finish(row, status)
        return list(rows.values())

    def run_case(self, case: C.Case) -> list[dict]:
        meta_inputs = C.make_inputs(case, "meta")
        rows = self._case_rows(case, meta_inputs)
        plan = []
        for name in rows:
            status = P.plan_status(case, name, preset=self.preset, device=self.device, deadline=self.deadline,
                                   case_rows=rows, done=self.rows, meta_inputs=meta_inputs,
                                   memory_measured=self._measure_memory(case))
            if status:
                self._finish(rows[name], status)
            else:
                plan.append(name)
        if self.device.type == "cpu" and self._measure_memory(case):
            plan = self._cpu_memory(case, plan, rows)
        if plan:
            self._time_all(case, plan, rows)
        ordered = list(rows.values())
        R.add_ratios(ordered)
        for r in R.check_targets(case, ordered):
            self.log(f"    targets {r['impl']}: {r['targets']}")
        # keep the table in candidate order (baselines first), whatever order they finished in
        ids = {id(r) for r in ordered}
        self.rows = [r for r in self.rows if id(r) not in ids] + ordered
        return ordered

    def _cpu_memory(self, case: C.Case, plan: list[str], rows: dict) -> list[str]:
        """Measure each planned implementation's CPU memory in a fresh process; return the plan
        without those that cannot run (OOM, not implemented, unavailable, timeout)."""
        p = self.preset
        for name in [n for n in plan if n not in p.memory_skip_impls]:
            mem = M.cpu_extra_subprocess(case, name, int(P.MEM_FRACTION * M.available_bytes(self.device)),
                                         p.worker_timeout_s)
            R.store_memory(rows[name], mem)
            if mem.status == "ok" and name == "compile" and mem.compile_s is not None:
                rows[name]["note"] += f"compile in worker {mem.compile_s:.1f} s; "
            if mem.status in ("OOM", "not implemented") or mem.status.startswith(("unavailable", "timeout")):
                plan = [n for n in plan if n != name]
                self._finish(rows[name], mem.status, mem.detail)
        return plan

    def _time_all(self, case: C.Case, plan: list[str], rows: dict) -> None:
        try:
            inputs = C.make_inputs(case, self.device)
        except Exception as e:  # noqa: BLE001
            for name in plan:
                self._finish(rows[name], "OOM" if I.is_oom(e) else f"error: {I.describe_error(e, 100)}",
                             "building inputs")
            return
        self._gemm_floor(case)
        cuda_memory = self.device.type == "cuda" and self._measure_memory(case)
        for name in plan:
            if self.deadline.status():
                self._finish(rows[name], self.deadline.status())
                continue
            status, detail = time_implementation(name, case, inputs, rows[name], self.preset, self.device,
                                                 cuda_memory and name not in self.preset.memory_skip_impls)
            self._finish(rows[name], status, detail)
        del inputs
        gc.collect()

    def _gemm_floor(self, case: C.Case) -> None:
        """Time the GEMM floor of a GEMM-bound case (once per case, in this run) unless it cannot fit."""
        spec = C.SPECS[case.loss]
        if spec.gemms is None or case.key() in self.gemm_floors:
            return
        shapes = spec.gemms(case)
        need = F.gemm_bytes(shapes, case.torch_dtype)
        label = f"{case.loss} {case.label}"
        if need > P.MEM_FRACTION * M.available_bytes(self.device):
            self.meta.setdefault("gemm_floors", {})[label] = {"status": f"skipped (would need ~{need / 2**30:.1f} GiB)"}
            return
        try:
            g = F.gemm_floor(shapes, case.torch_dtype, self.device, self.preset.gemm_budget_s)
        except Exception as e:  # noqa: BLE001 - reported, the case goes on
            self.meta.setdefault("gemm_floors", {})[label] = {"status": f"error: {I.describe_error(e, 100)}"}
            return
        self.gemm_floors[case.key()] = g
        self.meta.setdefault("gemm_floors", {})[label] = {"status": "ok", **g.as_dict()}

    def _measure_memory(self, case: C.Case) -> bool:
        lim = self.preset.memory_losses
        return self.memory and (lim is None or case.loss in lim)

    def _finish(self, row: dict, status: str, detail: str = "") -> None:
        """Give ``row`` its final status; derive its numbers and ratios; print the progress lines now due."""
        row["status"] = status
        if detail:
            row["note"] += detail + "; "
        if status == "ok":
            gemm = self.gemm_floors.get(C.Case(row["loss"], row["dims"], row["dtype"], row["options"]).key())
            R.add_derived_numbers(row, self.bw, self.device, gemm)
            R.add_ratios(R.same_case_rows(row, self.rows) + [row])
        self.rows.append(row)
        while self._log_order and self._log_order[0]["status"] != "pending":
            self.log(progress_line(self._log_order.pop(0)))


def run(preset: C.Preset, losses=None, impls=None, memory: bool | None = None, log=None, on_case=None) -> dict:
    return Runner(preset, losses, impls, memory, log, on_case).run()
