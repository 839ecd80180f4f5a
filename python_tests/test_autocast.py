"""Mixed precision: every loss under autocast (bf16; CPU here, CUDA on a GPU), and inputs of different floating dtypes.

Autocast makes a student's layers produce bf16 while the teacher's outputs, a projection's weight
or the labels' teacher stay fp32. As ``F.mse_loss`` does, the losses compute in the inputs' common
dtype (docs/decisions.md, "Mixed precision"); each gradient comes back in its input's dtype. The
fused kernels are not re-cast by autocast: they compute in float32 op-math from what they get.
"""
from __future__ import annotations

import pytest
import torch

from kdkernels import functional
from python_tests.helpers import backend_params

LOSSES = ["softmax_kl_div", "projected_mse", "attention_transfer", "rkd_distance", "rkd_angle", "rkd", "similarity_preserving", "fsp"]


def _teacher_side(loss: str, g: torch.Generator, device):
    if loss == "projected_mse":  # (teacher features, weight, bias): fp32, like a module's parameters
        return (torch.randn(4, 5, 12, generator=g).to(device), torch.randn(12, 8, generator=g).to(device),
                torch.randn(12, generator=g).to(device))
    if loss == "softmax_kl_div":
        return (torch.randn(4, 5, 8, generator=g).to(device),)
    if loss == "attention_transfer":  # (N, Ct, positions) maps beside the student's (4, 5, 8)
        return (torch.randn(4, 3, 8, generator=g).to(device),)
    if loss == "fsp":  # the student's fp32 second map (4, 3, 8) beside its bf16 first (4, 5, 8); the teacher's pair
        return (torch.randn(4, 3, 8, generator=g).to(device), torch.randn(4, 5, 6, generator=g).to(device),
                torch.randn(4, 3, 6, generator=g).to(device))
    return (torch.randn(4, 5, 6, generator=g).to(device),)


def _cases():
    out = []
    for loss in LOSSES:
        out.append(pytest.param(loss, torch.device("cpu"), "torch", id=f"{loss}-cpu-torch"))
        for p in backend_params(loss):  # CUDA ones run on a GPU (benchmarks/gpu_check.sh), skipped here
            out.append(pytest.param(loss, *p.values, id=f"{loss}-{p.id}", marks=p.marks))
    return out


@pytest.mark.parametrize("loss,device,backend", _cases())
def test_loss_under_autocast_bf16(loss, device, backend):
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(8, 8).to(device)  # the student's last layer
    x = torch.randn(4, 5, 8, generator=g).to(device)
    teacher_side = _teacher_side(loss, g, device)
    fn = getattr(functional, loss)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        student = layer(x)
        assert student.dtype == torch.bfloat16
        got = fn(student, *teacher_side, backend=backend)
    got.backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    # the same bf16 student outputs, promoted by hand, through the fp32 reference outside autocast
    expected = fn(student.detach().float(), *teacher_side, backend="torch")
    assert got.dtype == torch.float32
    # every backend computes in fp32 op-math: the fused kernels are not re-cast by autocast, and the
    # reference runs outside it
    torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss,device,backend", [c for c in _cases() if c.values[0] == "projected_mse"])
def test_projected_mse_none_under_autocast_bf16(loss, device, backend):
    """reduction="none" on the autocast path: per-row fp32 losses, and a non-uniform upstream gradient
    reaches the bf16 student's layer as through the reference."""
    g = torch.Generator().manual_seed(2)
    layers = [torch.nn.Linear(8, 8).to(device) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(4, 5, 8, generator=g).to(device)
    t, w, b = _teacher_side(loss, g, device)
    upstream = torch.rand(4, 5, generator=g).to(device) * 2 - 0.5
    results = []
    for layer, bk in zip(layers, (backend, "torch")):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got = functional.projected_mse(layer(x), t, w, b, reduction="none", backend=bk)
        got.backward(upstream)
        results.append(got.detach())
    assert results[0].shape == (4, 5) and results[0].dtype == torch.float32
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layers[0].weight.grad, layers[1].weight.grad, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("loss", LOSSES)
def test_mixed_dtypes_give_each_gradient_in_its_dtype(loss):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 5, 8, generator=g).to(torch.bfloat16).requires_grad_()
    teacher_side = [t.requires_grad_() for t in _teacher_side(loss, g, "cpu")]
    fn = getattr(functional, loss)
    loss_value = fn(student, *teacher_side)
    loss_value.backward()
    assert student.grad is not None and student.grad.dtype == torch.bfloat16
    for t in teacher_side:
        if t.grad is not None:  # relation losses give the teacher no gradient
            assert t.grad.dtype == torch.float32
    expected = fn(student.detach().float(), *[t.detach() for t in teacher_side], backend="torch")
    torch.testing.assert_close(loss_value.detach(), expected, rtol=1e-4, atol=1e-5)


def test_promotion_does_not_touch_the_inputs():
    s = torch.randn(3, 7, dtype=torch.bfloat16)
    t = torch.randn(3, 7, dtype=torch.float64)
    before = s.clone(), t.clone()
    functional.softmax_kl_div(s, t)
    assert s.dtype == torch.bfloat16 and torch.equal(s, before[0]) and torch.equal(t, before[1])
