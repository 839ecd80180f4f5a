"""Which backends exist, which are implemented per loss, and which one "auto" picks.

Everything about backend choice lives here, so one file answers "what runs my loss?":

* ``"torch"``  the eager reference (kdkernels.reference), always available;
* ``"cpu"``    C++ CPU kernels (kdkernels._C), for CPU tensors;
* ``"cuda"``   C++/CUDA kernels (kdkernels._C_cuda), for CUDA tensors;
* ``"triton"`` Triton kernels, for CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``.

``backend="auto"`` (or the ``KDKERNELS_BACKEND`` environment variable, which overrides "auto")
picks: CUDA tensors -> the faster of "triton"/"cuda" for that loss (``CUDA_AUTO_CHOICE``); CPU
tensors -> "cpu" when the extension is built, else "torch". A backend asked for by name that is
not available raises; it never silently falls back.
"""
from __future__ import annotations

import os

import torch

from kdkernels import _native, ops
from kdkernels.ops._spec import Op

BACKENDS = ("torch", "cpu", "cuda", "triton")

# Every loss of kdkernels.functional and the fused ops it runs: the one list of losses. "rkd" runs
# the combined op, or one of the single-term ops when a weight is 0.
LOSS_OPS: dict[str, tuple[Op, ...]] = {
    "softmax_kl_div": (ops.SOFTMAX_KL, ops.SOFTMAX_KL_STEP),  # loss-only pass, one-pass step with gradients
    "softmax_kl_div_topk": (ops.SOFTMAX_KL_TOPK,),
    # scalar reductions (gradients in the forward), "none" (per-row losses, chunks recomputed backward)
    "fused_linear_softmax_kl_div": (ops.FUSED_LINEAR_SOFTMAX_KL, ops.FUSED_LINEAR_SOFTMAX_KL_ROWS),
    "projected_mse": (ops.PROJECTED_MSE,),
    "attention_transfer": (ops.ATTENTION_TRANSFER,),
    "rkd_distance": (ops.RKD_DISTANCE,),
    "rkd_angle": (ops.RKD_ANGLE,),
    "rkd": (ops.RKD_DISTANCE_ANGLE, ops.RKD_DISTANCE, ops.RKD_ANGLE),
    "similarity_preserving": (ops.SIMILARITY_PRESERVING,),
    "fsp": (ops.FSP,),
}
LOSSES = tuple(LOSS_OPS)

# Backends implemented per loss: "torch" (the reference) always, plus every fused backend that all
# of the loss's ops have kernels for (from their OpDefs). The relation losses' CUDA kernels are
# compile-checked only: no GPU has run them yet.
IMPLEMENTED: dict[str, frozenset[str]] = {
    loss: frozenset({"torch"}) | frozenset.intersection(*(op.backends for op in loss_ops))
    for loss, loss_ops in LOSS_OPS.items()
}

# The faster GPU backend per loss. Not yet measured on a GPU (no GPU was lent so far): Triton is
# the default because its kernels were tested (interpreter) on every machine; update from
# benchmarks/results/ when a GPU run exists.
CUDA_AUTO_CHOICE: dict[str, str] = {
    "softmax_kl_div": "triton",
    "softmax_kl_div_topk": "triton",
    "fused_linear_softmax_kl_div": "triton",
    # cuBLAS GEMMs + fused epilogue kernels vs a Triton GEMM with the MSE in its epilogue: the
    # cuBLAS GEMMs are the safer default until a GPU run shows the Triton tiles (not autotuned yet)
    # are at least as fast.
    "projected_mse": "cuda",
    "attention_transfer": "triton",
    # both backends run the same cuBLAS GEMMs around one small fused kernel; the Triton launcher's
    # path is the one the interpreter tests. No GPU measurement yet.
    "fsp": "triton",
}

ENV_VAR = "KDKERNELS_BACKEND"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run tensors on ``device`` in this process, or None if it can."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs CPU tensors, got tensors on {device}"
        if not _native.cpu_loaded:
            return f"the C++ CPU extension kdkernels._C is not built ({_native.cpu_error})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs CUDA tensors, got tensors on {device}"
        if not _native.cuda_loaded:
            return f"the CUDA extension kdkernels._C_cuda is not built ({_native.cuda_error})"
        return None
    if backend == "triton":
        if not _native.triton_installed:
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"backend 'triton' runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def check_name(backend: object) -> str:
    """``backend`` if it names a backend ("auto" or one of BACKENDS); TypeError / ValueError otherwise.
    Availability depends on the tensors' device and is checked when a loss runs (``resolve``)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def implemented_backends(loss: str, device: torch.device | str) -> list[str]:
    """Backends that implement ``loss`` and can run tensors on ``device`` here, in BACKENDS order."""
    if loss not in IMPLEMENTED:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    device = torch.device(device)
    return [b for b in BACKENDS if b in IMPLEMENTED[loss] and unavailable_reason(b, device) is None]


def _auto(loss: str, device: torch.device) -> str:
    implemented = IMPLEMENTED[loss]
    if device.type == "cuda":
        preferred = CUDA_AUTO_CHOICE.get(loss)
        order = [preferred] if preferred else []
        order += [b for b in ("triton", "cuda") if b != preferred]
        for b in order:
            if b in implemented and unavailable_reason(b, device) is None:
                return b
        return "torch"
    if device.type == "cpu" and "cpu" in implemented and unavailable_reason("cpu", device) is None:
        return "cpu"
    return "torch"


def resolve(loss: str, backend: str, device: torch.device) -> str:
    """The concrete backend that runs ``loss`` for tensors on ``device``; raises if impossible."""
    check_name(backend)
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend == "auto":
            return _auto(loss, device)
        source = f"{ENV_VAR}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {source}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{loss}: {source} is not available: {reason}")
    if backend not in IMPLEMENTED[loss]:
        raise NotImplementedError(
            f"{loss} is not implemented for backend {backend!r} yet (implemented: {sorted(IMPLEMENTED[loss])})"
        )
    return backend
