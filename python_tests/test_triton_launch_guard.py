"""Every Triton launch goes through kdkernels.triton._common.launch, which puts it on its tensors' device.

Triton launches on the *current* CUDA device: a launch for tensors on another GPU that skips the
guard runs on the wrong device. Checked twice: statically (no ``kernel[grid](...)`` outside
_common.py, no second copy of the shared helpers) and at run time (every kernel run of every op,
forward and backward, came through the guard).
"""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from kdkernels import backends, ops

TRITON_DIR = pathlib.Path(__file__).resolve().parents[1] / "kdkernels" / "triton"
LAUNCHER_FILES = sorted(p for p in TRITON_DIR.rglob("*.py") if p.name != "_common.py")
SHARED_HELPERS = {"device_guard", "_device_guard", "launch", "tl_opmath", "_opmath", "_tl_dtype", "dot_precision",
                  "tiles", "override_tiles"}


def _direct_launches(tree: ast.AST) -> list[int]:
    """Line numbers of calls of the form ``something[grid](...)``."""
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)]


def test_launcher_files_exist():
    names = {str(p.relative_to(TRITON_DIR)) for p in LAUNCHER_FILES}
    for op in ops.ALL_OPS:
        module = op.spec.triton_module.removeprefix("kdkernels.triton.").replace(".", "/") + ".py"
        assert module in names, f"{op.name}: triton_module {op.spec.triton_module} has no file"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: str(p.relative_to(TRITON_DIR)))
def test_no_launch_bypasses_the_guard(path):
    tree = ast.parse(path.read_text())
    assert _direct_launches(tree) == [], f"{path.name}: launch through kdkernels.triton._common.launch"
    redefined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)} & SHARED_HELPERS
    assert not redefined, f"{path.name} redefines shared helpers {redefined}: import them from _common"


def test_the_scan_finds_a_direct_launch():
    assert _direct_launches(ast.parse("k[(4,)](x, y)\nlaunch(k, (4,), x)")) == [1]


# ---- run time -------------------------------------------------------------------------------------
def _triton_device() -> torch.device | None:
    gpus = [torch.device("cuda")] if torch.cuda.is_available() else []
    for device in gpus + [torch.device("cpu")]:
        if backends.unavailable_reason("triton", device) is None:
            return device
    return None


DEVICE = _triton_device()
needs_triton = pytest.mark.skipif(DEVICE is None, reason="no Triton backend here (no GPU, no TRITON_INTERPRET)")


def _inputs(op_name: str, device: torch.device, per_row: bool):
    """Small forward inputs of each op, float32, student requiring grad (relation ops: per-row
    losses or their sum)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    if op_name == "softmax_kl":
        return (rand(3, 40, grad=True), rand(3, 40, grad=True), None, 2.0, 2, 0.5, -100, True)
    if op_name == "softmax_kl_step":  # weight 0-d, per-row losses off, both gradients
        return (rand(3, 40, grad=True), rand(3, 40, grad=True), None, torch.tensor(0.5, device=device), 2.0, 2, 0.5,
                -100, True, False, True, True)
    if op_name == "softmax_kl_topk":  # weight 0-d, bucket tail, per-row losses off, the student gradient
        lq, idx = torch.randn(3, 40, generator=g).log_softmax(-1).topk(5, dim=-1)
        return (rand(3, 40, grad=True), lq.to(device), idx.to(device), None, torch.tensor(0.5, device=device), 2.0, 1,
                -100, True, False, True)
    if op_name in ("fused_linear_softmax_kl", "fused_linear_softmax_kl_rows"):  # teacher logits, chunks of 2 rows
        head = (rand(3, 6, grad=True), rand(40, 6, grad=True), None, rand(3, 40), None, None, None, None)
        options = (2.0, 0, 0.5, -100, True, 2)
        if op_name.endswith("_rows"):
            return head + options
        return head + (torch.tensor(0.5, device=device),) + options + (True, True, False)
    if op_name == "projected_mse":
        return (rand(2, 5, 6, grad=True), rand(2, 5, 4, grad=True), rand(4, 6, grad=True), rand(4, grad=True), 0)
    if op_name == "attention_transfer":  # weight 0-d, p general (exp2 / log2), not squared, both gradients
        return (rand(2, 3, 10, grad=True), rand(2, 4, 10, grad=True), torch.tensor(0.5, device=device), 2.5, False,
                False, True, True)
    if op_name == "fsp":  # weight 0-d, student S 10 and teacher S 6, every map's gradient
        return (rand(2, 3, 10, grad=True), rand(2, 4, 10, grad=True), rand(2, 3, 6, grad=True), rand(2, 4, 6, grad=True),
                torch.tensor(0.5, device=device), per_row, True, True, True, True)
    return (rand(9, 6, grad=True), rand(9, 4), per_row)  # the relation ops


@needs_triton
@pytest.mark.parametrize("op,per_row", [(op, per_row) for op in ops.ALL_OPS if "triton" in op.backends
                                         for per_row in ((False, True) if ".relation." in op.spec.triton_module else (False,))],
                         ids=lambda v: ("per_row" if v else "total") if isinstance(v, bool) else v.name)
def test_every_kernel_run_came_through_the_guard(op, per_row, monkeypatch):
    from kdkernels.triton import _common
    from kdkernels.triton.response import softmax_kl

    kernel_class = type(softmax_kl._softmax_kl_fwd_kernel)  # JITFunction, or the interpreter's class
    counts = {"guarded": 0, "runs": 0}
    real_guard, real_run = _common.device_guard, kernel_class.run

    def counting_guard(t):
        counts["guarded"] += 1
        return real_guard(t)

    def counting_run(self, *args, **kwargs):
        counts["runs"] += 1
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(_common, "device_guard", counting_guard)
    monkeypatch.setattr(kernel_class, "run", counting_run)
    outputs = op.forward("triton", *_inputs(op.name, DEVICE, per_row))
    first = outputs[0] if isinstance(outputs, tuple) else outputs
    first.sum().backward()
    assert counts["runs"] > 0
    assert counts["guarded"] == counts["runs"], counts


@needs_triton
def test_launch_refuses_tensors_on_two_devices():
    from kdkernels.triton import _common
    from kdkernels.triton.response import softmax_kl

    with pytest.raises(ValueError, match="one launch"):
        _common.launch(softmax_kl._softmax_kl_fwd_kernel, (1,), torch.empty(1, device=DEVICE),
                       torch.empty(1, device="meta"))
