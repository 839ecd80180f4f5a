"""What to run: the losses, their benchmark inputs, and the presets.

A :class:`Case` is one loss at one size, dtype and set of options. It is plain data (JSON
round-trips it), so the fresh process that measures CPU memory rebuilds exactly the same inputs.
Each loss has a :class:`LossSpec` that knows how to build its inputs and holds the coarse models the
runner needs before it measures anything: useful FLOPs (for the tensor-core fraction on GPU), and an
estimate of the extra memory of each implementation (to skip a case that would exhaust the machine
instead of crashing it). Those models only guard and annotate; every reported number is measured.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kdkernels.bench.inputs import (DeviceSource, attention_transfer_inputs, fsp_inputs, projected_mse_inputs,
                                    relation_inputs, softmax_kl_inputs)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


# --------------------------------------------------------------------------------------------- case
@dataclass
class Case:
    """One loss at one size. ``dims`` are the sizes, ``options`` the loss's keyword arguments."""

    loss: str
    dims: dict[str, int]
    dtype: str = "float32"
    options: dict[str, Any] = field(default_factory=dict)
    group: str = "main"  # "main" (the headline table) or "scaling" (the sweep over B)
    targets: dict[str, float] = field(default_factory=dict)  # issue targets checked for kdkernels backends

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        return SPECS[self.loss].label(self)

    def key(self) -> str:
        """Identity of the measurement (the group does not count: a scaling point equal to a main case is the same)."""
        return json.dumps([self.loss, self.dims, self.dtype, self.options], sort_keys=True)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "dims": dict(self.dims), "dtype": self.dtype, "options": dict(self.options),
                "group": self.group, "targets": dict(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(d["loss"], dict(d["dims"]), d.get("dtype", "float32"), dict(d.get("options", {})),
                   d.get("group", "main"), dict(d.get("targets", {})))


@dataclass
class Inputs:
    """Positional and keyword arguments of one call; tensors that require grad get gradients."""

    args: tuple
    kwargs: dict
    extras: dict = field(default_factory=dict)  # tensors some implementations need besides the loss's arguments

    def tensors(self) -> list[torch.Tensor]:
        return [a for a in (*self.args, *self.kwargs.values()) if isinstance(a, torch.Tensor)]

    def grad_tensors(self) -> list[torch.Tensor]:
        return [t for t in self.tensors() if t.requires_grad]

    def zero_grad(self) -> None:
        for t in self.grad_tensors():
            t.grad = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def grad_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.grad_tensors())


# ------------------------------------------------------------------------------------- loss specs
@dataclass
class LossSpec:
    """How to build a loss's inputs, plus the coarse models the runner uses before measuring."""

    make_inputs: Callable[[Case, torch.device, int], Inputs]
    label: Callable[[Case], str]
    # useful FLOPs per phase ({"fwd", "bwd", "step"}) for the tensor-core fraction; None: memory-bound
    flops: Callable[[Case], dict | None]
    # rough extra bytes above the inputs, per implementation kind ("eager", "compile", "peer", "kernel")
    est_extra_bytes: Callable[[Case, str], float]
    # rough arithmetic work of a step, to predict run time when nothing smaller was measured yet
    work: Callable[[Case], float]
    scale_dim: str | None = None  # the dimension a scaling sweep varies
    scale_power: float = 1.0  # run time grows as scale_dim ** scale_power
    # GEMM-bound losses: the (m, k, n) products of a step's useful FLOPs (``flops``), timed as plain
    # torch.mm in the same run for the compute floor (floor.gemm_floor); None: no GEMM floor
    gemms: Callable[[Case], list[tuple[int, int, int]]] | None = None


OPMATH_BYTES = 4  # every backend computes in fp32 (docs/design.md §2)


# softmax_kl_div ---------------------------------------------------------------------------------
def _kl_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    s, t, _ = softmax_kl_inputs(DeviceSource(seed, case.torch_dtype, device), (case.dims["R"], case.dims["V"]),
                                scale=2.0)
    return Inputs((s, t), dict(case.options))


def _kl_label(case: Case) -> str:
    o = case.options
    div = o.get("divergence", "forward")
    extra = f" beta={o['beta']}" if div == "jsd" and "beta" in o else ""
    return f"{case.dims['R']}x{case.dims['V']} {DTYPE_SHORT[case.dtype]} {div}{extra} T={o.get('temperature', 1.0)}"


