"""Softmax-KL against a top-k sparse teacher (functional.softmax_kl_div_topk, issue 11 §2).

The reference (kdkernels/reference/response_topk.py) is checked against a float64 composition that
builds the dense teacher the sparse inputs stand for; the fused backends against the reference,
in float64, with gradients, over tails, K (1 .. V), unsorted indices, temperatures, reductions,
labels and masked student entries.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kdkernels
from helpers import backend_params
from kdkernels import functional, ops, reference

BACKENDS = backend_params("softmax_kl_div_topk")
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def _inputs(device, rows, vocab, k, dtype, seed, shuffle=True, mask_student=False):
    gen = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    z = 3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    lq, idx = kdkernels.topk_teacher(z, k, 1.7)
    if shuffle:  # any order
        perm = torch.argsort(torch.rand(rows, k, generator=gen), dim=-1)
        lq, idx = lq.gather(-1, perm), idx.gather(-1, perm)
    if mask_student and vocab > k:  # -inf student logits outside the teacher's top-k
        outside = torch.ones(rows, vocab, dtype=torch.bool).scatter(-1, idx, False)
        s = s.masked_fill(outside & (torch.rand(rows, vocab, generator=gen) < 0.3), -math.inf)
    return (s.to(device=device, dtype=dtype).requires_grad_(True), lq.to(device=device, dtype=dtype),
            idx.to(device))


def _dense_composition(s, lq, idx, temperature, tail):
    """Per-row loss from first principles in float64: the sparse teacher spread over V."""
    log_p = torch.log_softmax(s.double() / temperature, -1)
    q = torch.zeros_like(log_p).scatter(-1, idx, lq.double().exp())
    in_k = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, idx, True)
    if tail == "renormalize":
        q = q / q.sum(-1, keepdim=True)
        return torch.where(q > 0, q * (q.log() - log_p), torch.zeros_like(q)).sum(-1)
    head = torch.where(q > 0, q * (q.log() - log_p), torch.zeros_like(q)).sum(-1)
    q_r = (1 - q.sum(-1)).clamp_min(0)
    p_r = torch.where(in_k, torch.zeros_like(log_p), log_p.exp()).sum(-1)
    bucket = torch.where((q_r > 0) & (~in_k.all(-1)), q_r * (q_r.log() - p_r.log()), torch.zeros_like(q_r))
    return head + bucket


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("k", [1, 4, 30])
def test_reference_matches_the_dense_composition(tail, k):
    s, lq, idx = _inputs("cpu", 4, 30, k, torch.float64, k)
    rows = reference.softmax_kl_div_topk(s, lq, idx, temperature=1.7, tail=tail, reduction="none", t2_scale=False)
    torch.testing.assert_close(rows, _dense_composition(s, lq, idx, 1.7, tail), rtol=1e-12, atol=1e-12)


def test_renormalize_with_k_equal_v_is_the_dense_loss():
    s, lq, idx = _inputs("cpu", 3, 20, 20, torch.float64, 1)
    z_t = torch.zeros(3, 20, dtype=torch.float64).scatter(-1, idx, lq)  # log-probs at T: logits up to a constant
    dense = functional.softmax_kl_div(s, z_t * 1.7, temperature=1.7, backend="torch")
    topk = functional.softmax_kl_div_topk(s, lq, idx, temperature=1.7, backend="torch")
    torch.testing.assert_close(topk, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", BACKENDS)
@settings(deadline=None, max_examples=30)
@given(rows=st.integers(1, 4), vocab=st.sampled_from([1, 5, 33, 300]), k_frac=st.sampled_from([0.0, 0.3, 1.0]),
       tail=st.sampled_from(["renormalize", "bucket"]), temperature=st.sampled_from([1.0, 2.5]),
       reduction=st.sampled_from(REDUCTIONS), t2_scale=st.booleans(), ignore_first=st.booleans(),
       mask_student=st.booleans(), upstream=st.sampled_from(["one", "random"]), seed=st.integers(0, 99))
@example(rows=2, vocab=33, k_frac=0.0, tail="bucket", temperature=1.0, reduction="batchmean", t2_scale=True,
         ignore_first=False, mask_student=False, upstream="one", seed=0)  # K = 1
@example(rows=3, vocab=33, k_frac=1.0, tail="bucket", temperature=2.5, reduction="none", t2_scale=False,
         ignore_first=True, mask_student=False, upstream="random", seed=1)  # K = V: the bucket is empty
@example(rows=3, vocab=300, k_frac=0.3, tail="renormalize", temperature=1.0, reduction="mean", t2_scale=True,
         ignore_first=False, mask_student=True, upstream="random", seed=2)  # -inf student entries
@example(rows=3, vocab=5, k_frac=0.3, tail="bucket", temperature=1.0, reduction="batchmean", t2_scale=False,
         ignore_first=False, mask_student=True, upstream="one", seed=34)  # a row's tail all -inf: loss inf, NaN row
def test_fused_matches_reference(device, backend, rows, vocab, k_frac, tail, temperature, reduction, t2_scale,
                                 ignore_first, mask_student, upstream, seed):
    k = max(1, round(k_frac * vocab))
    s, lq, idx = _inputs(device, rows, vocab, k, torch.float64, seed, mask_student=mask_student)
    labels = None
    if ignore_first:
        labels = torch.arange(rows, device=device)
        labels[0] = -100
    kw = dict(temperature=temperature, tail=tail, reduction=reduction, labels=labels, t2_scale=t2_scale)
    out = functional.softmax_kl_div_topk(s, lq, idx, backend=backend, **kw)
    s_ref = s.detach().clone().requires_grad_(True)
    ref = functional.softmax_kl_div_topk(s_ref, lq, idx, backend="torch", **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.ones_like(ref) if upstream == "one" else torch.rand(ref.shape, dtype=ref.dtype, device=device) + 0.5
    (grad,) = torch.autograd.grad(out, s, g)
    (grad_ref,) = torch.autograd.grad(ref, s_ref, g)
    # a bucket row whose student has no mass outside the top-k has loss +inf and a NaN gradient: in
    # every backend at the same places
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_float32(device, backend, tail):
    s, lq, idx = _inputs(device, 4, 500, 16, torch.float32, 3)
    out = functional.softmax_kl_div_topk(s, lq, idx, temperature=2.0, tail=tail, backend=backend)
    s64 = s.detach().double().requires_grad_(True)
    ref = functional.softmax_kl_div_topk(s64, lq.double(), idx, temperature=2.0, tail=tail, backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out, s)
    (grad_ref,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck_and_no_grad(device, backend):
    s, lq, idx = _inputs(device, 3, 12, 4, torch.float64, 4)
    for tail in ("renormalize", "bucket"):
        assert torch.autograd.gradcheck(
            lambda x: functional.softmax_kl_div_topk(x, lq, idx, temperature=1.3, tail=tail, reduction="none",
                                                     backend=backend), (s,))
    with torch.no_grad():
        loss = functional.softmax_kl_div_topk(s, lq, idx, backend=backend)
    assert not loss.requires_grad


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_inputs_are_never_written_and_only_the_gradient_is_saved(device, backend):
    s, lq, idx = _inputs(device, 3, 40, 5, torch.float32, 5)
    before = (s.detach().clone(), lq.clone(), idx.clone())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = functional.softmax_kl_div_topk(s, lq, idx, tail="bucket", backend=backend)
    assert [tuple(x.shape) for x in saved] == [(3, 40)]
    (0.5 * loss).backward()
    for x, x0 in zip((s.detach(), lq, idx), before):
        assert torch.equal(x, x0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("student_grad", [False, True])
def test_opcheck(device, backend, per_row, student_grad):
    s, lq, idx = _inputs(device, 4, 30, 6, torch.float32, 6)
    labels = torch.tensor([0, -100, 2, 3], device=device)
    args = (s.detach(), lq, idx, labels, torch.tensor(0.25, device=device), 1.5, 1, -100, True, per_row, student_grad)
    torch.library.opcheck(ops.SOFTMAX_KL_TOPK.forward_ops[backend], args)
    loss, grad = ops.SOFTMAX_KL_TOPK.forward(backend, *args)
    if student_grad:
        torch.library.opcheck(ops.SOFTMAX_KL_TOPK.backward_ops[backend], (torch.rand_like(loss) + 0.5, grad))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compiles_fullgraph(device, backend):
    torch._dynamo.reset()
    s, lq, idx = _inputs(device, 3, 40, 5, torch.float32, 7)
    loss_fn = kdkernels.TopKSoftmaxKLDivLoss(temperature=2.0, tail="bucket", backend=backend)
    eager = loss_fn(s, lq, idx)
    (g_eager,) = torch.autograd.grad(eager, s)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(s, lq, idx)
    (g,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(g, g_eager)


def test_topk_teacher_gives_the_log_softmax_at_the_top_k():
    z = 4 * torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(8))
    lq, idx = kdkernels.topk_teacher(z, 7, 2.5)
    assert lq.shape == idx.shape == (2, 3, 7) and idx.dtype == torch.int64 and lq.dtype == z.dtype
    torch.testing.assert_close(lq, torch.log_softmax(z / 2.5, -1).gather(-1, idx))
    assert torch.equal(idx, torch.topk(z, 7, -1).indices)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(indices=lambda i: i + 1000), ValueError, "teacher_topk_indices must lie in"),
    (dict(indices=lambda i: i.int()), TypeError, "teacher_topk_indices must be int64"),
    (dict(indices=lambda i: i[:, :2]), ValueError, "teacher_topk_indices must have the shape"),
    (dict(logprobs=lambda q: q[:2]), ValueError, "teacher_topk_logprobs must have the leading shape"),
    (dict(tail="drop"), ValueError, "tail"),
    (dict(temperature=0.0), ValueError, "temperature"),
])
def test_errors_name_the_argument(bad, exc, match):
    s, lq, idx = _inputs("cpu", 3, 20, 4, torch.float32, 9)
    idx = bad.get("indices", lambda i: i)(idx)
    lq = bad.get("logprobs", lambda q: q)(lq)
    with pytest.raises(exc, match=match):
        functional.softmax_kl_div_topk(s, lq, idx, tail=bad.get("tail", "renormalize"),
                                       temperature=bad.get("temperature", 1.0), backend="cpu")


def test_op_checks_indices_itself():
    s, lq, idx = _inputs("cpu", 2, 10, 3, torch.float32, 10)
    with pytest.raises(ValueError, match="indices must lie in"):
        ops.SOFTMAX_KL_TOPK.forward("cpu", s.detach(), lq, idx - 20, None, torch.tensor(1.0), 1.0, 0, -100, True,
                                    False, False)
