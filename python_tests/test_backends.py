"""Backend dispatch (docs/design.md §1): auto choice, KDKERNELS_BACKEND, clear errors, no silent fallback."""
from __future__ import annotations

import pytest
import torch

from kdkernels import _native, backends, functional

CPU = torch.device("cpu")


def test_auto_on_cpu_picks_cpu_extension_when_built():
    expected = "cpu" if _native.cpu_loaded else "torch"
    assert backends.resolve("softmax_kl_div", "auto", CPU) == expected


def test_auto_on_cpu_for_every_loss():
    expected = "cpu" if _native.cpu_loaded else "torch"
    for loss in backends.LOSSES:
        assert backends.resolve(loss, "auto", CPU) == expected, loss


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


def test_unported_loss_on_fused_backend_says_not_implemented(monkeypatch):
    if not _native.cpu_loaded:
        pytest.skip("needs the C++ extension to reach the not-implemented check")
    # every loss has a CPU kernel today: pretend one has not, as a loss being ported would
    monkeypatch.setitem(backends.IMPLEMENTED, "rkd_angle", frozenset({"torch"}))
    with pytest.raises(NotImplementedError, match="not implemented for backend 'cpu' yet"):
        functional.rkd_angle(torch.randn(3, 4), torch.randn(3, 4), backend="cpu")
    assert backends.resolve("rkd_angle", "auto", CPU) == "torch"


def test_implemented_backends_lists_only_runnable():
    got = backends.implemented_backends("softmax_kl_div", CPU)
    assert got[0] == "torch"
    assert ("cpu" in got) == _native.cpu_loaded
    assert "cuda" not in got