def _kl_est(case: Case, kind: str) -> float:
    rv = case.dims["R"] * case.dims["V"]
    esize = case.torch_dtype.itemsize
    return {"eager": 14 * rv * OPMATH_BYTES, "compile": 3 * rv * OPMATH_BYTES,
            "peer": 4 * rv * esize}.get(kind, 1.2 * rv * esize)


# softmax_kl_div_topk ----------------------------------------------------------------------------
def _topk_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    """The student, and the top-k of a dense teacher (kdkernels.topk_teacher's definition, computed
    here so that the bench runs while the package is being built); the dense teacher logits go to
    ``extras`` for the ``dense`` implementation (kdkernels' softmax_kl_div on the same student)."""
    s, t, _ = softmax_kl_inputs(DeviceSource(seed, case.torch_dtype, device), (case.dims["R"], case.dims["V"]),
                                scale=2.0)
    temperature = case.options.get("temperature", 1.0)
    with torch.no_grad():
        values, idx = torch.topk(t, case.dims["K"], dim=-1)
        lse = torch.logsumexp(t.float() / temperature, dim=-1, keepdim=True)
        lq = (values.float() / temperature - lse).to(t.dtype)
    return Inputs((s, lq, idx), dict(case.options), extras={"teacher_logits": t})


def _topk_label(case: Case) -> str:
    o = case.options
    return (f"{case.dims['R']}x{case.dims['V']} K={case.dims['K']} {DTYPE_SHORT[case.dtype]} "
            f"{o.get('tail', 'renormalize')} T={o.get('temperature', 1.0)}")


def _topk_est(case: Case, kind: str) -> float:
    rv = case.dims["R"] * case.dims["V"]
    return {"eager": 4 * rv * OPMATH_BYTES, "compile": 2 * rv * OPMATH_BYTES}.get(kind, 1.2 * rv * case.torch_dtype.itemsize)


# fused_linear_softmax_kl_div --------------------------------------------------------------------
def _fl_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    """Student hidden states and LM-head weight (no bias, as LM heads), dense teacher logits."""
    d = case.dims
    src = DeviceSource(seed, case.torch_dtype, device)
    h = src.finish(src.normal((d["R"], d["H"])), True)
    w = src.finish(src.fan_in_normal((d["V"], d["H"]), d["H"]) * 2.0, True)
    if "Ht" in d:  # the teacher as hidden states + its head (Liger's fused linear JSD takes that form)
        th = src.finish(src.normal((d["R"], d["Ht"])), False)
        tw = src.finish(src.fan_in_normal((d["V"], d["Ht"]), d["Ht"]) * 2.0, False)
        return Inputs((h, w), {"teacher_hidden": th, "teacher_weight": tw, **case.options})
    _s, t, _ = softmax_kl_inputs(DeviceSource(seed + 1, case.torch_dtype, device), (d["R"], d["V"]), scale=2.0)
    return Inputs((h, w), {"teacher_logits": t.detach(), **case.options})


def _fl_label(case: Case) -> str:
    d, o = case.dims, case.options
    teacher = f" teacher head {d['Ht']}" if "Ht" in d else ""
    return (f"{d['R']}x{d['H']} head {d['V']}{teacher} {DTYPE_SHORT[case.dtype]} {o.get('divergence', 'forward')} "
            f"T={o.get('temperature', 1.0)}")


def _fl_gemms(case: Case) -> list[tuple[int, int, int]]:
    d = case.dims
    teacher = [(d["R"], d["Ht"], d["V"])] if "Ht" in d else []
    return [(d["R"], d["H"], d["V"]), (d["R"], d["V"], d["H"]), (d["V"], d["R"], d["H"])] + teacher  # z; dh; dW


def _fl_flops(case: Case) -> dict:
    mm = 2.0 * case.dims["R"] * case.dims["H"] * case.dims["V"]
    teacher = 2.0 * case.dims["R"] * case.dims["Ht"] * case.dims["V"] if "Ht" in case.dims else 0.0
    return {"fwd": mm + teacher, "bwd": 2 * mm, "step": 3 * mm + teacher}


def _fl_est(case: Case, kind: str) -> float:
    d = case.dims
    rv, grads = d["R"] * d["V"] * OPMATH_BYTES, (d["R"] + d["V"]) * d["H"] * OPMATH_BYTES
    return {"eager": 8 * rv, "compile": 4 * rv, "unfused": 3 * rv}.get(kind, 0.2 * rv) + grads


