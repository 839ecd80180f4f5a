"""Argument checks shared by every loss (docs/design.md §2.4): errors name the argument and what was expected."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATING_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}")
    return x



def promote_floating(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Floating tensors (None passes through) cast to their common dtype, as ``F.mse_loss`` and
    autocast's promote ops do: a bf16 student (autocast) meets an fp32 teacher or projection in
    fp32. Only the narrower tensors are copied; autograd returns each gradient in its input's dtype."""
    present = [t for t in tensors if t is not None]
    common = present[0].dtype
    for t in present[1:]:
        common = torch.promote_types(common, t.dtype)
    return [t if t is None or t.dtype == common else t.to(common) for t in tensors]


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = present[0]
    for n, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} must be on the same device as {first_name} ({first.device}), got {t.device}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_positive(name: str, value: object) -> float:
    v = check_real(name, value)
    if not 0 < v < float("inf"):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_nonnegative(name: str, value: object) -> float:
    v = check_real(name, value)
    if not 0 <= v < float("inf"):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_rkd_weights(distance_weight: object, angle_weight: object) -> tuple[float, float]:
    """The two RKD weights as floats: finite, >= 0, not both 0."""
    distance_weight = check_nonnegative("distance_weight", distance_weight)
    angle_weight = check_nonnegative("angle_weight", angle_weight)
    if distance_weight == 0 and angle_weight == 0:
        raise ValueError("distance_weight and angle_weight are both 0: at least one RKD term must be weighted")
    return distance_weight, angle_weight


def check_open_unit_interval(name: str, value: object) -> float:
    v = check_real(name, value)
    if not 0 < v < 1:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value!r}")
    return v


