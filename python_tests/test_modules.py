"""The nn.Module losses are thin: same numbers as the functional API, parameters like nn.Linear."""
from __future__ import annotations

import torch

import kdkernels
from kdkernels import functional as F


def test_softmax_kl_module_matches_functional():
    s, t = torch.randn(4, 30, requires_grad=True), torch.randn(4, 30)
    labels = torch.tensor([0, -100, 1, 2])
    mod = kdkernels.SoftmaxKLDivLoss(temperature=3.0, divergence="reverse", reduction="sum")
    assert torch.equal(mod(s, t, labels), F.softmax_kl_div(s, t, 3.0, "reverse", reduction="sum", labels=labels))


def test_projected_mse_module_initialised_like_linear():
    torch.manual_seed(7)
    mod = kdkernels.ProjectedMSELoss(12, 20)
    torch.manual_seed(7)
    lin = torch.nn.Linear(12, 20)
    assert mod.weight.shape == (20, 12) and mod.bias.shape == (20,)
    assert torch.equal(mod.weight, lin.weight) and torch.equal(mod.bias, lin.bias)
    assert {n for n, _ in mod.named_parameters()} == {"weight", "bias"}


def test_projected_mse_module_forward_and_grads():
    mod = kdkernels.ProjectedMSELoss(3, 5, feature_dim=1)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4)
    loss = mod(x, t)
    expected = torch.nn.functional.mse_loss(torch.nn.functional.conv2d(x, mod.weight[:, :, None, None], mod.bias), t)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert x.grad is not None and mod.weight.grad is not None and mod.bias.grad is not None


def test_projected_mse_module_without_bias():
    mod = kdkernels.ProjectedMSELoss(3, 5, bias=False)
    assert mod.bias is None and [n for n, _ in mod.named_parameters()] == ["weight"]


def test_relation_modules_match_functional():
    s, t = torch.randn(6, 8), torch.randn(6, 3)
    assert torch.equal(kdkernels.RKDDistanceLoss()(s, t), F.rkd_distance(s, t))
    assert torch.equal(kdkernels.RKDAngleLoss(reduction="sum")(s, t), F.rkd_angle(s, t, reduction="sum"))
    assert torch.equal(kdkernels.SimilarityPreservingLoss()(s, t), F.similarity_preserving(s, t))
    combined = kdkernels.RKDLoss(distance_weight=2.0, angle_weight=3.0)(s, t)
    assert torch.equal(combined, F.rkd(s, t, distance_weight=2.0, angle_weight=3.0))
    # the one fused op and the two separate ones agree (each is held to the spec in test_relation.py)
    torch.testing.assert_close(combined, 2.0 * F.rkd_distance(s, t) + 3.0 * F.rkd_angle(s, t))
    assert "angle_weight=3.0" in repr(kdkernels.RKDLoss(distance_weight=2.0, angle_weight=3.0))
