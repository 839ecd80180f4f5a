"""`make bench` works end to end: the smoke preset runs every loss and writes complete results.

``run_smoke(tmpdir)`` runs ``python -m kdkernels.bench --preset smoke`` in a fresh process (no GPU
needed; well under a minute on two idle cores) and checks its output; a failed check raises
``AssertionError`` naming what is missing or incomplete.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time

from kdkernels.backends import LOSSES
from kdkernels.bench.cases import preset_smoke
from kdkernels.bench.report import FILES
from kdkernels.bench.rows import ROW_FIELDS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# a status is one of these, or starts with one of these followed by " ("
STATUS_WORDS = ("ok", "not implemented", "unavailable", "excluded", "skipped", "OOM", "error", "timeout")


def _finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def check_result(result: dict, csv_path: str | None = None) -> dict:
    """Check that every row of a bench result is complete; return counts. Raises AssertionError."""
    rows = result["rows"]
    assert rows, "no result rows"
    meta = result["meta"]
    for key in ("preset", "device", "torch", "copy_bandwidth", "elapsed_s"):
        assert key in meta, f"meta lacks {key!r}"
    assert _finite_positive(meta["copy_bandwidth"]["GBps"]), "copy bandwidth not measured"
    statuses: dict[str, int] = {}
    for r in rows:
        where = f"{r.get('loss')} {r.get('case')} [{r.get('impl')}]"
        missing = [k for k in ROW_FIELDS if k not in r]
        assert not missing, f"{where}: row lacks {missing}"
        st = r["status"]
        assert st != "pending", f"{where}: left pending"
        assert any(st == w or st.startswith(w + " (") or st.startswith(w + ":") for w in STATUS_WORDS), \
            f"{where}: unexpected status {st!r}"
        statuses[st.split(" (")[0].split(":")[0]] = statuses.get(st.split(" (")[0].split(":")[0], 0) + 1
        if st != "ok":
            continue
        for k in ("fwd_ms", "bwd_ms", "step_ms", "floor_ms", "x_floor", "achieved_GBps", "must_move_bytes",
                  "inputs_bytes", "grads_bytes"):
            assert _finite_positive(r[k]), f"{where}: {k} = {r[k]!r}"
        assert isinstance(r["repeats"], int) and r["repeats"] >= 1, f"{where}: repeats = {r['repeats']!r}"
        if r["impl"] == "compile":
            assert _finite_positive(r["compile_s"]), f"{where}: compile time missing"
        if r["mem_status"] == "ok":
            assert isinstance(r["mem_extra_bytes"], int) and r["mem_extra_bytes"] >= 0, f"{where}: mem_extra_bytes"
            assert _finite_positive(r["mem_ratio"]), f"{where}: mem_ratio"
    # ratios come from the same run: every ok row next to an ok eager row has them
    eager = {(r["group"], r["loss"], r["case"]) for r in rows if r["impl"] == "torch" and r["status"] == "ok"}
    compiled = {(r["group"], r["loss"], r["case"]) for r in rows if r["impl"] == "compile" and r["status"] == "ok"}
    for r in rows:
        key = (r["group"], r["loss"], r["case"])
        if r["status"] == "ok" and key in eager:
            for ph in ("fwd", "bwd", "step"):
                assert _finite_positive(r[f"vs_eager_{ph}"]), f"{key} [{r['impl']}]: vs_eager_{ph} missing"
        if r["status"] == "ok" and key in compiled:
            assert _finite_positive(r["vs_compile_step"]), f"{key} [{r['impl']}]: vs_compile_step missing"
    if csv_path is not None:
        with open(csv_path, newline="") as f:
            csv_rows = list(csv.DictReader(f))
        assert len(csv_rows) == len(rows), f"CSV has {len(csv_rows)} rows, JSON {len(rows)}"
        assert list(csv_rows[0].keys()) == ROW_FIELDS, "CSV columns differ from ROW_FIELDS"
    return statuses


def run_smoke(tmpdir, timeout_s: float = 300.0, extra_args: list[str] | None = None) -> dict:
    """Run ``python -m kdkernels.bench --preset smoke --out tmpdir`` in a fresh process and check it.

    Checks: exit status 0; ``results.json`` (with the printed report), ``results.csv``,
    ``speedup.png`` and ``scaling.png`` exist (PNGs are real PNGs); every case of the preset has a row for
    eager PyTorch that ran ("ok"); every row is complete (``check_result``); the oversized sweep
    point was skipped by the guards, not run.
    """
    out = os.fspath(tmpdir)
    cmd = [sys.executable, "-m", "kdkernels.bench", "--preset", "smoke", "--out", out, *(extra_args or [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"bench exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    paths = {k: os.path.join(out, f) for k, f in FILES.items()}
    for kind, path in paths.items():
        assert os.path.isfile(path) and os.path.getsize(path) > 0, f"{kind} output missing: {path}"
    for kind in ("png", "scaling_png"):
        with open(paths[kind], "rb") as f:
            assert f.read(8) == PNG_MAGIC, f"{paths[kind]} is not a PNG"
    with open(paths["json"]) as f:
        result = json.load(f)
    assert "report" in result and "scaling:" in result["report"], "the printed report is not in the JSON"
    statuses = check_result(result, paths["csv"])
    rows = result["rows"]
    preset = preset_smoke()
    keys = {(c.loss, c.label) for c in preset.cases}
    for loss, label in keys:
        here = [r for r in rows if r["loss"] == loss and r["case"] == label]
        assert here, f"no rows for {loss} {label}"
        big = label.startswith("B1048576")
        eager = [r for r in here if r["impl"] == "torch"]
        assert eager, f"no eager row for {loss} {label}"
        if big:
            assert all(r["status"] != "ok" for r in here), f"{loss} {label}: the oversized point ran"
            assert eager[0]["status"].startswith("skipped"), f"{loss} {label}: eager was {eager[0]['status']!r}"
        else:
            assert eager[0]["status"] == "ok", f"{loss} {label}: eager {eager[0]['status']!r}"
    assert {r["loss"] for r in rows} == set(LOSSES), "a loss is missing from the smoke run"
    assert "ok" in proc.stdout and "[1/" in proc.stdout, "no progress lines printed"
    return {"paths": paths, "rows": len(rows), "ok_rows": statuses.get("ok", 0), "statuses": statuses,
            "elapsed_s": elapsed, "bench_elapsed_s": result["meta"]["elapsed_s"]}


def test_bench_smoke(tmp_path):
    summary = run_smoke(tmp_path)
    assert summary["ok_rows"] > 0
