"""Functional distillation losses: validate the inputs, then run on the chosen backend (kdkernels._dispatch).

Every function takes ``backend="auto"`` (see kdkernels.backends) and returns a float32 loss
(float64 for float64 inputs); gradients come back in each input's own dtype. Inputs of different
floating dtypes (a bf16 student under autocast, an fp32 teacher) are computed in their common dtype.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from kdkernels import _dispatch, ops, reference
from kdkernels import _validation as v
from kdkernels import reduction as red
from kdkernels._dtypes import opmath_dtype
from kdkernels._feature import rows_3d
from kdkernels.ops.response import DIVERGENCE_CODES, TAIL_CODES
from kdkernels.ops.response_linear import auto_chunk_rows

__all__ = ["softmax_kl_div", "softmax_kl_div_topk", "fused_linear_softmax_kl_div", "projected_mse", "attention_transfer", "rkd_distance", "rkd_angle", "rkd", "similarity_preserving", "fsp"]

def softmax_kl_div(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    reduction: str = "batchmean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    t2_scale: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Temperature softmax-KL between student and teacher logits (docs/design.md §2.1).

    Args:
        student_logits: (..., V) raw student logits; gradients flow here.
        teacher_logits: (..., V) raw teacher logits, same shape and dtype; they get a gradient too
            if they require one (mutual learning).
        temperature: finite T > 0; both distributions are softmax(logits / T).
        divergence: with q = softmax(teacher_logits / T) and p = softmax(student_logits / T):
            "forward" = KL(q || p) (Hinton), "reverse" = KL(p || q),
            "jsd" = beta KL(q || m) + (1 - beta) KL(p || m) with m = beta q + (1 - beta) p.
        beta: the teacher's weight in (0, 1); used (and checked) only by "jsd".
        reduction: "batchmean" (sum / kept rows), "sum", "mean" (sum / (kept rows * V)) or
            "none" (per-row losses of shape ...).
        labels: optional integer tensor of shape (...); rows equal to ``ignore_index`` are skipped.
        t2_scale: multiply by T^2 so gradient magnitudes do not shrink with T.
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Returns:
        A float32 scalar (or (...) for reduction="none"); float64 for float64 inputs.
    """
    student_logits, teacher_logits, options = v.check_softmax_kl_inputs(
        student_logits, teacher_logits, labels, temperature, divergence, beta, reduction, ignore_index, t2_scale)
    temperature, divergence, beta, reduction, ignore_index, t2_scale = options

    return _dispatch.run("softmax_kl_div", backend, student_logits.device, reference.softmax_kl_div,
                         _fused_softmax_kl_div, student_logits, teacher_logits, temperature, divergence, beta,
                         reduction, labels, ignore_index, t2_scale)


def _fused_softmax_kl_div(backend, student_logits, teacher_logits, temperature, divergence, beta, reduction, labels,
                          ignore_index, t2_scale):
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).contiguous()
    teacher = teacher_logits.reshape(-1, vocab).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    student_grad = torch.is_grad_enabled() and student.requires_grad
    teacher_grad = torch.is_grad_enabled() and teacher.requires_grad
    if student_grad or teacher_grad:
        # one pass: the forward reads the logits once and computes the loss and its gradients, which
        # the backward only scales (docs/decisions.md, "One-pass step")
        weight = red.row_weight(reduction, flat_labels, ignore_index, student.shape[0], vocab,
                                student.new_empty((), dtype=opmath_dtype(student.dtype)))
        loss, _grad_s, _grad_t = ops.SOFTMAX_KL_STEP.forward(
            backend, student, teacher, flat_labels, weight, temperature, DIVERGENCE_CODES[divergence], beta,
            ignore_index, t2_scale, reduction == "none", student_grad, teacher_grad)
        return loss.reshape(lead) if reduction == "none" else loss
    rows, _stats = ops.SOFTMAX_KL.forward(backend, student, teacher, flat_labels, temperature,
                                          DIVERGENCE_CODES[divergence], beta, ignore_index, t2_scale)
    return red.reduce_rows(rows, reduction, lead, vocab, flat_labels, ignore_index)


