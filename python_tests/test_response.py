"""Fused temperature softmax-KL against the reference, on every available backend (docs/design.md §2.1)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import LOSS_TOLERANCES, assert_close, backend_params
from kdkernels import functional, reference
from kdkernels.bench.inputs import Float64Source, softmax_kl_inputs

BACKENDS = backend_params("softmax_kl_div")

# Sizes around the kernels' block sizes (powers of two) and odd sizes.
EDGE_VOCABS = [1, 2, 3, 7, 31, 32, 33, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097]


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple = (3,)
    vocab: int = 17
    dtype: torch.dtype = torch.float32
    temperature: float = 1.0
    divergence: str = "forward"
    beta: float = 0.5
    reduction: str = "batchmean"
    labels: str = "none"      # "none" | "some" (some rows ignored) | "all" (every row ignored)
    teacher_grad: bool = False
    scale: float = 3.0        # logit spread (std of the random logits)
    offset: float = 0.0       # added to every student and teacher logit: large-magnitude, non-one-hot rows
    mask: str = "none"        # "none" | "shared" (-inf in both) | "one-sided" (-inf where it stays finite)
    t2_scale: bool = True
    seed: int = 0


def make_inputs(case: Case, device):
    return softmax_kl_inputs(Float64Source(case.seed, case.dtype, device), case.lead + (case.vocab,),
                             scale=case.scale, offset=case.offset, mask=case.mask, divergence=case.divergence,
                             labels=case.labels, teacher_requires_grad=case.teacher_grad)


def loss_kwargs(case: Case) -> dict:
    return dict(temperature=case.temperature, divergence=case.divergence, beta=case.beta, reduction=case.reduction,
                t2_scale=case.t2_scale)


def check_against_reference(case: Case, device, backend: str):
    s, t, labels = make_inputs(case, device)
    out = functional.softmax_kl_div(s, t, labels=labels, backend=backend, **loss_kwargs(case))
    # the spec, evaluated in float64 on exactly the same (rounded) inputs
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(case.teacher_grad)
    ref = reference.softmax_kl_div(s64, t64, labels=labels, **loss_kwargs(case))

    expected_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype
    assert out.shape == ref.shape
    # the same spec in the kernels' op-math precision (float32), as a floor for the tolerances
    s32 = s.detach().cpu().requires_grad_(True)
    t32 = t.detach().cpu().requires_grad_(case.teacher_grad)
    eager = reference.softmax_kl_div(s32, t32, labels=None if labels is None else labels.cpu(), **loss_kwargs(case))
    assert_close(out, ref, case.dtype, LOSS_TOLERANCES, what="loss", eager_same_precision=eager)

    gen = torch.Generator().manual_seed(case.seed + 1)
    upstream = (torch.rand(ref.shape, generator=gen, dtype=torch.float64) + 0.5).to(device)
    grads = torch.autograd.grad(out, [s, t] if case.teacher_grad else [s], upstream.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, [s64, t64] if case.teacher_grad else [s64], upstream)
    eager_grads = torch.autograd.grad(eager, [s32, t32] if case.teacher_grad else [s32], upstream.cpu().to(eager.dtype))
    for g, rg, eg, name in zip(grads, ref_grads, eager_grads, ("grad_student", "grad_teacher")):
        assert g.dtype == case.dtype and g.shape == rg.shape
        assert_close(g, rg, case.dtype, what=name, eager_same_precision=eg)


def cases(backend: str):
    # The Triton interpreter mis-handles bf16 arithmetic and runs one program at a time: fp16/bf16
    # Triton runs are left to the GPU suite, and its grids are kept small.
    interpreted = backend == "triton" and not torch.cuda.is_available()
    dtypes = [torch.float32, torch.float64] if interpreted else [torch.float32, torch.float64, torch.float16,
                                                                  torch.bfloat16]
    max_rows = 8 if interpreted else 64
    lead = st.one_of(
        st.tuples(st.integers(1, max_rows)),
        st.tuples(st.integers(1, 4), st.integers(1, max_rows // 4 or 1)),
    )
    return st.builds(
        Case,
        lead=lead,
        vocab=st.one_of(st.sampled_from(EDGE_VOCABS), st.integers(1, 3000)),
        dtype=st.sampled_from(dtypes),
        temperature=st.sampled_from([0.5, 1.0, 2.0, 4.7]),
        divergence=st.sampled_from(["forward", "reverse", "jsd"]),
        beta=st.sampled_from([0.1, 0.5, 0.9]),
        reduction=st.sampled_from(["batchmean", "sum", "mean", "none"]),
        labels=st.sampled_from(["none", "some", "all"]),
        teacher_grad=st.booleans(),
        scale=st.sampled_from([0.1, 1.0, 3.0, 30.0]),
        offset=st.sampled_from([0.0, 1e3, 1e4]),
        mask=st.sampled_from(["none", "shared", "one-sided"]),
        t2_scale=st.booleans(),
        seed=st.integers(0, 2**16),
    )


EDGE_CASES = [
    Case(labels="all", reduction="batchmean"),                           # every row ignored
    Case(labels="all", reduction="mean", divergence="jsd", teacher_grad=True),
    Case(vocab=1, divergence="forward"),                                  # V = 1: loss 0, grads 0
    Case(vocab=1, divergence="jsd", teacher_grad=True),
    Case(scale=1e4, divergence="forward", teacher_grad=True),             # +-1e4 logits
    Case(scale=1e4, divergence="reverse", teacher_grad=True, vocab=300),
    Case(scale=1e4, divergence="jsd", beta=0.1, teacher_grad=True, vocab=300),
    # logits of magnitude 1e4..1e5 with a spread distribution (not one-hot): the centred stats
    Case(offset=1e4, divergence="forward", teacher_grad=True, vocab=300),
    Case(offset=-1e4, divergence="reverse", teacher_grad=True, vocab=300, temperature=2.0),
    Case(offset=1e4, divergence="jsd", beta=0.3, teacher_grad=True, vocab=300),
    Case(offset=1e5, divergence="forward", teacher_grad=True, vocab=300, temperature=0.5),
    Case(offset=1e5, divergence="reverse", teacher_grad=True, vocab=300),
    Case(offset=1e5, divergence="jsd", teacher_grad=True, vocab=300, temperature=2.0),
    Case(offset=1e4, divergence="jsd", teacher_grad=True, vocab=4097, lead=(2,)),  # several chunks
    Case(mask="shared", divergence="jsd", vocab=2049, teacher_grad=True),  # -inf masked vocabulary
    Case(mask="one-sided", divergence="forward", vocab=129, teacher_grad=True),
    Case(mask="one-sided", divergence="reverse", vocab=129, teacher_grad=True),
    Case(lead=(2, 3), vocab=4097, reduction="none", labels="some", temperature=2.0),  # 3-D input
]


def _with_examples(test):
    for c in EDGE_CASES:
        test = example(case=c)(test)
    return test


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_matches_reference(device, backend):
    @given(case=cases(backend))
    @_with_examples
    def run(case):
        check_against_reference(case, device, backend)

    run()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_in_input_propagates(device, backend):
    s = torch.randn(3, 40, device=device)
    t = torch.randn(3, 40, device=device)
    t[1, 7] = float("nan")
    rows = functional.softmax_kl_div(s, t, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_inputs_are_not_modified(device, backend):
    s = torch.randn(5, 100, device=device, requires_grad=True)
    t = torch.randn(5, 100, device=device, requires_grad=True)
    labels = torch.tensor([1, -100, 2, 3, -100], device=device)
    before = (s.detach().clone(), t.detach().clone(), labels.clone())
    functional.softmax_kl_div(s, t, temperature=2.0, divergence="jsd", labels=labels, backend=backend).backward()
    for a, b in zip((s.detach(), t.detach(), labels), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_no_teacher_grad_when_not_required(device, backend):
    s = torch.randn(4, 33, device=device, requires_grad=True)
    t = torch.randn(4, 33, device=device)
    functional.softmax_kl_div(s, t, backend=backend).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_noncontiguous_inputs(device, backend):
    base_s = torch.randn(6, 50, device=device)
    base_t = torch.randn(50, 6, device=device)
    s = base_s[::2].requires_grad_(False).clone()[:, ::2].requires_grad_(True)  # strided
    t = base_t.t()[::2, ::2]
    out = functional.softmax_kl_div(s, t, temperature=1.5, backend=backend)
    ref = reference.softmax_kl_div(s.detach().double(), t.double(), temperature=1.5)
    assert_close(out, ref, torch.float32, LOSS_TOLERANCES, what="loss")
