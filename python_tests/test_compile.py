"""torch.compile(fullgraph=True) traces models using each loss without graph breaks, fwd + bwd."""
from __future__ import annotations

import pytest
import torch

import kdkernels
from helpers import assert_close, backend_params, TOLERANCES


class StudentWithKD(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.head = torch.nn.Linear(16, 40)
        self.loss = loss

    def forward(self, x, teacher_logits, labels):
        return self.loss(self.head(x), teacher_logits, labels)


@pytest.mark.parametrize("device,backend", backend_params("softmax_kl_div"))
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("divergence", ["forward", "jsd"])  # the one-pass step's fast path and generic path
def test_softmax_kl_compiles_fullgraph(device, backend, compile_backend, divergence):
    if compile_backend == "inductor" and backend == "triton" and device.type == "cpu":
        pytest.skip("inductor + interpreted Triton on CPU adds nothing over aot_eager; run on GPU")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = StudentWithKD(kdkernels.SoftmaxKLDivLoss(temperature=2.0, divergence=divergence, backend=backend)).to(device)
    x = torch.randn(6, 16, device=device)
    teacher = torch.randn(6, 40, device=device)
    labels = torch.tensor([1, 2, -100, 3, 4, 5], device=device)

    eager_loss = model(x, teacher, labels)
    eager_grad, = torch.autograd.grad(eager_loss, model.head.weight)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    loss = compiled(x, teacher, labels)
    grad, = torch.autograd.grad(loss, model.head.weight)
    assert_close(loss, eager_loss, torch.float32, what="loss")
    assert_close(grad, eager_grad, torch.float32, what="grad")


class StudentWithHint(torch.nn.Module):
    """A conv student whose NCHW feature map is matched to a teacher's through a 1x1 projection."""

    def __init__(self, loss):
        super().__init__()
        self.body = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.loss = loss

    def forward(self, images, teacher_features):
        return self.loss(self.body(images), teacher_features)


@pytest.mark.parametrize("device,backend", backend_params("projected_mse"))
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_projected_mse_compiles_fullgraph(device, backend, compile_backend, reduction):
    if compile_backend == "inductor" and backend == "triton" and device.type == "cpu":
        pytest.skip("inductor + interpreted Triton on CPU adds nothing over aot_eager; run on GPU")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = StudentWithHint(kdkernels.ProjectedMSELoss(8, 12, feature_dim=1, reduction=reduction,
                                                       backend=backend)).to(device)
    images = torch.randn(2, 3, 5, 5, device=device)
    teacher = torch.randn(2, 12, 5, 5, device=device)
    params = (model.body.weight, model.loss.weight, model.loss.bias)
    upstream = torch.rand(2, 5, 5, device=device) if reduction == "none" else torch.ones((), device=device)

    eager_loss = model(images, teacher)
    eager_grads = torch.autograd.grad(eager_loss, params, upstream)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    loss = compiled(images, teacher)
    assert loss.shape == upstream.shape
    grads = torch.autograd.grad(loss, params, upstream)
    assert_close(loss, eager_loss, torch.float32, what="loss")
    for g, e, name in zip(grads, eager_grads, ("body.weight", "loss.weight", "loss.bias")):
        assert_close(g, e, torch.float32, what=f"grad {name}")


class EmbedderWithRelationKD(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.head = torch.nn.Linear(16, 12)
        self.loss = loss

    def forward(self, x, teacher_embeddings):
        return self.loss(self.head(x), teacher_embeddings)


RELATION_MODULES = {
    "rkd_distance": lambda backend: kdkernels.RKDDistanceLoss(backend=backend),
    "rkd_angle": lambda backend: kdkernels.RKDAngleLoss(reduction="sum", backend=backend),
    "rkd": lambda backend: kdkernels.RKDLoss(distance_weight=1.0, angle_weight=2.0, backend=backend),
    "similarity_preserving": lambda backend: kdkernels.SimilarityPreservingLoss(backend=backend),
}


RELATION_PARAMS = [pytest.param(loss, *p.values, id=f"{loss}-{p.id}", marks=p.marks)
                   for loss in RELATION_MODULES for p in backend_params(loss)]


@pytest.mark.parametrize("loss,device,backend", RELATION_PARAMS)
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_relation_losses_compile_fullgraph(loss, device, backend, compile_backend):
    if compile_backend == "inductor" and backend == "triton" and device.type == "cpu":
        pytest.skip("inductor + interpreted Triton on CPU adds nothing over aot_eager; run on GPU")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = EmbedderWithRelationKD(RELATION_MODULES[loss](backend)).to(device)
    x = torch.randn(10, 16, device=device)
    teacher = torch.randn(10, 7, device=device)
    eager_loss = model(x, teacher)
    eager_grad, = torch.autograd.grad(eager_loss, model.head.weight)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    loss_value = compiled(x, teacher)
    grad, = torch.autograd.grad(loss_value, model.head.weight)
    assert_close(loss_value, eager_loss, torch.float32, what="loss")
    assert_close(grad, eager_grad, torch.float32, what="grad")


@pytest.mark.parametrize("loss,device,backend", [p for p in RELATION_PARAMS if p.values[0] in ("rkd", "similarity_preserving")])
def test_relation_per_row_losses_compile_fullgraph(loss, device, backend):
    # reduction="none": the ops' (B,) output and (B,) upstream gradient through the fakes and autograd
    torch._dynamo.reset()
    torch.manual_seed(0)
    cls = kdkernels.RKDLoss if loss == "rkd" else kdkernels.SimilarityPreservingLoss
    model = EmbedderWithRelationKD(cls(reduction="none", backend=backend)).to(device)
    x = torch.randn(10, 16, device=device)
    teacher = torch.randn(10, 7, device=device)
    w = torch.linspace(-0.5, 2.0, 10, device=device)
    eager_loss = model(x, teacher)
    eager_grad, = torch.autograd.grad(eager_loss, model.head.weight, w)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_value = compiled(x, teacher)
    grad, = torch.autograd.grad(loss_value, model.head.weight, w)
    assert loss_value.shape == (10,)
    assert_close(loss_value, eager_loss, torch.float32, what="loss")
    assert_close(grad, eager_grad, torch.float32, what="grad")


@pytest.mark.parametrize("device,backend", backend_params("attention_transfer"))
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_attention_transfer_compiles_fullgraph(device, backend, compile_backend, reduction):
    if compile_backend == "inductor" and backend == "triton" and device.type == "cpu":
        pytest.skip("inductor + interpreted Triton on CPU adds nothing over aot_eager; run on GPU")
    torch._dynamo.reset()
    torch.manual_seed(0)
    body = torch.nn.Conv2d(3, 6, 3, padding=1).to(device)
    loss_fn = kdkernels.AttentionTransferLoss(p=2.0, reduction=reduction, backend=backend)

    def step(images, teacher):
        return loss_fn(body(images), teacher)

    images = torch.randn(2, 3, 5, 5, device=device)
    teacher = torch.randn(2, 8, 5, 5, device=device)
    upstream = torch.rand(2, device=device) + 0.5 if reduction == "none" else torch.ones((), device=device)
    eager_loss = step(images, teacher)
    eager_grads = torch.autograd.grad(eager_loss, tuple(body.parameters()), upstream)
    loss = torch.compile(step, fullgraph=True, backend=compile_backend)(images, teacher)
    grads = torch.autograd.grad(loss, tuple(body.parameters()), upstream)
    assert_close(loss, eager_loss, torch.float32, what="loss")
    for g, e in zip(grads, eager_grads):
        assert_close(g, e, torch.float32, what="grad")


@pytest.mark.parametrize("device,backend", backend_params("fsp"))
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fsp_compiles_fullgraph(device, backend, compile_backend, reduction):
    if compile_backend == "inductor" and backend == "triton" and device.type == "cpu":
        pytest.skip("inductor + interpreted Triton on CPU adds nothing over aot_eager; run on GPU")
    torch._dynamo.reset()
    torch.manual_seed(0)
    first = torch.nn.Conv2d(3, 4, 3, padding=1).to(device)
    second = torch.nn.Conv2d(4, 6, 3, padding=1).to(device)
    loss_fn = kdkernels.FSPLoss(weights=[1.0, 0.5], reduction=reduction, backend=backend)

    def step(images, t1, t2, t3):
        a = first(images)
        b = second(a)
        return loss_fn([(a, b), (images, a)], [(t1, t2), (t3, t1)])

    images = torch.randn(2, 3, 5, 5, device=device)
    t1, t2, t3 = (torch.randn(2, c, 3, 3, device=device) for c in (4, 6, 3))
    upstream = torch.rand(2, device=device) + 0.5 if reduction == "none" else torch.ones((), device=device)
    params = tuple(first.parameters()) + tuple(second.parameters())
    eager_loss = step(images, t1, t2, t3)
    eager_grads = torch.autograd.grad(eager_loss, params, upstream)
    loss = torch.compile(step, fullgraph=True, backend=compile_backend)(images, t1, t2, t3)
    grads = torch.autograd.grad(loss, params, upstream)
    assert_close(loss, eager_loss, torch.float32, what="loss")
    for g, e in zip(grads, eager_grads):
        assert_close(g, e, torch.float32, what="grad")
