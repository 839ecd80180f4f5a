"""`make demo` works end to end: ``python -m kdkernels.demo --quick`` trains, distils and reports.

Runs the demo in a fresh process in its quick mode (1 seed, 3 epochs; ~10-30 s on two cores) and
checks what it writes. Needs scikit-learn (the digits data); `make test` installs it.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import sklearn  # noqa: F401
except ImportError:
    pytest.skip("scikit-learn is not installed: the demo's digits data come from it "
                "(pip install scikit-learn; `make test` installs it)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = ("teacher", "student", "distilled", "distilled_eager")
EPOCHS = 3  # --quick


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "kdkernels.demo", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout}\n{proc.stderr}"
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def _is_acc(v) -> bool:
    return isinstance(v, float) and 0.0 <= v <= 1.0


def test_writes_results_and_plot(demo):
    out, _, result = demo
    png = (out / "learning_curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000, "the learning-curve plot is missing or empty"
    assert result["seeds"] == 1 and result["epochs"] == EPOCHS
    assert result["n_train"] + result["n_test"] == 1797  # the whole digits set, split once
    assert result["auto_backend"] in ("cpu", "torch")


def test_accuracies_are_real(demo):
    _, _, result = demo
    (run,) = result["runs"]
    for model in MODELS:
        curve = run[model]["test_acc"]
        assert len(curve) == EPOCHS and all(_is_acc(a) for a in curve), (model, curve)
        s = result["summary"]["test_accuracy"][model]
        assert _is_acc(s["mean"]) and s["mean"] == curve[-1] and s["n"] == 1
    # chance is 0.1: a few epochs on digits put the teacher far above it, the students clearly above
    assert run["teacher"]["test_acc"][-1] > 0.5
    assert run["student"]["test_acc"][-1] > 0.3
    assert run["distilled"]["test_acc"][-1] > 0.3
    # the kdkernels and eager losses train the same model from the same seed: the curves agree
    assert result["summary"]["max_abs_acc_diff_kdkernels_vs_eager"] <= 0.05


def test_timings_and_printout(demo):
    _, stdout, result = demo
    (run,) = result["runs"]
    for model in ("distilled", "distilled_eager"):
        epochs, losses = run[model]["epoch_s"], run[model]["loss_s"]
        assert len(epochs) == len(losses) == EPOCHS
        assert all(math.isfinite(e) and 0 < l < e for e, l in zip(epochs, losses)), (epochs, losses)
    for text in ("teacher", "student alone", "distilled student", "kdkernels losses", 'usual eager compositions',
                 "results.json", "learning_curves.png"):
        assert text in stdout, f"{text!r} missing from the demo's output:\n{stdout}"
