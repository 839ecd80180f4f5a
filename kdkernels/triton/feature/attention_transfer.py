"""Triton kernels of the one-pass ``attention_transfer`` op (contract: ATTENTION_TRANSFER in
kdkernels/ops/feature.py; the same math as csrc/include/kdkernels/attention.h).

student (N, Cs, S) and teacher (N, Ct, S) contiguous. Three launches, and when gradients are wanted
no (N, C, S) temporary, only op-math (N, S) rows and (N, 5) sample scalars:

1. ``_at_pool_kernel``, grid (N * S blocks,): a[k] = (1/C) sum_c |F[c, k]|^p of a block of positions
   of one sample, student and teacher, into the scratch rows a_s, a_t (a loop over channel tiles,
   coalesced along S).
2. ``_at_sample_kernel``, grid (N,): the sample's norms, then sum d^2, <v_s, d>, <v_t, d> over its
   rows: the loss row weight * l_n and the gradient coefficients. Samples are independent (each has
   its own normaliser), so one program per sample needs no atomics and sums deterministically.
3. ``_at_grad_kernel``, grid (N * S blocks, C blocks): g_a of its positions from the rows and the
   scalars, then dF = g_a / C * p |F|^(p-1) sign(F) for a tile of channels, in the input dtype.
   The map was read by launch 1; on a GPU a sample's map is often still in L2.

The power kind is a constexpr (p = 1: |x| and sign; p = 2: x^2 and 2x; else exp2(p log2 |x|)), so the
common cases need no transcendental. 0 at F = 0 in every kind (also |F|^p for general p). Offsets are
int64, arithmetic op-math (float32; float64 for float64 inputs). ``weight`` (the reduction's factor)
is a 0-d device tensor read by the kernels: no host sync. The backward only scales the saved
gradients in place (kdkernels/triton/scale_rows.py), nothing where the upstream factor is 1.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels._dtypes import opmath_dtype
from kdkernels.triton._common import launch, tiles, tl_opmath
from kdkernels.triton.relation._rows import ieee_sqrt
from kdkernels.triton.scale_rows import scale_rows_

EPS = 1e-12  # F.normalize's clamp on the attention norm (attention.h kEps)
POWER_ANY, POWER_ONE, POWER_TWO = 0, 1, 2  # attention.h PowerKind

# (elements per channel x position tile, largest BLOCK_S, largest BLOCK_R of the per-sample sweep,
# num_warps). Tests may shrink them with kdkernels.triton._common.override_tiles("attention_transfer",
# ...) to exercise several S / channel blocks on small maps. Not tuned on a GPU yet.
TILES = (4096, 256, 1024, 4)
N_SCALARS = 5  # per sample: nrm_s, nrm_t, f (g_v = f d), f <v_s, d>, f <v_t, d>


@triton.jit
def _abs_pow(x, p, KIND: tl.constexpr):
    """|x|^p, 0 at x = 0."""
    if KIND == 2:
        return x * x
    elif KIND == 1:
        return tl.abs(x)
    else:
        ax = tl.abs(x)
        return tl.where(ax == 0.0, 0.0, tl.exp2(p * tl.log2(ax)))


@triton.jit
def _abs_pow_grad(x, p, KIND: tl.constexpr):
    """d |x|^p / dx = p |x|^(p-1) sign(x), 0 at x = 0 (also for p = 1)."""
    if KIND == 2:
        return 2.0 * x
    elif KIND == 1:
        return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0)).to(x.dtype)
    else:
        ax = tl.abs(x)
        g = tl.where(ax == 0.0, 0.0, p * tl.exp2((p - 1.0) * tl.log2(ax)))
        return tl.where(x < 0.0, -g, g)


@triton.jit
def _pool_map(f_ptr, n, C, S, offs_s, mask_s, p, inv_c, KIND: tl.constexpr, DT: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(1/C) sum_c |F[n, c, offs_s]|^p of one (C, S) map."""
    base = f_ptr + n * C * S
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=DT)
    for c0 in range(0, C, BLOCK_C):
        cc = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = (cc < C)[:, None] & mask_s[None, :]
        x = tl.load(base + cc[:, None] * S + offs_s[None, :], mask=mask, other=0.0).to(DT)
        acc += _abs_pow(x, p, KIND)  # masked lanes load 0, and |0|^p = 0
    return tl.sum(acc, axis=0) * inv_c


