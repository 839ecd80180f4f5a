"""Op-level checks of the relation dispatcher ops: gradcheck (float64), torch.library.opcheck and
the memory contract (no B x B tensor for distance / SP, no B^3 one for angle; docs/design.md §2.3); the
combined RKD distance + angle op is the one RKDLoss runs."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import backend_params, cuda_only
import kdkernels
from kdkernels import _native, backends, functional, ops

needs_cpu_ext = pytest.mark.skipif(not _native.cpu_loaded, reason=f"C++ extension not built: {_native.cpu_error}")
LOSSES = ("rkd_distance", "similarity_preserving", "rkd_angle")  # the single-loss relation ops
PARAMS = [pytest.param(loss, *p.values, id=f"{loss}-{p.id}", marks=p.marks)
          for loss in LOSSES for p in backend_params(loss)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@needs_cpu_ext
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(6, 5), (7, 2, 3, 2)])
def test_gradcheck_cpu(loss, shape):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(shape[0], 4, dtype=torch.float64, generator=gen)
    fn = getattr(functional, loss)
    assert torch.autograd.gradcheck(lambda s: fn(s, t, reduction="sum", backend="cpu"), (s,))


@needs_cpu_ext
@pytest.mark.parametrize("loss", LOSSES + ("rkd",))
@pytest.mark.parametrize("shape", [(2, 3), (6, 5), (7, 2, 3, 2)])
def test_gradcheck_cpu_per_row(loss, shape):
    # the full Jacobian of the (B,) per-row losses: every one-hot upstream vector through the (B,)
    # backward path (pair weights w_i + w_j, A_w, SP's row-scaled dL/dG, angle's anchor weights)
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(shape[0], 4, dtype=torch.float64, generator=gen)
    if shape[0] > 2 and loss in ("rkd_distance", "similarity_preserving"):
        with torch.no_grad():
            s[2] = s[0]  # a duplicate row (the angle is not differentiable there: no gradient by design)
    fn = getattr(functional, loss)
    assert torch.autograd.gradcheck(lambda s: fn(s, t, reduction="none", backend="cpu"), (s,))


@needs_cpu_ext
def test_gradcheck_cpu_distance_through_mu_in_huber_linear_region():
    # teacher distances far from the student's: |x| > 1, where only the mu path couples the pairs
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(9, 4, dtype=torch.float64, generator=gen)
    t[0] *= 50
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda s: functional.rkd_distance(s, t, reduction=reduction, backend="cpu"), (s,))


def _ops(loss, backend):
    (op,) = backends.LOSS_OPS[loss]
    return op.forward_ops[backend], op.backward_ops[backend]


def _op_inputs(device, dtype=torch.float32, batch=9):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(batch, 6, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    t = torch.randn(batch, 4, generator=gen).to(device=device, dtype=dtype)
    return s, t


def _upstream(like: torch.Tensor, value: float) -> torch.Tensor:
    """An upstream gradient of the loss output's shape: 0-d, or a non-uniform (B,) vector."""
    if like.dim() == 0:
        return torch.full_like(like, value)
    return value * torch.linspace(-1.0, 2.0, like.shape[0], dtype=like.dtype, device=like.device)


