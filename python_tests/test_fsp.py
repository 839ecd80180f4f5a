"""FSP matrix loss (issue 15 §2; ops.FSP, kdkernels.reference.fsp).

The reference against a textbook float64 loop and the torchdistill-style eager composition (matmul +
F.mse_loss); every fused backend against the reference (hypothesis over 1-3 spatial dims, odd sizes,
C = 1, student and teacher spatial sizes that differ, reductions, dtypes, teacher gradients, zero
maps, N = 0); bf16; gradcheck of the CPU op; opcheck of every variant; the one-pass contract (what
is saved, kept graphs); the module; errors.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tnf
from hypothesis import example, given
from hypothesis import strategies as st

import kdkernels
from helpers import assert_close, assert_grad_close, backend_params
from kdkernels import functional, ops, reference
from kdkernels import reduction as red

BACKENDS = backend_params("fsp")
REDUCTIONS = list(red.RELATION.names)


def _maps(device, n, c1, c2, s_spatial, t_spatial, dtype, seed, zero_student=False, zero_teacher=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(n, c, *sp, generator=gen, dtype=torch.float64)
           for c, sp in ((c1, s_spatial), (c2, s_spatial), (c1, t_spatial), (c2, t_spatial))]
    if zero_student and n:
        out[0][0] = 0  # sample 0's G_s = 0
    if zero_teacher and n:
        out[3][-1] = 0
    return [x.to(device=device, dtype=dtype) for x in out]


def _textbook(sf, ss, tf, ts, reduction):
    """Per sample, sums over positions for every (i, j) entry (float64)."""
    n, c1, c2 = sf.shape[0], sf.shape[1], ss.shape[1]
    rows = []
    for k in range(n):
        total = 0.0
        for i in range(c1):
            for j in range(c2):
                a, b = sf[k, i].double().flatten(), ss[k, j].double().flatten()
                p, q = tf[k, i].double().flatten(), ts[k, j].double().flatten()
                d = float((a * b).sum()) / a.numel() - float((p * q).sum()) / p.numel()
                total += d * d
        rows.append(total)
    rows = torch.tensor(rows, dtype=torch.float64)
    if reduction == "none":
        return rows
    denom = {"mean": max(1, n * c1 * c2), "batchmean": max(1, n), "sum": 1}[reduction]
    return rows.sum() / denom


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_is_the_textbook_loss(reduction):
    maps = _maps("cpu", 3, 4, 2, (3, 5), (2, 2), torch.float64, seed=1, zero_teacher=True)
    torch.testing.assert_close(reference.fsp(*maps, reduction), _textbook(*maps, reduction))


def test_reference_is_the_eager_composition():
    """The usual eager code (torchdistill's fsp_matrix, Yim et al.'s G / HW) with F.mse_loss ("mean")
    and the paper's sum / N of the squared Frobenius norms ("batchmean")."""
    sf, ss, tf, ts = _maps("cpu", 4, 8, 6, (6, 6), (4, 4), torch.float32, seed=2)

    def fsp_matrix(a, b):
        a = a.flatten(2)
        return torch.matmul(a, b.flatten(2).transpose(1, 2)) / a.shape[2]

    gs, gt = fsp_matrix(sf, ss), fsp_matrix(tf, ts)
    torch.testing.assert_close(functional.fsp(sf, ss, tf, ts, backend="torch"), tnf.mse_loss(gs, gt))
    torch.testing.assert_close(functional.fsp(sf, ss, tf, ts, reduction="batchmean", backend="torch"),
                               (gs - gt).pow(2).sum() / 4)


@pytest.mark.parametrize("device,backend", BACKENDS)
@given(n=st.integers(0, 4), c1=st.integers(1, 5), c2=st.integers(1, 5),
       s_spatial=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
       t_spatial=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
       reduction=st.sampled_from(REDUCTIONS), dtype=st.sampled_from([torch.float32, torch.float64]),
       grads=st.sampled_from([(True, True, False, False), (True, False, False, False), (False, True, True, True),
                              (True, True, True, True), (False, False, False, True)]),
       zero_student=st.booleans(), zero_teacher=st.booleans(), seed=st.integers(0, 2**16))
@example(n=2, c1=1, c2=1, s_spatial=(1,), t_spatial=(1,), reduction="none", dtype=torch.float64,
         grads=(True, True, True, True), zero_student=True, zero_teacher=True, seed=0)  # C = 1, S = 1, zero maps
