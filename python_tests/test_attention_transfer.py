"""Attention transfer (issue 15 §1; ops.ATTENTION_TRANSFER, kdkernels.reference.attention_transfer).

The reference against a textbook float64 loop and the authors' composition; every fused backend
against the reference (hypothesis over shapes with 1-3 spatial dims, channels, p, squared,
reductions, dtypes, teacher gradients, all-zero maps); gradcheck and opcheck of the CPU op; the
one-pass contract (what is saved, in-place scaling, kept graphs); errors.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tnf
from hypothesis import example, given
from hypothesis import strategies as st

import kdkernels
from helpers import TOLERANCES, assert_close, assert_grad_close, backend_params
from kdkernels import functional, ops, reference
from kdkernels import reduction as red

BACKENDS = backend_params("attention_transfer")
REDUCTIONS = list(red.FEATURES.names)


def _maps(device, n, cs, ct, spatial, dtype, seed, zero_student=False, zero_teacher=False):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, cs, *spatial, generator=gen, dtype=torch.float64)
    t = torch.randn(n, ct, *spatial, generator=gen, dtype=torch.float64)
    if zero_student and n:
        s[0] = 0
    if zero_teacher and n:
        t[-1] = 0
    if n and s.numel():  # a few exact zeros inside a map (|x|' at 0 is 0)
        s.view(-1)[:: 7] = 0
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def _textbook(s, t, p, squared, reduction):
    """Per sample, loops over channels and positions (float64)."""
    rows = []
    n_pos = s[0, 0].numel() if s.shape[0] else 0
    for n in range(s.shape[0]):
        maps = []
        for f in (s[n], t[n]):
            f = f.reshape(f.shape[0], -1).double()
            a = sum(f[c].abs() ** p for c in range(f.shape[0])) / f.shape[0]
            maps.append(a / max(float(torch.sqrt((a * a).sum())), 1e-12))
        sq = float(((maps[0] - maps[1]) ** 2).sum())
        rows.append(sq if squared else sq ** 0.5)
    rows = torch.tensor(rows, dtype=torch.float64)
    if reduction == "none":
        return rows
    denom = {"mean": max(1, s.shape[0] * n_pos), "batchmean": max(1, s.shape[0]), "sum": 1}[reduction]
    return rows.sum() / denom


@pytest.mark.parametrize("p", [1.0, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_is_the_textbook_loss(p, squared, reduction):
    s, t = _maps("cpu", 3, 4, 5, (3, 5), torch.float64, seed=1, zero_teacher=True)
    torch.testing.assert_close(reference.attention_transfer(s, t, p, squared, reduction), _textbook(s, t, p, squared, reduction))


def test_reference_is_the_authors_composition():
    """Zagoruyko & Komodakis' code: at(x) = F.normalize(x.pow(2).mean(1).view(N, -1)); (at(s) - at(t)).pow(2).mean()."""
    s, t = _maps("cpu", 4, 8, 16, (6, 6), torch.float32, seed=2)

    def at(x):
        return tnf.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    torch.testing.assert_close(functional.attention_transfer(s, t, backend="torch"), (at(s) - at(t)).pow(2).mean())


@pytest.mark.parametrize("device,backend", BACKENDS)
@given(n=st.integers(0, 4), cs=st.integers(1, 5), ct=st.integers(1, 5),
       spatial=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
       p=st.sampled_from([1.0, 2.0, 3.0, 2.5]), squared=st.booleans(), reduction=st.sampled_from(REDUCTIONS),
       dtype=st.sampled_from([torch.float32, torch.float64]), teacher_grad=st.booleans(),
       zero_student=st.booleans(), zero_teacher=st.booleans(), seed=st.integers(0, 2**16))
@example(n=2, cs=1, ct=1, spatial=(1,), p=1.0, squared=False, reduction="none", dtype=torch.float64,
         teacher_grad=True, zero_student=True, zero_teacher=True, seed=0)  # both maps of sample 0/1 zero: d = 0
