"""Op-level checks of the projected-MSE dispatcher ops: gradcheck (float64) and torch.library.opcheck."""
from __future__ import annotations

import pytest
import torch

from helpers import backend_params, cuda_only
from kdkernels import _feature, _native, functional, ops

needs_cpu_ext = pytest.mark.skipif(not _native.cpu_loaded, reason=f"C++ extension not built: {_native.cpu_error}")

# (student shape, teacher shape, feature_dim): features last, and an NCHW map (feature-major layout)
LAYOUTS = [((5, 7), (5, 4), -1), ((2, 3, 4, 3), (2, 5, 4, 3), 1)]


@needs_cpu_ext
@pytest.mark.parametrize("x_shape,t_shape,fd", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
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
@pytest.mark.parametrize("reduction", [0, 2])
def test_opcheck_forward(device, backend, layout, bias, reduction):
    fwd, _ = _ops(backend)
    x3, t3, w, b = _op_args(device, layout, bias)
    torch.library.opcheck(fwd, (x3, t3, w, b, reduction))


@pytest.mark.parametrize("device,backend", backend_params("projected_mse"))
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("grads", [(True, True, True, True), (True, False, False, False),
                                   (False, True, False, True), (False, False, True, False)])
def test_opcheck_backward(device, backend, layout, grads):
    fwd, bwd = _ops(backend)
    x3, t3, w, b = _op_args(device, layout)
    with torch.no_grad():
        loss, residual = fwd(x3, t3, w, b, 1)
    grad_loss = torch.rand_like(loss)
    x_grad, t_grad, w_grad, b_grad = grads
    torch.library.opcheck(bwd, (grad_loss, x3.detach(), w.detach(), residual, 1, x_grad, t_grad, w_grad, b_grad))


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
