"""Bad input gets a ValueError / TypeError naming the argument (docs/design.md §2.4), one test each."""
from __future__ import annotations

import pytest
import torch

import kdkernels
from kdkernels import functional as F

S, T = torch.randn(4, 10), torch.randn(4, 10)


def kl(**kw):
    args = dict(student_logits=S, teacher_logits=T)
    args.update(kw)
    return F.softmax_kl_div(**args)


# ---- softmax_kl_div ------------------------------------------------------------------------
def test_kl_shape_mismatch():
    with pytest.raises(ValueError, match="teacher_logits"):
        kl(teacher_logits=torch.randn(4, 11))


def test_kl_non_floating_dtype():
    with pytest.raises(TypeError, match="student_logits"):
        kl(student_logits=torch.ones(4, 10, dtype=torch.int64))


def test_kl_not_a_tensor():
    with pytest.raises(TypeError, match="teacher_logits"):
        kl(teacher_logits=[[1.0] * 10] * 4)


def test_kl_mixed_dtypes_are_promoted():  # as F.mse_loss; test_autocast.py checks the values
    assert kl(teacher_logits=T.double()).dtype == torch.float64


def test_kl_device_mismatch():
    with pytest.raises(ValueError, match="teacher_logits.*device"):
        kl(teacher_logits=T.to("meta"))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_kl_temperature_not_positive(temperature):
    with pytest.raises(ValueError, match="temperature"):
        kl(temperature=temperature)


@pytest.mark.parametrize("beta", [0.0, 1.0, 1.5, -0.1])
def test_kl_beta_outside_unit_interval(beta):
    with pytest.raises(ValueError, match="beta"):
        kl(divergence="jsd", beta=beta)


def test_kl_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        kl(reduction="average")


def test_kl_unknown_divergence():
    with pytest.raises(ValueError, match="divergence"):
        kl(divergence="hellinger")


def test_kl_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        kl(backend="tpu")


def test_kl_labels_wrong_shape():
    with pytest.raises(ValueError, match="labels"):
        kl(labels=torch.zeros(5, dtype=torch.int64))


def test_kl_labels_wrong_dtype():
    with pytest.raises(TypeError, match="labels"):
        kl(labels=torch.zeros(4))


def test_kl_labels_wrong_device():
    with pytest.raises(ValueError, match="labels"):
        kl(labels=torch.zeros(4, dtype=torch.int64, device="meta"))


def test_kl_scalar_input():
    with pytest.raises(ValueError, match="student_logits"):
        kl(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0))


def test_kl_empty_vocab():
    with pytest.raises(ValueError, match="student_logits"):
        kl(student_logits=torch.randn(4, 0), teacher_logits=torch.randn(4, 0))


# ---- projected_mse ---------------------------------------------------------------------------
X, TF, W, B = torch.randn(3, 5), torch.randn(3, 7), torch.randn(7, 5), torch.randn(7)


def test_mse_weight_mismatch():
    with pytest.raises(ValueError, match="weight"):
        F.projected_mse(X, TF, torch.randn(7, 6), B)


def test_mse_teacher_mismatch():
    with pytest.raises(ValueError, match="teacher"):
        F.projected_mse(X, torch.randn(3, 8), W, B)


def test_mse_bias_mismatch():
    with pytest.raises(ValueError, match="bias"):
        F.projected_mse(X, TF, W, torch.randn(6))


def test_mse_feature_dim_out_of_range():
    with pytest.raises(ValueError, match="feature_dim"):
        F.projected_mse(X, TF, W, B, feature_dim=2)


def test_mse_mixed_dtypes_are_promoted():  # as F.mse_loss; test_autocast.py checks the values
    assert F.projected_mse(X, TF, W.double(), B).dtype == torch.float64


def test_mse_device_mismatch():
    with pytest.raises(ValueError, match="weight.*device"):
        F.projected_mse(X, TF, W.to("meta"), B)


def test_mse_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        F.projected_mse(X, TF, W, B, reduction="elementwise")


# ---- relation losses -------------------------------------------------------------------------
RELATION = [F.rkd_distance, F.rkd_angle, F.rkd, F.similarity_preserving]


@pytest.mark.parametrize("fn", RELATION)
def test_relation_batch_too_small(fn):
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.randn(1, 4), torch.randn(1, 6))


@pytest.mark.parametrize("fn", RELATION)
def test_relation_batch_mismatch(fn):
    with pytest.raises(ValueError, match="teacher"):
        fn(torch.randn(3, 4), torch.randn(4, 4))


@pytest.mark.parametrize("fn", RELATION)
def test_relation_non_floating(fn):
    with pytest.raises(TypeError, match="student"):
        fn(torch.ones(3, 4, dtype=torch.int32), torch.randn(3, 4))


@pytest.mark.parametrize("fn", RELATION)
def test_relation_unknown_reduction(fn):
    with pytest.raises(ValueError, match="reduction"):
        fn(torch.randn(3, 4), torch.randn(3, 4), reduction="avg")


@pytest.mark.parametrize("fn", RELATION)
def test_relation_device_mismatch(fn):
    with pytest.raises(ValueError, match="teacher.*device"):
        fn(torch.randn(3, 4), torch.randn(3, 4, device="meta"))


@pytest.mark.parametrize("name,value,error", [
    ("distance_weight", -1.0, ValueError), ("angle_weight", float("nan"), ValueError),
    ("angle_weight", float("inf"), ValueError), ("distance_weight", "1", TypeError), ("angle_weight", None, TypeError),
])
def test_rkd_bad_weight(name, value, error):
    with pytest.raises(error, match=name):
        F.rkd(torch.randn(3, 4), torch.randn(3, 4), **{name: value})
    with pytest.raises(error, match=name):
        kdkernels.RKDLoss(**{name: value})


def test_rkd_both_weights_zero():
    with pytest.raises(ValueError, match="distance_weight and angle_weight"):
        F.rkd(torch.randn(3, 4), torch.randn(3, 4), distance_weight=0.0, angle_weight=0)
