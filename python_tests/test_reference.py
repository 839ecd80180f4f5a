"""The eager references (the executable spec, docs/design.md §2) against independent textbook formulas.

Every expected value here is computed from the formulas of docs/design.md with plain float64 Python loops
over small cases (R <= 4, V <= 6, B <= 5, D <= 4); nothing is shared with the code under test.
hypothesis draws the small inputs; ``@example`` pins the edge cases (V = 1, all rows ignored,
-inf masks, +-1e4 logits, duplicate embeddings, B = 2, all-identical rows). Also: gradcheck of the
float64 references, dtypes of losses and gradients, and the teacher never getting a gradient in the
relation losses.
"""
from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kdkernels.ops.response import DIVERGENCE_CODES
from kdkernels.reference import projected_mse, rkd_angle, rkd_distance, similarity_preserving, softmax_kl_div

# 25 examples per test unless a profile (conftest.py: "ci" / "soak") is chosen explicitly.
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    **({} if os.environ.get("HYPOTHESIS_PROFILE") else {"max_examples": 25}),
)
F64 = dict(rtol=1e-8, atol=1e-10)
DIVERGENCES = tuple(DIVERGENCE_CODES)  # the op spec's names, in its order
INF = math.inf


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# textbook formulas (float64 Python loops)
# ---------------------------------------------------------------------------------------------
def tb_log_softmax(z: list[float], T: float) -> list[float]:
    zs = [v / T for v in z]
    m = max(zs)
    lse = m + math.log(sum(math.exp(v - m) for v in zs))
    return [v - lse for v in zs]


def tb_kl(log_a: list[float], log_b: list[float]) -> float:
    """KL(a || b) = sum_v a_v (log a_v - log b_v), with 0 log 0 = 0 (a_v = 0 in float64)."""
    total = 0.0
    for la, lb in zip(log_a, log_b):
        a = math.exp(la)
        if a > 0:
            total += a * (la - lb)
    return total


def tb_row_divergence(zs, zt, T, divergence, beta) -> float:
    lp, lq = tb_log_softmax(zs, T), tb_log_softmax(zt, T)
    if divergence == "forward":
        return tb_kl(lq, lp)
    if divergence == "reverse":
        return tb_kl(lp, lq)
    m = [beta * math.exp(a) + (1 - beta) * math.exp(b) for a, b in zip(lq, lp)]
    lm = [math.log(v) if v > 0 else -INF for v in m]
    return beta * tb_kl(lq, lm) + (1 - beta) * tb_kl(lp, lm)


def tb_softmax_kl(s, t, T, divergence, beta, reduction, labels, ignore_index, t2_scale):
    lead, V = s.shape[:-1], s.shape[-1]
    srows, trows = s.reshape(-1, V).tolist(), t.reshape(-1, V).tolist()
    keep = [True] * len(srows) if labels is None else [int(v) != ignore_index for v in labels.reshape(-1)]
    rows = []
    for zs, zt, k in zip(srows, trows, keep):
        ell = tb_row_divergence(zs, zt, T, divergence, beta) if k else 0.0
        rows.append(ell * T * T if t2_scale else ell)
    if reduction == "none":
        return np.array(rows, dtype=np.float64).reshape(lead)
    total = sum(rows)
    kept = max(1, sum(keep))
    return {"sum": total, "batchmean": total / kept, "mean": total / (kept * V)}[reduction]


def tb_projected_mse(x, t, W, b, feature_dim, reduction):
    fd = feature_dim % x.ndim
    Ds, Dt = x.shape[fd], t.shape[fd]
    others = [n for i, n in enumerate(x.shape) if i != fd]
    total, rows, per_row = 0.0, 0, []
    for idx in itertools.product(*(range(n) for n in others)):
        def at(a, f):
            full = list(idx)
            full.insert(fd, f)
            return float(a[tuple(full)])

        rows += 1
        row = 0.0
        for c in range(Dt):
            y = sum(float(W[c, k]) * at(x, k) for k in range(Ds)) + (0.0 if b is None else float(b[c]))
            row += (y - at(t, c)) ** 2
        per_row.append(row)
        total += row
    if reduction == "none":  # one loss per feature vector, in the order of the other dims
        return np.array(per_row, dtype=np.float64).reshape(others)
    return {"sum": total, "mean": total / (rows * Dt), "batchmean": total / rows}[reduction]


