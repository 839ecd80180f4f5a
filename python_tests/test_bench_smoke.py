"""`make bench` works end to end: the smoke preset runs every loss and writes complete results."""
from kdkernels.bench.selftest import run_smoke


def test_bench_smoke(tmp_path):
    summary = run_smoke(tmp_path)
    assert summary["ok_rows"] > 0