# projected_mse ----------------------------------------------------------------------------------
def _pm_sizes(case: Case) -> tuple[int, int, int]:
    """(rows, Ds, Dt): rows = N*H*W for a feature map with feature_dim=1."""
    d = case.dims
    if "N" in d:
        return d["N"] * d["H"] * d["W"], d["Cs"], d["Ct"]
    return d["R"], d["Ds"], d["Dt"]


def _pm_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    d = case.dims
    rows, ds, dtt = _pm_sizes(case)
    if "N" in d:  # (N, C, H, W) feature maps, projected per pixel (a 1x1 convolution)
        shapes, layout_dim = ((d["N"], ds, d["H"], d["W"]), (d["N"], dtt, d["H"], d["W"])), 1
    else:
        shapes, layout_dim = ((rows, ds), (rows, dtt)), -1
    x, t, w, b = projected_mse_inputs(DeviceSource(seed, case.torch_dtype, device), *shapes, layout_dim,
                                      bias_scale=0.1)
    return Inputs((x, t, w), {"bias": b, **case.options})


def _pm_label(case: Case) -> str:
    d, fd = case.dims, case.options.get("feature_dim", -1)
    if "N" in d:
        return f"N{d['N']} Cs{d['Cs']}->Ct{d['Ct']} {d['H']}x{d['W']} fd={fd} {DTYPE_SHORT[case.dtype]}"
    return f"{d['R']} rows Ds{d['Ds']}->Dt{d['Dt']} {DTYPE_SHORT[case.dtype]}"


def _pm_flops(case: Case) -> dict:
    rows, ds, dtt = _pm_sizes(case)
    mm = 2.0 * rows * ds * dtt  # one projection-sized matmul
    return {"fwd": mm, "bwd": 2 * mm, "step": 3 * mm}  # y = xW^T; dx = dy W, dW = dy^T x


def _pm_gemms(case: Case) -> list[tuple[int, int, int]]:
    rows, ds, dtt = _pm_sizes(case)
    return [(rows, ds, dtt), (rows, dtt, ds), (dtt, rows, ds)]  # y = x W^T; dx = dy W; dW = dy^T x


def _pm_est(case: Case, kind: str) -> float:
    rows, ds, dtt = _pm_sizes(case)
    y = rows * dtt * OPMATH_BYTES
    return {"eager": 5 * y, "compile": 3 * y, "peer": 5 * y}.get(kind, 1.2 * y) + rows * ds * OPMATH_BYTES


def _pm_work(case: Case) -> float:
    rows, _, dtt = _pm_sizes(case)
    return _pm_flops(case)["step"] + 30.0 * rows * dtt


# attention_transfer -----------------------------------------------------------------------------
def _at_sizes(case: Case) -> tuple[int, int, int, int]:
    """(N, Cs, Ct, positions)."""
    d = case.dims
    return d["N"], d["Cs"], d["Ct"], d["H"] * d["W"]


def _at_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    d = case.dims
    s, t = attention_transfer_inputs(DeviceSource(seed, case.torch_dtype, device), (d["N"], d["Cs"], d["H"], d["W"]),
                                     (d["N"], d["Ct"], d["H"], d["W"]))
    return Inputs((s, t), dict(case.options))


def _at_label(case: Case) -> str:
    d = case.dims
    return f"N{d['N']} Cs{d['Cs']} Ct{d['Ct']} {d['H']}x{d['W']} {DTYPE_SHORT[case.dtype]}"


def _at_est(case: Case, kind: str) -> float:
    n, cs, ct, k = _at_sizes(case)
    student, teacher = n * cs * k * OPMATH_BYTES, n * ct * k * OPMATH_BYTES
    # eager: |F|^p of the student kept for the backward, its gradient, the teacher's transient one
    return {"eager": 3 * student + teacher, "compile": 2 * student, "peer": 3 * student + teacher}.get(kind, student)


def _at_work(case: Case) -> float:
    n, cs, ct, k = _at_sizes(case)
    return 20.0 * n * (cs + ct) * k  # pooling, normalising and the gradient sweep: memory-bound


# relation losses --------------------------------------------------------------------------------
def _rel_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    return Inputs(relation_inputs(DeviceSource(seed, case.torch_dtype, device), *_rel_dims(case)),
                  dict(case.options))


def _rel_dims(case: Case) -> tuple[int, int, int]:
    d = case.dims
    return d["B"], d.get("Ds", d.get("D")), d.get("Dt", d.get("D"))


def _rel_label(case: Case) -> str:
    b, ds, dt = _rel_dims(case)
    dims = f"D{ds}" if ds == dt else f"Ds{ds} Dt{dt}"
    return f"B{b} {dims} {DTYPE_SHORT[case.dtype]}"


