"""The one-pass softmax-KL step (ops.SOFTMAX_KL_STEP, docs/decisions.md "One-pass step").

When a gradient is needed, ``softmax_kl_div`` computes the loss and its gradients in the forward
and the backward only scales them. These tests pin what that path promises beyond the reference
equivalence of test_response.py (which runs through it): the same numbers as the two-pass ops,
which path runs when, what is saved, in-place scaling that leaves factor-1 rows alone, and the
errors for what it cannot do (a second backward through the same loss, double backward).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import backend_params
from kdkernels import functional, ops
from kdkernels import reduction as red
from kdkernels.ops.response import DIVERGENCE_CODES

BACKENDS = backend_params("softmax_kl_div")
REDUCTIONS = list(red.ROWS.names)


def _inputs(device, rows, vocab, dtype, seed, teacher_grad=False, ignored=()):
    gen = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    t = (3 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    labels = None
    if ignored:
        labels = torch.arange(rows, device=device)
        labels[list(ignored)] = -100
    return s.requires_grad_(True), t.requires_grad_(teacher_grad), labels


def _two_pass(backend, s, t, labels, temperature, divergence, beta, reduction, t2_scale):
    """Today's two-pass formula: the loss-only forward op (its autograd recomputes p, q from the
    logits) reduced in Python, as softmax_kl_div did before the one-pass step."""
    rows, _stats = ops.SOFTMAX_KL.forward(backend, s, t, labels, temperature, DIVERGENCE_CODES[divergence], beta,
                                          -100, t2_scale)
    return red.reduce_rows(rows, reduction, (s.shape[0],), s.shape[1], labels, -100)


def _upstream(kind, loss, seed):
    if kind == "one":
        return torch.ones_like(loss)
    if kind == "scalar":
        return torch.full_like(loss, -2.5)
    gen = torch.Generator().manual_seed(seed)  # per row for "none": some rows exactly 1, some not
    g = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss) + 0.5
    if g.dim() == 1:
        g[::2] = 1.0
    return g


@pytest.mark.parametrize("device,backend", BACKENDS)
@settings(deadline=None, max_examples=25)
@given(rows=st.integers(1, 5), vocab=st.sampled_from([1, 3, 33, 257, 1030]),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       divergence=st.sampled_from(["forward", "reverse", "jsd"]), temperature=st.sampled_from([1.0, 2.5]),
       reduction=st.sampled_from(REDUCTIONS), t2_scale=st.booleans(), teacher_grad=st.booleans(),
       ignore_first=st.booleans(), upstream=st.sampled_from(["one", "scalar", "random"]), seed=st.integers(0, 99))
@example(rows=3, vocab=33, dtype=torch.float32, divergence="forward", temperature=2.5, reduction="batchmean",
         t2_scale=True, teacher_grad=False, ignore_first=True, upstream="one", seed=0)
@example(rows=4, vocab=257, dtype=torch.float64, divergence="jsd", temperature=1.0, reduction="none",
         t2_scale=False, teacher_grad=True, ignore_first=False, upstream="random", seed=1)
def test_step_gives_the_two_pass_numbers(device, backend, rows, vocab, dtype, divergence, temperature, reduction,
                                         t2_scale, teacher_grad, ignore_first, upstream, seed):
    s, t, labels = _inputs(device, rows, vocab, dtype, seed, teacher_grad, ignored=(0,) if ignore_first else ())
    kw = dict(temperature=temperature, divergence=divergence, beta=0.3, reduction=reduction, t2_scale=t2_scale)
    step = functional.softmax_kl_div(s, t, labels=labels, backend=backend, **kw)
    s2, t2 = s.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(teacher_grad)
    two = _two_pass(backend, s2, t2, labels, temperature, divergence, 0.3, reduction, t2_scale)
    assert step.shape == two.shape and step.dtype == two.dtype
    torch.testing.assert_close(step, two, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
    g = _upstream(upstream, step, seed)
    inputs, inputs2 = ([s, t], [s2, t2]) if teacher_grad else ([s], [s2])
    grads = torch.autograd.grad(step, inputs, g)
    grads2 = torch.autograd.grad(two, inputs2, g)
    for a, b in zip(grads, grads2):
        # the same math up to rounding (the Hinton fast path forms p as exp(b - m) / sum, the
        # two-pass backward as exp(b - m - log sum)): a few ulp of the row's largest gradient
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(a, b, rtol=8 * eps, atol=8 * eps * float(b.abs().max()))


class _OpLog(TorchDispatchMode):
    """Names of the kdkernels ops (and every other op) that run inside the mode."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _kd_ops(names):
    return [n.split("::")[1] for n in names if n.startswith("kdkernels::")]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_no_grad_runs_the_loss_only_pass(device, backend):
    s, t, _ = _inputs(device, 3, 40, torch.float32, 0)
    suffix = "_triton" if backend == "triton" else ""
    with torch.no_grad(), _OpLog() as log:
        functional.softmax_kl_div(s, t, backend=backend)
    assert _kd_ops(log.names) == [f"softmax_kl_forward{suffix}"]
    with _OpLog() as log:  # no input requires grad
        functional.softmax_kl_div(s.detach(), t, backend=backend)
    assert _kd_ops(log.names) == [f"softmax_kl_forward{suffix}"]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_only_scales_the_saved_gradient(device, backend, reduction):
    s, t, _ = _inputs(device, 3, 40, torch.float32, 1)
    suffix = "_triton" if backend == "triton" else ""
    with _OpLog() as log:
        loss = functional.softmax_kl_div(s, t, reduction=reduction, backend=backend)
    assert _kd_ops(log.names) == [f"softmax_kl_step_forward{suffix}"]
    with _OpLog() as log:
        loss.sum().backward()
    # one in-place op: no recomputation from the logits, no product in the autograd formula
    assert _kd_ops(log.names) == [f"softmax_kl_step_backward{suffix}"]
    assert not [n for n in log.names if n.startswith("aten::mul")]
    # nor zero-filled upstream gradients for the gradient outputs (one of the logits' size each)
    assert not [n for n in log.names if n.startswith(("aten::zeros", "aten::zero_", "aten::fill_"))]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_only_the_gradients_are_saved(device, backend):
    s, t, _ = _inputs(device, 4, 50, torch.float32, 2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        functional.softmax_kl_div(s, t, backend=backend)
    kd_saved = [x for x in saved if x.numel() >= s.numel() or x.numel() == 0]
    assert [tuple(x.shape) for x in kd_saved] == [(4, 50), (0,)]  # grad_student, no grad_teacher
    assert all(x.data_ptr() not in (s.data_ptr(), t.data_ptr()) for x in kd_saved if x.numel())


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_inputs_are_never_written(device, backend):
    s, t, labels = _inputs(device, 4, 50, torch.float32, 3, teacher_grad=True, ignored=(2,))
    before = (s.detach().clone(), t.detach().clone(), labels.clone())
    loss = functional.softmax_kl_div(s, t, labels=labels, divergence="jsd", backend=backend)
    (0.7 * loss).backward()
    for x, x0 in zip((s, t, labels), before):
        assert torch.equal(x.detach(), x0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_op_scales_rows_in_place_except_factor_one(device, backend):
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(4, 9, generator=gen).to(device)
    expected = grad.clone()
    factor = torch.tensor([1.0, -2.0, 1.0, 0.0], device=device)
    expected[1] *= -2.0
    expected[3] = 0.0
    ops.SOFTMAX_KL_STEP.backward_ops[backend](factor, grad, grad.new_empty((0,)))
    assert torch.equal(grad, expected)
    ops.SOFTMAX_KL_STEP.backward_ops[backend](torch.tensor(0.5, device=device), grad.new_empty((0,)), grad)
    assert torch.equal(grad, expected * 0.5)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_backward_twice_through_a_retained_graph(device, backend, reduction):
    # retain_graph=True (and gradcheck) use the graph again: the saved gradients must survive the first backward
    s, t, _ = _inputs(device, 3, 10, torch.float32, 5, teacher_grad=True)
    loss = functional.softmax_kl_div(s, t, reduction=reduction, backend=backend)
    first = torch.autograd.grad(loss, [s, t], torch.full_like(loss, 3.0), retain_graph=True)
    second = torch.autograd.grad(loss, [s, t], torch.full_like(loss, -0.5))
    for a, b in zip(first, second):
        torch.testing.assert_close(b, a * (-0.5 / 3.0), rtol=1e-6, atol=1e-9)
    fresh = torch.autograd.grad(functional.softmax_kl_div(s, t, reduction=reduction, backend=backend), [s, t],
                                torch.full_like(loss, -0.5))
    for a, b in zip(second, fresh):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_double_backward_raises(device, backend):
    s, t, _ = _inputs(device, 2, 10, torch.float64, 6)
    loss = functional.softmax_kl_div(s, t, backend=backend)
    with pytest.raises(NotImplementedError, match="double backward"):  # at create_graph=True already
        (g,) = torch.autograd.grad(loss, s, create_graph=True)
        g.sum().backward()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_and_fully_ignored_batches_give_zero(device, backend, reduction):
    for rows, ignored in ((0, ()), (3, (0, 1, 2))):
        s, t, labels = _inputs(device, rows, 7, torch.float32, 7, teacher_grad=True, ignored=ignored)
        loss = functional.softmax_kl_div(s, t, labels=labels, reduction=reduction, backend=backend)
        assert torch.equal(loss, torch.zeros_like(loss))
        loss.sum().backward()
        assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))