def tb_rows(e) -> list[list[float]]:
    """(B, ...) -> B lists of floats (flatten from dim 1)."""
    return [list(map(float, np.asarray(r).ravel())) for r in e]


def tb_smooth_l1(a: float, b: float) -> float:
    x = abs(a - b)
    return 0.5 * x * x if x < 1.0 else x - 0.5


def tb_dot(u, v) -> float:
    return sum(a * b for a, b in zip(u, v))


def tb_normalized_distances(E):
    B = len(E)
    d = [[0.0] * B for _ in range(B)]
    for i in range(B):
        for j in range(B):
            if i != j:
                d[i][j] = math.sqrt(max(sum((a - b) ** 2 for a, b in zip(E[i], E[j])), 1e-12))
    positive = [v for row in d for v in row if v > 0]
    mu = sum(positive) / len(positive)
    return [[v / mu for v in row] for row in d]


def tb_relation_reduce(rows: list[float], reduction: str, terms_per_row: int):
    """Per-row relation losses reduced: "none" the list, "sum", "batchmean" / B, "mean" / (B terms)."""
    B, total = len(rows), sum(rows)
    return {"none": rows, "sum": total, "batchmean": total / B, "mean": total / (B * terms_per_row)}[reduction]


def tb_rkd_distance(s, t, reduction):
    ds, dt = tb_normalized_distances(tb_rows(s)), tb_normalized_distances(tb_rows(t))
    B = len(ds)
    rows = [sum(tb_smooth_l1(ds[i][j], dt[i][j]) for j in range(B)) for i in range(B)]
    return tb_relation_reduce(rows, reduction, B)


def tb_angles(E):
    B = len(E)

    def unit(i, j):
        v = [b - a for a, b in zip(E[i], E[j])]
        n = max(math.sqrt(sum(c * c for c in v)), 1e-12)
        return [c / n for c in v]

    return [[[tb_dot(unit(i, j), unit(i, k)) for k in range(B)] for j in range(B)] for i in range(B)]


def tb_rkd_angle(s, t, reduction):
    ps, pt = tb_angles(tb_rows(s)), tb_angles(tb_rows(t))
    B = len(ps)
    rows = [sum(tb_smooth_l1(ps[i][j][k], pt[i][j][k]) for j in range(B) for k in range(B)) for i in range(B)]
    return tb_relation_reduce(rows, reduction, B * B)


def tb_sp_gram(E):
    G = [[tb_dot(a, b) for b in E] for a in E]
    out = []
    for row in G:
        n = max(math.sqrt(sum(g * g for g in row)), 1e-12)
        out.append([g / n for g in row])
    return out


def tb_similarity_preserving(s, t, reduction):
    gs, gt = tb_sp_gram(tb_rows(s)), tb_sp_gram(tb_rows(t))
    B = len(gs)
    rows = [sum((gt[i][j] - gs[i][j]) ** 2 for j in range(B)) for i in range(B)]
    return tb_relation_reduce(rows, reduction, B)


# ---------------------------------------------------------------------------------------------
# softmax-KL (docs/design.md §2.1)
# ---------------------------------------------------------------------------------------------
def kl_case(s, t, T=1.0, beta=0.5, labels=None, ignore_index=-100, t2_scale=True):
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    return dict(s=s, t=t, T=T, beta=beta, labels=None if labels is None else np.asarray(labels, dtype=np.int64),
                ignore_index=ignore_index, t2_scale=t2_scale)