def _gram_flops(case: Case) -> dict:
    """Two Gram matrices forward (student, teacher), one B x B x Ds matmul for the student gradient."""
    b, ds, dt = _rel_dims(case)
    fwd, bwd = 2.0 * b * b * (ds + dt), 2.0 * b * b * ds
    return {"fwd": fwd, "bwd": bwd, "step": fwd + bwd}


def _gram_gemms(case: Case) -> list[tuple[int, int, int]]:
    b, ds, dt = _rel_dims(case)
    return [(b, ds, b), (b, dt, b), (b, b, ds)]  # the two Gram matrices; the student gradient


def _pair_est(n_bxb_eager: float, n_bxb_compile: float):
    def est(case: Case, kind: str) -> float:
        b, ds, dt = _rel_dims(case)
        bxb = b * b * OPMATH_BYTES
        rows = 4 * b * (ds + dt) * OPMATH_BYTES
        return {"eager": n_bxb_eager * bxb, "compile": n_bxb_compile * bxb}.get(kind, 0.0) + rows
    return est


def _angle_est(case: Case, kind: str) -> float:
    b, ds, dt = _rel_dims(case)
    b3, b2d = float(b) ** 3 * OPMATH_BYTES, b * b * (ds + dt) * OPMATH_BYTES
    return {"eager": 8 * b3 + 3 * b2d, "compile": 3 * b3 + b2d}.get(kind, 4.0 * b * b * OPMATH_BYTES) + 4 * b * (ds + dt) * OPMATH_BYTES


def _pair_work(case: Case) -> float:
    b, _, _ = _rel_dims(case)
    return _gram_flops(case)["step"] + 60.0 * b * b


def _angle_work(case: Case) -> float:
    b, ds, dt = _rel_dims(case)
    return _gram_flops(case)["step"] + 60.0 * float(b) ** 3 + 2.0 * float(b) ** 3 * (ds + dt)


# fsp -------------------------------------------------------------------------------------------
def _fsp_sizes(case: Case) -> tuple[int, int, int, int, int]:
    """(N, C1, C2, student positions, teacher positions); the teacher's spatial size is the student's
    unless the case gives Ht, Wt."""
    d = case.dims
    return d["N"], d["C1"], d["C2"], d["H"] * d["W"], d.get("Ht", d["H"]) * d.get("Wt", d["W"])


def _fsp_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    d = case.dims
    maps = fsp_inputs(DeviceSource(seed, case.torch_dtype, device), d["N"], d["C1"], d["C2"], (d["H"], d["W"]),
                      (d.get("Ht", d["H"]), d.get("Wt", d["W"])))
    return Inputs(maps, dict(case.options))


def _fsp_label(case: Case) -> str:
    d = case.dims
    teacher = f" teacher {d['Ht']}x{d['Wt']}" if "Ht" in d else ""
    return f"N{d['N']} C1{d['C1']} C2{d['C2']} {d['H']}x{d['W']}{teacher} {DTYPE_SHORT[case.dtype]}"


def _fsp_gemms(case: Case) -> list[tuple[int, ...]]:
    """The step's four batched products (b, m, k, n), teacher without grad: G_s = A_s B_s^T, G_t,
    dA_s = g B_s, dB_s = g^T A_s."""
    n, c1, c2, ss, st = _fsp_sizes(case)
    return [(n, c1, ss, c2), (n, c1, st, c2), (n, c1, c2, ss), (n, c2, c1, ss)]


def _fsp_flops(case: Case) -> dict:
    n, c1, c2, ss, st = _fsp_sizes(case)
    fwd, bwd = 2.0 * n * c1 * c2 * (ss + st), 4.0 * n * c1 * c2 * ss
    return {"fwd": fwd, "bwd": bwd, "step": fwd + bwd}


def _fsp_est(case: Case, kind: str) -> float:
    n, c1, c2, ss, _st = _fsp_sizes(case)
    grads, g = n * (c1 + c2) * ss * OPMATH_BYTES, n * c1 * c2 * OPMATH_BYTES
    return grads + {"eager": 6 * g, "compile": 4 * g, "peer": 6 * g}.get(kind, 3 * g)