def _step_args(device, per_row, student_grad, teacher_grad):
    s, t, labels = _inputs(device, 5, 37, torch.float32, 8, ignored=(1,))
    weight = torch.tensor(0.25, device=device)
    return (s.detach(), t.detach(), labels, weight, 1.5, 2, 0.4, -100, True, per_row, student_grad, teacher_grad)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)])
def test_opcheck(device, backend, per_row, grads):
    args = _step_args(device, per_row, *grads)
    torch.library.opcheck(ops.SOFTMAX_KL_STEP.forward_ops[backend], args)
    # with inputs that require grad: the autograd registration too. (opcheck's aot_dispatch checks
    # return every output of the op, here the gradients the autograd formula also saves and scales
    # in place, which AOTAutograd's partitioner rejects; the functional, which drops them, compiles:
    # test_compile.py.)
    s, t = args[0].clone().requires_grad_(grads[0]), args[1].clone().requires_grad_(grads[1])
    torch.library.opcheck(ops.SOFTMAX_KL_STEP.forward_ops[backend], (s, t) + args[2:],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    loss, grad_s, grad_t = ops.SOFTMAX_KL_STEP.forward(backend, *args)
    upstream = torch.rand_like(loss) + 0.5
    torch.library.opcheck(ops.SOFTMAX_KL_STEP.backward_ops[backend], (upstream, grad_s, grad_t))