LOGIT = st.one_of(st.floats(-30, 30, allow_nan=False), st.sampled_from([1e4, -1e4]))


@st.composite
def kl_cases(draw):
    lead = draw(st.sampled_from([(), (1,), (2,), (3,), (4,), (2, 2)]))
    V = draw(st.integers(1, 6))
    shape = lead + (V,)
    s = draw(hnp.arrays(np.float64, shape, elements=LOGIT))
    t = draw(hnp.arrays(np.float64, shape, elements=LOGIT))
    mask = draw(st.sampled_from(["none", "shared", "independent"]))
    if mask != "none" and V > 1:
        # -inf entries, but every row keeps a finite logit (column 0 is never masked).
        ms = draw(hnp.arrays(np.bool_, shape))
        mt = ms if mask == "shared" else draw(hnp.arrays(np.bool_, shape))
        ms[..., 0] = mt[..., 0] = False
        s, t = np.where(ms, -INF, s), np.where(mt, -INF, t)
    ignore_index = draw(st.sampled_from([-100, 0, 2]))
    labels = None
    if draw(st.booleans()):
        labels = draw(hnp.arrays(np.int64, lead, elements=st.sampled_from([ignore_index, 0, 1, 3])))
    return kl_case(s, t, T=draw(st.sampled_from([0.3, 0.5, 1.0, 2.0, 4.0])), beta=draw(st.floats(0.01, 0.99)),
                   labels=labels, ignore_index=ignore_index, t2_scale=draw(st.booleans()))


def run_reference_kl(case, divergence, reduction, dtype=torch.float64):
    labels = None if case["labels"] is None else torch.as_tensor(case["labels"])
    return softmax_kl_div(t64(case["s"]).to(dtype), t64(case["t"]).to(dtype), temperature=case["T"],
                          divergence=divergence, beta=case["beta"], reduction=reduction, labels=labels,
                          ignore_index=case["ignore_index"], t2_scale=case["t2_scale"])


_R = [[0.5, -1.0, 2.0, 0.0], [3.0, 1.0, -2.0, 0.25], [-1.5, 0.0, 0.0, 4.0]]


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@SETTINGS
@given(case=kl_cases())
@example(case=kl_case([[1.0], [-3.0]], [[2.0], [5.0]], T=2.0))  # V = 1: every divergence is 0
@example(case=kl_case(_R, list(reversed(_R)), labels=[-100, -100, -100]))  # all rows ignored
@example(case=kl_case(_R, list(reversed(_R)), labels=[-100, 1, -100], T=3.0, t2_scale=False))
@example(case=kl_case([[0.0, -INF, 1.0, -INF], [2.0, -INF, -INF, -INF]],  # shared -inf masks
                      [[1.0, -INF, -1.0, -INF], [-5.0, -INF, -INF, -INF]], T=0.5))
