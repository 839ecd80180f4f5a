"""Triton kernels of the ``softmax_kl_topk`` op: one-pass softmax-KL against a top-k sparse teacher
(kdkernels.reference.response_topk; the op spec is SOFTMAX_KL_TOPK of kdkernels.ops.response).

One program per row:

1. a loop over V: the student's row max m and log_sum = log sum exp(b - m) of b = z * (1/T) (an
   online max / sum, as the first loop of ``_rows.jsd_row_stats``), and the number of entries
   that are not -inf;
2. loops over the K teacher entries: the K student logits are gathered at the indices, log p_{i_k}
   = (b_{i_k} - m) - log_sum, and the row loss is computed
   * renormalize: q~ = softmax_k(lq) (one more loop over K for its max / sum),
     l = sum_k q~_k (log q~_k - log p_{i_k});
   * bucket: q = exp(lq), Q = sum q, q_r = max(0, 1 - Q), P = sum p_{i_k}, p_r = 1 - P (exactly 0
     when every entry that is not -inf is in the top-k, e.g. K = V, as the reference's exact sum
     over the entries outside the top-k),
     l = sum_k q_k (lq_k - log p_{i_k}) + (q_r > 0 ? q_r (log q_r - log p_r) : 0);
   terms with q = 0 are exactly 0;
3. when ``student_grad``, a loop over V writing g p_j A (renormalize A = 1; bucket A = Q - c P,
   c = q_r / p_r, 0 when q_r = 0), a ``tl.debug_barrier()``, then the K indices' entries are
   overwritten with their whole value g (p_{i_k} A - (w_k - c p_{i_k})), w = q~ (renormalize) or q
   (bucket): written from op math, not read back and corrected, so a 16-bit gradient is rounded
   once. g = weight * (T if t2_scale else 1/T).

The backward only scales the gradient rows in place (kdkernels/triton/scale_rows.py), as the
step's. Conventions as softmax_kl_step.py: enable_fp_fusion=False, ``fp64`` scalar annotations,
int64 offsets, op-math arithmetic, ignored rows never read (loss 0, zero gradient rows), ``weight``
a 0-d device tensor read by the kernel. Out-of-range indices: a ``tl.device_assert`` (active in
debug builds / the interpreter) and a masked gather; the Python layer checks CPU tensors.

Importing this module imports triton: set ``TRITON_INTERPRET=1`` before it for CPU tensors.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from kdkernels._dtypes import opmath_dtype
from kdkernels.triton._common import launch, tl_opmath
from kdkernels.triton.response._rows import launch_config, load_scaled, store_zero_grad_rows
from kdkernels.triton.scale_rows import scale_rows_


@triton.jit
def _gather_k(s_row, lq_row, idx_row, offs, K, V, inv_t, m_s, log_sum_s, DT: tl.constexpr):
    """A chunk of the K entries: (mask, indices, lq, b at the indices, log p at the indices)."""
    mask = offs < K
    idx = tl.load(idx_row + offs, mask=mask, other=0)
    tl.device_assert((idx >= 0) & (idx < V), "softmax_kl_topk: an index is outside [0, V)")
    in_range = mask & (idx >= 0) & (idx < V)
    lq = tl.load(lq_row + offs, mask=mask, other=float("-inf")).to(DT)
    b = load_scaled(s_row + idx, in_range, inv_t, DT)
    log_p = (b - m_s) - log_sum_s
    return mask, idx, lq, b, log_p


@triton.jit
def _softmax_kl_topk_kernel(
    s_ptr,  # (R, V) student logits
    lq_ptr,  # (R, K) teacher log-probs
    idx_ptr,  # (R, K) int64 indices
    labels_ptr,
    weight_ptr,
    loss_ptr,  # (R,) weight * row loss
    grad_s_ptr,
    V,
    K,
    ignore_index,
    inv_temp: "fp64",
    loss_scale: "fp64",
    grad_scale: "fp64",
    HAS_LABELS: tl.constexpr,
    TAIL: tl.constexpr,  # 0 renormalize, 1 bucket
    STUDENT_GRAD: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_off = row * V
    k_off = row * K
    zero = tl.full([], 0.0, DT)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            tl.store(loss_ptr + row, zero)
            store_zero_grad_rows(grad_s_ptr + row_off, grad_s_ptr + row_off, V, STUDENT_GRAD, False, DT, BLOCK_V)
            return

    inv_t = tl.full([], inv_temp, DT)
    neg_inf = tl.full([], float("-inf"), DT)
    s_row = s_ptr + row_off
    lq_row = lq_ptr + k_off
    idx_row = idx_ptr + k_off
    cols = tl.arange(0, BLOCK_V)
    kcols = tl.arange(0, BLOCK_K)

    # (1) the student's stats: m_s, log sum exp(b - m_s), and how many entries are not -inf
    ms = neg_inf
    ss = zero
    n_fin = tl.full([], 0, tl.int64)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        b = load_scaled(s_row + offs, mask, inv_t, DT)
        new_ms = tl.maximum(ms, tl.max(b, 0))
        cs = tl.where(new_ms == float("-inf"), 0.0, new_ms)  # 0 while all seen is -inf: no NaN
        ss = ss * tl.exp(ms - cs) + tl.sum(tl.exp(b - cs), 0)
        n_fin += tl.sum((b != float("-inf")).to(tl.int64), 0)
        ms = new_ms
    m_s = ms
    log_sum_s = tl.log(ss)

    # (2) the row loss from the K entries
    c = zero
    a_dense = tl.full([], 1.0, DT)
    log_z = zero  # renormalize: log sum_k exp(lq_k)
    if TAIL == 0:
        mq = neg_inf
        sq = zero
        for start in range(0, K, BLOCK_K):
            offs = start + kcols
            mask = offs < K
            lq = tl.load(lq_row + offs, mask=mask, other=float("-inf")).to(DT)
            new_mq = tl.maximum(mq, tl.max(lq, 0))
            cq = tl.where(new_mq == float("-inf"), 0.0, new_mq)
            sq = sq * tl.exp(mq - cq) + tl.sum(tl.exp(lq - cq), 0)
            mq = new_mq
        log_z = mq + tl.log(sq)
        acc = zero
        for start in range(0, K, BLOCK_K):
            offs = start + kcols
            mask, idx, lq, b, log_p = _gather_k(s_row, lq_row, idx_row, offs, K, V, inv_t, m_s, log_sum_s, DT)
            log_w = lq - log_z
            w = tl.exp(log_w)
            pos = (w > 0.0) & mask
            acc += tl.sum(tl.where(pos | (w != w), w * tl.where(pos, log_w - log_p, 0.0), 0.0), 0)
        row_loss = acc
    else:
        head = zero
        q_sum = zero
        p_sum = zero
        n_fin_k = tl.full([], 0, tl.int64)
        for start in range(0, K, BLOCK_K):
            offs = start + kcols
            mask, idx, lq, b, log_p = _gather_k(s_row, lq_row, idx_row, offs, K, V, inv_t, m_s, log_sum_s, DT)
            q = tl.exp(lq)
            pos = (q > 0.0) & mask
            head += tl.sum(tl.where(pos | (q != q), q * tl.where(pos, lq - log_p, 0.0), 0.0), 0)
            q_sum += tl.sum(tl.where(mask, q, 0.0), 0)
            p_sum += tl.sum(tl.where(mask, tl.exp(log_p), 0.0), 0)
            n_fin_k += tl.sum(((b != float("-inf")) & mask).to(tl.int64), 0)
        # K = V: no entry is left for the bucket, which is empty (docs/decisions.md, as the reference)
        q_r = tl.where(K < V, tl.maximum(1.0 - q_sum, 0.0), 0.0)
        # p_r = 1 - P; exactly 0 when no entry outside the top-k has mass (e.g. K = V)
        p_r = tl.where(n_fin_k == n_fin, 0.0, tl.maximum(1.0 - p_sum, 0.0))
        q_r_pos = q_r > 0.0
        safe_q_r = tl.where(q_r_pos, q_r, 1.0)
        tail_term = tl.where(q_r_pos, q_r * (tl.log(safe_q_r) - tl.log(p_r)), 0.0)
        row_loss = head + tail_term
        # p_r = 0 with q_r > 0 (every entry outside the top-k masked): the loss is +inf and c = inf
        # makes the row's gradient NaN, as the reference's and the CPU/CUDA kernels' (docs/decisions.md)
        c = tl.where(q_r_pos, q_r / p_r, 0.0)
        a_dense = q_sum - c * p_sum
    weight = tl.load(weight_ptr).to(DT)
    tl.store(loss_ptr + row, row_loss * tl.full([], loss_scale, DT) * weight)

    # (3) the gradient: the dense part over V, then the K entries' whole values
    if STUDENT_GRAD:
        g = weight * tl.full([], grad_scale, DT)
        ga = g * a_dense
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            b = load_scaled(s_row + offs, mask, inv_t, DT)
            p = tl.exp((b - m_s) - log_sum_s)
            tl.store(grad_s_ptr + row_off + offs, (p * ga).to(grad_s_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the dense stores before the K entries' stores (the same addresses)
        for start in range(0, K, BLOCK_K):
            offs = start + kcols
            mask, idx, lq, b, log_p = _gather_k(s_row, lq_row, idx_row, offs, K, V, inv_t, m_s, log_sum_s, DT)
            p = tl.exp(log_p)
            if TAIL == 0:
                w = tl.exp(lq - log_z)
            else:
                w = tl.exp(lq)
            grad = g * (p * a_dense - (w - c * p))
            in_range = mask & (idx >= 0) & (idx < V)
            tl.store(grad_s_ptr + row_off + idx, grad.to(grad_s_ptr.dtype.element_ty), mask=in_range)


def _check(student: Tensor, teacher_logprobs: Tensor, indices: Tensor, labels) -> None:
    if student.dim() != 2 or teacher_logprobs.dim() != 2 or teacher_logprobs.shape[0] != student.shape[0]:
        raise ValueError(f"student must be (R, V) and teacher_logprobs (R, K), got {tuple(student.shape)} and "
                         f"{tuple(teacher_logprobs.shape)}")
    if indices.shape != teacher_logprobs.shape or indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64 of shape {tuple(teacher_logprobs.shape)}, got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    if student.dtype != teacher_logprobs.dtype:
        raise TypeError(f"student and teacher_logprobs must have the same dtype, got {student.dtype} and "
                        f"{teacher_logprobs.dtype}")
    if teacher_logprobs.shape[1] > student.shape[1] or (student.shape[0] and teacher_logprobs.shape[1] < 1):
        raise ValueError(f"K must be in [1, V = {student.shape[1]}], got {teacher_logprobs.shape[1]}")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != student.shape[0]):
        raise ValueError(f"labels must have shape ({student.shape[0]},), got {tuple(labels.shape)}")


def forward(student: Tensor, teacher_logprobs: Tensor, indices: Tensor, labels, weight: Tensor, temperature: float,
            tail: int, ignore_index: int, t2_scale: bool, per_row: bool, student_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, grad_student): loss = weight * sum_r l_r (0-d), or weight * l_r (R,) when ``per_row``;
    the gradient of that loss (of each row's, when ``per_row``) in the student's dtype, an empty (0,)
    tensor when not ``student_grad``."""
    _check(student, teacher_logprobs, indices, labels)
    tail = int(tail)
    if tail not in (0, 1):
        raise ValueError(f"tail must be 0 (renormalize) or 1 (bucket), got {tail}")
    if weight.dim() != 0:
        raise ValueError(f"weight must be a 0-d tensor, got shape {tuple(weight.shape)}")
    student = student.contiguous()
    teacher_logprobs = teacher_logprobs.contiguous()
    indices = indices.contiguous()
    rows, vocab = student.shape
    k = teacher_logprobs.shape[1]
    grad_s = torch.empty_like(student) if student_grad else student.new_empty((0,))
    row_loss = torch.empty((rows,), dtype=opmath_dtype(student.dtype), device=student.device)
    if rows == 0 or vocab == 0:
        row_loss.zero_()
    else:
        has_labels = labels is not None
        temperature = float(temperature)
        inv_temp = 1.0 / temperature
        loss_scale = temperature * temperature if t2_scale else 1.0
        grad_scale = temperature if t2_scale else inv_temp  # T^2 loss scale times the 1/T of d(z/T)/dz
        block, num_warps = launch_config(vocab, student.dtype)
        block_k, _ = launch_config(k, student.dtype)
        launch(_softmax_kl_topk_kernel, (rows,), student, teacher_logprobs, indices,
               labels.contiguous() if has_labels else row_loss,  # dummy pointer, never read
               weight, row_loss,
               grad_s if student_grad else student,  # dummy pointer, never written
               vocab, k, int(ignore_index), inv_temp, loss_scale, grad_scale,
               HAS_LABELS=has_labels, TAIL=tail, STUDENT_GRAD=bool(student_grad), DT=tl_opmath(student.dtype),
               BLOCK_V=block, BLOCK_K=block_k, num_warps=num_warps, enable_fp_fusion=False)
    return (row_loss if per_row else row_loss.sum()), grad_s


def backward(grad_loss: Tensor, grad_student: Tensor) -> None:
    """Scales the saved gradient in place, row r by grad_loss (0-d) or grad_loss[r] ((R,))."""
    factor = grad_loss.reshape(-1) if grad_loss.dim() > 1 else grad_loss
    scale_rows_(grad_student, factor)  # skips an empty (0,) gradient
