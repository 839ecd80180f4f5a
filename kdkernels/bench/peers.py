"""The installed peers users would otherwise use: torchdistill's losses (CPU and GPU) and Liger-Kernel's KL / JSD (GPU).

Each peer is called with its own classes, its options mapped from the case's; what it cannot
express is reported as ``unavailable (reason)``, never silently replaced by something else.

torchdistill (``torchdistill.losses.mid_level``; its ``losses`` package needs torch only, so the
bench installs it with ``pip install --no-deps torchdistill``):

* ``softmax_kl_div`` -> ``KDLoss(temperature=T, alpha=0)``: ``nn.KLDivLoss`` of
  ``log_softmax(s / T)`` against ``softmax(t / T)`` over dim 1 (logits flattened to (rows, V)).
  With no hard-label term torchdistill returns the KL unscaled, so the bench multiplies it by T^2
  (``t2_scale``). Forward KL only (reverse / JSD: unavailable); no ignored rows (labels there are
  cross-entropy targets); no per-row ("none") reduction.
* ``projected_mse`` (FitNets) -> torchdistill has no hint-loss class of its own: its FitNets recipes
  are ``SimpleLossWrapper(nn.MSELoss())`` on the output of a regressor module. The regressor here is
  the case's plain linear / 1x1 convolution (torchdistill's ``ConvReg`` adds BatchNorm and ReLU:
  another loss), so this row is torchdistill's wrapper around the eager composition. No "batchmean".
* ``attention_transfer`` -> ``ATLoss(at_pairs, mode)``: mode "code" (the authors' code:
  ``normalize(x.pow(2).mean(1))``, ``.pow(2).mean()``) is our p = 2, squared, "mean"; mode "paper"
  (``normalize(x.pow(2).sum(1))``, ``||.||_2`` per sample, summed / N) is our p = 2, not squared,
  "batchmean" (the sum over channels and the mean differ by C, which the normalisation removes).
  Other p, reductions or pairings: unavailable.
* ``rkd_distance`` / ``rkd_angle`` / ``rkd`` -> ``RKDLoss(dist_factor, angle_factor)`` with (1, 0),
  (0, 1) and the case's weights: the RKD paper's code (Gram-trick ``pdist``, ``d[d > 0].mean()``).
  Reductions "mean" and "sum" only (no "batchmean", no per-row "none").
* ``similarity_preserving`` -> ``SPKDLoss``. **Not the same loss**: it normalises the Gram rows
  with ``normalize(G, 1)`` -- ``p=1``, an L1 norm -- where the SP paper, RepDistiller and kdkernels
  use L2. Same work, different values; its row is timed and labelled so in the notes. Its
  "batchmean" divides by B^2, kdkernels' "mean"; "sum" as ours; no "batchmean" (sum / B) or "none".
* ``fsp`` -> ``FSPLoss(fsp_pairs)`` with one pair. **Not the same loss**: it sums the L2 norms of the
  columns of G_s - G_t (``.norm(dim=1).sum()``, not squared) and divides by N, where the FSP paper and
  kdkernels take the squared Frobenius norm. Same work (the same four GEMMs), different values; its
  row is timed and labelled so in the notes, for the scalar reductions (it has one normalisation of
  its own, no "none"). 4-D maps only (it reads H, W; it max-pools a pair's maps to one size).

Liger-Kernel (GPU, ``softmax_kl_div``): ``log_softmax`` of both inputs, then
``LigerKLDIVLoss(reduction="batchmean", log_target=True)`` (forward KL) or ``LigerJSD(beta)``,
times T^2. ``fused_linear_softmax_kl_div`` (JSD, teacher as hidden + head): ``LigerFusedLinearJSD``.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

NOTES = {
    ("torchdistill", "similarity_preserving"): "torchdistill SPKDLoss L1-normalises Gram rows (kdkernels, paper: L2): "
                                               "same work, different loss",
    ("torchdistill", "softmax_kl_div"): "torchdistill KDLoss(alpha=0) x T^2",
    ("torchdistill", "projected_mse"): "torchdistill SimpleLossWrapper(nn.MSELoss) on a plain linear/1x1-conv regressor",
    ("torchdistill", "attention_transfer"): "torchdistill ATLoss (mode 'code': squared, mean; 'paper': norm, batchmean)",
    ("torchdistill", "fsp"): "torchdistill FSPLoss sums column L2 norms of G_s - G_t / N (kdkernels, paper: squared "
                             "Frobenius): same work, different loss",
}


def try_import(name: str):
    """(module, None), or (None, the reason it cannot be imported); the bench's one import probe."""
    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any failure means "not available", with the reason kept
        return None, f"{type(e).__name__}: {e}"


