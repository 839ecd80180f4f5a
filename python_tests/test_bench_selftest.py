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

import pytest

from kdkernels.backends import LOSSES
from kdkernels.bench import __main__ as cli
from kdkernels.bench import floor as F
from kdkernels.bench import peers
from kdkernels.bench.cases import PRESETS, SPECS, SHAPE_FORMS, get_preset, parse_shape, preset_smoke, shape_cases
from kdkernels.bench.impls import ALL_IMPLS, RATIO_BASELINES
from kdkernels.bench.progress import Eta
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
        for k in ("fwd_ms", "bwd_ms", "step_ms", "copy_floor_ms", "x_copy_floor", "achieved_GBps", "must_move_bytes",
                  "inputs_bytes", "grads_bytes"):
            assert _finite_positive(r[k]), f"{where}: {k} = {r[k]!r}"
        if SPECS[r["loss"]].gemms is not None and meta.get("gemm_floors", {}).get(
                f"{r['loss']} {r['case']}", {}).get("status") == "ok":
            assert _finite_positive(r["gemm_floor_ms"]) and _finite_positive(r["x_gemm_floor"]), f"{where}: GEMM floor"
        elif SPECS[r["loss"]].gemms is None:
            assert r["x_gemm_floor"] is None, f"{where}: a GEMM floor for a loss that has none"
        assert isinstance(r["repeats"], int) and r["repeats"] >= 1, f"{where}: repeats = {r['repeats']!r}"
        if r["impl"] == "compile":
            assert _finite_positive(r["compile_s"]), f"{where}: compile time missing"
        if r["mem_status"] == "ok":
            assert isinstance(r["mem_extra_bytes"], int) and r["mem_extra_bytes"] >= 0, f"{where}: mem_extra_bytes"
            assert _finite_positive(r["mem_ratio"]), f"{where}: mem_ratio"
    # ratios come from the same run: every ok row next to an ok baseline row has them (not the baseline itself)
    for base, phases in RATIO_BASELINES.items():
        ran = {(r["group"], r["loss"], r["case"]) for r in rows if r["impl"] == base and r["status"] == "ok"}
        for r in rows:
            key = (r["group"], r["loss"], r["case"])
            for ph in phases:
                if r["impl"] == base or r["status"] != "ok" or key not in ran:
                    assert r[f"vs_{base}_{ph}"] is None, f"{key} [{r['impl']}]: vs_{base}_{ph} without its baseline"
                else:
                    assert _finite_positive(r[f"vs_{base}_{ph}"]), f"{key} [{r['impl']}]: vs_{base}_{ph} missing"
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
    the eager composition that ran ("ok"), and rows for the reference and torchdistill (ok where
    torchdistill is installed, else "unavailable (...)"); every row is complete (``check_result``);
    the oversized sweep point was skipped by the guards, not run.
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
        eager = [r for r in here if r["impl"] == "eager"]
        assert eager, f"no eager row for {loss} {label}"
        if big:
            assert all(r["status"] != "ok" for r in here), f"{loss} {label}: the oversized point ran"
            assert eager[0]["status"].startswith("skipped"), f"{loss} {label}: eager was {eager[0]['status']!r}"
            continue
        assert eager[0]["status"] == "ok", f"{loss} {label}: eager {eager[0]['status']!r}"
        if label.startswith("B32 "):
            continue  # the sweep: eager and the kernels only
        by_impl = {r["impl"]: r for r in here}
        assert by_impl["reference"]["status"] == "ok", f"{loss} {label}: reference {by_impl['reference']['status']!r}"
        if loss == "softmax_kl_div_topk":  # torchdistill has no sparse teacher; the dense kdkernels step instead
            assert "torchdistill" not in by_impl and by_impl["dense"]["status"] == "ok", f"{loss} {label}"
            continue
        if loss == "fused_linear_softmax_kl_div":  # torchdistill has no fused head; F.linear + kdkernels' KL instead
            assert "torchdistill" not in by_impl and by_impl["linear_kd"]["status"] == "ok", f"{loss} {label}"
            continue
        td = by_impl["torchdistill"]["status"]
        if peers.torchdistill()[0] is not None:
            assert td == "ok", f"{loss} {label}: torchdistill {td!r}"
        else:
            assert td.startswith("unavailable (torchdistill not installed"), f"{loss} {label}: torchdistill {td!r}"
    assert {r["loss"] for r in rows} == set(LOSSES), "a loss is missing from the smoke run"
    assert "ok" in proc.stdout and "[1/" in proc.stdout and "ETA ~" in proc.stdout, "no progress lines printed"
    assert "accuracy spec" in result["report"] and "eager composition" in result["report"], "baselines not named"
    return {"paths": paths, "rows": len(rows), "ok_rows": statuses.get("ok", 0), "statuses": statuses,
            "elapsed_s": elapsed, "bench_elapsed_s": result["meta"]["elapsed_s"]}


def test_bench_smoke(tmp_path):
    summary = run_smoke(tmp_path)
    assert summary["ok_rows"] > 0


# ------------------------------------------------------------------- timing-independent checks
@pytest.mark.parametrize("name", ["cpu", "full", "gpu", "smoke"])
def test_preset_covers_every_loss(name):
    preset = get_preset(name)
    assert {c.loss for c in preset.cases if c.group == "main"} == set(LOSSES), f"preset {name} misses a loss"


