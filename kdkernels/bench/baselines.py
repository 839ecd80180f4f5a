"""The eager baselines: each loss as users write it today in plain PyTorch (the bench's ``eager``).

These are the usual compositions from the papers and the libraries users copy from, written the
way a training script would write them -- not :mod:`kdkernels.reference`, which is the accuracy
spec (float32 op-math for every dtype, ``cdist`` without the matmul trick, care at -inf and at
coincident points) and is far slower than anything a user would run. Every speed ratio of the
bench is taken against these (``vs_eager_*``) and against ``torch.compile`` of them
(``vs_compile_*``).

Same signatures as the kdkernels losses (without ``backend``) and, on finite inputs, the same
values: ``python_tests/test_bench_baselines.py`` checks each against the reference in float32, so
the ratios compare like with like. Where they are not the same, by design (what users' code does):

* they run in the inputs' dtype: bf16 inputs give bf16 intermediates (the fastest eager form),
  where the reference and the kernels compute in float32;
* softmax-KL takes log-probs with ``log_target=True``; a logit of -inf (a masked vocabulary entry)
  gives NaN there (``exp(-inf) * (-inf - x)``), where the kernels give its 0 * log 0 = 0;
* RKD distance uses the Gram trick ``|a|^2 + |b|^2 - 2 a.b``, which cancels for near-identical
  rows (the reference computes the differences); RKD angle normalises differences with
  ``F.normalize``, whose gradient at coincident points is scaled by 1 / eps (the kernels give 0).

Family by family:

* ``softmax_kl_div``: ``F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
  reduction="batchmean", log_target=True) * T * T`` (Hinton KD); reverse KL swaps the two;
  JSD: ``m = beta q + (1 - beta) p`` and ``beta KL(q || m) + (1 - beta) KL(p || m)``. Labels drop the
  ignored rows first (boolean row selection).
* ``softmax_kl_div_topk``: the sparse composition a user writes for a stored top-k teacher:
  ``log_softmax(s / T)`` gathered at the indices against ``softmax`` of the K log-probs
  ("renormalize"), or against the K probabilities plus the remaining mass as one more event with
  ``log(1 - sum p_k)`` ("bucket"), summed per row, batchmean, times T^2.
* ``projected_mse``: ``F.mse_loss(F.linear(x, W, b), t)``; an (N, C, H, W) map with
  ``feature_dim=1`` goes through ``F.conv2d(x, W[:, :, None, None], b)`` (a 1x1 convolution).
* ``attention_transfer``: the authors' code (Zagoruyko & Komodakis; torchdistill's ``ATLoss``):
  ``at(x) = F.normalize(x.pow(p).mean(1).flatten(1))`` -- ``x.abs().pow(p)`` for a p other than 2,
  where a negative activation would otherwise give a complex or negative power --, then
  ``(at(s) - at(t)).pow(2).mean()`` ("mean", squared); the paper's form ``||at(s) - at(t)||_2`` per
  sample for ``squared=False``. The teacher side under ``torch.no_grad()`` unless it requires grad.
* ``rkd_distance`` / ``rkd_angle`` / ``rkd``: the RKD paper's code (Park et al. 2019; torchdistill's
  ``RKDLoss``): Gram-trick distances clamped at 1e-12, diagonal zeroed, divided by their mean
  off-diagonal value, smooth-L1; angles from ``F.normalize``-d differences and ``bmm``. The teacher
  side under ``torch.no_grad()``. The mean is ``sum / count(d > 0)`` rather than the paper's
  ``d[d > 0].mean()``: the same number, without a host sync or a ``torch.compile`` graph break.
* ``similarity_preserving``: the SP paper's (Tung & Mori 2019): ``G = f f^T``, rows L2-normalised
  (``F.normalize``), squared Frobenius norm of the difference, divided by B^2 (kdkernels' "mean").
* ``fsp``: the usual eager code (Yim et al.; torchdistill's ``fsp_matrix``): ``G = torch.matmul(a,
  b.transpose(1, 2)) / HW`` of the flattened maps, the teacher's under ``torch.no_grad()`` unless its
  maps require grad, then ``F.mse_loss(G_s, G_t)`` ("mean"); the squared Frobenius norm per sample
  for the other reductions ("batchmean" is the paper's).
* Relation reductions are kdkernels' words (kdkernels.reduction.RELATION), applied to the
  elementwise losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["softmax_kl_div", "softmax_kl_div_topk", "fused_linear_softmax_kl_div", "projected_mse", "attention_transfer", "rkd_distance", "rkd_angle", "rkd", "similarity_preserving", "fsp"]


# ------------------------------------------------------------------------------ response (KD)
def softmax_kl_div(student_logits, teacher_logits, temperature=1.0, divergence="forward", beta=0.5,
                   reduction="batchmean", labels=None, ignore_index=-100, t2_scale=True):
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    keep = None
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
        s, t = s[keep], t[keep]
    log_p = F.log_softmax(s / temperature, dim=-1)  # student
    log_q = F.log_softmax(t / temperature, dim=-1)  # teacher
    red = "sum" if reduction == "none" else reduction
    if reduction == "none":  # per-row losses: elementwise, summed over the vocabulary
        def kl(log_a, log_b):  # KL(b || a), a and b given as log-probs
            return F.kl_div(log_a, log_b, reduction="none", log_target=True).sum(-1)
    else:
        def kl(log_a, log_b):
            return F.kl_div(log_a, log_b, reduction=red, log_target=True)
    if divergence == "forward":  # KL(q || p), Hinton
        loss = kl(log_p, log_q)
    elif divergence == "reverse":  # KL(p || q)
        loss = kl(log_q, log_p)
    else:  # generalised JSD
        log_m = (beta * log_q.exp() + (1 - beta) * log_p.exp()).log()
        loss = beta * kl(log_m, log_q) + (1 - beta) * kl(log_m, log_p)
    if t2_scale:
        loss = loss * (temperature * temperature)
    if reduction == "none":
        if keep is None:
            return loss.reshape(lead)
        full = loss.new_zeros(keep.shape[0])
        full[keep] = loss
        return full.reshape(lead)
    return loss


def fused_linear_softmax_kl_div(student_hidden, student_weight, student_bias=None, *, teacher_logits=None,
                                teacher_hidden=None, teacher_weight=None, teacher_bias=None, **options):
    """What a user writes without a fused head: the LM heads as F.linear (full logits), then the eager KD above."""
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    return softmax_kl_div(F.linear(student_hidden, student_weight, student_bias), teacher_logits, **options)


def softmax_kl_div_topk(student_logits, teacher_topk_logprobs, teacher_topk_indices, temperature=1.0,
                        tail="renormalize", reduction="batchmean", labels=None, ignore_index=-100, t2_scale=True):
    vocab, k = student_logits.shape[-1], teacher_topk_logprobs.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, vocab)
    lq = teacher_topk_logprobs.reshape(-1, k)
    idx = teacher_topk_indices.reshape(-1, k)
    keep = None
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
        s, lq, idx = s[keep], lq[keep], idx[keep]
    log_p_k = F.log_softmax(s / temperature, dim=-1).gather(-1, idx)
    if tail == "renormalize":
        log_q = F.log_softmax(lq, dim=-1)
        rows = (log_q.exp() * (log_q - log_p_k)).sum(-1)
    else:
        q = lq.exp()
        rows = (q * (lq - log_p_k)).sum(-1)
        if k < vocab:
            q_r = (1 - q.sum(-1)).clamp_min(0)
            p_r = 1 - log_p_k.exp().sum(-1)
            rows = rows + torch.where(q_r > 0, q_r * (q_r.clamp_min(1e-30).log() - p_r.log()), torch.zeros_like(q_r))
    if t2_scale:
        rows = rows * (temperature * temperature)
    if reduction == "none":
        if keep is None:
            return rows.reshape(lead)
        full = rows.new_zeros(keep.shape[0])
        full[keep] = rows
        return full.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    kept = max(1, rows.shape[0])
    return total / kept if reduction == "batchmean" else total / (kept * vocab)


# -------------------------------------------------------------------------- feature (FitNets)
def project(student, weight, bias=None, feature_dim=-1):
    """The regressor: ``F.linear`` along the features, or a 1x1 ``F.conv2d`` on (N, C, H, W) maps."""
    fd = feature_dim % student.dim()
    if student.dim() == 4 and fd == 1:
        return F.conv2d(student, weight[:, :, None, None], bias)
    if fd == student.dim() - 1:
        return F.linear(student, weight, bias)
    return F.linear(student.movedim(fd, -1), weight, bias).movedim(-1, fd)


def projected_mse(student, teacher, weight, bias=None, feature_dim=-1, reduction="mean"):
    y = project(student, weight, bias, feature_dim)
    fd = feature_dim % student.dim()
    if reduction == "batchmean":  # sum over each feature vector, mean over the vectors
        rows = teacher.numel() // teacher.shape[fd] if teacher.shape[fd] else 0
        return F.mse_loss(y, teacher, reduction="sum") / max(1, rows)
    return F.mse_loss(y, teacher, reduction=reduction)


def _attention(x, p):
    pooled = x.pow(2) if p == 2 else x.abs().pow(p)
    return F.normalize(pooled.mean(1).flatten(1))


def attention_transfer(student, teacher, p=2.0, squared=True, reduction="mean"):
    if teacher.requires_grad:
        at_t = _attention(teacher, p)
    else:
        with torch.no_grad():
            at_t = _attention(teacher, p)
    d = _attention(student, p) - at_t
    if squared:
        if reduction == "mean":
            return d.pow(2).mean()
        rows = d.pow(2).sum(1)
    else:
        rows = d.norm(dim=1)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / max(1, d.shape[0])
    return rows.sum() / max(1, d.numel())  # "mean": sum / (N * positions)


# ------------------------------------------------------------------------------------ relation
def _pdist(e, eps=1e-12):
    """(B, D) -> (B, B) Euclidean distances by the Gram trick, the diagonal set to 0 (RKD's pdist)."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _normalized_pdist(e):
    d = _pdist(e)
    return d / (d.sum() / (d > 0).sum())  # divided by the mean positive distance


def _angles(e):
    """(B, D) -> (B, B, B) cosines of the angle at i between e_j and e_k."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # diff[i, j] = e_j - e_i
    u = F.normalize(diff, p=2, dim=2)
    return torch.bmm(u, u.transpose(1, 2))


def _reduce_relation(entries, reduction):
    """(B, ...) elementwise relation losses reduced as kdkernels' words: "mean" over the entries,
    "sum", "batchmean" (sum / B), "none" (each row's sum, (B,))."""
    if reduction == "none":
        return entries.flatten(1).sum(dim=1)
    if reduction == "mean":
        return entries.mean()
    return entries.sum() / (entries.shape[0] if reduction == "batchmean" else 1)


def rkd_distance(student, teacher, reduction="mean"):
    s, t = student.flatten(1), teacher.flatten(1)
    with torch.no_grad():
        t_d = _normalized_pdist(t)
    return _reduce_relation(F.smooth_l1_loss(_normalized_pdist(s), t_d, reduction="none"), reduction)


def rkd_angle(student, teacher, reduction="mean"):
    s, t = student.flatten(1), teacher.flatten(1)
    with torch.no_grad():
        t_a = _angles(t)
    return _reduce_relation(F.smooth_l1_loss(_angles(s), t_a, reduction="none"), reduction)


def rkd(student, teacher, distance_weight=1.0, angle_weight=2.0, reduction="mean"):
    loss = 0.0
    if distance_weight != 0:
        loss = loss + distance_weight * rkd_distance(student, teacher, reduction)
    if angle_weight != 0:
        loss = loss + angle_weight * rkd_angle(student, teacher, reduction)
    return loss


def similarity_preserving(student, teacher, reduction="mean"):
    s, t = student.flatten(1), teacher.flatten(1)
    g_s = F.normalize(s @ s.t(), p=2, dim=1)
    with torch.no_grad():
        g_t = F.normalize(t @ t.t(), p=2, dim=1)
    return _reduce_relation((g_t - g_s).pow(2), reduction)


def _fsp_matrix(first, second):
    a = first.flatten(2)
    return torch.matmul(a, second.flatten(2).transpose(1, 2)) / a.shape[2]


def fsp(student_first, student_second, teacher_first, teacher_second, reduction="mean"):
    if teacher_first.requires_grad or teacher_second.requires_grad:
        g_t = _fsp_matrix(teacher_first, teacher_second)
    else:
        with torch.no_grad():
            g_t = _fsp_matrix(teacher_first, teacher_second)
    g_s = _fsp_matrix(student_first, student_second)
    if reduction == "mean":
        return F.mse_loss(g_s, g_t)
    return _reduce_relation((g_s - g_t).pow(2), reduction)
