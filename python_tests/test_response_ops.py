"""Op-level checks of the softmax-KL dispatcher ops: gradcheck (float64) and torch.library.opcheck."""
from __future__ import annotations

import pytest
import torch

from helpers import backend_params
from kdkernels import _native, functional, ops
from kdkernels.ops import response as response_ops

needs_cpu_ext = pytest.mark.skipif(not _native.cpu_loaded, reason=f"C++ extension not built: {_native.cpu_error}")


@needs_cpu_ext
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("t2_scale", [True, False])
def test_gradcheck_cpu(divergence, t2_scale):
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(4, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(4, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([0, -100, 2, 1])

    def f(s, t):
        return functional.softmax_kl_div(s, t, temperature=1.7, divergence=divergence, beta=0.3, labels=labels,
                                         reduction="none", t2_scale=t2_scale, backend="cpu")

    assert torch.autograd.gradcheck(f, (s, t))


def _op_args(device, dtype=torch.float32, labels=True, divergence=2):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(5, 37, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    t = torch.randn(5, 37, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    lab = torch.tensor([1, -100, 3, 4, 0], device=device) if labels else None
    return s, t, lab, 1.5, divergence, 0.4, -100, True


def _ops(backend):
    return ops.SOFTMAX_KL.forward_ops[backend], ops.SOFTMAX_KL.backward_ops[backend]


@pytest.mark.parametrize("device,backend", backend_params("softmax_kl_div"))
@pytest.mark.parametrize("divergence", [0, 1, 2])
def test_opcheck_forward(device, backend, divergence):
    fwd, _ = _ops(backend)
    torch.library.opcheck(fwd, _op_args(device, divergence=divergence))
    torch.library.opcheck(fwd, _op_args(device, labels=False, divergence=divergence))


@pytest.mark.parametrize("device,backend", backend_params("softmax_kl_div"))
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)])
def test_opcheck_backward(device, backend, grads):
    fwd, bwd = _ops(backend)
    s, t, lab, T, div, beta, ii, t2 = _op_args(device)
    with torch.no_grad():
        loss, stats = fwd(s, t, lab, T, div, beta, ii, t2)
    grad_loss = torch.rand_like(loss)
    torch.library.opcheck(bwd, (grad_loss, s.detach(), t.detach(), lab, stats, T, div, beta, ii, t2, *grads))


def test_divergence_codes_match_schema_doc():
    # the C++ schema comment and the header enum use 0/1/2 for forward/reverse/jsd
    assert response_ops.DIVERGENCE_CODES == {"forward": 0, "reverse": 1, "jsd": 2}