@functools.lru_cache(maxsize=1)
def torchdistill():
    """(module torchdistill.losses.mid_level, version) or (None, reason)."""
    mod, err = try_import("torchdistill.losses.mid_level")
    if mod is None:
        return None, err
    return mod, getattr(importlib.import_module("torchdistill"), "__version__", "?")


@functools.lru_cache(maxsize=1)
def liger():
    """({"kl": LigerKLDIVLoss, "jsd": LigerJSD, "version": str}, None) or (None, reason)."""
    kl, err = try_import("liger_kernel.transformers.kl_div")
    jsd, err2 = try_import("liger_kernel.transformers.jsd")
    if kl is None or jsd is None:
        return None, err or err2
    fl_jsd, _err3 = try_import("liger_kernel.transformers.fused_linear_jsd")
    fused_jsd = None if fl_jsd is None else getattr(fl_jsd, "LigerFusedLinearJSD", None)
    return {"kl": kl.LigerKLDIVLoss, "jsd": jsd.LigerJSD, "fused_linear_jsd": fused_jsd,
            "version": getattr(importlib.import_module("liger_kernel"), "__version__", "?")}, None


# -------------------------------------------------------------------------------- torchdistill
# kdkernels' SP reduction -> SPKDLoss's: its "batchmean" divides by B^2, which is our "mean"
SP_REDUCTIONS = {"mean": "batchmean", "sum": "sum"}

def torchdistill_unavailable(loss: str, options: dict) -> str | None:
    """Why torchdistill cannot run this loss with these options, or None."""
    mod, err = torchdistill()
    if mod is None:
        return f"unavailable (torchdistill not installed: {err[:80]})"
    if loss == "softmax_kl_div_topk":
        return "unavailable (torchdistill has no sparse top-k teacher)"
    if loss == "softmax_kl_div":
        if options.get("divergence", "forward") != "forward":
            return "unavailable (torchdistill's KDLoss is forward KL only)"
        if options.get("labels") is not None:
            return "unavailable (torchdistill's KDLoss has no ignored rows)"
        if options.get("reduction", "batchmean") == "none":
            return "unavailable (torchdistill's KDLoss has no per-row reduction)"
    if loss == "projected_mse" and options.get("reduction", "mean") == "batchmean":
        return "unavailable (nn.MSELoss has no batchmean)"
    if loss == "attention_transfer" and _at_mode(options) is None:
        return "unavailable (torchdistill's ATLoss: p 2, squared with mean ('code') or not with batchmean ('paper'))"
    if loss == "similarity_preserving" and options.get("reduction", "mean") not in SP_REDUCTIONS:
        return "unavailable (SPKDLoss reductions: batchmean = our mean, sum)"
    if loss == "fsp" and options.get("reduction", "mean") == "none":
        return "unavailable (torchdistill's FSPLoss has no per-sample reduction)"
    if loss in ("rkd_distance", "rkd_angle", "rkd") and options.get("reduction", "mean") not in ("mean", "sum"):
        return "unavailable (torchdistill's RKDLoss reductions: mean, sum)"
    return None


def _at_mode(options: dict) -> str | None:
    """ATLoss's mode for these attention-transfer options, or None (it has no such form)."""
    if float(options.get("p", 2.0)) != 2.0:
        return None
    squared, reduction = options.get("squared", True), options.get("reduction", "mean")
    return {(True, "mean"): "code", (False, "batchmean"): "paper"}.get((bool(squared), reduction))


def _io(path: str, tensor: torch.Tensor) -> dict:
    return {path: {"output": tensor}}


