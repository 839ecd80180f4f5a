"""A fresh process that measures the CPU memory of one step: ``python -m kdkernels.bench._rss_worker JSON``.

JSON: ``{"case": Case.to_dict(), "impl": name, "limit_bytes": int, "threads": int}``. Prints one line
``KDKBENCH_RESULT {MemResult fields}`` on stdout. See :mod:`kdkernels.bench.memory` for the method.
"""
from __future__ import annotations

import gc
import json
import resource
import sys
import time

from kdkernels.bench.rss import PeakPoller, peak_bytes, reset_peak, rss_bytes, virtual_bytes

RESULT_TAG = "KDKBENCH_RESULT "  # same as memory.RESULT_TAG (not imported: keep the worker's imports lean)


def _limit_address_space(limit_bytes: int) -> None:
    """Cap this process's address space at what it has now plus ``limit_bytes``."""
    vms = virtual_bytes()
    if vms is None or limit_bytes <= 0:
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = vms + int(limit_bytes)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def measure(spec: dict) -> dict:
    import torch

    from kdkernels.bench import impls
    from kdkernels.bench.cases import Case, make_inputs
    from kdkernels.bench.timing import one_step

    case, impl = Case.from_dict(spec["case"]), spec["impl"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))  # the same as the bench process
    device = torch.device("cpu")
    try:
        impls.check_available(impl, case, device)
    except impls.Unavailable as e:
        return {"status": str(e)}
    stage = "building inputs"
    try:
        before_inputs = rss_bytes()
        _limit_address_space(spec.get("limit_bytes", 0))
        inputs = make_inputs(case, device)
        inputs_rss = rss_bytes() - before_inputs
        stage = "first step"
        fn = impls.make_callable(impl, case)
        t0 = time.perf_counter()
        one_step(fn, inputs)  # warm-up; for torch.compile also the compilation
        compile_s = time.perf_counter() - t0 if impl == "compile" else None
        inputs.zero_grad()
        gc.collect()
        stage = "measured step"
        if reset_peak(check=True):
            base = rss_bytes()
            one_step(fn, inputs)
            peak = peak_bytes()
            method = "fresh process: VmHWM after clear_refs - RSS before the step"
        else:
            base = rss_bytes()
            with PeakPoller() as poller:
                one_step(fn, inputs)
            peak = poller.peak_bytes
            method = "fresh process: polled RSS peak (1 ms) - RSS before the step"
    except Exception as e:  # noqa: BLE001 - reported, never raised
        if impls.is_not_implemented(e):
            return {"status": "not implemented", "detail": impls.describe_error(e)}
        if impls.is_oom(e):
            return {"status": "OOM", "detail": f"{stage}: {impls.describe_error(e)}"}
        if impl == "compile" and stage == "first step":
            return {"status": "unavailable (compile failed)", "detail": impls.describe_error(e)}
        return {"status": f"error: {impls.describe_error(e, 100)}", "detail": stage}
    return {"status": "ok", "extra_bytes": max(0, peak - base), "baseline_bytes": base, "peak_bytes": peak,
            "method": method, "compile_s": compile_s, "detail": f"inputs RSS {inputs_rss / 2**20:.1f} MiB"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        result = measure(json.loads(argv[0]))
    except MemoryError:
        result = {"status": "OOM", "detail": "MemoryError"}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