@example(n=3, cs=3, ct=2, spatial=(3, 1, 2), p=2.5, squared=True, reduction="mean", dtype=torch.float32,
         teacher_grad=True, zero_student=True, zero_teacher=False, seed=5)
@example(n=0, cs=2, ct=3, spatial=(4,), p=2.0, squared=True, reduction="mean", dtype=torch.float32,
         teacher_grad=False, zero_student=False, zero_teacher=False, seed=0)  # no samples: loss 0
def test_fused_matches_reference(device, backend, n, cs, ct, spatial, p, squared, reduction, dtype, teacher_grad,
                                 zero_student, zero_teacher, seed):
    s, t = _maps(device, n, cs, ct, spatial, dtype, seed, zero_student, zero_teacher)
    s_in, t_in = s.clone(), t.clone()
    s.requires_grad_(True)
    t.requires_grad_(teacher_grad)
    kw = dict(p=p, squared=squared, reduction=reduction)
    got = functional.attention_transfer(s, t, backend=backend, **kw)
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(teacher_grad)
    want = functional.attention_transfer(s64, t64, backend="torch", **kw)
    assert got.shape == want.shape and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, want, dtype, what="loss")
    up = torch.rand(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    wanted = [s64] + ([t64] if teacher_grad else [])
    grads = torch.autograd.grad(got, [s] + ([t] if teacher_grad else []), up.to(got.device, got.dtype))
    grads_ref = torch.autograd.grad(want, wanted, up)
    positions = math.prod(spatial)
    factor = red.per_sample_factor(reduction, n, positions) * 1.5  # the upstream: 0.5 .. 1.5
    for name, a, b, c in zip(("student", "teacher"), grads, grads_ref, (cs, ct)):
        assert a.dtype == dtype and a.shape == b.shape
        assert_grad_close(a, b, dtype, f"{name} gradient", factor * p / (c * positions))
    assert torch.equal(s.detach(), s_in) and torch.equal(t.detach(), t_in)  # inputs never written


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bfloat16_maps(device, backend):
    s, t = _maps(device, 3, 6, 8, (5, 5), torch.bfloat16, seed=3)
    s.requires_grad_(True)
    got = functional.attention_transfer(s, t, backend=backend)
    s64 = s.detach().double().requires_grad_(True)
    want = functional.attention_transfer(s64, t.double(), backend="torch")
    assert_close(got, want, torch.bfloat16, what="loss")
    (g,) = torch.autograd.grad(got, s)
    (g_ref,) = torch.autograd.grad(want, s64)
    assert g.dtype == torch.bfloat16
    assert_grad_close(g, g_ref, torch.bfloat16, "gradient", red.per_sample_factor("mean", 3, 25) * 2 / (6 * 25))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kept_graph_backward_twice(device, backend, reduction):
    """With retain_graph the saved gradients are scaled as copies: two backwards give the same."""
    s, t = _maps(device, 3, 4, 2, (4, 3), torch.float64, seed=4)
    s.requires_grad_(True)
    loss = functional.attention_transfer(s, t, reduction=reduction, backend=backend)
    up = torch.full(loss.shape, 3.0, dtype=loss.dtype, device=loss.device)
    (g1,) = torch.autograd.grad(loss, s, up, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s, up)
    torch.testing.assert_close(g1, g2)
    s64 = s.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(functional.attention_transfer(s64, t, reduction=reduction, backend="torch"), s64,
                                   up)
    torch.testing.assert_close(g2, g_ref)


GPU_BACKENDS = [b for b in BACKENDS if b.id.startswith("cuda")]


# the CUDA kernel's launch forms (csrc/cuda/feature/attention_transfer.cu): a cluster of blocks per
# sample when few samples (shared memory, then the global scratch for long rows), one block per sample
# with the scratch, the scalar (unvectorised) path, a general p, a zero and a NaN sample
GPU_CASES = {"cluster": (1, 3, 5, (64, 64), torch.float32, 2.0), "cluster-scratch": (1, 2, 3, (256, 256), torch.float32, 2.0),
             "blocks-scratch": (300, 3, 2, (128, 128), torch.float32, 2.0), "scalar-path": (5, 4, 6, (7, 11, 13), torch.float32, 2.0),
             "p3": (6, 5, 3, (33, 17), torch.float32, 3.0), "fp64": (2, 3, 4, (50, 50), torch.float64, 2.5)}


@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("device,backend", GPU_BACKENDS)
def test_gpu_launch_forms_match_reference(device, backend, case):
    n, cs, ct, spatial, dtype, p = GPU_CASES[case]
    s, t = _maps(device, n, cs, ct, spatial, dtype, seed=21, zero_student=True)
    if case == "p3":
        s[1, 0, 0, 0] = float("nan")  # sample 1's loss and gradient are NaN, the others' are not
    s.requires_grad_(True)
    t.requires_grad_(True)
    got = functional.attention_transfer(s, t, p=p, reduction="none", backend=backend)
    s64, t64 = (x.detach().cpu().double().requires_grad_(True) for x in (s, t))
    want = reference.attention_transfer(s64, t64, p=p, reduction="none")
    assert_close(got, want, dtype, what="per-sample losses")
    up = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    grads = torch.autograd.grad(got, (s, t), up.to(got.device, got.dtype))
    refs = torch.autograd.grad(want, (s64, t64), up)
    positions = math.prod(spatial)
    for name, a, b, c in zip(("student", "teacher"), grads, refs, (cs, ct)):
        assert_grad_close(a, b, dtype, f"{case}: {name} gradient", 1.5 * p / (c * positions))
    again = functional.attention_transfer(s, t, p=p, reduction="none", backend=backend)
    assert torch.equal(torch.nan_to_num(got, 7.0), torch.nan_to_num(again, 7.0)), "not deterministic"


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_float16_gradients_do_not_underflow(device, backend):
    """float16 maps: the gradient of a "mean" over 16 x 32 x 32 positions has entries ~1e-8, under
    float16's subnormals' reach if it were saved in float16 before the upstream scales it; scaled by a
    GradScaler-like upstream (2^16) it must come back as the spec's, not as zeros."""
    s, t = _maps(device, 16, 8, 4, (32, 32), torch.float16, seed=8)
    s.requires_grad_(True)
    loss = functional.attention_transfer(s, t, backend=backend)
    (g,) = torch.autograd.grad(loss * 65536.0, s)
    s64 = s.detach().cpu().double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(reference.attention_transfer(s64, t.cpu().double()) * 65536.0, s64)
    assert g.dtype == torch.float16
    representable = g_ref.abs() > 1e-5  # well above float16's subnormals once scaled
    assert representable.float().mean() > 0.5 and (g.cpu()[representable] != 0).all()
    assert_grad_close(g, g_ref, torch.float16, "float16 gradient")


@pytest.mark.parametrize("p", [1.0, 2.0, 2.5])
def test_cpu_streamed_fp32_gradient(p):
    """An fp32 gradient above 16 MiB takes the CPU kernel's streaming-store path (odd S: unaligned
    rows, head and tail elements); it must equal the float64 spec like the plain path."""
    if "cpu" not in kdkernels.backends.implemented_backends("attention_transfer", "cpu"):
        pytest.skip("the C++ CPU extension is not built")
    g = torch.Generator().manual_seed(11)
    s = torch.randn(40, 100, 33, 33, generator=g).requires_grad_(True)  # 17.4 MB gradient, S = 1089
    t = torch.randn(40, 7, 33, 33, generator=g).requires_grad_(True)
    loss = functional.attention_transfer(s, t, p=p, backend="cpu")
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    s64, t64 = s.detach().double().requires_grad_(True), t.detach().double().requires_grad_(True)
    ref = reference.attention_transfer(s64, t64, p=p)
    ref_s, ref_t = torch.autograd.grad(ref, (s64, t64))
    assert_close(loss, ref, torch.float32, what="loss")
    factor = red.per_sample_factor("mean", 40, 33 * 33) * p / (33 * 33)
    assert_grad_close(grad_s, ref_s, torch.float32, "grad_student", factor / 100)
    assert_grad_close(grad_t, ref_t, torch.float32, "grad_teacher", factor / 7)


def test_gradcheck_cpu_op():
    if "cpu" not in kdkernels.backends.implemented_backends("attention_transfer", "cpu"):
        pytest.skip("the C++ CPU extension is not built")
    for p, squared, reduction in ((2.0, True, "mean"), (1.0, False, "none"), (2.5, True, "batchmean")):
        s, t = _maps("cpu", 2, 3, 2, (3, 2), torch.float64, seed=6)
        s.requires_grad_(True)
        t.requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda a, b: functional.attention_transfer(a, b, p=p, squared=squared, reduction=reduction, backend="cpu"),
            (s, t))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)])
