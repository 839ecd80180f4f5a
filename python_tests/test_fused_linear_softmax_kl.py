"""Fused linear + softmax-KL (functional.fused_linear_softmax_kl_div, issue 12).

The reference (kdkernels/reference/response_linear.py) is checked against a float64 composition
written from first principles; every fused backend against the reference over shapes, chunk sizes
(1, odd, > rows, auto), bias, teacher logits vs teacher hidden + head (other hidden size),
divergences, reductions, labels with ignored rows and upstream gradients; bf16 against an fp32
composition; gradcheck, opcheck, compile, saved state, and the error contract.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kdkernels
from helpers import backend_params
from kdkernels import functional, ops

BACKENDS = backend_params("fused_linear_softmax_kl_div")
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
DIVERGENCES = ["forward", "reverse", "jsd"]


def _make(device, rows, hidden, vocab, dtype, seed, bias=True, teacher="logits", teacher_hidden=None):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)

    h = rnd(rows, hidden).requires_grad_(True)
    w = rnd(vocab, hidden, scale=hidden ** -0.5 * 2).requires_grad_(True)
    b = rnd(vocab).requires_grad_(True) if bias else None
    if teacher == "logits":
        t = dict(teacher_logits=rnd(rows, vocab, scale=2.0))
    else:
        ht = teacher_hidden or hidden + 3
        t = dict(teacher_hidden=rnd(rows, ht), teacher_weight=rnd(vocab, ht, scale=ht ** -0.5 * 2),
                 teacher_bias=rnd(vocab) if teacher == "hidden+bias" else None)
    return h, w, b, t


def _grads(loss, params, upstream):
    present = [p for p in params if p is not None]
    grads = iter(torch.autograd.grad(loss, present, upstream))
    return [next(grads) if p is not None else None for p in params]


def test_reference_is_linear_then_kl_from_first_principles():
    h, w, b, t = _make("cpu", 6, 5, 11, torch.float64, 0, teacher="hidden+bias")
    ref = kdkernels.reference.fused_linear_softmax_kl_div(h, w, b, **t, temperature=1.7, reduction="batchmean")
    z_s = h @ w.T + b
    z_t = t["teacher_hidden"] @ t["teacher_weight"].T + t["teacher_bias"]
    log_p, log_q = torch.log_softmax(z_s / 1.7, -1), torch.log_softmax(z_t / 1.7, -1)
    expected = (log_q.exp() * (log_q - log_p)).sum() / 6 * 1.7 ** 2
    torch.testing.assert_close(ref, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", BACKENDS)
@settings(deadline=None, max_examples=30)
@given(rows=st.integers(1, 40), hidden=st.integers(1, 20), vocab=st.sampled_from([1, 7, 33, 130]),
       chunk=st.sampled_from([1, 3, 8, 64, None]), bias=st.booleans(),
       teacher=st.sampled_from(["logits", "hidden", "hidden+bias"]), divergence=st.sampled_from(DIVERGENCES),
       reduction=st.sampled_from(REDUCTIONS), temperature=st.sampled_from([1.0, 2.5]), t2_scale=st.booleans(),
       ignore=st.sampled_from(["none", "some", "all"]), upstream=st.sampled_from(["one", "random"]),
       seed=st.integers(0, 99))
@example(rows=5, hidden=4, vocab=7, chunk=1, bias=True, teacher="hidden+bias", divergence="forward",
         reduction="batchmean", temperature=2.5, t2_scale=True, ignore="some", upstream="one", seed=0)  # chunk 1
@example(rows=5, hidden=4, vocab=33, chunk=64, bias=False, teacher="logits", divergence="jsd", reduction="none",
         temperature=1.0, t2_scale=False, ignore="none", upstream="random", seed=1)  # chunk > rows, "none"
@example(rows=9, hidden=3, vocab=7, chunk=3, bias=True, teacher="logits", divergence="reverse", reduction="mean",
         temperature=1.0, t2_scale=True, ignore="all", upstream="random", seed=2)  # every row ignored
def test_fused_matches_reference(device, backend, rows, hidden, vocab, chunk, bias, teacher, divergence, reduction,
                                 temperature, t2_scale, ignore, upstream, seed):
    h, w, b, t = _make(device, rows, hidden, vocab, torch.float64, seed, bias=bias, teacher=teacher)
    labels = None
    if ignore != "none":
        labels = torch.arange(rows, device=device) % vocab
        labels[::2 if ignore == "some" else 1] = -100
    kw = dict(**t, temperature=temperature, divergence=divergence, reduction=reduction, labels=labels,
              t2_scale=t2_scale)
    out = functional.fused_linear_softmax_kl_div(h, w, b, chunk_size=chunk, backend=backend, **kw)
    ref = functional.fused_linear_softmax_kl_div(h, w, b, backend="torch", **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.ones_like(ref) if upstream == "one" else torch.rand(ref.shape, dtype=ref.dtype, device=device) + 0.5
    for got, want, name in zip(_grads(out, (h, w, b), g), _grads(ref, (h, w, b), g), ("hidden", "weight", "bias")):
        if want is None:
            assert got is None
            continue
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_bfloat16_against_a_float32_composition(device, backend, reduction):
    """bf16 inputs: logits are rounded to bf16 by the GEMM (as F.linear in bf16 does), the loss is
    accumulated in fp32, the weight gradient in fp32 over the chunks. Tolerances are bf16's."""
    h, w, b, t = _make(device, 64, 32, 300, torch.bfloat16, 3, teacher="hidden")
    out = functional.fused_linear_softmax_kl_div(h, w, b, **t, temperature=2.0, reduction=reduction, chunk_size=16,
                                                 backend=backend)
    h32, w32, b32 = (x.detach().float().requires_grad_(True) for x in (h, w, b))
    t32 = {k: None if x is None else x.float() for k, x in t.items()}
    ref = functional.fused_linear_softmax_kl_div(h32, w32, b32, **t32, temperature=2.0, reduction=reduction,
                                                 backend="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2 * max(1.0, ref.abs().max().item()))
    g = torch.ones_like(ref)
    for got, want in zip(_grads(out, (h, w, b), g), _grads(ref, (h32, w32, b32), g)):
        assert got.dtype == torch.bfloat16
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=3e-2 * scale)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_gradcheck(device, backend, reduction):
    h, w, b, t = _make(device, 5, 3, 6, torch.float64, 4, teacher="hidden+bias")
    labels = torch.tensor([1, -100, 2, 0, 5], device=device)
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: functional.fused_linear_softmax_kl_div(
            h_, w_, b_, **t, temperature=1.3, divergence="jsd", reduction=reduction, labels=labels, chunk_size=2,
            backend=backend), (h, w, b))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_only_the_gradients_are_saved_and_nothing_is_written(device, backend):
    h, w, b, t = _make(device, 12, 6, 40, torch.float32, 5)
    t["teacher_logits"].requires_grad_(True)
    before = [x.detach().clone() for x in (h, w, b, t["teacher_logits"])]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = functional.fused_linear_softmax_kl_div(h, w, b, **t, temperature=2.0, chunk_size=5, backend=backend)
    assert sorted(tuple(x.shape) for x in saved) == [(12, 6), (40,), (40, 6)]  # no (rows, V) tensor
    (0.5 * loss).backward()
    assert t["teacher_logits"].grad is None  # the teacher is a constant
    for x, x0 in zip((h, w, b, t["teacher_logits"]), before):
        assert torch.equal(x.detach(), x0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_frozen_head_and_repeated_backward(device, backend):
    h, w, b, t = _make(device, 7, 4, 20, torch.float64, 6, bias=False)
    w.requires_grad_(False)
    loss = functional.fused_linear_softmax_kl_div(h, w, **t, chunk_size=3, backend=backend)
    ref = functional.fused_linear_softmax_kl_div(h, w, **t, backend="torch")
    (g_ref,) = torch.autograd.grad(ref, h)
    (g1,) = torch.autograd.grad(3 * loss, h, retain_graph=True)  # kept graph: scales a copy
    (g2,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(g1, 3 * g_ref)
    torch.testing.assert_close(g2, g_ref)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["logits", "hidden+bias"])
def test_opcheck(device, backend, teacher):
    h, w, b, t = _make(device, 6, 4, 9, torch.float32, 7, teacher=teacher)
    labels = torch.tensor([0, -100, 2, 3, 1, 1], device=device)
    tensors = (h.detach(), w.detach(), b.detach(), t.get("teacher_logits"), t.get("teacher_hidden"),
               t.get("teacher_weight"), t.get("teacher_bias"), labels)
    options = (1.5, 0, 0.5, -100, True, 4)
    scale = torch.tensor(0.2, device=device)
    torch.library.opcheck(ops.FUSED_LINEAR_SOFTMAX_KL.forward_ops[backend], tensors + (scale,) + options +
                          (True, True, True))
    _loss, gh, gw, gb = ops.FUSED_LINEAR_SOFTMAX_KL.forward(backend, *tensors, scale, *options, True, True, True)
    torch.library.opcheck(ops.FUSED_LINEAR_SOFTMAX_KL.backward_ops[backend],
                          (torch.tensor(0.5, device=device), gh, gw, gb))
    torch.library.opcheck(ops.FUSED_LINEAR_SOFTMAX_KL_ROWS.forward_ops[backend], tensors + options)
    torch.library.opcheck(ops.FUSED_LINEAR_SOFTMAX_KL_ROWS.backward_ops[backend],
                          (torch.rand(6, device=device),) + tensors + options + (True, True, True))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_compiles_fullgraph(device, backend, reduction):
    torch._dynamo.reset()
    h, w, b, t = _make(device, 8, 5, 30, torch.float32, 8, teacher="hidden")
    loss_fn = kdkernels.FusedLinearSoftmaxKLDivLoss(temperature=2.0, reduction=reduction, chunk_size=3,
                                                    backend=backend)

    def step(h_, w_, b_):
        return loss_fn(h_, w_, b_, teacher_hidden=t["teacher_hidden"], teacher_weight=t["teacher_weight"]).sum()

    eager = step(h, w, b)
    g_eager = torch.autograd.grad(eager, (h, w, b))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(h, w, b)
    grads = torch.autograd.grad(loss, (h, w, b))
    torch.testing.assert_close(loss, eager)
    for g, ge in zip(grads, g_eager):
        torch.testing.assert_close(g, ge)


def test_module_matches_functional_and_a_model_head():
    torch.manual_seed(9)
    head = torch.nn.Linear(6, 25)
    h = torch.randn(2, 5, 6, requires_grad=True)
    z_t = torch.randn(2, 5, 25)
    loss = kdkernels.FusedLinearSoftmaxKLDivLoss(temperature=2.0)(h, head.weight, head.bias, teacher_logits=z_t)
    eager = kdkernels.functional.softmax_kl_div(head(h), z_t, temperature=2.0, backend="torch")
    torch.testing.assert_close(loss, eager)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(teacher_logits=torch.zeros(4, 9)), ValueError, "teacher_logits must be"),  # vocabulary mismatch
    (dict(weight=torch.zeros(10, 5)), ValueError, "student_weight must be"),  # wrong hidden size
    (dict(teacher_hidden=torch.zeros(4, 3), teacher_weight=torch.zeros(10, 3)), ValueError, "exactly once"),
    (dict(teacher_logits=None), ValueError, "exactly once"),
    (dict(teacher_logits=None, teacher_hidden=torch.zeros(4, 3)), ValueError, "needs teacher_weight"),
    (dict(teacher_logits=None, teacher_hidden=torch.zeros(4, 3), teacher_weight=torch.zeros(9, 3)), ValueError,
     "teacher_weight must be"),
    (dict(bias=torch.zeros(9)), ValueError, "student_bias must be"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
    (dict(hidden="x"), TypeError, "student_hidden"),
])
def test_errors_name_the_argument(bad, exc, match):
    args = dict(hidden=torch.zeros(4, 6), weight=torch.zeros(10, 6), bias=None, teacher_logits=torch.zeros(4, 10))
    args.update(bad)
    hidden, weight, bias = args.pop("hidden"), args.pop("weight"), args.pop("bias")
    with pytest.raises(exc, match=match):
        functional.fused_linear_softmax_kl_div(hidden, weight, bias, backend="cpu", **args)


def test_dense_eager_kd_matches():
    """The user's eager composition (Linear, then F.kl_div on log-softmaxes) gives the same number."""
    h, w, b, t = _make("cpu", 10, 8, 50, torch.float64, 11)
    ours = functional.fused_linear_softmax_kl_div(h, w, b, **t, temperature=3.0, chunk_size=4, backend="cpu")
    z = tF.linear(h, w, b)
    eager = tF.kl_div(torch.log_softmax(z / 3.0, -1), torch.log_softmax(t["teacher_logits"] / 3.0, -1),
                      reduction="batchmean", log_target=True) * 9.0
    torch.testing.assert_close(ours, eager, rtol=1e-10, atol=1e-12)