SPECS: dict[str, LossSpec] = {
    "softmax_kl_div": LossSpec(_kl_inputs, _kl_label, lambda c: None, _kl_est,
                               lambda c: 80.0 * c.dims["R"] * c.dims["V"]),
    "softmax_kl_div_topk": LossSpec(_topk_inputs, _topk_label, lambda c: None, _topk_est,
                                    lambda c: 40.0 * c.dims["R"] * c.dims["V"]),
    "fused_linear_softmax_kl_div": LossSpec(_fl_inputs, _fl_label, _fl_flops, _fl_est,
                                            lambda c: _fl_flops(c)["step"] + 60.0 * c.dims["R"] * c.dims["V"],
                                            gemms=_fl_gemms),
    "projected_mse": LossSpec(_pm_inputs, _pm_label, _pm_flops, _pm_est, _pm_work, gemms=_pm_gemms),
    # memory-bound (a channel pooling and a per-sample normalisation): the copy floor, no GEMM floor
    "attention_transfer": LossSpec(_at_inputs, _at_label, lambda c: None, _at_est, _at_work),
    "rkd_distance": LossSpec(_rel_inputs, _rel_label, _gram_flops, _pair_est(12, 4), _pair_work, "B", 2.0,
                             gemms=_gram_gemms),
    "similarity_preserving": LossSpec(_rel_inputs, _rel_label, _gram_flops, _pair_est(10, 4), _pair_work, "B", 2.0,
                                      gemms=_gram_gemms),
    # angle: the work is B^3 element-wise triples, not matmul FLOPs, so no tensor-core fraction and
    # no GEMM floor (a GEMM of its Gram FLOPs would be a bound far below what its B^3 work needs)
    "rkd_angle": LossSpec(_rel_inputs, _rel_label, lambda c: None, _angle_est, _angle_work, "B", 3.0),
    # distance + 2 x angle (RKDLoss's default weights) in one op: the angle's B^3 dominates
    "rkd": LossSpec(_rel_inputs, _rel_label, lambda c: None, _angle_est, _angle_work, "B", 3.0),
    # GEMM-bound: four batched products a step (two Grams, the student's two gradients)
    "fsp": LossSpec(_fsp_inputs, _fsp_label, _fsp_flops, _fsp_est, lambda c: _fsp_flops(c)["step"] * 1.2,
                    gemms=_fsp_gemms),
}


def make_inputs(case: Case, device: torch.device | str, seed: int = 0) -> Inputs:
    return SPECS[case.loss].make_inputs(case, torch.device(device), seed)


# ----------------------------------------------------------------------------------------- presets
@dataclass
class Preset:
    """A list of cases plus how hard to measure them."""

    name: str
    device: str
    cases: list[Case]
    warmup: int = 1  # untimed full steps before timing (after compilation, for torch.compile)
    min_repeats: int = 3
    max_repeats: int = 20
    budget_s: float = 2.0  # aim for this much timed work per (case, implementation)
    max_case_s: float = 90.0  # skip a (case, implementation) predicted to take longer than this
    copy_mib: int = 256  # buffer of the copy-bandwidth measurement
    memory: bool = True
    memory_losses: tuple[str, ...] | None = None  # losses whose memory is measured; None: all
    memory_skip_impls: tuple[str, ...] = ()  # implementations whose memory is not measured
    compile_losses: tuple[str, ...] | None = None  # losses to torch.compile; None: all
    scaling_skip_impls: tuple[str, ...] = ("compile", "torchdistill", "reference")  # the sweep: eager vs kernels
    worker_timeout_s: float = 600.0
    assumed_flops_per_s: float = 50e9  # to predict run time before anything comparable was measured
    time_limit_s: float | None = None  # cases not started by then are reported "skipped (time limit)"
    threads: int | None = None  # torch CPU threads; None: torch's default (all cores)
    gemm_budget_s: float = 0.3  # timed work of the GEMM floor of a case (GEMM-bound losses)


# issue #11 (one-pass step): <= 2.5x the 3-unit traffic floor (read student + teacher, write the
# gradient) and faster than the two-pass step, in the same run; the earlier issues' eager / compile targets
KL_CPU_TARGETS = {"vs_eager_step": 3.0, "vs_compile_step": 1.5, "x_copy_floor": 2.5, "vs_twopass_step": 1.0,
                  "mem_ratio": 1.05}


# issue #11 §2: the top-k step <= 1.2x the dense fused step on the same student; memory = the student gradient
TOPK_CPU_TARGETS = {"vs_dense_step": 1 / 1.2, "mem_ratio": 1.05}


# issue #12: the step at least 0.9x as fast as F.linear + kdkernels' softmax_kl_div, memory beyond the
# hidden / weight gradients <= 15 % of the eager composition's
FUSED_LINEAR_CPU_TARGETS = {"vs_linear_kd_step": 0.9, "mem_beyond_grads_x_eager": 0.15}
FUSED_LINEAR_SPEED_TARGET = {"vs_linear_kd_step": 0.9}  # 512 rows: chunks of 256 hold half the logits