def test_opcheck(device, backend, per_row, grads):
    s, t = _maps(device, 3, 4, 2, (5,), torch.float32, seed=7)
    args = (s, t, torch.tensor(0.1, device=device), 2.5, not per_row, per_row, *grads)
    torch.library.opcheck(ops.ATTENTION_TRANSFER.forward_ops[backend], args)
    # with inputs that require grad: schema, autograd registration, fake (as softmax_kl_step's test says,
    # the aot_dispatch checks return the saved gradients as outputs, which the partitioner rejects;
    # the functional, which drops them, compiles: test_compile.py)
    s_g, t_g = s.clone().requires_grad_(grads[0]), t.clone().requires_grad_(grads[1])
    torch.library.opcheck(ops.ATTENTION_TRANSFER.forward_ops[backend], (s_g, t_g) + args[2:],
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    loss, grad_s, grad_t = ops.ATTENTION_TRANSFER.forward(backend, *args)
    torch.library.opcheck(ops.ATTENTION_TRANSFER.backward_ops[backend], (torch.rand_like(loss) + 0.5, grad_s, grad_t))


def test_saves_only_the_gradients():
    """One-pass: the forward's gradients are all that is kept for the backward (not the maps)."""
    if "cpu" not in kdkernels.backends.implemented_backends("attention_transfer", "cpu"):
        pytest.skip("the C++ CPU extension is not built")
    s, t = _maps("cpu", 2, 3, 4, (6,), torch.float32, seed=8)
    s.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        functional.attention_transfer(s, t, backend="cpu")
    assert [tuple(x.shape) for x in saved] == [tuple(s.shape), (0,)]


def test_module():
    s, t = _maps("cpu", 2, 3, 4, (5, 5), torch.float32, seed=9)
    loss = kdkernels.AttentionTransferLoss(p=3.0, squared=False, reduction="sum")
    torch.testing.assert_close(loss(s, t), functional.attention_transfer(s, t, p=3.0, squared=False, reduction="sum",
                                                                        backend="torch"))
    assert "p=3.0" in repr(loss) and "squared=False" in repr(loss)
    with pytest.raises(ValueError, match="p must be"):
        kdkernels.AttentionTransferLoss(p=0.5)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: (torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)), ValueError, "same spatial size"),
    (lambda: (torch.zeros(2, 3, 4), torch.zeros(3, 3, 4)), ValueError, "same batch size"),
    (lambda: (torch.zeros(2, 3), torch.zeros(2, 3)), ValueError, "student must have at least 3"),
    (lambda: (torch.zeros(2, 0, 4), torch.zeros(2, 3, 4)), ValueError, "at least 1 channel"),
    (lambda: (torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(2, 3, 4)), TypeError, "student"),
])
def test_errors(make, exc, match):
    s, t = make()
    with pytest.raises(exc, match=match):
        functional.attention_transfer(s, t)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(p=0.5), ValueError, "p must be"), (dict(p=float("inf")), ValueError, "p must be"),
    (dict(p="2"), TypeError, "p must be"), (dict(squared=1), TypeError, "squared"),
    (dict(reduction="avg"), ValueError, "reduction"), (dict(backend="gpu"), ValueError, "backend"),
])
def test_option_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        functional.attention_transfer(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), **kw)