def check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the same shape as {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def check_min_dim(name: str, x: torch.Tensor, ndim: int, what: str) -> None:
    if x.dim() < ndim:
        raise ValueError(f"{name} must have at least {ndim} dimension(s) ({what}), got shape {tuple(x.shape)}")


def check_softmax_kl_options(temperature: object, divergence: object, beta: object, reduction: object,
                             ignore_index: object, t2_scale: object) -> tuple[float, str, float, str, int, bool]:
    """The options of softmax_kl_div, checked and normalised (one check for the function and the module).

    beta must lie in (0, 1) only for divergence="jsd", the one divergence that uses it.
    """
    from kdkernels import reduction as red
    from kdkernels.ops.response import DIVERGENCE_CODES

    temperature = check_positive("temperature", temperature)
    divergence = check_choice("divergence", divergence, tuple(DIVERGENCE_CODES))
    beta = check_open_unit_interval("beta", beta) if divergence == "jsd" else check_real("beta", beta)
    red.ROWS.check(reduction)
    return (temperature, divergence, beta, reduction, check_int("ignore_index", ignore_index),
            check_bool("t2_scale", t2_scale))


def check_labels(labels: object, lead: tuple, what: str = "the logits") -> None:
    """``labels``: None, or an integer tensor of the leading shape ``lead`` of ``what``."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(f"labels must have the leading shape of {what} {tuple(lead)}, got {tuple(labels.shape)}")


def check_softmax_kl_inputs(student_logits, teacher_logits, labels, temperature, divergence, beta, reduction,
                            ignore_index, t2_scale):
    """The checks of a dense softmax-KL's inputs (softmax_kl_div, and each rank's slice of the
    vocab-parallel one): (student_logits, teacher_logits) promoted to their common dtype, and the
    checked options (temperature, divergence, beta, reduction, ignore_index, t2_scale)."""
    check_float_tensor("student_logits", student_logits)
    check_float_tensor("teacher_logits", teacher_logits)
    check_min_dim("student_logits", student_logits, 1, "..., vocab")
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_labels(labels, tuple(student_logits.shape[:-1]))
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, labels=labels)
    options = check_softmax_kl_options(temperature, divergence, beta, reduction, ignore_index, t2_scale)
    if student_logits.shape[-1] < 1:
        raise ValueError(f"student_logits must have a vocabulary dimension of size >= 1, got shape "
                         f"{tuple(student_logits.shape)}")
    student_logits, teacher_logits = promote_floating(student_logits, teacher_logits)
    return student_logits, teacher_logits, options


def check_fused_linear_softmax_kl_inputs(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
                                         teacher_weight, teacher_bias, labels, chunk_size, temperature, divergence,
                                         beta, reduction, ignore_index, t2_scale):
    """The checks of a fused linear + softmax-KL's inputs (fused_linear_softmax_kl_div, and each rank's
    vocabulary slice of the vocab-parallel one): the seven tensors promoted to their common dtype,
    the teacher's detached (it gets no gradient), the checked options as check_softmax_kl_options,
    and chunk_size (None or an int >= 1)."""
    check_float_tensor("student_hidden", student_hidden)
    check_float_tensor("student_weight", student_weight)
    check_min_dim("student_hidden", student_hidden, 1, "..., hidden")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_weight must be (vocab, hidden) with hidden = {student_hidden.shape[-1]} (the last "
                         f"dim of student_hidden), got {tuple(student_weight.shape)}")
    lead, vocab = tuple(student_hidden.shape[:-1]), student_weight.shape[0]
    if vocab < 1:
        raise ValueError(f"student_weight must have a vocabulary of size >= 1, got shape {tuple(student_weight.shape)}")
    if student_bias is not None:
        check_float_tensor("student_bias", student_bias)
        if tuple(student_bias.shape) != (vocab,):
            raise ValueError(f"student_bias must be ({vocab},), got {tuple(student_bias.shape)}")
    if (teacher_logits is None) == (teacher_hidden is None):
        raise ValueError("give the teacher exactly once: teacher_logits, or teacher_hidden with teacher_weight")
    if teacher_logits is not None:
        check_float_tensor("teacher_logits", teacher_logits)
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("teacher_weight / teacher_bias go with teacher_hidden, not with teacher_logits")
        if tuple(teacher_logits.shape) != lead + (vocab,):
            raise ValueError(f"teacher_logits must be {lead + (vocab,)} (student_hidden's leading shape and the "
                             f"vocabulary of student_weight), got {tuple(teacher_logits.shape)}")
    else:
        check_float_tensor("teacher_hidden", teacher_hidden)
        if teacher_weight is None:
            raise ValueError("teacher_hidden needs teacher_weight (the teacher's LM-head weight)")
        check_float_tensor("teacher_weight", teacher_weight)
        if tuple(teacher_hidden.shape[:-1]) != lead or teacher_hidden.dim() != student_hidden.dim():
            raise ValueError(f"teacher_hidden must have student_hidden's leading shape {lead}, got "
                             f"{tuple(teacher_hidden.shape)}")
        if teacher_weight.dim() != 2 or tuple(teacher_weight.shape) != (vocab, teacher_hidden.shape[-1]):
            raise ValueError(f"teacher_weight must be ({vocab}, {teacher_hidden.shape[-1]}) (the student's vocabulary, "
                             f"the teacher's hidden size), got {tuple(teacher_weight.shape)}")
        if teacher_bias is not None:
            check_float_tensor("teacher_bias", teacher_bias)
            if tuple(teacher_bias.shape) != (vocab,):
                raise ValueError(f"teacher_bias must be ({vocab},), got {tuple(teacher_bias.shape)}")
    check_labels(labels, lead, "student_hidden")
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      teacher_logits=teacher_logits, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                      teacher_bias=teacher_bias, labels=labels)
    options = check_softmax_kl_options(temperature, divergence, beta, reduction, ignore_index, t2_scale)
    teacher = [None if t is None else t.detach() for t in (teacher_logits, teacher_hidden, teacher_weight, teacher_bias)]
    return promote_floating(student_hidden, student_weight, student_bias, *teacher), options, chunk_size