# issue #15 §1: attention transfer's step >= 5x the eager composition, <= 2x the copy floor (read both
# maps, write the student gradient), memory beyond the gradient <= 10 % of the eager composition's
AT_CPU_TARGETS = {"vs_eager_step": 5.0, "x_copy_floor": 2.0, "mem_beyond_grads_x_eager": 0.10}


# issue #15 §2: the FSP step <= 1.3x its GEMM floor (the four batched GEMMs as torch.bmm), >= 1.5x the
# eager composition, memory (beyond the gradients) no more than eager's
FSP_CPU_TARGETS = {"x_gemm_floor": 1.3, "vs_eager_step": 1.5, "mem_beyond_grads_x_eager": 1.0}


def _fsp(n, c1, c2, h, w, dtype="float32", targets=None, **opts) -> Case:
    return Case("fsp", {"N": n, "C1": c1, "C2": c2, "H": h, "W": w}, dtype, opts, "main", targets or {})


def _at(n, cs, ct, h, w, dtype="float32", targets=None, **opts) -> Case:
    return Case("attention_transfer", {"N": n, "Cs": cs, "Ct": ct, "H": h, "W": w}, dtype, opts, "main", targets or {})


def _fl(r, h, v, dtype="float32", targets=None, **opts) -> Case:
    return Case("fused_linear_softmax_kl_div", {"R": r, "H": h, "V": v}, dtype, {"temperature": 2.0, **opts}, "main",
                targets or {})


def _topk(r, v, k, dtype="float32", targets=None, **opts) -> Case:
    return Case("softmax_kl_div_topk", {"R": r, "V": v, "K": k}, dtype, {"temperature": 2.0, **opts}, "main",
                targets or {})


def _kl(r, v, dtype="float32", group="main", targets=None, **opts) -> Case:
    return Case("softmax_kl_div", {"R": r, "V": v}, dtype, {"temperature": 2.0, **opts}, group, targets or {})


def _rel(loss, b, d, dtype="float32", group="main") -> Case:
    return Case(loss, {"B": b, "D": d}, dtype, {}, group)


def _scaling(loss_sizes: dict[str, list[int]], d: int, dtype: str) -> list[Case]:
    return [_rel(loss, b, d, dtype, "scaling") for loss, sizes in loss_sizes.items() for b in sizes]


def preset_cpu() -> Preset:
    """The default without a GPU: every loss once, every implementation, at sizes that end in about
    2 minutes on 2 cores (``--preset full``: the larger sizes and the sweep over B). Memory is
    measured (one fresh process each, a few seconds apiece) for the eager composition and the
    kdkernels backend only; no sweep."""
    cases = [
        _kl(1024, 32000, targets=KL_CPU_TARGETS),
        _topk(1024, 32000, 64, targets=TOPK_CPU_TARGETS),
        _fl(512, 1024, 32000, targets=FUSED_LINEAR_SPEED_TARGET),
        Case("projected_mse", {"N": 16, "Cs": 128, "Ct": 256, "H": 32, "W": 32}, "float32", {"feature_dim": 1}),
        _at(16, 128, 256, 32, 32),
        _rel("rkd_distance", 1024, 512),
        _rel("similarity_preserving", 1024, 512),
        _rel("rkd_angle", 128, 512),
        _rel("rkd", 128, 512),
        _fsp(16, 128, 128, 32, 32),
    ]
    return Preset("cpu", "cpu", cases, warmup=1, min_repeats=3, max_repeats=10, budget_s=0.5,
                  max_case_s=30.0, copy_mib=128,
                  memory_skip_impls=("compile", "torchdistill", "reference"), assumed_flops_per_s=50e9)


