"""Every Triton kernel launch compiles for sm_90 with Triton's real compiler, without a GPU.

The rest of the suite runs Triton kernels under the interpreter (TRITON_INTERPRET=1), which never
compiles them; python_tests/triton_sm90_compile.py records each launcher's launches and compiles
every distinct variant down to a cubin. It runs in a subprocess because the interpreter setting is
process-wide (conftest.py turns it on here).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kdkernels import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "python_tests", "triton_sm90_compile.py")


@pytest.mark.skipif(not _native.triton_installed, reason="triton is not installed")
@pytest.mark.parametrize("family", ["response", "feature", "relation"])
def test_every_triton_launch_compiles_for_sm90(family):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, SCRIPT, family], capture_output=True, text=True, env=env, timeout=900)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-6000:]
    summary = report.strip().splitlines()[-1]
    assert " 0 failed" in summary and not summary.startswith("0 compiled"), summary