@example(case=kl_case([[0.0, 1.0, 2.0]], [[0.0, -INF, 2.0]], beta=0.2))  # teacher-only mask
@example(case=kl_case([[0.0, -INF, 2.0]], [[0.0, 1.0, 2.0]], beta=0.8))  # student-only mask (forward = inf)
@example(case=kl_case([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], [[-1e4, 1e4, 0.0], [1e4, -1e4, 1e4]], T=0.3))
@example(case=kl_case([[1e4, -1e4]], [[1e4, -1e4]], T=1.0))  # identical extreme rows: loss 0
@example(case=kl_case(np.array([2.0, -1.0, 0.5]), np.array([0.0, 1.0, 1.0]), labels=np.array(1)))  # lead ()
def test_softmax_kl_matches_textbook(case, divergence, reduction):
    expected = tb_softmax_kl(case["s"], case["t"], case["T"], divergence, case["beta"], reduction,
                             case["labels"], case["ignore_index"], case["t2_scale"])
    got = run_reference_kl(case, divergence, reduction)
    assert got.dtype == torch.float64
    assert got.shape == (case["s"].shape[:-1] if reduction == "none" else ())
    torch.testing.assert_close(got, t64(expected), **F64)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softmax_kl_float32_matches_textbook(divergence):
    gen = torch.Generator().manual_seed(7)
    s, t = 4 * torch.randn(4, 6, generator=gen), 4 * torch.randn(4, 6, generator=gen)
    case = kl_case(s.double().numpy(), t.double().numpy(), T=2.0, beta=0.3, labels=[1, -100, 2, 0])
    for reduction in ("batchmean", "sum", "mean", "none"):
        expected = tb_softmax_kl(case["s"], case["t"], 2.0, divergence, 0.3, reduction, case["labels"], -100, True)
        got = run_reference_kl(case, divergence, reduction, dtype=torch.float32)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), t64(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_softmax_kl_gradcheck_t2(divergence, reduction):
    """float64 gradcheck to student and teacher (mutual learning), with T^2 scaling and an ignored row."""
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([0, -100, 4])

    def f(a, b):
        return softmax_kl_div(a, b, temperature=2.5, divergence=divergence, beta=0.3, reduction=reduction,
                              labels=labels, t2_scale=True)

    assert torch.autograd.gradcheck(f, (s, t))
    # the T^2 factor is really applied (gradcheck alone would accept any constant factor)
    unscaled = softmax_kl_div(s, t, 2.5, divergence, 0.3, reduction, labels, t2_scale=False)
    torch.testing.assert_close(f(s, t), 2.5**2 * unscaled)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softmax_kl_ignored_rows_zero_grad_even_if_nan(divergence):
    s = torch.tensor([[1.0, 2.0, 0.0], [math.nan, INF, -INF]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 3.0], [math.nan, 1.0, 2.0]], requires_grad=True)
    loss = softmax_kl_div(s, t, divergence=divergence, labels=torch.tensor([2, -100]))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.equal(s.grad[1], torch.zeros(3)) and torch.equal(t.grad[1], torch.zeros(3))
    assert torch.isfinite(s.grad).all() and s.grad[0].abs().sum() > 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softmax_kl_extreme_logits_float32_finite(divergence):
    """Underflowing probabilities (+-1e4 logits) give a finite loss and gradient in float32."""
    s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, 5.0]], requires_grad=True)
    loss = softmax_kl_div(s, t, temperature=0.5, divergence=divergence, reduction="sum")
    loss.backward()
    case = kl_case(s.detach().double().numpy(), t.detach().double().numpy(), T=0.5)
    expected = tb_softmax_kl(case["s"], case["t"], 0.5, divergence, 0.5, "sum", None, -100, True)
    assert math.isfinite(expected)
    torch.testing.assert_close(loss.double(), t64(expected), rtol=1e-5, atol=1e-3)
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_softmax_kl_shared_inf_mask_is_dropping_the_columns(divergence, dtype):
    """-inf in the same columns of student and teacher (a masked vocabulary) must act exactly like
    removing those columns: same loss, same gradient on the kept columns, zero (not NaN) on the
    masked ones, to student and teacher."""
    gen = torch.Generator().manual_seed(4)
    s0 = torch.randn(3, 5, dtype=dtype, generator=gen)
    t0 = torch.randn(3, 5, dtype=dtype, generator=gen)
    keep = torch.tensor([True, False, True, True, False])
    s = s0.masked_fill(~keep, -INF).requires_grad_()
    t = t0.masked_fill(~keep, -INF).requires_grad_()
    s_small, t_small = s0[:, keep].requires_grad_(), t0[:, keep].requires_grad_()
    loss = softmax_kl_div(s, t, temperature=1.5, divergence=divergence, beta=0.3)
    loss_small = softmax_kl_div(s_small, t_small, temperature=1.5, divergence=divergence, beta=0.3)
    loss.backward()
    loss_small.backward()
    torch.testing.assert_close(loss, loss_small)
    for full, small in ((s.grad, s_small.grad), (t.grad, t_small.grad)):
        assert torch.isfinite(full).all(), f"non-finite gradient with a shared -inf mask: {full}"
        torch.testing.assert_close(full[:, keep], small)
        assert torch.equal(full[:, ~keep], torch.zeros_like(full[:, ~keep]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_softmax_kl_dtypes(dtype):
    s = torch.randn(3, 5).to(dtype).requires_grad_()
    t = torch.randn(3, 5).to(dtype).requires_grad_()
    loss = softmax_kl_div(s, t, temperature=2.0, divergence="jsd")
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert s.grad.dtype == dtype and t.grad.dtype == dtype


# ---------------------------------------------------------------------------------------------
# projected MSE (docs/design.md §2.2)
# ---------------------------------------------------------------------------------------------
FEATURE = st.floats(-5, 5, allow_nan=False)


@st.composite
def feature_cases(draw):
    others = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    Ds, Dt = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    pos = draw(st.integers(0, len(others)))
    feature_dim = draw(st.sampled_from([pos, pos - len(others) - 1]))  # positive or negative spelling
    xs, ts = list(others), list(others)
    xs.insert(pos, Ds)
    ts.insert(pos, Dt)
    x = draw(hnp.arrays(np.float64, tuple(xs), elements=FEATURE))
    t = draw(hnp.arrays(np.float64, tuple(ts), elements=FEATURE))
    W = draw(hnp.arrays(np.float64, (Dt, Ds), elements=FEATURE))
    b = draw(st.none() | hnp.arrays(np.float64, (Dt,), elements=FEATURE))
    return dict(x=x, t=t, W=W, b=b, feature_dim=feature_dim)


def feature_case(x, t, W, b=None, feature_dim=-1):
    return dict(x=np.asarray(x, dtype=np.float64), t=np.asarray(t, dtype=np.float64),
                W=np.asarray(W, dtype=np.float64), b=None if b is None else np.asarray(b, dtype=np.float64),
                feature_dim=feature_dim)


_NCHW = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2) / 7 - 1


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@SETTINGS
@given(case=feature_cases())
@example(case=feature_case(_NCHW, _NCHW[:, :2] * 2, [[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]], [0.5, -1.0], 1))
@example(case=feature_case([[1.0, 2.0]], [[3.0]], [[1.0, 1.0]], None, -1))  # exact fit: loss 0
@example(case=feature_case([1.0, -2.0, 3.0], [0.5, 0.25], np.ones((2, 3)), [1.0, 2.0], 0))  # a single vector
def test_projected_mse_matches_textbook(case, reduction):
    expected = tb_projected_mse(case["x"], case["t"], case["W"], case["b"], case["feature_dim"], reduction)
    got = projected_mse(t64(case["x"]), t64(case["t"]), t64(case["W"]), None if case["b"] is None else t64(case["b"]),
                        feature_dim=case["feature_dim"], reduction=reduction)
    assert got.dtype == torch.float64 and got.shape == np.shape(expected)
    torch.testing.assert_close(got, t64(expected), **F64)


def test_projected_mse_is_conv1x1_mse():
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 5, 3, 4, generator=gen), torch.randn(2, 6, 3, 4, generator=gen)
    W, b = torch.randn(6, 5, generator=gen), torch.randn(6, generator=gen)
    y = torch.nn.functional.conv2d(x, W[:, :, None, None], b)
    torch.testing.assert_close(projected_mse(x, t, W, b, feature_dim=1), torch.nn.functional.mse_loss(y, t))
    torch.testing.assert_close(projected_mse(x, t, W, b, feature_dim=1, reduction="batchmean"),
                               (y - t).square().sum() / (2 * 3 * 4))


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@pytest.mark.parametrize("feature_dim,bias", [(1, True), (-1, False), (-1, True)])
def test_projected_mse_gradcheck(reduction, feature_dim, bias):
    gen = torch.Generator().manual_seed(2)
    shape_x, shape_t = ((2, 3, 2, 2), (2, 4, 2, 2)) if feature_dim == 1 else ((3, 2, 3), (3, 2, 4))
    x = torch.randn(shape_x, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(shape_t, dtype=torch.float64, generator=gen, requires_grad=True)
    W = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    inputs = [x, t, W]
    if bias:
        inputs.append(torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True))

    def f(x, t, W, b=None):
        return projected_mse(x, t, W, b, feature_dim=feature_dim, reduction=reduction)

    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_projected_mse_dtypes(dtype):
    x = torch.randn(4, 3).to(dtype).requires_grad_()
    t = torch.randn(4, 2).to(dtype)
    W = torch.randn(2, 3).to(dtype).requires_grad_()
    b = torch.randn(2).to(dtype).requires_grad_()
    loss = projected_mse(x, t, W, b)
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert x.grad.dtype == W.grad.dtype == b.grad.dtype == dtype
    expected = tb_projected_mse(x.detach().double().numpy(), t.double().numpy(), W.detach().double().numpy(),
                                b.detach().double().numpy(), -1, "mean")
    torch.testing.assert_close(loss.double(), t64(expected), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# relation losses (docs/design.md §2.3)
# ---------------------------------------------------------------------------------------------
RELATION_WORDS = ("mean", "sum", "batchmean", "none")
RELATIONS = {
    "rkd_distance": (rkd_distance, tb_rkd_distance, RELATION_WORDS),
    "rkd_angle": (rkd_angle, tb_rkd_angle, RELATION_WORDS),
    "similarity_preserving": (similarity_preserving, tb_similarity_preserving, RELATION_WORDS),
}
RELATION_PARAMS = [(name, red) for name, (_, _, reds) in RELATIONS.items() for red in reds]
EMBED = st.floats(-4, 4, allow_nan=False)
TAILS = [(), (1,), (2,), (3,), (4,), (2, 2), (1, 3)]


@st.composite
def embeddings(draw, B):
    e = draw(hnp.arrays(np.float64, (B,) + draw(st.sampled_from(TAILS)), elements=EMBED))
    if draw(st.booleans()):  # duplicate rows: row i becomes a copy of an earlier row
        for i, src in enumerate(draw(st.lists(st.integers(0, B - 1), min_size=B, max_size=B))):
            if src < i:
                e[i] = e[src]
    return e


@st.composite
def relation_cases(draw):
    B = draw(st.integers(2, 5))
    return dict(s=draw(embeddings(B)), t=draw(embeddings(B)))


def rel_case(s, t):
    return dict(s=np.asarray(s, dtype=np.float64), t=np.asarray(t, dtype=np.float64))


_E5 = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 0.0], [-2.0, 0.5, 1.5], [0.0, 0.0, 3.0], [1.5, -0.5, -1.0]])
_T5 = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0], [2.0, 1.0], [0.5, 0.5]])


