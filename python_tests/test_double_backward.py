"""Second-order gradients: correct on the reference (gradgradcheck), a clear NotImplementedError on the
fused backends, never a silent None, zero or NaN (docs/decisions.md, "Double backward")."""
from __future__ import annotations

import pytest
import torch

from kdkernels import backends, functional
from python_tests.helpers import backend_params


def _inputs(loss: str, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    if loss == "softmax_kl_div":
        return rand(4, 7), (rand(4, 7),), {"temperature": 2.0}
    if loss == "softmax_kl_div_topk":
        lq, idx = torch.log_softmax(rand(4, 7) / 2.0, -1).topk(3, -1)
        return rand(4, 7), (lq, idx), {"temperature": 2.0, "tail": "bucket"}
    if loss == "fused_linear_softmax_kl_div":  # the student's hidden states; a fixed head and teacher logits
        return rand(4, 5), (rand(7, 5),), {"teacher_logits": rand(4, 7), "temperature": 2.0, "chunk_size": 3}
    if loss == "projected_mse":
        return rand(2, 3, 5), (rand(2, 3, 4), rand(4, 5), rand(4)), {}
    if loss == "attention_transfer":  # (N, Cs, H, W) student, (N, Ct, H, W) teacher
        return rand(2, 3, 4, 3), (rand(2, 5, 4, 3),), {"p": 2.5}
    if loss == "fsp":  # the student's first map; its second, the teacher's pair (another spatial size)
        return rand(2, 3, 4, 3), (rand(2, 5, 4, 3), rand(2, 3, 2, 2), rand(2, 5, 2, 2)), {"reduction": "batchmean"}
    return rand(6, 3), (rand(6, 4),), {}  # relation losses


def _loss_of_student(loss: str, backend: str, device="cpu"):
    student, rest, options = _inputs(loss, device)
    fn = getattr(functional, loss)
    return student, lambda s: fn(s, *rest, backend=backend, **options)


@pytest.mark.parametrize("loss", backends.LOSSES)
def test_reference_second_derivatives_are_right(loss):
    student, f = _loss_of_student(loss, "torch")
    assert torch.autograd.gradgradcheck(f, (student.requires_grad_(),))


@pytest.mark.parametrize("loss", ["rkd_angle", "rkd"])  # the losses with the angle term's duplicate-pair clamp
def test_reference_angle_has_no_nan_second_derivative_at_duplicates(loss):
    student, f = _loss_of_student(loss, "torch")
    student = student.clone()
    student[1] = student[0]  # a coincident pair: u = 0 there, no gradient through it
    student.requires_grad_()
    (grad,) = torch.autograd.grad(f(student), student, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), student)
    assert torch.isfinite(second).all()


def _fused_cases():
    out = []
    for loss in backends.LOSSES:
        for p in backend_params(loss):
            out.append(pytest.param(loss, *p.values, id=f"{loss}-{p.id}", marks=p.marks))
    return out


@pytest.mark.parametrize("loss,device,backend", _fused_cases())
def test_fused_double_backward_raises(loss, device, backend):
    student, f = _loss_of_student(loss, backend, device)
    student.requires_grad_()
    (plain,) = torch.autograd.grad(f(student), student)
    # The error comes at the create_graph backward (when the gradient could not be differentiated,
    # e.g. projected_mse's grad_x from its saved residual) or at the backward through the gradient.
    with pytest.raises(NotImplementedError, match="double backward"):
        (grad,) = torch.autograd.grad(f(student), student, create_graph=True)
        torch.testing.assert_close(grad.detach(), plain)  # create_graph alone gives the same gradient
        grad.square().sum().backward()