def preset_full() -> Preset:
    """The complete CPU sweep (tens of minutes on 2 cores): the former default."""
    cases = [
        _kl(4096, 32000, targets=KL_CPU_TARGETS),
        _topk(4096, 32000, 64, targets=TOPK_CPU_TARGETS),
        _topk(4096, 32000, 64, tail="bucket"),
        _fl(4096, 1024, 32000, targets=FUSED_LINEAR_CPU_TARGETS),
        Case("projected_mse", {"N": 64, "Cs": 128, "Ct": 256, "H": 32, "W": 32}, "float32", {"feature_dim": 1}),
        _at(64, 128, 256, 32, 32, targets=AT_CPU_TARGETS),
        _rel("rkd_distance", 4096, 512),
        _rel("similarity_preserving", 4096, 512),
        _rel("rkd_angle", 512, 512),
        _rel("rkd", 512, 512),
        _fsp(64, 128, 128, 32, 32, targets=FSP_CPU_TARGETS),
    ]
    cases += _scaling({"rkd_distance": [1024, 2048, 4096, 8192, 16384],
                       "similarity_preserving": [1024, 2048, 4096, 8192, 16384],
                       "rkd_angle": [128, 256, 512, 1024]}, 512, "float32")
    return Preset("full", "cpu", cases, warmup=1, min_repeats=3, max_repeats=10, budget_s=2.0,
                  max_case_s=90.0, copy_mib=256, memory_skip_impls=("reference",), assumed_flops_per_s=100e9)


def preset_gpu() -> Preset:
    # most important first: under a time limit the tail is what gets skipped
    cases = [
        _kl(4096, 128256, "float32"),
        _kl(4096, 128256, "bfloat16"),
        _topk(4096, 128256, 64, "bfloat16"),
        # Liger's fused linear JSD benchmark form (teacher hidden + head, beta 0.5, T 1), side by side with it
        Case("fused_linear_softmax_kl_div", {"R": 8192, "H": 4096, "Ht": 4096, "V": 128256}, "bfloat16",
             {"temperature": 1.0, "divergence": "jsd", "beta": 0.5}),
        Case("projected_mse", {"R": 16384, "Ds": 768, "Dt": 4096}, "bfloat16"),
        _at(128, 256, 512, 32, 32, "bfloat16"),
        _rel("rkd_distance", 16384, 1024, "bfloat16"),
        _rel("similarity_preserving", 16384, 1024, "bfloat16"),
        _rel("rkd_angle", 1024, 1024, "bfloat16"),
        _rel("rkd", 1024, 1024, "bfloat16"),
        _fsp(128, 256, 256, 32, 32, "bfloat16"),
        _kl(4096, 32000, "bfloat16"),
        _kl(4096, 128256, "bfloat16", divergence="jsd", beta=0.5),
        _kl(4096, 256000, "bfloat16"),
    ]
    cases += _scaling({"rkd_distance": [4096, 16384, 65536],
                       "similarity_preserving": [4096, 16384, 65536],
                       "rkd_angle": [512, 1024, 2048]}, 1024, "bfloat16")
    return Preset("gpu", "cuda", cases, warmup=3, min_repeats=5, max_repeats=50, budget_s=0.5,
                  max_case_s=30.0, copy_mib=2048, worker_timeout_s=300.0, assumed_flops_per_s=50e12,
                  time_limit_s=100.0, gemm_budget_s=0.1)  # benchmarks/gpu_check.sh gives the whole command 150 s


def preset_smoke(device: str = "cpu") -> Preset:
    cases = [
        _kl(64, 512),
        _topk(64, 512, 8),
        _fl(64, 32, 512),
        Case("projected_mse", {"N": 2, "Cs": 8, "Ct": 16, "H": 4, "W": 4}, "float32", {"feature_dim": 1}),
        _at(2, 8, 16, 4, 4),
        _rel("rkd_distance", 64, 16),
        _rel("similarity_preserving", 64, 16),
        _rel("rkd_angle", 16, 8),
        _rel("rkd", 16, 8),
        _fsp(2, 4, 6, 4, 4),
        # the sweep's last point is far too big on purpose: it must be skipped by the guards, not run
        _rel("rkd_distance", 32, 16, group="scaling"),
        _rel("rkd_distance", 1 << 20, 16, group="scaling"),
    ]
    return Preset("smoke", device, cases, warmup=1, min_repeats=3, max_repeats=5, budget_s=0.05,
                  max_case_s=20.0, copy_mib=16, compile_losses=("softmax_kl_div",), worker_timeout_s=60.0,
                  memory_losses=("softmax_kl_div",), memory_skip_impls=("compile",), threads=1,
                  assumed_flops_per_s=50e9 if device == "cpu" else 50e12, gemm_budget_s=0.02)


PRESETS = {"cpu": preset_cpu, "full": preset_full, "gpu": preset_gpu, "smoke": preset_smoke}


def get_preset(name: str, device: str | None = None) -> Preset:
    if name == "smoke":
        return preset_smoke(device or "cpu")
    preset = PRESETS[name]()
    if device is not None:
        preset.device = device
    return preset