@pytest.mark.parametrize("name,reduction", RELATION_PARAMS)
@SETTINGS
@given(case=relation_cases())
@example(case=rel_case([[1.0, 2.0], [3.0, -1.0]], [[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]))  # B = 2
@example(case=rel_case(_E5[[0, 1, 0, 3, 1]], _T5))  # duplicate student embeddings
@example(case=rel_case(_E5, np.tile(_T5[:1], (5, 1))))  # all-identical teacher rows
@example(case=rel_case(np.tile(_E5[:1], (5, 1)), np.tile(_T5[2:3], (5, 1))))  # all identical, both sides
@example(case=rel_case(np.zeros((4, 3)), _T5[:4]))  # all-zero student (SP: zero Gram matrix)
@example(case=rel_case(_E5.reshape(5, 3, 1), _T5.reshape(5, 1, 2)))  # flattened from dim 1, Ds != Dt
def test_relation_matches_textbook(name, reduction, case):
    fn, textbook, _ = RELATIONS[name]
    expected = textbook(case["s"], case["t"], reduction)
    got = fn(t64(case["s"]), t64(case["t"]), reduction=reduction)
    assert got.dtype == torch.float64 and got.shape == ((len(case["s"]),) if reduction == "none" else ())
    torch.testing.assert_close(got, t64(expected), **F64)


def test_relation_identical_rows_are_finite_and_as_documented():
    """All-identical rows: every off-diagonal distance is the clamp sqrt(1e-12), mu equals it, d/mu = 1."""
    same = torch.ones(4, 3, dtype=torch.float64)
    spread = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [3.0, 4.0]], dtype=torch.float64)
    # d/mu of `spread`: distances 3,4,5 each twice per row pair -> mu = 4; off-diagonal 1 vs d/4
    d = torch.cdist(spread, spread) / 4
    off = ~torch.eye(4, dtype=torch.bool)
    expected = torch.where(off, torch.nn.functional.smooth_l1_loss(d, torch.ones(4, 4), reduction="none"), 0.0).mean()
    torch.testing.assert_close(rkd_distance(spread, same), expected)
    for fn in (rkd_distance, rkd_angle, similarity_preserving):
        assert torch.isfinite(fn(same, same)) and fn(same, same) == 0


