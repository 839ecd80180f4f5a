"""Who runs a case: the kdkernels backends and the baselines they are compared with.

Implementation names (the values of ``--backends``), in run order (the reference last):

* ``eager``        the usual eager composition a user writes (:mod:`kdkernels.bench.baselines`):
                   the baseline of every ``vs_eager_*`` ratio
* ``compile``      ``torch.compile`` of that composition (default mode, ``dynamic=False``); compiled
                   once, before timing, the compile time reported apart: the ``vs_compile_*`` ratios
* ``torchdistill`` torchdistill's losses where it is installed (:mod:`kdkernels.bench.peers`):
                   ``vs_torchdistill_step``
* ``liger``        Liger-Kernel's KL / JSD (GPU, ``softmax_kl_div`` only, when ``liger_kernel``
                   imports): ``vs_liger_step``
* ``cpu``, ``cuda``, ``triton``: the kdkernels backends, through ``kdkernels.functional``
* ``twopass``      kdkernels' softmax-KL step before the one-pass step (``softmax_kl_div`` only): the
                   loss-only forward op and its backward op, which reads the logits again, on the
                   device's default fused backend: ``vs_twopass_step`` (the one-pass step's gain)
* ``linear_kd``    ``F.linear`` (the full logits) then kdkernels' ``softmax_kl_div`` on the device's default
                   fused backend (``fused_linear_softmax_kl_div`` only): ``vs_linear_kd_step``, what
                   fusing the head into the loss gains over the unfused kdkernels loss
* ``dense``        kdkernels' ``softmax_kl_div`` of the same student against the dense teacher logits the
                   top-k was taken from (``softmax_kl_div_topk`` only), on the device's default fused
                   backend: ``vs_dense_step``, what the sparse teacher costs against the dense one
* ``reference``    ``kdkernels.reference`` (``backend="torch"``): the accuracy spec, shown for
                   comparison, never a ratio's baseline (it is far slower than what users run)

Which kdkernels backends exist comes from ``kdkernels.backends.implemented_backends``. Triton on CPU
(``TRITON_INTERPRET=1``) is a correctness tool, far too slow to time: it is always excluded here.
If ``kdkernels.functional`` does not import (the package is being built), the bench still runs the
baselines and the reference, and reports the kdkernels backends as unavailable.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from kdkernels.bench import baselines, peers
from kdkernels.bench.cases import Case, Inputs

BASELINES = ("eager", "compile")
PEERS = ("torchdistill", "liger")
REFERENCE = "reference"
KERNELS = ("cpu", "cuda", "triton")
TWO_PASS = "twopass"
DENSE = "dense"
LINEAR_KD = "linear_kd"
ALL_IMPLS = BASELINES + PEERS + KERNELS + (TWO_PASS, DENSE, LINEAR_KD, REFERENCE)  # the values --backends accepts
# the ratio columns: vs_<impl>_<phase> for these baselines
RATIO_BASELINES = {"eager": ("fwd", "bwd", "step"), "compile": ("fwd", "bwd", "step"),
                   "torchdistill": ("step",), "liger": ("step",), TWO_PASS: ("step",), DENSE: ("step",),
                   LINEAR_KD: ("step",)}
LABELS = {"eager": "eager composition (the usual PyTorch code)", "compile": "torch.compile of the eager composition",
          "torchdistill": "torchdistill's loss", "liger": "Liger-Kernel", "reference": "accuracy reference (kdkernels.reference)",
          "cpu": "kdkernels cpu", "cuda": "kdkernels cuda", "triton": "kdkernels triton",
          TWO_PASS: "kdkernels two-pass softmax-KL step (loss-only forward, backward re-reads the logits)",
          DENSE: "kdkernels softmax_kl_div against the dense teacher logits (same student)",
          LINEAR_KD: "F.linear (full logits) + kdkernels softmax_kl_div"}
# the kind used by the memory / time models of cases.LossSpec
KIND = {"eager": "eager", "compile": "compile", "torchdistill": "eager", "liger": "peer", "reference": "eager",
        "cpu": "kernel", "cuda": "kernel", "triton": "kernel", TWO_PASS: "kernel", DENSE: "kernel",
        LINEAR_KD: "unfused"}


class Unavailable(Exception):
    """The implementation cannot run here; the message says why."""


@dataclass
class Api:
    functional: object | None
    backends: object | None
    reference: object
    liger: dict | None
    torchdistill: str | None  # its version
    errors: dict


@functools.lru_cache(maxsize=1)
def api() -> Api:
    errors = {}
    functional, err = peers.try_import("kdkernels.functional")
    if err:
        errors["kdkernels.functional"] = err
    backends, err = peers.try_import("kdkernels.backends")
    if err:
        errors["kdkernels.backends"] = err
    reference = importlib.import_module("kdkernels.reference")
    liger, err = peers.liger()
    if liger is None:
        errors["liger_kernel"] = err
    td, td_version = peers.torchdistill()
    if td is None:
        errors["torchdistill"] = td_version
        td_version = None
    return Api(functional, backends, reference, liger, td_version, errors)


def implemented_backends(loss: str, device: torch.device) -> list[str]:
    a = api()
    if a.functional is None or a.backends is None:
        return ["torch"]
    try:
        return list(a.backends.implemented_backends(loss, device))
    except Exception:  # noqa: BLE001
        return ["torch"]


def candidates(loss: str, device: torch.device) -> list[str]:
    """Every implementation that makes sense for this loss on this device, in run order: the baselines,
    the kdkernels backends, then the reference (shown, not a baseline: the first to go under a time limit)."""
    # torchdistill has no sparse teacher and no fused head
    no_td = ("softmax_kl_div_topk", "fused_linear_softmax_kl_div")
    names = ["eager", "compile"] + ([] if loss in no_td else ["torchdistill"])
    if device.type == "cuda" and loss in ("softmax_kl_div", "fused_linear_softmax_kl_div"):
        names.append("liger")
    names += ["cuda", "triton"] if device.type == "cuda" else ["cpu"]
    if loss == "softmax_kl_div":
        names.append(TWO_PASS)
    if loss == "softmax_kl_div_topk":
        names.append(DENSE)
    if loss == "fused_linear_softmax_kl_div":
        names.append(LINEAR_KD)
    return names + ["reference"]


def check_available(impl: str, case: Case, device: torch.device) -> None:
    """Raise :class:`Unavailable` with the reason if ``impl`` cannot run ``case`` here."""
    a = api()
    if impl == "eager":
        return
    if impl == "compile":
        if not hasattr(torch, "compile"):
            raise Unavailable("unavailable (no torch.compile)")
        return
    if impl == "torchdistill":
        why = peers.torchdistill_unavailable(case.loss, case.options)
        if why:
            raise Unavailable(why)
        return
    if impl == "liger":
        why = peers.liger_unavailable(case.loss, {**case.options, "teacher_head": "Ht" in case.dims}, device)
        if why:
            raise Unavailable(why)
        return
    if impl == "triton" and device.type != "cuda":
        raise Unavailable("excluded (Triton on CPU is the interpreter)")
    if impl == "reference":
        return
    if a.functional is None:
        raise Unavailable("unavailable (kdkernels.functional does not import)")
    if impl == TWO_PASS:
        if case.loss != "softmax_kl_div":
            raise Unavailable("unavailable (softmax_kl_div only)")
        impl = _two_pass_backend(device)
    if impl == LINEAR_KD:
        if case.loss != "fused_linear_softmax_kl_div":
            raise Unavailable("unavailable (fused_linear_softmax_kl_div only)")
        impl = _two_pass_backend(device)
        if impl not in implemented_backends("softmax_kl_div", device):
            raise Unavailable(_why_not(impl, "softmax_kl_div", device))
        return
    if impl == DENSE:
        if case.loss != "softmax_kl_div_topk":
            raise Unavailable("unavailable (softmax_kl_div_topk only)")
        impl = _two_pass_backend(device)
        if impl not in implemented_backends("softmax_kl_div", device):
            raise Unavailable(_why_not(impl, "softmax_kl_div", device))
        return
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


def _two_pass_backend(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else api().backends.CUDA_AUTO_CHOICE.get("softmax_kl_div", "triton")


def _two_pass_call(case: Case) -> Callable[[Inputs], torch.Tensor]:
    from kdkernels import ops, reduction
    from kdkernels.ops.response import DIVERGENCE_CODES

    def run(inp: Inputs) -> torch.Tensor:
        s, t = inp.args
        o = {"temperature": 1.0, "divergence": "forward", "beta": 0.5, "reduction": "batchmean", "t2_scale": True,
             **inp.kwargs}
        backend = _two_pass_backend(s.device)
        rows, _stats = ops.SOFTMAX_KL.forward(backend, s, t, None, o["temperature"], DIVERGENCE_CODES[o["divergence"]],
                                              o["beta"], -100, o["t2_scale"])
        return reduction.reduce_rows(rows, o["reduction"], (s.shape[0],), s.shape[1], None, -100)

    return run


def _linear_kd_call() -> Callable[[Inputs], torch.Tensor]:
    kl = api().functional.softmax_kl_div

    def run(inp: Inputs) -> torch.Tensor:
        h, w = inp.args[:2]
        kw = dict(inp.kwargs)
        teacher = kw.pop("teacher_logits", None)
        th, tw = kw.pop("teacher_hidden", None), kw.pop("teacher_weight", None)
        if teacher is None:
            with torch.no_grad():
                teacher = torch.nn.functional.linear(th, tw)
        return kl(torch.nn.functional.linear(h, w), teacher, backend=_two_pass_backend(h.device), **kw)

    return run


def make_callable(impl: str, case: Case) -> Callable[[Inputs], torch.Tensor]:
    """A function of the case's inputs returning the (scalar) loss. ``compile`` is not compiled yet:
    its first call compiles (the runner does that call before timing)."""
    a = api()
    eager = getattr(baselines, case.loss)
    if impl == "eager":
        return lambda inp: eager(*inp.args, **inp.kwargs)
    if impl == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no recompile limits, no stale graphs
        compiled = torch.compile(eager, dynamic=False)
        return lambda inp: compiled(*inp.args, **inp.kwargs)
    if impl == "torchdistill":
        return peers.torchdistill_call(case.loss, case.options, baselines.project)
    if impl == "liger":
        return peers.liger_call(case.options, case.loss)
    if impl == TWO_PASS:
        return _two_pass_call(case)
    if impl == LINEAR_KD:
        return _linear_kd_call()
    if impl == DENSE:
        kl = a.functional.softmax_kl_div
        return lambda inp: kl(inp.args[0], inp.extras["teacher_logits"], temperature=inp.kwargs.get("temperature", 1.0),
                              reduction=inp.kwargs.get("reduction", "batchmean"),
                              backend=_two_pass_backend(inp.args[0].device))
    if impl == "reference":
        if a.functional is not None:
            return _functional_call(case.loss, "torch")
        ref = getattr(a.reference, case.loss)
        return lambda inp: ref(*inp.args, **inp.kwargs)
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