@example(n=3, c1=3, c2=5, s_spatial=(3, 1, 5), t_spatial=(7,), reduction="mean", dtype=torch.float32,
         grads=(True, True, True, True), zero_student=False, zero_teacher=False, seed=5)  # 3-D vs 1-D spatial
@example(n=0, c1=2, c2=3, s_spatial=(4,), t_spatial=(2, 2), reduction="mean", dtype=torch.float32,
         grads=(True, True, False, False), zero_student=False, zero_teacher=False, seed=0)  # no samples: loss 0
@example(n=0, c1=2, c2=3, s_spatial=(4,), t_spatial=(2, 2), reduction="none", dtype=torch.float64,
         grads=(True, True, True, True), zero_student=False, zero_teacher=False, seed=0)
def test_fused_matches_reference(device, backend, n, c1, c2, s_spatial, t_spatial, reduction, dtype, grads,
                                 zero_student, zero_teacher, seed):
    maps = _maps(device, n, c1, c2, s_spatial, t_spatial, dtype, seed, zero_student, zero_teacher)
    before = [m.clone() for m in maps]
    for m, g in zip(maps, grads):
        m.requires_grad_(g)
    got = functional.fsp(*maps, reduction=reduction, backend=backend)
    maps64 = [m.detach().double().cpu().requires_grad_(g) for m, g in zip(maps, grads)]
    want = functional.fsp(*maps64, reduction=reduction, backend="torch")
    assert got.shape == want.shape and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got.cpu(), want, dtype, what="loss")
    up = torch.rand(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    inputs = [m for m, g in zip(maps, grads) if g]
    got_grads = torch.autograd.grad(got, inputs, up.to(got.device, got.dtype))
    ref_grads = torch.autograd.grad(want, [m for m, g in zip(maps64, grads) if g], up)
    for i, (a, b) in enumerate(zip(got_grads, ref_grads)):
        assert a.dtype == dtype and a.shape == b.shape
        assert_grad_close(a, b, dtype, f"gradient {i}")
    assert all(torch.equal(m.detach(), b) for m, b in zip(maps, before))  # inputs never written


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_several_blocks_per_sample(device, backend):
    """C1 * C2 = 391 entries: with the Triton tile shrunk to 64, several blocks per sample."""
    from kdkernels.triton._common import override_tiles

    maps = _maps(device, 2, 17, 23, (3, 3), (2, 5), torch.float64, seed=11)
    for m in maps:
        m.requires_grad_(True)
    with override_tiles("fsp", (64, 1)):
        got = functional.fsp(*maps, reduction="sum", backend=backend)
        grads = torch.autograd.grad(got, maps)
    maps64 = [m.detach().cpu().requires_grad_(True) for m in maps]
    want = functional.fsp(*maps64, reduction="sum", backend="torch")
    assert_close(got.cpu(), want, torch.float64, what="loss")
    for a, b in zip(grads, torch.autograd.grad(want, maps64)):
        assert_close(a.cpu(), b, torch.float64, what="gradient")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_float16_gradients_do_not_underflow(device, backend):
    """float16 maps: "mean" over N C1 C2 with the 1 / S of G puts the gradient's entries near float16's
    subnormals; scaled by a GradScaler-like upstream (2^16) they must come back as the spec's."""
    sf, ss, tf, ts = _maps(device, 16, 32, 32, (32, 32), (32, 32), torch.float16, seed=4)
    sf.requires_grad_(True)
    ss.requires_grad_(True)
    loss = functional.fsp(sf, ss, tf, ts, backend=backend)
    grads = torch.autograd.grad(loss * 65536.0, (sf, ss))
    maps64 = [m.detach().cpu().double() for m in (sf, ss, tf, ts)]
    maps64[0].requires_grad_(True)
    maps64[1].requires_grad_(True)
    refs = torch.autograd.grad(functional.fsp(*maps64, backend="torch") * 65536.0, maps64[:2])
    for g, g_ref in zip(grads, refs):
        assert g.dtype == torch.float16
        representable = g_ref.abs() > 1e-5  # well above float16's subnormals once scaled
        assert representable.float().mean() > 0.5 and (g.cpu()[representable] != 0).all()
        assert_grad_close(g, g_ref, torch.float16, "float16 gradient")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bfloat16_maps(device, backend):
    sf, ss, tf, ts = _maps(device, 3, 6, 8, (5, 5), (3, 3), torch.bfloat16, seed=3)
    sf.requires_grad_(True)
    ss.requires_grad_(True)
    got = functional.fsp(sf, ss, tf, ts, backend=backend)
    maps64 = [m.detach().double().cpu() for m in (sf, ss, tf, ts)]
    maps64[0].requires_grad_(True)
    maps64[1].requires_grad_(True)
    want = functional.fsp(*maps64, backend="torch")
    assert_close(got.cpu(), want, torch.bfloat16, what="loss")
    grads = torch.autograd.grad(got, (sf, ss))
    for g, g_ref in zip(grads, torch.autograd.grad(want, maps64[:2])):
        assert g.dtype == torch.bfloat16
        assert_grad_close(g, g_ref, torch.bfloat16, "gradient")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kept_graph_backward_twice(device, backend, reduction):
    """With retain_graph the saved gradients are scaled as copies: two backwards give the same."""
    sf, ss, tf, ts = _maps(device, 3, 4, 2, (4, 3), (5,), torch.float64, seed=4)
    sf.requires_grad_(True)
    tf.requires_grad_(True)
    loss = functional.fsp(sf, ss, tf, ts, reduction=reduction, backend=backend)
    up = torch.full(loss.shape, 3.0, dtype=loss.dtype, device=loss.device)
    g1 = torch.autograd.grad(loss, (sf, tf), up, retain_graph=True)
    g2 = torch.autograd.grad(loss, (sf, tf), up)
    torch.testing.assert_close(g1, g2)
    ref = [m.detach().clone().requires_grad_(r) for m, r in zip((sf, ss, tf, ts), (True, False, True, False))]
    g_ref = torch.autograd.grad(functional.fsp(*ref, reduction=reduction, backend="torch"), (ref[0], ref[2]), up)
    torch.testing.assert_close(g2, g_ref)


def test_gradcheck_cpu_op():
    if "cpu" not in kdkernels.backends.implemented_backends("fsp", "cpu"):
        pytest.skip("the C++ CPU extension is not built")
    for reduction in ("mean", "none", "batchmean"):
        maps = _maps("cpu", 2, 3, 2, (3, 2), (5,), torch.float64, seed=6)
        for m in maps:
            m.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda *a: functional.fsp(*a, reduction=reduction, backend="cpu"), tuple(maps))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("grads", [(True, True, True, True), (True, False, False, False), (False, False, True, True)])