@triton.jit
def _at_pool_kernel(fs_ptr, ft_ptr, as_ptr, at_ptr, CS, CT, S, s_blocks, p_in: "fp64", inv_cs: "fp64",
                    inv_ct: "fp64", KIND: tl.constexpr, DT: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // s_blocks).to(tl.int64)
    offs_s = (pid % s_blocks).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    p = tl.full([], p_in, DT)
    a_s = _pool_map(fs_ptr, n, CS, S, offs_s, mask_s, p, tl.full([], inv_cs, DT), KIND, DT, BLOCK_C, BLOCK_S)
    a_t = _pool_map(ft_ptr, n, CT, S, offs_s, mask_s, p, tl.full([], inv_ct, DT), KIND, DT, BLOCK_C, BLOCK_S)
    tl.store(as_ptr + n * S + offs_s, a_s, mask=mask_s)
    tl.store(at_ptr + n * S + offs_s, a_t, mask=mask_s)


@triton.jit
def _clamped_norm(sumsq, eps):
    """max(||a||, eps); NaN stays NaN."""
    nrm = ieee_sqrt(sumsq)
    return tl.where(nrm <= eps, eps, nrm)


@triton.jit
def _at_sample_kernel(as_ptr, at_ptr, weight_ptr, loss_ptr, coef_ptr, S, SQUARED: tl.constexpr,
                      WRITE_COEF: tl.constexpr, EPS: tl.constexpr, DT: tl.constexpr, BLOCK_R: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    row_s = as_ptr + n * S
    row_t = at_ptr + n * S
    cols = tl.arange(0, BLOCK_R)
    ss = tl.zeros((BLOCK_R,), dtype=DT)
    st = tl.zeros((BLOCK_R,), dtype=DT)
    for k0 in range(0, S, BLOCK_R):
        k = k0 + cols
        mask = k < S
        a_s = tl.load(row_s + k, mask=mask, other=0.0)
        a_t = tl.load(row_t + k, mask=mask, other=0.0)
        ss += a_s * a_s
        st += a_t * a_t
    eps = tl.full([], EPS, DT)  # in op-math: a float64 eps is 1e-12 itself, not its float32 rounding
    nrm_s = _clamped_norm(tl.sum(ss, axis=0), eps)
    nrm_t = _clamped_norm(tl.sum(st, axis=0), eps)
    d2 = tl.zeros((BLOCK_R,), dtype=DT)
    vd_s = tl.zeros((BLOCK_R,), dtype=DT)
    vd_t = tl.zeros((BLOCK_R,), dtype=DT)
    for k0 in range(0, S, BLOCK_R):
        k = k0 + cols
        mask = k < S
        v_s = tl.load(row_s + k, mask=mask, other=0.0) / nrm_s
        v_t = tl.load(row_t + k, mask=mask, other=0.0) / nrm_t
        d = v_s - v_t
        d2 += d * d
        vd_s += v_s * d
        vd_t += v_t * d
    sum_d2 = tl.sum(d2, axis=0)
    weight = tl.load(weight_ptr).to(DT)
    if SQUARED:
        tl.store(loss_ptr + n, weight * sum_d2)
    else:
        tl.store(loss_ptr + n, weight * ieee_sqrt(sum_d2))
    if WRITE_COEF:
        if SQUARED:  # g_v = f d
            f = 2.0 * weight
        else:  # d ||d|| / d d = d / ||d||, 0 where d = 0
            f = tl.where(sum_d2 > 0.0, weight / ieee_sqrt(sum_d2), 0.0)
        coef = coef_ptr + n * 5  # N_SCALARS
        tl.store(coef, nrm_s)
        tl.store(coef + 1, nrm_t)
        tl.store(coef + 2, f)
        tl.store(coef + 3, f * tl.sum(vd_s, axis=0))
        tl.store(coef + 4, f * tl.sum(vd_t, axis=0))


@triton.jit
def _grad_a(g_v, v, v_dot_gv, nrm, eps):
    """(g_v - v <v, g_v>) / nrm through the normaliser, g_v / eps where the clamp was active."""
    return tl.where(nrm > eps, (g_v - v * v_dot_gv) / nrm, g_v / eps)


@triton.jit
def _write_map_grad(f_ptr, g_ptr, n, C, S, offs_s, mask_s, g_a, p, KIND: tl.constexpr, DT: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """dF[n, c, offs_s] = g_a * |F|^p' for the channel tile of this program (g_a already / C)."""
    cc = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (cc < C)[:, None] & mask_s[None, :]
    offs = n * C * S + cc[:, None] * S + offs_s[None, :]
    x = tl.load(f_ptr + offs, mask=mask, other=0.0).to(DT)
    dx = g_a[None, :] * _abs_pow_grad(x, p, KIND)
    tl.store(g_ptr + offs, dx.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _at_grad_kernel(fs_ptr, ft_ptr, as_ptr, at_ptr, coef_ptr, gs_ptr, gt_ptr, CS, CT, S, s_blocks, p_in: "fp64",
                    inv_cs: "fp64", inv_ct: "fp64", KIND: tl.constexpr, STUDENT_GRAD: tl.constexpr,
                    TEACHER_GRAD: tl.constexpr, EPS: tl.constexpr, DT: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    n = (pid // s_blocks).to(tl.int64)
    offs_s = (pid % s_blocks).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    p = tl.full([], p_in, DT)
    coef = coef_ptr + n * 5  # N_SCALARS
    nrm_s = tl.load(coef)
    nrm_t = tl.load(coef + 1)
    f = tl.load(coef + 2)
    v_s = tl.load(as_ptr + n * S + offs_s, mask=mask_s, other=0.0) / nrm_s
    v_t = tl.load(at_ptr + n * S + offs_s, mask=mask_s, other=0.0) / nrm_t
    eps = tl.full([], EPS, DT)
    g_v = f * (v_s - v_t)  # the teacher's is -g_v, its <v_t, -g_v> = -f <v_t, d>
    if STUDENT_GRAD:
        g_a = _grad_a(g_v, v_s, tl.load(coef + 3), nrm_s, eps) * tl.full([], inv_cs, DT)
        _write_map_grad(fs_ptr, gs_ptr, n, CS, S, offs_s, mask_s, g_a, p, KIND, DT, BLOCK_C)
    if TEACHER_GRAD:
        g_a = _grad_a(-g_v, v_t, -tl.load(coef + 4), nrm_t, eps) * tl.full([], inv_ct, DT)
        _write_map_grad(ft_ptr, gt_ptr, n, CT, S, offs_s, mask_s, g_a, p, KIND, DT, BLOCK_C)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _power_kind(p: float) -> int:
    return POWER_ONE if p == 1.0 else (POWER_TWO if p == 2.0 else POWER_ANY)


def _check(student: Tensor, teacher: Tensor, weight: Tensor, p: float) -> None:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(f"student and teacher must be 3-D (N, C, S), got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0] or student.shape[2] != teacher.shape[2]:
        raise ValueError(f"student and teacher must share N and S, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.shape[1] < 1 or teacher.shape[1] < 1:
        raise ValueError(f"student and teacher need at least one channel, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.dtype != teacher.dtype:
        raise ValueError(f"student and teacher must have one dtype, got {student.dtype} and {teacher.dtype}")
    if not (student.is_contiguous() and teacher.is_contiguous()):
        raise ValueError("student and teacher must be contiguous")
    if not p >= 1.0:
        raise ValueError(f"p must be >= 1, got {p}")
    if weight.dim() != 0:
        raise ValueError(f"weight must be a 0-d tensor, got shape {tuple(weight.shape)}")


def _blocks(channels: int, positions: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_S, BLOCK_R, num_warps): BLOCK_S along the contiguous positions first."""
    tile, max_s, max_r, num_warps = tiles("attention_transfer", TILES)
    block_s = min(triton.next_power_of_2(positions), max_s)
    block_c = max(1, min(triton.next_power_of_2(channels), tile // block_s))
    block_r = min(triton.next_power_of_2(positions), max_r)
    return block_c, block_s, block_r, num_warps


def forward(student: Tensor, teacher: Tensor, weight: Tensor, p: float, squared: bool, per_row: bool,
            student_grad: bool, teacher_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_student, grad_teacher): loss = weight * sum_n l_n (0-d), or weight * l_n (N,) when
    ``per_row``; the gradients of that loss (of each sample's, when ``per_row``) in the maps' dtype,
    an unrequested one an empty (0,) tensor."""
    p = float(p)
    _check(student, teacher, weight, p)
    N, Cs, S = student.shape
    Ct = teacher.shape[1]
    acc_dtype = opmath_dtype(student.dtype)
    grad_s = torch.empty_like(student) if student_grad else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    rows = torch.zeros((N,), dtype=acc_dtype, device=student.device)
    if N > 0:
        kind = _power_kind(p)
        DT = tl_opmath(student.dtype)
        block_c, block_s, block_r, num_warps = _blocks(max(Cs, Ct), S)
        s_blocks = triton.cdiv(S, block_s)
        a_s = torch.empty((N, S), dtype=acc_dtype, device=student.device)
        a_t = torch.empty((N, S), dtype=acc_dtype, device=student.device)
        w = weight.to(device=student.device, dtype=acc_dtype)
        want_grad = student_grad or teacher_grad
        coef = torch.empty((N, N_SCALARS) if want_grad else (1,), dtype=acc_dtype, device=student.device)
        inv_cs, inv_ct = 1.0 / Cs, 1.0 / Ct
        launch(_at_pool_kernel, (N * s_blocks,), student, teacher, a_s, a_t, Cs, Ct, S, s_blocks, p, inv_cs, inv_ct,
               KIND=kind, DT=DT, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=num_warps)
        launch(_at_sample_kernel, (N,), a_s, a_t, w, rows, coef, S, SQUARED=bool(squared), WRITE_COEF=want_grad,
               EPS=EPS, DT=DT, BLOCK_R=block_r, num_warps=num_warps)
        if want_grad:
            c_blocks = triton.cdiv(max(Cs if student_grad else 1, Ct if teacher_grad else 1), block_c)
            launch(_at_grad_kernel, (N * s_blocks, c_blocks), student, teacher, a_s, a_t, coef,
                   grad_s if student_grad else student,  # dummy pointers are never written
                   grad_t if teacher_grad else teacher, Cs, Ct, S, s_blocks, p, inv_cs, inv_ct, KIND=kind,
                   STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad, EPS=EPS, DT=DT, BLOCK_C=block_c,
                   BLOCK_S=block_s, num_warps=num_warps)
    # the per-sample rows summed by torch: deterministic, and one tiny launch
    return (rows if per_row else rows.sum()), grad_s, grad_t


def backward(grad_loss: Tensor, grad_student: Tensor, grad_teacher: Tensor) -> None:
    """Scales the saved gradients in place, sample n by grad_loss (0-d) or grad_loss[n] ((N,))."""
    for grad in (grad_student, grad_teacher):
        if grad.numel():  # an unrequested (0,) gradient, or no samples: nothing to scale
            scale_rows_(grad.view(grad.shape[0], -1), grad_loss)
