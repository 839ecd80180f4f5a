"""Shared test helpers: the per-dtype tolerance table and the (device, backend) pairs under test."""
from __future__ import annotations

import pytest
import torch

from kdkernels import backends

# One table: (rtol, atol) per input dtype, applied to values scaled by the reference's magnitude
# (atol is multiplied by max(1, max |expected|)). Losses are computed in float32 for every
# reduced-precision input, so their tolerance is float32's; gradients come back in the input dtype.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 2e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (2e-2, 1e-2),
}
LOSS_TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 2e-5),
    torch.float16: (1e-4, 2e-5),
    torch.bfloat16: (1e-4, 2e-5),
}

HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, table=TOLERANCES, what="",
                 eager_same_precision: torch.Tensor | None = None):
    """``actual`` (a kernel's result for inputs of ``dtype``) against ``expected`` (the float64 spec).

    ``eager_same_precision``, if given, is the eager reference run in the kernel's own op-math
    precision on the same inputs: where even it cannot meet the table (e.g. fp32 logits of 1e3
    divided by T round at 1e-5 of their differences), a few times its error is allowed instead.
    """
    rtol, atol = table[dtype]
    # compared on the host in float64: a CUDA kernel's result meets a spec computed on the CPU
    expected = expected.detach().to("cpu", torch.float64)
    actual = actual.detach().to("cpu", torch.float64)
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    atol = atol * scale
    if eager_same_precision is not None and dtype != torch.float64:
        err = (eager_same_precision.detach().to("cpu", torch.float64) - expected).abs()
        err = err[torch.isfinite(err)]
        if err.numel():
            atol = max(atol, 4 * err.max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                      natural: float = 0.0):
    """A gradient against the float64 spec, both divided by the spec's largest magnitude.

    ``assert_close``'s absolute floor (atol x max(1, |expected|)) suits values of order 1; a loss
    reduced by "mean" over many entries has gradients far below 1, where that floor would accept
    anything near zero, even all zeros. ``natural``, the size a gradient entry has for this case,
    floors the scale at a tenth of it: a gradient that is 0 in exact arithmetic is then compared at
    the size it would have, so a kernel's float32 round-off there is not read as a relative error."""
    expected = expected.detach().to("cpu", torch.float64)
    finite = expected[torch.isfinite(expected)]  # NaN / inf entries are compared as such, not scaled by
    scale = finite.abs().max().item() if finite.numel() else 0.0
    scale = max(scale, 0.1 * natural) or 1.0
    assert_close(actual.detach().to("cpu", torch.float64) / scale, expected / scale, dtype, what=what)


ALL_DEVICES = ("cpu", "cuda")


def backend_params(loss: str) -> list:
    """pytest params (device, backend) for every fused backend of ``loss``; unavailable ones are
    skipped with the reason (never counted as passes)."""
    out = []
    for dev in ALL_DEVICES:
        device = torch.device(dev)
        for b in ("cpu", "cuda", "triton"):
            if b not in backends.IMPLEMENTED[loss]:
                continue
            if (b == "cpu" and dev != "cpu") or (b == "cuda" and dev != "cuda"):
                continue
            reason = None if (dev != "cuda" or HAS_CUDA) else "needs a CUDA GPU"
            if reason is None:
                reason = backends.unavailable_reason(b, device)
            marks = [pytest.mark.skipif(reason is not None, reason=str(reason))]
            if dev == "cuda":
                marks.append(pytest.mark.cuda)
            out.append(pytest.param(device, b, id=f"{dev}-{b}", marks=marks))
    return out