def test_opcheck(device, backend, per_row, grads):
    maps = [m.contiguous().view(m.shape[0], m.shape[1], -1)
            for m in _maps(device, 3, 4, 2, (5,), (2, 3), torch.float32, seed=7)]
    args = (*maps, torch.tensor(0.1, device=device), per_row, *grads)
    torch.library.opcheck(ops.FSP.forward_ops[backend], args)
    # with inputs that require grad: schema, autograd registration, fake (the aot_dispatch checks
    # return the saved gradients as outputs, which the partitioner rejects; test_compile.py compiles
    # the functional, which drops them)
    maps_g = [m.clone().requires_grad_(g) for m, g in zip(maps, grads)]
    torch.library.opcheck(ops.FSP.forward_ops[backend], (*maps_g, *args[4:]),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    loss, *saved = ops.FSP.forward(backend, *args)
    torch.library.opcheck(ops.FSP.backward_ops[backend], (torch.rand_like(loss) + 0.5, *saved))


def test_saves_only_the_gradients():
    """One-pass: the forward's gradients are all that is kept for the backward (not the maps)."""
    if "cpu" not in kdkernels.backends.implemented_backends("fsp", "cpu"):
        pytest.skip("the C++ CPU extension is not built")
    sf, ss, tf, ts = _maps("cpu", 2, 3, 4, (6,), (3,), torch.float32, seed=8)
    sf.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        functional.fsp(sf, ss, tf, ts, backend="cpu")
    assert [tuple(x.shape) for x in saved] == [tuple(sf.shape), (0,), (0,), (0,)]


def test_backward_rejects_bad_upstream():
    if "cpu" not in kdkernels.backends.implemented_backends("fsp", "cpu"):
        pytest.skip("the C++ CPU extension is not built")
    maps = [m.view(m.shape[0], m.shape[1], -1) for m in _maps("cpu", 3, 2, 2, (4,), (4,), torch.float32, seed=9)]
    _loss, *saved = ops.FSP.forward("cpu", *maps, torch.tensor(1.0), True, True, True, False, False)
    before = [g.clone() for g in saved]
    with pytest.raises(RuntimeError, match="grad_loss must be 0-d or"):
        ops.FSP.backward_ops["cpu"](torch.ones(5), *saved)
    assert all(torch.equal(a, b) for a, b in zip(saved, before))  # nothing scaled


def test_module():
    pairs = [_maps("cpu", 2, 3, 4, (5, 5), (3, 3), torch.float32, seed=s) for s in (10, 11)]
    loss = kdkernels.FSPLoss(weights=[0.5, 2.0], reduction="sum")
    got = loss([(p[0], p[1]) for p in pairs], [(p[2], p[3]) for p in pairs])
    want = sum(w * functional.fsp(*p, reduction="sum", backend="torch") for w, p in zip((0.5, 2.0), pairs))
    torch.testing.assert_close(got, want)
    default = kdkernels.FSPLoss()([(pairs[0][0], pairs[0][1])], [(pairs[0][2], pairs[0][3])])
    torch.testing.assert_close(default, functional.fsp(*pairs[0], backend="torch"))
    assert "weights=[0.5, 2.0]" in repr(loss)
    with pytest.raises(ValueError, match="weights has 2 entries"):
        loss([(pairs[0][0], pairs[0][1])], [(pairs[0][2], pairs[0][3])])
    with pytest.raises(ValueError, match="teacher_pairs must have as many pairs"):
        loss([(p[0], p[1]) for p in pairs], [(pairs[0][2], pairs[0][3])])
    with pytest.raises(TypeError, match="weights"):
        kdkernels.FSPLoss(weights=1.0)
    with pytest.raises(ValueError, match="reduction"):
        kdkernels.FSPLoss(reduction="avg")


def _z(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: (_z(2, 3, 4), _z(2, 5, 5), _z(2, 3, 4), _z(2, 5, 4)), ValueError,
     "student_first and student_second must have the same spatial size"),
    (lambda: (_z(2, 3, 4), _z(2, 5, 4), _z(2, 3, 4, 2), _z(2, 5, 4)), ValueError,
     "teacher_first and teacher_second must have the same spatial size"),
    (lambda: (_z(2, 3, 4), _z(2, 5, 4), _z(3, 3, 4), _z(3, 5, 4)), ValueError,
     "teacher_first must have the same batch"),
    (lambda: (_z(2, 3, 4), _z(3, 5, 4), _z(2, 3, 4), _z(2, 5, 4)), ValueError,
     "student_second must have the same batch"),
    (lambda: (_z(2, 3, 4), _z(2, 5, 4), _z(2, 4, 4), _z(2, 5, 4)), ValueError,
     "teacher_first must have student_first's 3"),
    (lambda: (_z(2, 3, 4), _z(2, 5, 4), _z(2, 3, 4), _z(2, 6, 4)), ValueError,
     "teacher_second must have student_second's 5"),
    (lambda: (_z(2, 0, 4), _z(2, 5, 4), _z(2, 0, 4), _z(2, 5, 4)), ValueError, "at least 1 channel"),
    (lambda: (_z(2, 3, 0), _z(2, 5, 0), _z(2, 3, 4), _z(2, 5, 4)), ValueError, "at least 1 spatial position"),
    (lambda: (_z(2, 3), _z(2, 5, 4), _z(2, 3, 4), _z(2, 5, 4)), ValueError, "student_first must have at least 3"),
    (lambda: (_z(2, 3, 4), _z(2, 5, 4, dtype=torch.int64), _z(2, 3, 4), _z(2, 5, 4)), TypeError, "student_second"),
    (lambda: (_z(2, 3, 4), _z(2, 5, 4), _z(2, 3, 4), [[0.0]]), TypeError, "teacher_second"),
])
def test_errors(make, exc, match):
    maps = make()
    with pytest.raises(exc, match=match):
        functional.fsp(*maps)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(reduction="avg"), ValueError, "reduction"), (dict(reduction=None), ValueError, "reduction"),
    (dict(backend="gpu"), ValueError, "backend"), (dict(backend=3), TypeError, "backend"),
])
def test_option_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        functional.fsp(_z(2, 3, 4), _z(2, 5, 4), _z(2, 3, 4), _z(2, 5, 4), **kw)


def test_promotes_mixed_dtypes():
    """A bf16 student against an fp32 teacher (autocast) runs in fp32; each gradient in its map's dtype."""
    sf, ss, tf, ts = _maps("cpu", 2, 3, 4, (4,), (4,), torch.float32, seed=12)
    sf = sf.bfloat16().requires_grad_(True)
    loss = functional.fsp(sf, ss, tf, ts)
    (g,) = torch.autograd.grad(loss, sf)
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16
    assert math.isfinite(loss.item())
