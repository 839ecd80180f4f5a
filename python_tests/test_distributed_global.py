"""kdkernels.distributed's global-batch relation losses on real process groups (issue 13 §2): gloo on
127.0.0.1, world sizes 2 and 3, uneven rows per rank (an empty rank, a rank with one row).

The ranks run python_tests/dist_worker.py's "global-batch relation losses" scenarios through
test_distributed's ``_run`` (spawned processes, a timeout: a hang fails the test, every failing
rank's traceback is reported).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from kdkernels import backends
from kdkernels.distributed import (
    global_rkd,
    global_rkd_angle,
    global_rkd_distance,
    global_similarity_preserving,
)
from test_distributed import _run

GLOBAL_LOSSES = [global_rkd_distance, global_rkd_angle, global_rkd, global_similarity_preserving]


@pytest.mark.parametrize("world", [2, 3])
def test_global_relation_losses_match_the_one_process_loss(world):
    """Every loss, reduction and backend, rkd with a zero weight, different feature sizes, a
    (B, C, H, W) input, float32: loss and each rank's gradient slice against one process."""
    # the ranks inherit os.environ: without TRITON_INTERPRET (set by conftest) no triton configs run
    assert backends.unavailable_reason("triton", torch.device("cpu")) is None or torch.cuda.is_available()
    details = _run(world, ["global_equivalence"])
    n = len([b for b in ("torch", "cpu", "triton") if b in backends.implemented_backends("rkd", "cpu")])
    assert details == [f"{6 * 4 * n + 1} configurations"] * world, details


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_global_relation_losses_on_cuda_tensors_over_gloo():
    """CUDA tensors, the cuda and triton backends; gloo because NCCL needs one GPU per rank and the
    lent machine has one (both ranks share it)."""
    details = _run(2, ["global_equivalence_cuda"])
    assert all("configurations" in d for d in details), details


def test_global_bad_input_raises_on_every_rank_without_hanging():
    details = _run(2, ["global_bad_input"])
    assert details == ["errors on every rank"] * 2


def test_global_bad_input_world_3_with_an_empty_rank():
    details = _run(3, ["global_bad_input"])
    assert details == ["errors on every rank"] * 3


def test_a_teacher_requiring_grad_warns_and_gets_no_gradient():
    details = _run(2, ["global_teacher_grad"])
    assert details == ["teacher warned, no gradient"] * 2


@pytest.mark.parametrize("loss", GLOBAL_LOSSES, ids=lambda f: f.__name__)
def test_without_a_process_group_it_says_so(loss):
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_the_torchrun_global_relation_byte_count_example_runs():
    """benchmarks/global_relation_bytes.py under torchrun (2 CPU ranks, tiny sizes): it completes,
    communicates less than the naive gather of distance / Gram rows, and gives the one-process loss."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(root, "benchmarks", "global_relation_bytes.py"), "--rows", "64",
                           "--student-dim", "8", "--teacher-dim", "16", "--repeats", "1"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("bytes kdkernels / naive")]
    assert len(lines) == 2, proc.stdout  # rkd_distance and similarity_preserving
    for line in lines:
        ratio = float(line.split("=")[1].split()[0])
        assert 0 < ratio < 1, line
        loss_diff = float(line.rsplit("|loss difference| ", 1)[1].split()[0])
        assert loss_diff < 1e-5, line
        grad_diff = float(line.split("max |grad difference| ", 1)[1].split(";")[0])
        assert grad_diff < 1e-6, line