# ------------------------------------------------------------------------------ --shape
RELATION_SHAPE = "BxD or BxDsxDt (batch x feature size; Ds, Dt: student and teacher sizes)"
SHAPE_FORMS = {
    "softmax_kl_div": "RxV (rows x vocabulary), e.g. 8192x128000",
    "softmax_kl_div_topk": "RxVxK (rows x vocabulary x teacher entries kept), e.g. 8192x128000x64",
    "fused_linear_softmax_kl_div": "RxHxV (rows x hidden size x vocabulary), e.g. 4096x1024x32000",
    "projected_mse": "RxDsxDt (feature vectors x student dim x teacher dim, features last) or NxCsxCtxHxW "
                     "(N, Cs, H, W student maps projected to Ct channels: a 1x1 conv, feature_dim=1)",
    "attention_transfer": "NxCsxCtxHxW (N feature maps, student and teacher channels, spatial size), e.g. 64x128x256x32x32",
    "rkd_distance": RELATION_SHAPE,
    "rkd_angle": RELATION_SHAPE,
    "rkd": RELATION_SHAPE,
    "similarity_preserving": RELATION_SHAPE,
    "fsp": "NxC1xC2xHxW (N pairs of maps with C1 and C2 channels, one spatial size for student and teacher) or "
           "NxC1xC2xHxWxHtxWt (the teacher's spatial size Ht x Wt), e.g. 64x128x128x32x32",
}


def parse_shape(loss: str, text: str) -> tuple[dict[str, int], dict[str, Any]]:
    """``--shape`` text -> (dims, options the form implies) for ``loss``; ValueError saying the forms."""
    try:
        nums = [int(p) for p in text.lower().replace("*", "x").split("x")]
    except ValueError:
        nums = []
    if not nums or any(n < 1 for n in nums):
        raise ValueError(f"--shape {text!r}: not positive integers joined by 'x'; {loss}: {SHAPE_FORMS[loss]}")
    n = len(nums)
    dims = opts = None
    if loss == "softmax_kl_div" and n == 2:
        dims, opts = {"R": nums[0], "V": nums[1]}, {}
    elif loss == "softmax_kl_div_topk" and n == 3 and nums[2] <= nums[1]:
        dims, opts = {"R": nums[0], "V": nums[1], "K": nums[2]}, {}
    elif loss == "fused_linear_softmax_kl_div" and n == 3:
        dims, opts = {"R": nums[0], "H": nums[1], "V": nums[2]}, {}
    elif loss == "projected_mse" and n == 3:
        dims, opts = {"R": nums[0], "Ds": nums[1], "Dt": nums[2]}, {"feature_dim": -1}
    elif loss == "projected_mse" and n == 5:
        dims, opts = dict(zip(("N", "Cs", "Ct", "H", "W"), nums)), {"feature_dim": 1}
    elif loss == "attention_transfer" and n == 5:
        dims, opts = dict(zip(("N", "Cs", "Ct", "H", "W"), nums)), {}
    elif loss == "fsp" and n in (5, 7):
        dims, opts = dict(zip(("N", "C1", "C2", "H", "W", "Ht", "Wt"), nums)), {}
    elif loss in ("rkd_distance", "rkd_angle", "rkd", "similarity_preserving") and n in (2, 3):
        dims = {"B": nums[0], "D": nums[1]} if n == 2 else {"B": nums[0], "Ds": nums[1], "Dt": nums[2]}
        opts = {}
        if nums[0] < 2:
            raise ValueError(f"--shape {text!r}: relation losses need a batch B >= 2")
    if dims is None:
        raise ValueError(f"--shape {text!r} has {n} dimension(s), which {loss} does not take; "
                         f"{loss}: {SHAPE_FORMS[loss]}")
    return dims, opts


def shape_cases(preset: Preset, losses: list[str], text: str, dtype: str | None = None) -> list[Case]:
    """One main case per loss at the user's ``--shape``, with the options (and, unless ``dtype`` is
    given, the dtype) of that loss's first main case in ``preset``; no issue targets."""
    out = []
    for loss in losses:
        dims, shape_opts = parse_shape(loss, text)
        template = next((c for c in preset.cases if c.loss == loss and c.group == "main"), None)
        opts = dict(template.options) if template else ({"temperature": 2.0} if loss == "softmax_kl_div" else {})
        if loss == "projected_mse":  # the form of the shape decides the layout
            opts.pop("feature_dim", None)
            if shape_opts["feature_dim"] == 1:
                opts["feature_dim"] = 1
        out.append(Case(loss, dims, dtype or (template.dtype if template else "float32"), opts, "main"))
    return out
