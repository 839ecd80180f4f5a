"""Backend dispatch (DESIGN §1): auto choice, KDKERNELS_BACKEND, clear errors, no silent fallback."""
from __future__ import annotations

import pytest
import torch

from kdkernels import _native, backends, functional

CPU = torch.device("cpu")


def test_auto_on_cpu_picks_cpu_extension_when_built():
    expected = "cpu" if _native.cpu_loaded else "torch"
    assert backends.resolve("softmax_kl_div", "auto", CPU) == expected


def test_auto_for_unported_losses_is_torch():
    for loss in ("projected_mse", "rkd_distance", "rkd_angle", "similarity_preserving"):
        if backends.IMPLEMENTED[loss] == {"torch"}:
            assert backends.resolve(loss, "auto", CPU) == "torch"


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve("softmax_kl_div", "auto", CPU) == "torch"


def test_env_var_does_not_override_explicit_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    assert backends.resolve("softmax_kl_div", "torch", CPU) == "torch"


def test_env_var_unknown_name(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.resolve("softmax_kl_div", "auto", CPU)


def test_unavailable_backend_raises_instead_of_falling_back():
    with pytest.raises(RuntimeError, match="cuda"):
        functional.softmax_kl_div(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")


def test_unported_loss_on_fused_backend_says_not_implemented():
    if not _native.cpu_loaded:
        pytest.skip("needs the C++ extension to reach the not-implemented check")
    unported = [loss for loss in backends.LOSSES if "cpu" not in backends.IMPLEMENTED[loss]]
    if not unported:
        pytest.skip("every loss has a CPU kernel")
    with pytest.raises(NotImplementedError, match="not implemented for backend 'cpu' yet"):
        backends.resolve(unported[0], "cpu", CPU)


def test_implemented_backends_lists_only_runnable():
    got = backends.implemented_backends("softmax_kl_div", CPU)
    assert got[0] == "torch"
    assert ("cpu" in got) == _native.cpu_loaded
    assert "cuda" not in got
