"""Who runs a case: the kdkernels backends and the baselines they are compared with.

Implementation names (the values of ``--backends``):

* ``torch``   eager PyTorch, the reference (``backend="torch"``): the baseline of every ratio
* ``compile`` ``torch.compile`` of the reference (default mode, ``dynamic=False``); compiled once,
              before timing, and the compile time is reported apart
* ``liger``   Liger-Kernel's KL / JSD (GPU, ``softmax_kl_div`` only, when ``liger_kernel`` imports):
              ``log_softmax`` of both inputs, then ``LigerKLDIVLoss`` / ``LigerJSD`` on log-probs
* ``cpu``, ``cuda``, ``triton``: the kdkernels backends, through ``kdkernels.functional``

Which kdkernels backends exist comes from ``kdkernels.backends.implemented_backends``. Triton on CPU
(``TRITON_INTERPRET=1``) is a correctness tool, far too slow to time: it is always excluded here.
If ``kdkernels.functional`` does not import (the package is being built), the bench still runs the
reference and ``torch.compile`` of it, and reports the kdkernels backends as unavailable.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from kdkernels.bench.cases import Case, Inputs

BASELINES = ("torch", "compile")
PEERS = ("liger",)
KERNELS = ("cpu", "cuda", "triton")
ALL_IMPLS = BASELINES + PEERS + KERNELS  # the values --backends accepts
# the kind used by the memory / time models of cases.LossSpec
KIND = {"torch": "eager", "compile": "compile", "liger": "peer", "cpu": "kernel", "cuda": "kernel", "triton": "kernel"}


class Unavailable(Exception):
    """The implementation cannot run here; the message says why."""


@dataclass
class Api:
    functional: object | None
    backends: object | None
    reference: object
    liger: dict | None
    errors: dict


def _try_import(name: str):
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any failure means "not available", with the reason kept
        return None, f"{type(e).__name__}: {e}"


@functools.lru_cache(maxsize=1)
def api() -> Api:
    errors = {}
    functional, err = _try_import("kdkernels.functional")
    if err:
        errors["kdkernels.functional"] = err
    backends, err = _try_import("kdkernels.backends")
    if err:
        errors["kdkernels.backends"] = err
    reference = importlib.import_module("kdkernels.reference")
    liger = None
    kl, err = _try_import("liger_kernel.transformers.kl_div")
    jsd, err2 = _try_import("liger_kernel.transformers.jsd")
    if kl is not None and jsd is not None:
        liger = {"kl": kl.LigerKLDIVLoss, "jsd": jsd.LigerJSD,
                 "version": getattr(importlib.import_module("liger_kernel"), "__version__", "?")}
    else:
        errors["liger_kernel"] = err or err2
    return Api(functional, backends, reference, liger, errors)


def implemented_backends(loss: str, device: torch.device) -> list[str]:
    a = api()
    if a.functional is None or a.backends is None:
        return ["torch"]
    try:
        return list(a.backends.implemented_backends(loss, device))
    except Exception:  # noqa: BLE001
        return ["torch"]


def candidates(loss: str, device: torch.device) -> list[str]:
    """Every implementation that makes sense for this loss on this device, in run order (baselines first)."""
    names = ["torch", "compile"]
    if device.type == "cuda":
        if loss == "softmax_kl_div":
            names.append("liger")
        names += ["cuda", "triton"]
    else:
        names.append("cpu")
    return names


def check_available(impl: str, case: Case, device: torch.device) -> None:
    """Raise :class:`Unavailable` with the reason if ``impl`` cannot run ``case`` here."""
    a = api()
    if impl == "torch":
        return
    if impl == "compile":
        if not hasattr(torch, "compile"):
            raise Unavailable("unavailable (no torch.compile)")
        return
    if impl == "liger":
        if device.type != "cuda":
            raise Unavailable("unavailable (Liger is GPU only)")
        if a.liger is None:
            raise Unavailable("unavailable (liger_kernel not installed)")
        if case.loss != "softmax_kl_div":
            raise Unavailable("unavailable (Liger has no such loss)")
        if case.options.get("divergence", "forward") == "reverse":
            raise Unavailable("unavailable (Liger's KL gives no gradient to its target)")
        return
    if impl == "triton" and device.type != "cuda":
        raise Unavailable("excluded (Triton on CPU is the interpreter)")
    if a.functional is None:
        raise Unavailable("unavailable (kdkernels.functional does not import)")
    if impl not in implemented_backends(case.loss, device):
        raise Unavailable(_why_not(impl, case.loss, device))


def _why_not(impl: str, loss: str, device: torch.device) -> str:
    """"not implemented" or "unavailable (reason)", from kdkernels.backends' optional details."""
    b = api().backends
    table = getattr(b, "IMPLEMENTED", None)
    if isinstance(table, dict) and impl not in table.get(loss, (impl,)):
        return "not implemented"
    reason_fn = getattr(b, "unavailable_reason", None)
    if callable(reason_fn):
        try:
            reason = reason_fn(impl, device)
        except Exception:  # noqa: BLE001
            reason = None
        if reason:
            reason = " ".join(str(reason).split())
            return f"unavailable ({reason[:120]})"
    return "unavailable (not implemented or not built)"


def _functional_call(loss: str, backend: str) -> Callable[[Inputs], torch.Tensor]:
    fn = getattr(api().functional, loss)
    return lambda inp: fn(*inp.args, backend=backend, **inp.kwargs)


def _liger_call(case: Case) -> Callable[[Inputs], torch.Tensor]:
    lg = api().liger
    o = case.options
    temp = float(o.get("temperature", 1.0))
    scale = temp * temp if o.get("t2_scale", True) else 1.0
    if o.get("divergence", "forward") == "jsd":
        loss_fn = lg["jsd"](beta=float(o.get("beta", 0.5)))
    else:  # forward KL(teacher || student) on log-probs, reduced per row like "batchmean"
        loss_fn = lg["kl"](reduction="batchmean", log_target=True)

    def call(inp: Inputs) -> torch.Tensor:
        s, t = inp.args
        log_p = torch.log_softmax(s / temp, dim=-1)
        log_q = torch.log_softmax(t / temp, dim=-1)
        return loss_fn(log_p, log_q) * scale

    return call


def make_callable(impl: str, case: Case) -> Callable[[Inputs], torch.Tensor]:
    """A function of the case's inputs returning the (scalar) loss. ``compile`` is not compiled yet:
    its first call compiles (the runner does that call before timing)."""
    a = api()
    ref = getattr(a.reference, case.loss)
    if impl == "torch":
        if a.functional is not None:
            return _functional_call(case.loss, "torch")
        return lambda inp: ref(*inp.args, **inp.kwargs)
    if impl == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no recompile limits, no stale graphs
        compiled = torch.compile(ref, dynamic=False)
        return lambda inp: compiled(*inp.args, **inp.kwargs)
    if impl == "liger":
        return _liger_call(case)
    return _functional_call(case.loss, impl)


def is_not_implemented(exc: BaseException) -> bool:
    """True if ``exc`` is, or was raised from, a NotImplementedError (torch.compile wraps errors)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, NotImplementedError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc)
    return "can't allocate memory" in msg or "out of memory" in msg.lower() or "Cannot allocate memory" in msg


def describe_error(exc: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
