"""Extra memory of one full step (forward + backward), above the inputs.

* GPU: in the bench process, after the timing: ``torch.cuda.reset_peak_memory_stats``, then
  ``extra = max_memory_allocated() - memory_allocated()`` around one step (the inputs, and anything
  else already allocated, are in the starting value). The gradients are part of the extra.
* CPU: the peak resident set of a FRESH process per (case, implementation) -- ``python -m
  kdkernels.bench._rss_worker`` -- so nothing the bench process allocated before, and no heap the
  allocator kept from an earlier case, is counted. The worker builds the inputs, runs one untimed
  step (warm-up; for ``torch.compile`` also the compilation), resets the kernel's peak-RSS mark
  (``/proc/self/clear_refs``), reads the RSS, runs one step and reads the peak (``VmHWM``):
  ``extra = peak - RSS before the step``. glibc is told (``MALLOC_MMAP_THRESHOLD_``) to hand large
  freed blocks back to the system, so the warm-up step's freed memory is not silently reused.
  The worker also caps its address space (``RLIMIT_AS``) at the memory the machine has free, so a
  case that would exhaust the machine fails with an allocation error ("OOM") instead of swapping
  or waking the OOM killer; it runs before the timing of the same case, which is skipped on OOM.

``mem_ratio`` in the report is ``(inputs + extra) / (inputs + gradients)``: 1.00 means the step
needed nothing beyond its inputs and the gradients it must produce.
"""
from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

from kdkernels.bench.cases import Case, Inputs
from kdkernels.bench.timing import one_step

RESULT_TAG = "KDKBENCH_RESULT "
WORKER_MODULE = "kdkernels.bench._rss_worker"


@dataclass
class MemResult:
    status: str  # "ok", "OOM", "not implemented", "unavailable (...)", "timeout", "error: ..."
    extra_bytes: int | None = None
    baseline_bytes: int | None = None
    peak_bytes: int | None = None
    method: str = ""
    compile_s: float | None = None
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def available_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on ``device`` (free GPU memory, or the OS's available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is in the "bench" extra; /proc/meminfo does the same on Linux
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        raise


def cuda_extra(fn, inputs: Inputs, device: torch.device) -> MemResult:
    inputs.zero_grad()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    one_step(fn, inputs)  # the gradients it leaves are part of the step's memory
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    inputs.zero_grad()
    return MemResult("ok", peak - base, base, peak, "cuda max_memory_allocated - memory_allocated before the step")


def package_root() -> str:
    """The directory that holds the kdkernels package (on the workers' PYTHONPATH; the git checkout)."""
    import kdkernels

    return os.path.dirname(os.path.dirname(os.path.abspath(kdkernels.__file__)))


def worker_env() -> dict:
    env = dict(os.environ)
    # a fixed mmap threshold turns off glibc's dynamic threshold: big freed blocks go back to the OS
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    root = package_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def cpu_extra_subprocess(case: Case, impl: str, limit_bytes: int, timeout_s: float = 600.0) -> MemResult:
    """Run one step of ``impl`` on ``case`` in a fresh process and return its peak RSS above the inputs."""
    spec = json.dumps({"case": case.to_dict(), "impl": impl, "limit_bytes": int(limit_bytes),
                       "threads": torch.get_num_threads()})
    proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=worker_env(), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and its compile workers
        proc.communicate()
        return MemResult("timeout", detail=f"worker took more than {timeout_s:.0f} s")
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            return MemResult(**json.loads(line[len(RESULT_TAG):]))
    if proc.returncode in (-signal.SIGKILL, 137):
        return MemResult("OOM", detail="worker killed (SIGKILL), most likely out of memory")
    tail = " ".join((err or out).strip().splitlines()[-3:])[-300:]
    return MemResult(f"error: worker exit {proc.returncode}", detail=tail)
