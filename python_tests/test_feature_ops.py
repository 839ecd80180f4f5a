"""Op-level checks of the projected-MSE dispatcher ops: gradcheck (float64) and torch.library.opcheck."""
from __future__ import annotations

import pytest
import torch

from helpers import backend_params, cuda_only
from kdkernels import _feature, _native, functional, ops
from kdkernels.reduction import FEATURE_NONE

needs_cpu_ext = pytest.mark.skipif(not _native.cpu_loaded, reason=f"C++ extension not built: {_native.cpu_error}")

# (student shape, teacher shape, feature_dim): features last, and an NCHW map (feature-major layout)
LAYOUTS = [((5, 7), (5, 4), -1), ((2, 3, 4, 3), (2, 5, 4, 3), 1)]


@needs_cpu_ext
@pytest.mark.parametrize("x_shape,t_shape,fd", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_gradcheck_cpu(x_shape, t_shape, fd, reduction):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(x_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(t_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(t_shape[fd], x_shape[fd], dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(t_shape[fd], dtype=torch.float64, generator=gen, requires_grad=True)

    def f(x, t, w, b):
        return functional.projected_mse(x, t, w, b, feature_dim=fd, reduction=reduction, backend="cpu")

    assert torch.autograd.gradcheck(f, (x, t, w, b))


def _op_args(device, layout, bias=True, dtype=torch.float32):
    x_shape, t_shape, fd = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    t = torch.randn(t_shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    w = torch.randn(t_shape[fd], x_shape[fd], generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    b = torch.randn(t_shape[fd], generator=gen).to(device=device, dtype=dtype).requires_grad_(True) if bias else None
    x3, t3 = _feature.rows_3d(x, t, fd)
    return x3, t3, w, b


def _ops(backend):
    return ops.PROJECTED_MSE.forward_ops[backend], ops.PROJECTED_MSE.backward_ops[backend]


@pytest.mark.parametrize("device,backend", backend_params("projected_mse"))
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", [0, 2, FEATURE_NONE])
def test_opcheck_forward(device, backend, layout, bias, reduction):
    fwd, _ = _ops(backend)
    x3, t3, w, b = _op_args(device, layout, bias)
    torch.library.opcheck(fwd, (x3, t3, w, b, reduction))


@pytest.mark.parametrize("device,backend", backend_params("projected_mse"))
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("grads", [(True, True, True, True), (True, False, False, False),
                                   (False, True, False, True), (False, False, True, False)])
@pytest.mark.parametrize("reduction", [1, FEATURE_NONE])
def test_opcheck_backward(device, backend, layout, grads, reduction):
    fwd, bwd = _ops(backend)
    x3, t3, w, b = _op_args(device, layout)
    with torch.no_grad():
        loss, residual = fwd(x3, t3, w, b, reduction)
    assert loss.shape == (x3.shape[:2] if reduction == FEATURE_NONE else ())
    grad_loss = torch.rand_like(loss)  # (B, P) for "none": one upstream value per row
    x_grad, t_grad, w_grad, b_grad = grads
    torch.library.opcheck(bwd, (grad_loss, x3.detach(), w.detach(), residual, reduction, x_grad, t_grad, w_grad,
                                b_grad))


@pytest.mark.parametrize("device,backend", backend_params("projected_mse"))
@pytest.mark.parametrize("layout", [0, 1])
def test_none_op_is_per_row_sums(device, backend, layout):
    """Code 3: the forward's (B, P) loss sums to the "sum" loss row by row, and the backward with a
    (B, P) grad_loss equals the scalar backward of the grad_loss-weighted sum."""
    fwd, bwd = _ops(backend)
    x3, t3, w, b = _op_args(device, layout)
    with torch.no_grad():
        rows, residual = fwd(x3, t3, w, b, FEATURE_NONE)
        total, _ = fwd(x3, t3, w, b, 1)
        torch.testing.assert_close(rows, residual.double().square().sum(-1).float())
        torch.testing.assert_close(rows.sum(), total)
        g = torch.rand(rows.shape, generator=torch.Generator().manual_seed(1)).to(device)
        got = bwd(g, x3.detach(), w.detach(), residual, FEATURE_NONE, True, True, True, True)
        # the weighted sum's gradient, from the reference on the same inputs
        leaves = [a.detach().double().requires_grad_(True) for a in (x3, t3, w, b)]
        with torch.enable_grad():
            r = leaves[0] @ leaves[2].T + leaves[3] - leaves[1]
            expected = torch.autograd.grad((r.square().sum(-1) * g.double()).sum(), [leaves[i] for i in (0, 1, 2, 3)])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)


@needs_cpu_ext
def test_none_backward_rejects_a_scalar_grad_loss():
    fwd, bwd = _ops("cpu")
    x3, t3, w, b = _op_args(torch.device("cpu"), 0)
    with torch.no_grad():
        _, residual = fwd(x3, t3, w, b, FEATURE_NONE)
    with pytest.raises(RuntimeError, match=r"grad_loss must be \(B, P\)"):
        bwd(torch.tensor(1.0), x3.detach(), w.detach(), residual, FEATURE_NONE, True, False, True, True)


@pytest.mark.parametrize("device,backend", backend_params("projected_mse"))
def test_residual_layout_follows_the_teacher(device, backend):
    """feature.h's rule: a feature-major teacher (NCHW) gets a residual with its memory layout."""
    fwd, _ = _ops(backend)
    for layout, expected_fmajor in ((0, False), (1, True)):
        x3, t3, w, b = _op_args(device, layout)
        with torch.no_grad():
            _, residual = fwd(x3, t3, w, b, 0)
        B, P, Dt = residual.shape
        assert _feature.feature_major(P, Dt, residual.stride(1)) == expected_fmajor
        assert residual.stride() == t3.stride()


@cuda_only
@pytest.mark.cuda
def test_cuda_backward_rejects_a_host_grad_loss():
    # the kernels read grad_loss on the device: a CPU scalar must be an error, not a bad pointer
    fwd, bwd = _ops("cuda")
    x3, t3, w, b = _op_args(torch.device("cuda"), 0)
    with torch.no_grad():
        _, residual = fwd(x3, t3, w, b, 1)
    with pytest.raises(RuntimeError, match="grad_loss must be on the residual's device"):
        bwd(torch.tensor(1.0), x3.detach(), w.detach(), residual, 1, True, False, True, True)