@pytest.mark.parametrize("name", list(RELATIONS))
@pytest.mark.parametrize("seed", [0, 1])
def test_relation_float32_matches_textbook(name, seed):
    fn, textbook, reductions = RELATIONS[name]
    gen = torch.Generator().manual_seed(seed)
    s, t = torch.randn(5, 2, 2, generator=gen), 3 * torch.randn(5, 3, generator=gen) + 1
    for reduction in reductions:
        got = fn(s, t, reduction=reduction)
        assert got.dtype == torch.float32
        expected = textbook(s.double().numpy(), t.double().numpy(), reduction)
        torch.testing.assert_close(got.double(), t64(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(RELATIONS))
@pytest.mark.parametrize("shape_s,shape_t", [((4, 3), (4, 5)), ((3, 2, 2), (3, 2)), ((2, 3), (2, 3))])
def test_relation_gradcheck(name, shape_s, shape_t):
    """float64 gradcheck to the student; finite differences also move the student's mu."""
    fn, _, reductions = RELATIONS[name]
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(shape_s, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(shape_t, dtype=torch.float64, generator=gen)
    for reduction in reductions:
        assert torch.autograd.gradcheck(lambda a: fn(a, t, reduction=reduction), (s,))


@pytest.mark.parametrize("name", list(RELATIONS))
def test_relation_teacher_gets_no_gradient(name):
    fn = RELATIONS[name][0]
    gen = torch.Generator().manual_seed(6)
    s = torch.randn(4, 3, generator=gen, requires_grad=True)
    t = torch.randn(4, 2, 2, generator=gen, requires_grad=True)
    loss = fn(s, t)
    assert loss.requires_grad
    (grad_t,) = torch.autograd.grad(loss, t, retain_graph=True, allow_unused=True)
    assert grad_t is None
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(RELATIONS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_relation_dtypes_and_duplicate_rows_grad_finite(name, dtype):
    fn = RELATIONS[name][0]
    s = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]).to(dtype).requires_grad_()
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]).to(dtype)
    loss = fn(s, t)
    loss.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert s.grad.dtype == dtype
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", list(RELATIONS))
def test_relation_scale_invariance(name):
    """All three compare scale-free relations: scaling the student's embeddings changes nothing."""
    fn = RELATIONS[name][0]
    gen = torch.Generator().manual_seed(8)
    s, t = torch.randn(5, 3, dtype=torch.float64, generator=gen), torch.randn(5, 4, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(fn(7.5 * s, t), fn(s, t))
    assert fn(s, t) > 0
