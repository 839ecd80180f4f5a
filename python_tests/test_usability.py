"""What a new user trips on (issue #10 §4): options checked where they are written, clear errors,
complete reprs and docstrings, no silent surprises."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import kdkernels
from kdkernels import backends, functional
from kdkernels.bench.__main__ import main as bench_main

MODULES = [kdkernels.SoftmaxKLDivLoss, kdkernels.RKDDistanceLoss, kdkernels.RKDAngleLoss,
           kdkernels.SimilarityPreservingLoss, kdkernels.RKDLoss]


# ---- options are checked at construction -------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    ({"temperature": 0}, ValueError, "temperature"),
    ({"temperature": math.inf}, ValueError, "temperature"),
    ({"temperature": math.nan}, ValueError, "temperature"),
    ({"divergence": "foo"}, ValueError, "divergence"),
    ({"reduction": "foo"}, ValueError, "reduction"),
    ({"backend": "foo"}, ValueError, "backend"),
    ({"backend": 3}, TypeError, "backend"),
    ({"divergence": "jsd", "beta": 2.0}, ValueError, "beta"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ({"t2_scale": 1}, TypeError, "t2_scale"),
])
def test_kl_module_checks_options_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        kdkernels.SoftmaxKLDivLoss(**kwargs)


@pytest.mark.parametrize("module", MODULES[1:], ids=lambda m: m.__name__)
@pytest.mark.parametrize("kwargs,match", [({"reduction": "foo"}, "reduction"), ({"backend": "foo"}, "backend")])
def test_relation_modules_check_options_at_construction(module, kwargs, match):
    with pytest.raises(ValueError, match=match):
        module(**kwargs)


@pytest.mark.parametrize("kwargs,match", [({"reduction": "foo"}, "reduction"), ({"backend": "gpu"}, "backend"),
                                          ({"feature_dim": "1"}, "feature_dim")])
def test_projected_mse_module_checks_options_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kdkernels.ProjectedMSELoss(4, 6, **kwargs)


def test_infinite_temperature_is_refused_by_the_function():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        functional.softmax_kl_div(s, t, temperature=math.inf)


@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_beta_is_not_checked_where_it_is_unused(divergence):
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    expected = functional.softmax_kl_div(s, t, divergence=divergence, backend="torch")
    got = functional.softmax_kl_div(s, t, divergence=divergence, beta=2.0)
    torch.testing.assert_close(got, expected)
    assert kdkernels.SoftmaxKLDivLoss(divergence=divergence, beta=2.0).beta == 2.0


def test_labels_of_the_wrong_type_name_labels():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    with pytest.raises(TypeError, match="labels"):
        kdkernels.SoftmaxKLDivLoss()(s, t, 2.0)  # a temperature passed where labels go


def test_implemented_backends_takes_a_device_string():
    assert backends.implemented_backends("softmax_kl_div", "cpu") == backends.implemented_backends(
        "softmax_kl_div", torch.device("cpu"))
    assert "torch" in backends.implemented_backends("rkd", "cpu")
    with pytest.raises(ValueError, match="loss"):
        backends.implemented_backends("kl", "cpu")


# ---- reprs and docstrings ------------------------------------------------------------------------
def test_reprs_show_every_option():
    r = repr(kdkernels.SoftmaxKLDivLoss(temperature=2.0, ignore_index=-1, t2_scale=False, backend="torch"))
    for part in ("temperature=2.0", "ignore_index=-1", "t2_scale=False", "backend='torch'"):
        assert part in r
    assert "backend='torch'" in repr(kdkernels.ProjectedMSELoss(4, 6, backend="torch"))


def test_similarity_preserving_default_is_spelled_out():
    import inspect

    assert inspect.signature(kdkernels.SimilarityPreservingLoss).parameters["reduction"].default == "mean"
    assert kdkernels.SimilarityPreservingLoss().reduction == "mean"


@pytest.mark.parametrize("module", MODULES + [kdkernels.ProjectedMSELoss], ids=lambda m: m.__name__)
def test_forward_has_its_own_docstring(module):
    assert module.forward.__doc__ and module.forward.__doc__ != torch.nn.Module.forward.__doc__


def test_jsd_docstring_says_which_distribution_is_the_teacher():
    doc = functional.softmax_kl_div.__doc__
    assert "q = softmax(teacher_logits" in doc and "p = softmax(student_logits" in doc


# ---- relation losses and the teacher's gradient --------------------------------------------------
@pytest.mark.parametrize("loss", ["rkd_distance", "rkd_angle", "rkd", "similarity_preserving"])
def test_relation_loss_warns_that_the_teacher_gets_no_gradient(loss):
    s = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 3, requires_grad=True)
    with pytest.warns(UserWarning, match="teacher gets no gradient"):
        getattr(functional, loss)(s, t).backward()
    assert t.grad is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(functional, loss)(s, t.detach())  # a detached teacher: no warning


# ---- Triton interpreter: no numpy noise ------------------------------------------------------------
def test_triton_interpreter_prints_no_numpy_warnings():
    if backends.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("the Triton interpreter is not enabled here")
    s = torch.randn(4, 33)
    s[0, :5] = -math.inf  # masked vocabulary: -inf - -inf inside the kernel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        functional.softmax_kl_div(s, torch.randn(4, 33), backend="triton")


# ---- bench -----------------------------------------------------------------------------------------
def test_bench_says_when_nothing_can_run(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU (the cuda backend runs on this one)")
    assert bench_main(["--preset", "smoke", "--backends", "cuda", "--out", str(tmp_path)]) == 2
    assert "none of the backends cuda runs on cpu" in capsys.readouterr().err
