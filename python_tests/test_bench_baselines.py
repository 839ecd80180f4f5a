"""The bench's speed baselines compute the same losses as kdkernels: the ratios compare like with like.

``kdkernels.bench.baselines`` (the ``eager`` implementation: the usual PyTorch compositions users
write) must give the reference's values and gradients in float32 on ordinary (finite, well
separated) inputs; so must torchdistill's losses where their definition is ours (KD, RKD, FitNets
MSE). torchdistill's SP is a different loss (L1-normalised Gram rows): the test pins that down, so
the notes that say so stay true. Tests of torchdistill skip, with the reason, where it is not installed.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from kdkernels import reference
from kdkernels.backends import LOSSES
from kdkernels.bench import baselines, impls, peers
from kdkernels.bench.cases import Case, Inputs, get_preset, make_inputs
from kdkernels.bench.inputs import (Float64Source, attention_transfer_inputs, fsp_inputs, projected_mse_inputs,
                                    relation_inputs, softmax_kl_inputs)

RTOL, ATOL = 1e-5, 1e-6  # float32: the same math in a different order


def _close(a, b, what):
    a, b = a.detach().double(), b.detach().double()
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{what}: {m}")


def _compare(fn_a, fn_b, tensors, what):
    """Values of fn_a() and fn_b() and the gradients of every tensor that requires grad."""
    grads = [t for t in tensors if t is not None and t.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # F.kl_div's note on reduction="mean"
        a, b = fn_a(), fn_b()
    _close(a, b, f"{what} value")
    if grads and a.dim() == 0:
        ga = torch.autograd.grad(a, grads, allow_unused=True)
        gb = torch.autograd.grad(b, grads, allow_unused=True)
        for i, (x, y) in enumerate(zip(ga, gb)):
            assert (x is None) == (y is None), f"{what}: gradient {i} present in one only"
            if x is not None:
                _close(x, y, f"{what} grad {i}")


def _src(seed=0):
    return Float64Source(seed, torch.float32, "cpu")


# --------------------------------------------------------------------------- softmax_kl_div
@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("labels", ["none", "some"])
def test_softmax_kl_eager_equals_reference(divergence, reduction, labels):
    s, t, lab = softmax_kl_inputs(_src(), (3, 5, 37), scale=2.0, divergence=divergence, labels=labels)
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, reduction=reduction, labels=lab)
    _compare(lambda: baselines.softmax_kl_div(s, t, **kw), lambda: reference.softmax_kl_div(s, t, **kw), [s],
             f"softmax_kl_div {divergence} {reduction} labels={labels}")


def test_softmax_kl_eager_no_t2_and_teacher_grad():
    s, t, _ = softmax_kl_inputs(_src(1), (6, 11), teacher_requires_grad=True)
    kw = dict(temperature=3.0, t2_scale=False)
    _compare(lambda: baselines.softmax_kl_div(s, t, **kw), lambda: reference.softmax_kl_div(s, t, **kw), [s, t],
             "softmax_kl_div t2_scale=False")


# ---------------------------------------------------------------------------- projected_mse
PM_LAYOUTS = {
    "nchw-conv1x1": ((2, 6, 3, 4), (2, 5, 3, 4), 1),  # F.conv2d path
    "rows-linear": ((7, 6), (7, 5), -1),  # F.linear path
    "seq-linear": ((2, 3, 6), (2, 3, 5), -1),
    "channels-first-3d": ((2, 6, 9), (2, 5, 9), 1),  # movedim path
}


@pytest.mark.parametrize("layout", sorted(PM_LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
@pytest.mark.parametrize("bias", [True, False])
def test_projected_mse_eager_equals_reference(layout, reduction, bias):
    xs, ts, fd = PM_LAYOUTS[layout]
    x, t, w, b = projected_mse_inputs(_src(), xs, ts, fd, bias=bias)
    _compare(lambda: baselines.projected_mse(x, t, w, b, fd, reduction),
             lambda: reference.projected_mse(x, t, w, b, fd, reduction), [x, w, b],
             f"projected_mse {layout} {reduction} bias={bias}")


# --------------------------------------------------------------------------------- relation
RELATION_SHAPES = {"same-dims": (9, 7, 7, ()), "ds-ne-dt": (8, 6, 10, ()), "maps": (6, 3, 2, (2, 2))}


@pytest.mark.parametrize("loss", ["rkd_distance", "rkd_angle", "rkd", "similarity_preserving"])
@pytest.mark.parametrize("shape", sorted(RELATION_SHAPES))
@pytest.mark.parametrize("reduction", ["default", "sum", "batchmean", "none"])
def test_relation_eager_equals_reference(loss, shape, reduction):
    b, ds, dt, spatial = RELATION_SHAPES[shape]
    s, t = relation_inputs(_src(), b, ds, dt, spatial)
    kw = {} if reduction == "default" else {"reduction": reduction}
    _compare(lambda: getattr(baselines, loss)(s, t, **kw), lambda: getattr(reference, loss)(s, t, **kw), [s],
             f"{loss} {shape} {reduction}")


@pytest.mark.parametrize("weights", [(1.0, 2.0), (0.5, 0.0), (0.0, 3.0)])
def test_rkd_eager_weights(weights):
    s, t = relation_inputs(_src(2), 7, 5, 4)
    _compare(lambda: baselines.rkd(s, t, *weights), lambda: reference.rkd(s, t, *weights), [s], f"rkd {weights}")


# ------------------------------------------------------------------------ attention_transfer
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_attention_transfer_eager_equals_reference(p, squared, reduction):
    s, t = attention_transfer_inputs(_src(), (3, 4, 5, 2), (3, 6, 5, 2), teacher_requires_grad=True)
    kw = dict(p=p, squared=squared, reduction=reduction)
    _compare(lambda: baselines.attention_transfer(s, t, **kw), lambda: reference.attention_transfer(s, t, **kw),
             [s, t], f"attention_transfer p={p} squared={squared} {reduction}")


# ------------------------------------------------------------------------------------- fsp
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_fsp_eager_equals_reference(reduction, teacher_grad):
    maps = fsp_inputs(_src(), 3, 4, 5, (3, 2), (2, 2), teacher_requires_grad=teacher_grad)
    _compare(lambda: baselines.fsp(*maps, reduction=reduction), lambda: reference.fsp(*maps, reduction=reduction),
             list(maps), f"fsp {reduction} teacher_grad={teacher_grad}")


def test_relation_eager_teacher_gets_no_gradient():
    s, t = relation_inputs(_src(3), 6, 4, 4, teacher_requires_grad=True)
    for loss in ("rkd_distance", "rkd_angle", "similarity_preserving"):
        g = torch.autograd.grad(getattr(baselines, loss)(s, t), [s, t], allow_unused=True)
        assert g[1] is None or not g[1].any(), loss


# ------------------------------------------------------------------------ the bench's cases
@pytest.mark.parametrize("loss", LOSSES)
def test_eager_impl_equals_reference_impl_on_the_smoke_case(loss):
    case = next(c for c in get_preset("smoke").cases if c.loss == loss)
    inp = make_inputs(case, "cpu")
    _compare(lambda: impls.make_callable("eager", case)(inp), lambda: impls.make_callable("reference", case)(inp),
             inp.grad_tensors(), f"{loss} eager vs reference impl")


def test_every_loss_has_an_eager_baseline():
    assert set(LOSSES) <= set(baselines.__all__)
    for name in baselines.__all__:
        assert getattr(baselines, name).__module__ == "kdkernels.bench.baselines"  # not the reference's


# ------------------------------------------------------------------------------ torchdistill
td_missing = peers.torchdistill()[0] is None
needs_td = pytest.mark.skipif(td_missing, reason=f"torchdistill not installed ({peers.torchdistill()[1]}); "
                                                  "`make bench` / the test deps install it")


def _td(loss, options, inputs):
    return peers.torchdistill_call(loss, options, baselines.project)(inputs)


@needs_td
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_torchdistill_kd_equals_reference(reduction):
    s, t, _ = softmax_kl_inputs(_src(), (2, 4, 29), scale=2.0)
    o = {"temperature": 2.0, "reduction": reduction}
    _compare(lambda: _td("softmax_kl_div", o, Inputs((s, t), {})), lambda: reference.softmax_kl_div(s, t, **o), [s],
             f"torchdistill KDLoss {reduction}")


@needs_td
@pytest.mark.parametrize("loss", ["rkd_distance", "rkd_angle", "rkd"])
def test_torchdistill_rkd_equals_reference(loss):
    s, t = relation_inputs(_src(), 9, 6, 5)
    _compare(lambda: _td(loss, {}, Inputs((s, t), {})), lambda: getattr(reference, loss)(s, t), [s],
             f"torchdistill RKDLoss for {loss}")


@needs_td
@pytest.mark.parametrize("layout", ["nchw-conv1x1", "rows-linear"])
def test_torchdistill_fitnet_equals_reference(layout):
    xs, ts, fd = PM_LAYOUTS[layout]
    x, t, w, b = projected_mse_inputs(_src(), xs, ts, fd)
    o = {"feature_dim": fd}
    _compare(lambda: _td("projected_mse", o, Inputs((x, t, w), {"bias": b, **o})),
             lambda: reference.projected_mse(x, t, w, b, fd), [x, w, b], f"torchdistill MSE {layout}")


@needs_td
@pytest.mark.parametrize("squared,reduction", [(True, "mean"), (False, "batchmean")])
def test_torchdistill_attention_transfer_equals_reference(squared, reduction):
    """ATLoss mode 'code' is our squared "mean", mode 'paper' our norm "batchmean" (p = 2)."""
    s, t = attention_transfer_inputs(_src(), (3, 4, 5, 2), (3, 6, 5, 2))
    o = {"squared": squared, "reduction": reduction}
    _compare(lambda: _td("attention_transfer", o, Inputs((s, t), {})),
             lambda: reference.attention_transfer(s, t, **o), [s], f"torchdistill ATLoss {o}")
    for other in ({"p": 3.0}, {"reduction": "sum"}, {"squared": False, "reduction": "mean"}):
        assert "unavailable" in peers.torchdistill_unavailable("attention_transfer", other)


@needs_td
def test_torchdistill_relation_reductions_map_to_ours():
    # SPKDLoss's "batchmean" is our "mean" (sum / B^2); the words it lacks are unavailable
    s, t = relation_inputs(_src(), 8, 6, 5)
    inp = Inputs((s, t), {})
    _close(_td("similarity_preserving", {"reduction": "mean"}, inp), _td("similarity_preserving", {}, inp), "SP mean")
    _close(_td("similarity_preserving", {"reduction": "sum"}, inp) / 64, _td("similarity_preserving", {}, inp), "SP sum")
    _compare(lambda: _td("rkd_distance", {"reduction": "sum"}, inp),
             lambda: reference.rkd_distance(s, t, reduction="sum"), [s], "torchdistill RKD sum")
    for loss in ("similarity_preserving", "rkd_distance", "rkd_angle", "rkd"):
        for reduction in ("batchmean", "none"):
            assert "unavailable" in peers.torchdistill_unavailable(loss, {"reduction": reduction})


@needs_td
def test_torchdistill_sp_is_the_l1_normalised_variant():
    """SPKDLoss normalises Gram rows with p=1 (kdkernels and the SP paper: p=2): a different value."""
    s, t = relation_inputs(_src(), 8, 6, 5)
    got = _td("similarity_preserving", {}, Inputs((s, t), {}))
    ours = reference.similarity_preserving(s, t)
    assert not torch.allclose(got, ours, rtol=1e-3), "torchdistill's SP now matches ours: update peers.NOTES"
    g_s = torch.nn.functional.normalize(s @ s.t(), p=1, dim=1)
    g_t = torch.nn.functional.normalize(t @ t.t(), p=1, dim=1)
    _close(got, (g_t - g_s).pow(2).sum() / 64, "torchdistill SP = L1-normalised SP")


@needs_td
def test_torchdistill_fsp_is_the_column_norm_variant():
    """FSPLoss sums the L2 norms of the columns of G_s - G_t (not squared) / N, where kdkernels and the
    FSP paper take the squared Frobenius norm: a different value."""
    maps = fsp_inputs(_src(), 3, 4, 5, (3, 3), (3, 3))
    got = _td("fsp", {}, Inputs(maps, {}))
    ours = reference.fsp(*maps, reduction="batchmean")
    assert not torch.allclose(got, ours, rtol=1e-3), "torchdistill's FSP now matches ours: update peers.NOTES"
    from kdkernels.reference.relation import fsp_matrix

    d = fsp_matrix(*maps[:2]) - fsp_matrix(*maps[2:])
    _close(got, d.norm(dim=1).sum() / 3, "torchdistill FSP = column norms / N")
    assert "unavailable" in peers.torchdistill_unavailable("fsp", {"reduction": "none"})


@needs_td
def test_torchdistill_unavailable_reasons():
    for opts in ({"divergence": "reverse"}, {"divergence": "jsd"}, {"reduction": "none"}):
        case = Case("softmax_kl_div", {"R": 4, "V": 8}, options=opts)
        with pytest.raises(impls.Unavailable, match="unavailable"):
            impls.check_available("torchdistill", case, torch.device("cpu"))
    case = Case("projected_mse", {"R": 4, "Ds": 3, "Dt": 2}, options={"reduction": "batchmean"})
    with pytest.raises(impls.Unavailable, match="batchmean"):
        impls.check_available("torchdistill", case, torch.device("cpu"))


def test_torchdistill_missing_is_reported_not_dropped(monkeypatch):
    monkeypatch.setattr(peers, "torchdistill", lambda: (None, "ModuleNotFoundError: No module named 'torchdistill'"))
    case = Case("rkd_distance", {"B": 4, "D": 3})
    assert "torchdistill" in impls.candidates("rkd_distance", torch.device("cpu"))
    with pytest.raises(impls.Unavailable, match="torchdistill not installed"):
        impls.check_available("torchdistill", case, torch.device("cpu"))