@pytest.mark.parametrize("loss,device,backend", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_forward(loss, device, backend, dtype, per_row):
    fwd, _ = _ops(loss, backend)
    s, t = _op_inputs(device, dtype)
    with torch.no_grad():
        out = fwd(s, t, per_row)
    loss_out = out[0] if isinstance(out, tuple) else out
    assert loss_out.shape == ((s.shape[0],) if per_row else ())
    torch.library.opcheck(fwd, (s, t, per_row))


@pytest.mark.parametrize("loss,device,backend", PARAMS)
@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_backward(loss, device, backend, per_row):
    fwd, bwd = _ops(loss, backend)
    s, t = _op_inputs(device)
    with torch.no_grad():
        out = fwd(s, t, per_row)
    outs = out if isinstance(out, tuple) else (out,)
    torch.library.opcheck(bwd, (_upstream(outs[0], 0.7), s.detach(), t) + tuple(outs[1:]))


@pytest.mark.parametrize("loss,device,backend", PARAMS)
def test_backward_rejects_a_misshapen_upstream_gradient(loss, device, backend):
    fwd, bwd = _ops(loss, backend)
    s, t = _op_inputs(device)
    with torch.no_grad():
        out = fwd(s, t, False)
    outs = out if isinstance(out, tuple) else (out,)
    wrong = torch.ones(s.shape[0] + 1, dtype=outs[0].dtype, device=device)
    with pytest.raises(RuntimeError):
        bwd(wrong, s.detach(), t, *outs[1:])


# ---- memory: peak RSS of a fresh process, above what it held just before the loss -------------
_MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from kdkernels import functional
    from kdkernels.bench.rss import peak_extra_bytes
    loss, backend, batch, dim, reduction = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.manual_seed(0)
    fn = getattr(functional, loss)
    def step(s, t):
        out = fn(s, t, reduction=reduction, backend=backend)
        out.backward(torch.rand_like(out))  # "none": a (B,) upstream gradient
    step(torch.randn(64, dim, requires_grad=True), torch.randn(64, dim))  # load, warm up
    s = torch.randn(batch, dim, requires_grad=True)
    t = torch.randn(batch, dim)
    extra = peak_extra_bytes(lambda: step(s, t))
    if extra is None:
        sys.exit("cannot reset the peak RSS here (/proc/self/clear_refs)")
    print(extra)
""")


def _peak_extra_bytes(loss, backend, batch, dim, reduction="mean"):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, loss, backend, str(batch), str(dim), reduction],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "clear_refs" in proc.stderr:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


@needs_cpu_ext
@pytest.mark.parametrize("loss", ["rkd_distance", "similarity_preserving"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_forward_backward_never_holds_a_batch_by_batch_matrix(loss, reduction):
    batch, dim = 4096, 64
    one_matrix = batch * batch * 4  # a single (B, B) float32 tensor: 64 MiB
    fused = _peak_extra_bytes(loss, "cpu", batch, dim, reduction)
    # O(B D + B tile): the student's centred copy, two (tile, B) blocks, the gradient: under one B x B matrix
    assert fused < one_matrix, f"fused {loss} peaked {fused / 2**20:.1f} MiB above its inputs"
    # the measurement sees B x B tensors: the eager reference must trip it
    eager = _peak_extra_bytes(loss, "torch", batch, dim)
    assert eager > one_matrix, f"eager {loss} peaked only {eager / 2**20:.1f} MiB: the measurement is blind"


@needs_cpu_ext
@pytest.mark.parametrize("loss", ["rkd_angle", "rkd"])
def test_cpu_angle_memory_is_quadratic_not_cubic(loss):
    batch, dim = 512, 64
    fused = _peak_extra_bytes(loss, "cpu", batch, dim)
    # six (B, B) float32 matrices (squared distances, inverse norms, two gradient buffers) + slack;
    # a (B, B, B) float32 tensor would be 512 MiB
    assert fused < 12 * batch * batch * 4, f"fused {loss} peaked {fused / 2**20:.1f} MiB"


# ---- RKD distance + angle in one op (RKDLoss) ------------------------------------------------------
COMBINED_PARAMS = backend_params("rkd")


def _combined_ops(backend):
    return ops.RKD_DISTANCE_ANGLE.forward_ops[backend], ops.RKD_DISTANCE_ANGLE.backward_ops[backend]


@needs_cpu_ext
@pytest.mark.parametrize("weights", [(1.0, 2.0), (0.3, 0.0), (0.0, 1.0)])
def test_gradcheck_cpu_combined(weights):
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(7, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(
        lambda s: functional.rkd(s, t, *weights, reduction="sum", backend="cpu"), (s,))


@needs_cpu_ext
@pytest.mark.parametrize("per_row", [False, True])
def test_gradcheck_cpu_combined_op_each_output(per_row):
    # each output on its own: the backward must route grad_distance and grad_angle to their terms
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    fwd, _ = _combined_ops("cpu")
    for k in (0, 1):
        assert torch.autograd.gradcheck(lambda s: fwd(s, t, per_row)[k], (s,))


@pytest.mark.parametrize("device,backend", COMBINED_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_combined_forward(device, backend, dtype, per_row):
    fwd, _ = _combined_ops(backend)
    torch.library.opcheck(fwd, _op_inputs(device, dtype) + (per_row,))


@pytest.mark.parametrize("device,backend", COMBINED_PARAMS)
@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_combined_backward(device, backend, per_row):
    fwd, bwd = _combined_ops(backend)
    s, t = _op_inputs(device)
    with torch.no_grad():
        distance, angle, stats = fwd(s, t, per_row)
    assert distance.shape == angle.shape == ((s.shape[0],) if per_row else ())
    torch.library.opcheck(bwd, (_upstream(distance, 0.7), _upstream(angle, -1.3), s.detach(), t, stats))


class _OpLog(TorchDispatchMode):
    """Names of the kdkernels ops that run below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("kdkernels::"):
            self.names.append(name.split("::")[1].split(".")[0].removesuffix("_triton"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,backend", COMBINED_PARAMS)
@pytest.mark.parametrize("weights,expected", [
    ((1.0, 2.0), ["rkd_distance_angle_forward", "rkd_distance_angle_backward"]),
    ((1.0, 0.0), ["rkd_distance_forward", "rkd_distance_backward"]),  # distance alone keeps O(B) memory
    ((0.0, 2.0), ["rkd_angle_forward", "rkd_angle_backward"]),
])
def test_rkd_loss_runs_one_fused_op(device, backend, weights, expected):
    # "shared quantities once": RKDLoss with both terms is one forward and one backward op, not
    # the distance and angle ops one after the other
    s, t = _op_inputs(device)
    loss = kdkernels.RKDLoss(*weights, backend=backend)
    with _OpLog() as log:
        loss(s, t).backward()
    assert log.names == expected


@cuda_only
@pytest.mark.cuda
def test_cuda_backward_rejects_host_grads_and_stats():
    # the kernels read these on the device: CPU tensors must be an error, not a bad pointer
    s, t = _op_inputs(torch.device("cuda"))
    s = s.detach()
    _, stats = torch.ops.kdkernels.rkd_distance_forward(s, t, False)
    one = torch.ones((), device="cuda")
    with pytest.raises(RuntimeError, match="grad_loss must be on the student's device"):
        torch.ops.kdkernels.rkd_distance_backward(torch.tensor(1.0), s, t, stats)
    with pytest.raises(RuntimeError, match="stats must be on the student's device"):
        torch.ops.kdkernels.rkd_distance_backward(one, s, t, stats.cpu())
    with pytest.raises(RuntimeError, match="grad_angle must be on the student's device"):
        torch.ops.kdkernels.rkd_distance_angle_backward(one, torch.tensor(1.0), s, t, stats)