def torchdistill_call(loss: str, options: dict, linear_or_conv: Callable) -> Callable:
    """A function of the case's ``Inputs`` calling torchdistill's loss for ``loss``.
    ``linear_or_conv(x, w, b, feature_dim)``: the regressor of the FitNets hint."""
    td, _version = torchdistill()
    o = dict(options)
    if loss == "softmax_kl_div":
        temp = float(o.get("temperature", 1.0))
        scale = temp * temp if o.get("t2_scale", True) else 1.0
        fn = td.KDLoss("s", "output", "t", "output", temperature=temp, alpha=0,
                       reduction=o.get("reduction", "batchmean"))

        def call(inp):
            s, t = inp.args
            v = s.shape[-1]
            return fn(_io("s", s.reshape(-1, v)), _io("t", t.reshape(-1, v))) * scale
        return call
    if loss == "projected_mse":
        fn = td.SimpleLossWrapper(torch.nn.MSELoss(reduction=o.get("reduction", "mean")),
                                  input={"is_from_teacher": False, "module_path": "regressor", "io": "output"},
                                  target={"is_from_teacher": True, "module_path": "hint", "io": "output"})
        fd = o.get("feature_dim", -1)

        def call(inp):
            x, t, w = inp.args
            y = linear_or_conv(x, w, inp.kwargs.get("bias"), fd)
            return fn(_io("regressor", y), _io("hint", t), None)
        return call
    if loss in ("rkd_distance", "rkd_angle", "rkd"):
        factors = {"rkd_distance": (1.0, 0.0), "rkd_angle": (0.0, 1.0),
                   "rkd": (float(o.get("distance_weight", 1.0)), float(o.get("angle_weight", 2.0)))}[loss]
        fn = td.RKDLoss("s", "t", dist_factor=factors[0], angle_factor=factors[1],
                        reduction=o.get("reduction", "mean"))
        return lambda inp: fn(_io("s", inp.args[0]), _io("t", inp.args[1]))
    if loss == "attention_transfer":
        side = {"io": "output"}
        fn = td.ATLoss({"at": {"student": {"path": "s", **side}, "teacher": {"path": "t", **side}, "weight": 1}},
                       mode=_at_mode(o))
        return lambda inp: fn(_io("s", inp.args[0]), _io("t", inp.args[1]))
    if loss == "fsp":
        names = ("student_first", "student_second", "teacher_first", "teacher_second")
        fn = td.FSPLoss({"pair": {**{n: {"io": "output", "path": n} for n in names}, "weight": 1}})

        def call(inp):
            maps = dict(zip(names, inp.args))
            return fn({n: {"output": maps[n]} for n in names[:2]}, {n: {"output": maps[n]} for n in names[2:]})
        return call
    if loss == "similarity_preserving":
        fn = td.SPKDLoss("s", "t", reduction=SP_REDUCTIONS[o.get("reduction", "mean")])
        return lambda inp: fn(_io("s", inp.args[0]), _io("t", inp.args[1]))
    raise KeyError(loss)


# --------------------------------------------------------------------------------------- Liger
def liger_unavailable(loss: str, options: dict, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "unavailable (Liger is GPU only)"
    lg, _err = liger()
    if lg is None:
        return "unavailable (liger_kernel not installed)"
    if loss == "fused_linear_softmax_kl_div":
        if lg.get("fused_linear_jsd") is None:
            return "unavailable (this liger_kernel has no LigerFusedLinearJSD)"
        if options.get("divergence", "forward") != "jsd" or not options.get("teacher_head", False):
            return "unavailable (Liger's fused linear loss is JSD against a teacher given as hidden + head)"
        return None
    if loss != "softmax_kl_div":
        return "unavailable (Liger has no such loss)"
    if options.get("divergence", "forward") == "reverse":
        return "unavailable (Liger's KL gives no gradient to its target)"
    return None


def liger_call(options: dict, loss: str = "softmax_kl_div") -> Callable:
    lg, _err = liger()
    if loss == "fused_linear_softmax_kl_div":  # JSD(beta) of the two heads' softmaxes at T, batchmean
        fused = lg["fused_linear_jsd"](jsd_beta=float(options.get("beta", 0.5)),
                                       temperature=float(options.get("temperature", 1.0)))
        return lambda inp: fused(inp.args[0], inp.args[1], inp.kwargs["teacher_hidden"], inp.kwargs["teacher_weight"])
    temp = float(options.get("temperature", 1.0))
    scale = temp * temp if options.get("t2_scale", True) else 1.0
    if options.get("divergence", "forward") == "jsd":
        loss_fn = lg["jsd"](beta=float(options.get("beta", 0.5)))
    else:  # forward KL(teacher || student) on log-probs, reduced per row like "batchmean"
        loss_fn = lg["kl"](reduction="batchmean", log_target=True)

    def call(inp):
        s, t = inp.args
        log_p = torch.log_softmax(s / temp, dim=-1)
        log_q = torch.log_softmax(t / temp, dim=-1)
        return loss_fn(log_p, log_q) * scale

    return call
