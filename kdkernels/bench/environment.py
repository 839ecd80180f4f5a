"""The ``meta`` of a bench result: where, when and with what it ran."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch

from kdkernels.bench import cases as C
from kdkernels.bench import impls as I
from kdkernels.bench.memory import package_root
from kdkernels.bench.plan import MEM_FRACTION
from kdkernels.bench.rows import PEAK_FLOPS


def _git_commit() -> str | None:
    try:
        root = package_root()
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


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
        "torchdistill": a.torchdistill,
        "baselines": {k: v for k, v in I.LABELS.items()},
        "import_errors": a.errors,
        "peak_flops_assumed": PEAK_FLOPS if device.type == "cuda" else None,
        "mem_fraction": MEM_FRACTION,
        "loadavg_start": loadavg(),
    }