def softmax_kl_div_topk(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_indices: Tensor,
    *,
    temperature: float = 1.0,
    tail: str = "renormalize",
    reduction: str = "batchmean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    t2_scale: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Softmax-KL against a top-k sparse teacher, e.g. stored offline by ``kdkernels.topk_teacher``.

    Args:
        student_logits: (..., V) raw student logits; log p = log_softmax(student_logits / T) over
            the whole vocabulary. Gradients flow here (the teacher inputs get none).
        teacher_topk_logprobs: (..., K) log-probabilities of the teacher's full softmax at the same
            temperature (not logits), K <= V.
        teacher_topk_indices: (..., K) int64 vocabulary indices of those entries, any order,
            unique per row (required, not checked: a duplicate gives an unspecified result).
        tail: "renormalize" (q~ = softmax over the K log-probs; l = sum_k q~_k (log q~_k - log p_{i_k}))
            or "bucket" (the teacher's missing mass q_r = max(0, 1 - sum_k q_k) is one more event,
            against p_r = 1 - sum_k p_{i_k}).
        temperature, reduction, labels, ignore_index, t2_scale, backend: as ``softmax_kl_div``
            ("mean" divides by V).

    No dense (..., V) teacher tensor is built; the fused backends read the student once and, when a
    gradient is needed, compute it in the same pass (the one-pass step of ``softmax_kl_div``).
    """
    v.check_float_tensor("student_logits", student_logits)
    v.check_float_tensor("teacher_topk_logprobs", teacher_topk_logprobs)
    if not isinstance(teacher_topk_indices, Tensor):
        raise TypeError(f"teacher_topk_indices must be a torch.Tensor, got {type(teacher_topk_indices).__name__}")
    if teacher_topk_indices.dtype != torch.int64:
        raise TypeError(f"teacher_topk_indices must be int64, got {teacher_topk_indices.dtype}")
    v.check_min_dim("student_logits", student_logits, 1, "..., vocab")
    v.check_labels(labels, tuple(student_logits.shape[:-1]))
    v.check_same_device(student_logits=student_logits, teacher_topk_logprobs=teacher_topk_logprobs,
                        teacher_topk_indices=teacher_topk_indices, labels=labels)
    temperature, _div, _beta, reduction, ignore_index, t2_scale = v.check_softmax_kl_options(
        temperature, "forward", 0.5, reduction, ignore_index, t2_scale)
    tail = v.check_choice("tail", tail, tuple(TAIL_CODES))
    lead, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if tuple(teacher_topk_logprobs.shape[:-1]) != lead or teacher_topk_logprobs.dim() != student_logits.dim():
        raise ValueError(f"teacher_topk_logprobs must have the leading shape of the student logits {lead} and a "
                         f"last dimension K, got {tuple(teacher_topk_logprobs.shape)}")
    if teacher_topk_indices.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"teacher_topk_indices must have the shape of teacher_topk_logprobs "
                         f"{tuple(teacher_topk_logprobs.shape)}, got {tuple(teacher_topk_indices.shape)}")
    k = teacher_topk_logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk_logprobs must have 1 <= K <= V = {vocab} entries per row, got K = {k}")
    if teacher_topk_indices.device.type == "cpu" and teacher_topk_indices.numel() and not torch.compiler.is_compiling():
        # on a GPU the kernels check on the device (no host sync); here it is free
        lo, hi = int(teacher_topk_indices.min()), int(teacher_topk_indices.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"teacher_topk_indices must lie in [0, {vocab}), got values in [{lo}, {hi}]")
    student_logits, teacher_topk_logprobs = v.promote_floating(student_logits, teacher_topk_logprobs)
    return _dispatch.run("softmax_kl_div_topk", backend, student_logits.device, _reference_topk, _fused_topk,
                         student_logits, teacher_topk_logprobs, teacher_topk_indices, temperature, tail, reduction,
                         labels, ignore_index, t2_scale)


def _reference_topk(student_logits, lq, idx, temperature, tail, reduction, labels, ignore_index, t2_scale):
    return reference.softmax_kl_div_topk(student_logits, lq, idx, temperature, tail, reduction, labels, ignore_index,
                                         t2_scale)


def _fused_topk(backend, student_logits, lq, idx, temperature, tail, reduction, labels, ignore_index, t2_scale):
    lead, vocab, k = tuple(student_logits.shape[:-1]), student_logits.shape[-1], lq.shape[-1]
    student = student_logits.reshape(-1, vocab).contiguous()
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    student_grad = torch.is_grad_enabled() and student.requires_grad
    weight = red.row_weight(reduction, flat_labels, ignore_index, student.shape[0], vocab,
                            student.new_empty((), dtype=opmath_dtype(student.dtype)))
    loss, _grad = ops.SOFTMAX_KL_TOPK.forward(
        backend, student, lq.detach().reshape(-1, k).contiguous(), idx.reshape(-1, k).contiguous(), flat_labels,
        weight, temperature, TAIL_CODES[tail], ignore_index, t2_scale, reduction == "none", student_grad)
    return loss.reshape(lead) if reduction == "none" else loss


def topk_teacher(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The inputs of ``softmax_kl_div_topk`` from (..., V) teacher logits: the K largest
    log_softmax(teacher_logits / T) values (..., K), in the logits' dtype, and their int64 indices.

    log_softmax at the top-k is z_k / T - logsumexp(z / T): the top-k of the logits and one row
    log-sum-exp, so no full-size log-prob copy is made. No gradient (a stored teacher is a constant).
    """
    v.check_float_tensor("teacher_logits", teacher_logits)
    v.check_min_dim("teacher_logits", teacher_logits, 1, "..., vocab")
    k = v.check_int("k", k)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got {k}")
    temperature = v.check_positive("temperature", temperature)
    with torch.no_grad():
        z = teacher_logits.detach()
        values, indices = torch.topk(z, k, dim=-1)
        dt = opmath_dtype(z.dtype)
        # logsumexp(z / T) per row, a block of rows at a time: its temporary stays O(block x V)
        flat = z.reshape(-1, vocab)
        block = max(1, (1 << 24) // max(1, vocab))
        lse = torch.cat([torch.logsumexp(flat[r:r + block].to(dt) / temperature, dim=-1)
                         for r in range(0, flat.shape[0], block)]) if flat.shape[0] else flat.new_empty((0,), dtype=dt)
        logprobs = (values.to(dt) / temperature - lse.reshape(values.shape[:-1] + (1,))).to(z.dtype)
    return logprobs, indices


def fused_linear_softmax_kl_div(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Optional[Tensor] = None,
    *,
    teacher_logits: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    reduction: str = "batchmean",
    labels: Optional[Tensor] = None,
    ignore_index: int = -100,
    t2_scale: bool = True,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """The student's LM head and softmax-KL in one op, without (tokens x vocabulary) logits.

    Exactly ``softmax_kl_div(F.linear(student_hidden, student_weight, student_bias), teacher, ...)``,
    where ``teacher`` is ``teacher_logits`` or ``F.linear(teacher_hidden, teacher_weight, teacher_bias)``.

    Args:
        student_hidden: (..., H) the student's last hidden states; gets a gradient.
        student_weight: (V, H) the student's LM-head weight (e.g. ``model.lm_head.weight``); gets a gradient.
        student_bias: (V,) or None; gets a gradient.
        teacher_logits: (..., V) the teacher's logits, or None when the teacher is given as
        teacher_hidden: (..., Ht) the teacher's hidden states (Ht may differ from H) with
        teacher_weight: (V, Ht) its LM-head weight and teacher_bias: (V,) or None.
            The teacher side is a constant: it gets no gradient (inputs that require one are detached).
        temperature, divergence, beta, reduction, labels, ignore_index, t2_scale, backend: as
            ``softmax_kl_div``.
        chunk_size: rows per chunk; None: rows / 8 as a power of two, at least 256 (docs/decisions.md).

    The fused backends compute each chunk's logits (a torch GEMM), its loss and logit gradient (the
    one-pass softmax-KL step) and, for the scalar reductions, turn that gradient into the hidden,
    weight and bias gradients at once; the backward only scales them. With reduction="none" the
    backward recomputes the chunks instead (the per-row upstream gradient is not known before).
    Extra memory: O(chunk x V) besides the gradients. 16-bit weights accumulate their gradient in fp32.
    """
    tensors, options, chunk_size = v.check_fused_linear_softmax_kl_inputs(
        student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
        labels, chunk_size, temperature, divergence, beta, reduction, ignore_index, t2_scale)
    temperature, divergence, beta, reduction, ignore_index, t2_scale = options
    return _dispatch.run("fused_linear_softmax_kl_div", backend, student_hidden.device,
                         _reference_fused_linear, _fused_linear_softmax_kl_div, *tensors, temperature,
                         divergence, beta, reduction, labels, ignore_index, t2_scale, chunk_size)


def _reference_fused_linear(*args):
    return reference.fused_linear_softmax_kl_div(*args[:-1])  # chunk_size: the fused backends' only


def _fused_linear_softmax_kl_div(backend, hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                                 teacher_bias, temperature, divergence, beta, reduction, labels, ignore_index, t2_scale,
                                 chunk_size):
    lead, vocab = tuple(hidden.shape[:-1]), weight.shape[0]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    rows = flat_hidden.shape[0]
    teacher = (None if teacher_logits is None else teacher_logits.reshape(-1, vocab).contiguous(),
               None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).contiguous(),
               None if teacher_weight is None else teacher_weight.contiguous(),
               None if teacher_bias is None else teacher_bias.contiguous())
    flat_labels = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    chunk = chunk_size if chunk_size is not None else auto_chunk_rows(rows, vocab, flat_hidden.shape[1])
    options = (temperature, DIVERGENCE_CODES[divergence], beta, ignore_index, t2_scale, chunk)
    inputs = (flat_hidden, weight.contiguous(), None if bias is None else bias.contiguous(), *teacher, flat_labels)
    if reduction == "none":
        return ops.FUSED_LINEAR_SOFTMAX_KL_ROWS.forward(backend, *inputs, *options).reshape(lead)
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    scale = red.row_weight(reduction, flat_labels, ignore_index, rows, vocab,
                           flat_hidden.new_empty((), dtype=opmath_dtype(flat_hidden.dtype)))
    loss, _gh, _gw, _gb = ops.FUSED_LINEAR_SOFTMAX_KL.forward(backend, *inputs, scale, *options, *needs)
    return loss


def _check_feature_inputs(student, teacher, weight, bias, feature_dim, reduction):
    v.check_float_tensor("student", student)
    v.check_float_tensor("teacher", teacher)
    v.check_float_tensor("weight", weight)
    if bias is not None:
        v.check_float_tensor("bias", bias)
    v.check_same_device(student=student, teacher=teacher, weight=weight, bias=bias)
    feature_dim = v.check_int("feature_dim", feature_dim)
    red.FEATURES.check(reduction)
    v.check_min_dim("student", student, 1, "features")
    if not -student.dim() <= feature_dim < student.dim():
        raise ValueError(f"feature_dim must be in [{-student.dim()}, {student.dim() - 1}] for student of shape "
                         f"{tuple(student.shape)}, got {feature_dim}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (teacher_dim, student_dim), got shape {tuple(weight.shape)}")
    fd = feature_dim % student.dim()
    if student.shape[fd] != weight.shape[1]:
        raise ValueError(f"weight must have shape (teacher_dim, {student.shape[fd]}) to project student features "
                         f"of size {student.shape[fd]} (feature_dim={feature_dim}), got {tuple(weight.shape)}")
    expected_t = student.shape[:fd] + (weight.shape[0],) + student.shape[fd + 1:]
    if teacher.shape != expected_t:
        raise ValueError(f"teacher must have shape {tuple(expected_t)} (student's shape with the feature dim = "
                         f"weight.shape[0]), got {tuple(teacher.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return feature_dim


def projected_mse(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    feature_dim: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """FitNets hint: MSE between the projected student features and the teacher's (docs/design.md §2.2).

    Args:
        student: (..., Ds, ...) with the features at ``feature_dim``.
        teacher: same shape as ``student`` but Dt at ``feature_dim``.
        weight: (Dt, Ds) projection; bias: (Dt,) or None. y = x W^T + b per feature vector;
            ``feature_dim=1`` on an (N, C, H, W) map is a 1x1 convolution.
        reduction: "mean" (as F.mse_loss), "sum", "batchmean" (sum / number of feature vectors) or
            "none": one loss sum_d (y - t)_d^2 per feature vector (not elementwise like
            F.mse_loss(reduction="none"); per row, like softmax_kl_div's "none").
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Returns:
        A 0-d float32 loss (float64 for float64 inputs); for "none", the teacher's shape without
        ``feature_dim`` (e.g. (N, H, W) for (N, Ct, H, W) maps with feature_dim=1). Gradients reach
        student, weight, bias and teacher (when it requires grad) in their own dtype.

    Inputs of any layout are accepted: the fused backends see the student as a (B, P, Ds) view
    (e.g. an NCHW map with feature_dim=1 as (N, H*W, Cs) with stride 1 along H*W), never a
    permuted copy; see kdkernels._feature.rows_3d for the rare inputs that are copied once.
    """
    feature_dim = _check_feature_inputs(student, teacher, weight, bias, feature_dim, reduction)
    student, teacher, weight, bias = v.promote_floating(student, teacher, weight, bias)
    return _dispatch.run("projected_mse", backend, student.device, reference.projected_mse, _fused_projected_mse,
                         student, teacher, weight, bias, feature_dim, reduction)


def _fused_projected_mse(backend, student, teacher, weight, bias, feature_dim, reduction):
    x, t = rows_3d(student, teacher, feature_dim)
    loss, _residual = ops.PROJECTED_MSE.forward(backend, x, t, weight, bias, red.FEATURES.code(reduction))
    if reduction == "none":  # (B, P) -> the other dims of the teacher, in order (rows_3d keeps their order)
        fd = feature_dim % teacher.dim()
        return loss.reshape(teacher.shape[:fd] + teacher.shape[fd + 1:])
    return loss


def attention_transfer(student: Tensor, teacher: Tensor, *, p: float = 2.0, squared: bool = True,
                       reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) between feature maps.

    Args:
        student: (N, Cs, *spatial), teacher: (N, Ct, *spatial): channels may differ, the spatial
            sizes (one or more dims) must match.
        p: the power of the channel pooling a = (1/C) sum_c |F_c|^p, a real >= 1 (the paper's 2).
        squared: l_n = sum (v_s - v_t)^2 (True, the authors' code; torchdistill's mode 'code') or
            ||v_s - v_t||_2 (False, the paper's Eq. 2, mode 'paper'), v = a / max(||a||_2, 1e-12).
        reduction: "mean" (sum / (N * positions), the authors' ``.pow(2).mean()``), "sum",
            "batchmean" (sum / N) or "none" ((N,) per-sample losses).
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    Gradients reach the student and, when it requires one, the teacher. The fused backends read each
    map once in the forward, which also writes the gradients (the backward only scales them) and
    allocate no (N, C, positions) temporary.
    """
    v.check_float_tensor("student", student)
    v.check_float_tensor("teacher", teacher)
    v.check_same_device(student=student, teacher=teacher)
    v.check_min_dim("student", student, 3, "batch, channels, spatial...")
    v.check_min_dim("teacher", teacher, 3, "batch, channels, spatial...")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"teacher must have the same batch size as student ({student.shape[0]}), got {teacher.shape[0]}")
    if student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"student and teacher must have the same spatial size, got {tuple(student.shape[2:])} and "
                         f"{tuple(teacher.shape[2:])}")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.shape[1] < 1:
            raise ValueError(f"{name} must have at least 1 channel, got shape {tuple(x.shape)}")
    p = v.check_real("p", p)
    if not 1 <= p < float("inf"):
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    squared = v.check_bool("squared", squared)
    red.FEATURES.check(reduction)
    student, teacher = v.promote_floating(student, teacher)
    return _dispatch.run("attention_transfer", backend, student.device, reference.attention_transfer,
                         _fused_attention_transfer, student, teacher, p, squared, reduction)


def _float32_if_half_with_grad(*tensors: Tensor) -> tuple[Tensor, ...]:
    """float16 inputs of a one-pass op that will form gradients, as float32 copies.

    The one-pass ops save the gradient for an upstream of 1 in the inputs' dtype, weight included;
    in float16 the entries of a "mean" over large maps (~1e-10) underflow to 0 before the backward
    can scale them (docs/decisions.md, "One-pass ops in float16"). Through float32 copies the op's
    backward scales in float32 and autograd's cast rounds the scaled gradient to float16 after.
    bfloat16 has float32's range and is left as it is."""
    if tensors[0].dtype != torch.float16 or not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return tensors
    return tuple(t.float() for t in tensors)


def _fused_attention_transfer(backend, student, teacher, p, squared, reduction):
    samples, positions = student.shape[0], math.prod(student.shape[2:])
    s = student.reshape(samples, student.shape[1], positions).contiguous()
    t = teacher.reshape(samples, teacher.shape[1], positions).contiguous()
    s, t = _float32_if_half_with_grad(s, t)
    grad = torch.is_grad_enabled()
    weight = torch.tensor(red.per_sample_factor(reduction, samples, s.shape[2]), dtype=opmath_dtype(s.dtype),
                          device=s.device)
    loss, _gs, _gt = ops.ATTENTION_TRANSFER.forward(backend, s, t, weight, p, squared, reduction == "none",
                                                    grad and student.requires_grad, grad and teacher.requires_grad)
    return loss


def _check_relation_inputs(loss, student, teacher, reduction):
    _check_relation_tensors(student, teacher, reduction)
    if student.shape[0] < 2:
        raise ValueError(f"student must have a batch of at least 2 samples for relation losses, got {student.shape[0]}")
    _warn_teacher_requires_grad(loss, teacher, stacklevel=3)


def _check_relation_tensors(student, teacher, reduction):
    """The checks of one rank's relation inputs (kdkernels.distributed's global-batch losses too):
    everything but the batch size >= 2, which they check on the global batch."""
    v.check_float_tensor("student", student)
    v.check_float_tensor("teacher", teacher)
    v.check_same_device(student=student, teacher=teacher)
    red.RELATION.check(reduction)
    v.check_min_dim("student", student, 2, "batch, features...")
    v.check_min_dim("teacher", teacher, 2, "batch, features...")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"teacher must have the same batch size as student ({student.shape[0]}), got {teacher.shape[0]}")


def _warn_teacher_requires_grad(loss, teacher, stacklevel):
    """The relation losses' warning for a teacher that requires grad; ``stacklevel`` counts from the
    caller of this function (3 from a loss's check: the user's line calling the loss)."""
    if teacher.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # Python shows this once per call site: the teacher is a target here, never trained
        warnings.warn(f"{loss}: the teacher gets no gradient from relation losses (its relations are the "
                      f"target); pass teacher.detach() to silence this", UserWarning, stacklevel=stacklevel + 1)


def _relation_rows(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(B, ...) inputs as the contiguous (B, Ds) / (B, Dt) rows the fused ops take."""
    batch = student.shape[0]
    return student.reshape(batch, -1).contiguous(), teacher.reshape(batch, -1).contiguous()


def _terms_per_row(loss_op, batch: int) -> int:
    """How many matrix entries a relation op's per-row loss sums: B^2 for angle (anchor i's (B, B)
    slice of the B^3 cosines), B otherwise (row i of a (B, B) matrix)."""
    return batch * batch if loss_op is ops.RKD_ANGLE else batch


def _fused_relation(loss_op, backend: str, student: Tensor, teacher: Tensor, reduction: str) -> Tensor:
    """``loss_op`` (a single-loss relation op) on ``backend``, reduced: "none" asks the op for the
    per-row losses, every other word for their total."""
    out = loss_op.forward(backend, *_relation_rows(student, teacher), reduction == "none")
    loss = out[0] if isinstance(out, tuple) else out  # distance and SP also return their stats
    batch = student.shape[0]
    return red.reduce_relation(loss, reduction, batch, _terms_per_row(loss_op, batch))


def rkd_distance(student: Tensor, teacher: Tensor, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """RKD distance loss between (B, ...) student and teacher embeddings (docs/design.md §2.3).

    Smooth-L1 between the pairwise distance matrices, each divided by its mean positive distance;
    row i's loss is l_i = sum_j smooth_l1(d^_s,ij - d^_t,ij). The teacher gets no gradient.
    reduction: "mean" over the B^2 entries (default), "sum", "batchmean" (sum / B) or "none" (the
    (B,) per-row losses). The fused backends never form the (B, B) distance matrices.
    """
    _check_relation_inputs("rkd_distance", student, teacher, reduction)
    student, teacher = v.promote_floating(student, teacher)
    return _dispatch.run("rkd_distance", backend, student.device, reference.rkd_distance,
                         functools.partial(_fused_relation, ops.RKD_DISTANCE), student, teacher, reduction)


def rkd_angle(student: Tensor, teacher: Tensor, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """RKD angle loss between (B, ...) embeddings: smooth-L1 between the B^3 cosines <u_ij, u_ik>;
    anchor i's loss is l_i = sum_jk smooth_l1(psi_s,ijk - psi_t,ijk).

    The teacher gets no gradient. reduction: "mean" over the B^3 entries (default), "sum",
    "batchmean" (sum / B) or "none" (the (B,) per-anchor losses). The fused backends keep O(B^2)
    memory (no (B, B, B) or (B, B, D) tensor). A coincident pair (|e_j - e_i| <= 1e-12, u_ij = 0)
    passes no gradient, on every backend.
    """
    _check_relation_inputs("rkd_angle", student, teacher, reduction)
    student, teacher = v.promote_floating(student, teacher)
    return _dispatch.run("rkd_angle", backend, student.device, reference.rkd_angle,
                         functools.partial(_fused_relation, ops.RKD_ANGLE), student, teacher, reduction)


def rkd(student: Tensor, teacher: Tensor, distance_weight: float = 1.0, angle_weight: float = 2.0,
        reduction: str = "mean", backend: str = "auto") -> Tensor:
    """``distance_weight * rkd_distance + angle_weight * rkd_angle`` (docs/design.md §2.3; the RKD paper's
    lambda_D = 1, lambda_A = 2 by default), each term reduced by ``reduction`` (as in
    ``rkd_distance`` / ``rkd_angle``: "mean", "sum", "batchmean", or "none" for the (B,) weighted
    per-row losses distance_weight * l^dist_i + angle_weight * l^angle_i).

    The fused backends compute both terms in one op from one set of (B, B) squared distances per
    side, forward and backward (O(B^2) memory, as ``rkd_angle``). A weight of 0 skips its term
    entirely (so distance alone keeps ``rkd_distance``'s O(B) memory); weights must be finite and
    >= 0, not both 0.
    """
    _check_relation_inputs("rkd", student, teacher, reduction)
    student, teacher = v.promote_floating(student, teacher)
    distance_weight, angle_weight = v.check_rkd_weights(distance_weight, angle_weight)
    return _dispatch.run("rkd", backend, student.device, reference.rkd, _fused_rkd, student, teacher,
                         distance_weight, angle_weight, reduction)


def _fused_rkd(backend, student, teacher, distance_weight, angle_weight, reduction):
    if angle_weight == 0:
        return distance_weight * _fused_relation(ops.RKD_DISTANCE, backend, student, teacher, reduction)
    if distance_weight == 0:
        return angle_weight * _fused_relation(ops.RKD_ANGLE, backend, student, teacher, reduction)
    distance, angle, _stats = ops.RKD_DISTANCE_ANGLE.forward(backend, *_relation_rows(student, teacher),
                                                             reduction == "none")
    batch = student.shape[0]
    return (distance_weight * red.reduce_relation(distance, reduction, batch, _terms_per_row(ops.RKD_DISTANCE, batch))
            + angle_weight * red.reduce_relation(angle, reduction, batch, _terms_per_row(ops.RKD_ANGLE, batch)))


def similarity_preserving(student: Tensor, teacher: Tensor, reduction: str = "mean",
                          backend: str = "auto") -> Tensor:
    """Similarity-preserving loss between (B, ...) features: ||G_t^ - G_s^||_F^2 of the L2
    row-normalised Gram matrices; row i's loss is l_i = sum_j (G^_t,ij - G^_s,ij)^2.

    reduction: "mean" (default: sum / B^2, the paper's normalisation), "sum", "batchmean" (sum / B;
    before the relation reductions were unified it meant sum / B^2, now "mean": docs/decisions.md,
    "Reductions") or "none" (the (B,) per-row losses). The teacher gets no gradient; the fused
    backends never form the (B, B) Gram matrices."""
    _check_relation_inputs("similarity_preserving", student, teacher, reduction)
    student, teacher = v.promote_floating(student, teacher)
    return _dispatch.run("similarity_preserving", backend, student.device, reference.similarity_preserving,
                         functools.partial(_fused_relation, ops.SIMILARITY_PRESERVING), student, teacher, reduction)


def fsp(student_first: Tensor, student_second: Tensor, teacher_first: Tensor, teacher_second: Tensor, *,
        reduction: str = "mean", backend: str = "auto") -> Tensor:
    """FSP matrix loss (Yim et al., "A Gift from Knowledge Distillation", CVPR 2017) between the
    student's and the teacher's pair of layers.

    Args:
        student_first: (N, C1, *spatial), student_second: (N, C2, *spatial): the student's two maps,
            one spatial size (one or more dims) within the pair.
        teacher_first: (N, C1, *spatial_t), teacher_second: (N, C2, *spatial_t): the teacher's, with
            the student's channel counts; its spatial size may differ from the student's.
        reduction: "mean" (sum / (N C1 C2) = ``F.mse_loss`` of the FSP matrices), "sum",
            "batchmean" (sum / N, the paper's) or "none" ((N,) per-sample losses).
        backend: "auto", "torch", "cpu", "cuda" or "triton".

    G = A B^T / S per sample, A (C1, S) and B (C2, S) the maps flattened over their S positions:
    (N, C1, C2). l_n = sum_ij (G_s - G_t)_ij^2, the paper's squared Frobenius norm (torchdistill's
    FSPLoss sums the L2 norms of the difference's columns instead, not squared: a different loss).
    Gradients reach the student's maps and those of the teacher's that require one. The fused
    backends run the four (eight with teacher gradients: four per side) batched GEMMs through torch
    and fuse the rest: one difference matrix that becomes the gradient in place, the gradients formed
    in the forward (the backward only scales them), no copy of the maps.
    """
    maps = dict(student_first=student_first, student_second=student_second, teacher_first=teacher_first,
                teacher_second=teacher_second)
    for name, x in maps.items():
        v.check_float_tensor(name, x)
    v.check_same_device(**maps)
    for name, x in maps.items():
        v.check_min_dim(name, x, 3, "batch, channels, spatial...")
    for name, x in maps.items():
        if x.shape[0] != student_first.shape[0]:
            raise ValueError(f"{name} must have the same batch size as student_first ({student_first.shape[0]}), "
                             f"got {x.shape[0]}")
    for side in ("student", "teacher"):
        first, second = maps[f"{side}_first"], maps[f"{side}_second"]
        if first.shape[2:] != second.shape[2:]:
            raise ValueError(f"{side}_first and {side}_second must have the same spatial size, got "
                             f"{tuple(first.shape[2:])} and {tuple(second.shape[2:])}")
        if math.prod(first.shape[2:]) < 1:
            raise ValueError(f"{side}_first must have at least 1 spatial position, got shape {tuple(first.shape)}")
    for which in ("first", "second"):
        s, t = maps[f"student_{which}"], maps[f"teacher_{which}"]
        if s.shape[1] < 1:
            raise ValueError(f"student_{which} must have at least 1 channel, got shape {tuple(s.shape)}")
        if t.shape[1] != s.shape[1]:
            raise ValueError(f"teacher_{which} must have student_{which}'s {s.shape[1]} channels, got {t.shape[1]}")
    red.RELATION.check(reduction)
    tensors = v.promote_floating(student_first, student_second, teacher_first, teacher_second)
    return _dispatch.run("fsp", backend, student_first.device, reference.fsp, _fused_fsp, *tensors, reduction)


def _fused_fsp(backend, student_first, student_second, teacher_first, teacher_second, reduction):
    maps = _float32_if_half_with_grad(*(x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])).contiguous()
                                        for x in (student_first, student_second, teacher_first, teacher_second)))
    samples, c1, c2 = maps[0].shape[0], maps[0].shape[1], maps[1].shape[1]
    grad = torch.is_grad_enabled()
    weight = torch.tensor(red.per_sample_factor(reduction, samples, c1 * c2), dtype=opmath_dtype(maps[0].dtype),
                          device=maps[0].device)
    wanted = [grad and x.requires_grad for x in (student_first, student_second, teacher_first, teacher_second)]
    loss, *_grads = ops.FSP.forward(backend, *maps, weight, reduction == "none", *wanted)
    return loss