def test_cpu_preset_is_the_quick_one():
    cpu, full = get_preset("cpu"), get_preset("full")
    assert not [c for c in cpu.cases if c.group == "scaling"], "the default preset has no sweep"
    assert any(c.group == "scaling" for c in full.cases)
    assert cpu.memory and cpu.device == "cpu" and full.device == "cpu"
    assert "eager" not in cpu.memory_skip_impls and "cpu" not in cpu.memory_skip_impls  # memory kept
    work = {c.loss: SPECS[c.loss].work(c) for c in cpu.cases}
    for c in full.cases:
        if c.group == "main":
            assert work[c.loss] <= SPECS[c.loss].work(c), f"cpu preset's {c.loss} is not smaller than full's"
    assert set(PRESETS) == {"cpu", "full", "gpu", "smoke"}


def test_baselines_are_implementations_and_ratio_columns():
    for name in ("eager", "compile", "torchdistill", "liger", "reference"):
        assert name in ALL_IMPLS
    assert "reference" not in RATIO_BASELINES, "the reference is the accuracy spec, not a speed baseline"
    for base, phases in RATIO_BASELINES.items():
        for ph in phases:
            assert f"vs_{base}_{ph}" in ROW_FIELDS
    for k in ("x_copy_floor", "x_gemm_floor", "gemm_floor_ms", "copy_floor_ms"):
        assert k in ROW_FIELDS


@pytest.mark.parametrize("loss,text,dims,fd", [
    ("softmax_kl_div", "8192x128000", {"R": 8192, "V": 128000}, None),
    ("projected_mse", "16384x768x4096", {"R": 16384, "Ds": 768, "Dt": 4096}, -1),
    ("projected_mse", "64x128x256x32x32", {"N": 64, "Cs": 128, "Ct": 256, "H": 32, "W": 32}, 1),
    ("rkd_distance", "4096x512", {"B": 4096, "D": 512}, None),
    ("similarity_preserving", "4096X256x512", {"B": 4096, "Ds": 256, "Dt": 512}, None),
    ("rkd", "512x512", {"B": 512, "D": 512}, None),
])
def test_shape_parsing(loss, text, dims, fd):
    got, _opts = parse_shape(loss, text)
    assert got == dims
    (case,) = shape_cases(get_preset("cpu"), [loss], text)
    assert case.dims == dims and case.group == "main" and not case.targets
    if loss == "softmax_kl_div":
        assert case.options["temperature"] == 2.0  # the preset's options
    if fd is not None:
        assert case.options.get("feature_dim", -1) == fd
    (bf16,) = shape_cases(get_preset("cpu"), [loss], text, "bfloat16")
    assert bf16.dtype == "bfloat16"
    assert case.label  # the label builds for every form


@pytest.mark.parametrize("loss,text", [("softmax_kl_div", "8192"), ("softmax_kl_div", "2x3x4"), ("projected_mse", "8x16"),
                                       ("rkd_angle", "1x16"), ("rkd_distance", "0x16"), ("rkd", "axb"),
                                       ("similarity_preserving", "2x3x4x5")])
def test_shape_parsing_rejects(loss, text):
    with pytest.raises(ValueError, match=r"--shape"):
        parse_shape(loss, text)
    assert loss in SHAPE_FORMS


def test_shape_cli_errors(capsys):
    assert cli.main(["--shape", "8x16"]) == 2  # no --losses
    assert "--shape needs --losses" in capsys.readouterr().err
    assert cli.main(["--shape", "8x16x4", "--losses", "softmax_kl_div"]) == 2
    assert "RxV" in capsys.readouterr().err
    assert cli.main(["--dtype", "bfloat16"]) == 2
    assert "--shape" in capsys.readouterr().err


def test_shape_runs_just_that_case(tmp_path):
    out = os.fspath(tmp_path)
    cmd = [sys.executable, "-m", "kdkernels.bench", "--preset", "smoke", "--losses", "softmax_kl_div,rkd_distance",
           "--shape", "32x48", "--backends", "eager,cpu", "--no-memory", "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(os.path.join(out, "results.json")) as f:
        rows = json.load(f)["rows"]
    assert {(r["loss"], r["case"].split(" ")[0]) for r in rows} == {("softmax_kl_div", "32x48"), ("rkd_distance", "B32")}
    assert {r["impl"] for r in rows} == {"eager", "cpu"}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]


def test_eta_calibrates_on_finished_cases():
    eta = Eta([1.0, 1.0, 2.0])
    assert eta.remaining_s(0.0) == pytest.approx(4.0)  # a-priori
    eta.finished(0, 10.0)  # the first case took 10x its estimate
    assert eta.remaining_s(10.0) == pytest.approx(30.0)
    assert "ETA ~30 s" in eta.case_line(2, 3, 10.0, "x")
    limited = Eta([100.0], time_limit_s=5.0)
    assert limited.remaining_s(2.0) == pytest.approx(3.0)


def test_gemm_floor_times_the_products():
    import torch

    shapes = [(8, 4, 6), (6, 8, 4)]
    g = F.gemm_floor(shapes, torch.float32, torch.device("cpu"), budget_s=0.01)
    assert g.ms > 0 and g.repeats >= 3 and g.flops == 2 * (8 * 4 * 6 + 6 * 8 * 4)
    assert F.gemm_bytes(shapes, torch.float32) == 4 * (8 * 4 + 4 * 6 + 6 * 8 + 8 * 6 + 6 * 4)  # (8, 4) once
