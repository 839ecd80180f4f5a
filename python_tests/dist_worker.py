"""What each process of python_tests/test_distributed.py runs (gloo on 127.0.0.1).

``run(rank, world, port, scenarios, results)`` joins the group (60 s timeout on every collective),
runs the named scenarios and puts ("ok", rank, detail) or ("fail", rank, traceback) on ``results``;
the process group is destroyed whatever happens.
"""
from __future__ import annotations

import datetime
import itertools
import math
import traceback

import torch
import torch.distributed as dist

import kdkernels
from kdkernels import functional
from kdkernels.distributed import vocab_parallel_fused_linear_softmax_kl_div, vocab_parallel_softmax_kl_div

ROWS, VOCAB = 5, 17


def slices(world: int) -> list[tuple[int, int]]:
    """Uneven contiguous vocabulary slices (as Megatron gives for V not divisible by the world size)."""
    cuts = {2: [0, 7, VOCAB], 3: [0, 4, 11, VOCAB]}[world]
    return list(zip(cuts[:-1], cuts[1:]))


def _full_inputs(seed: int, dtype=torch.float64, masked: bool = False):
    gen = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    t = 3 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    if masked:  # masked vocabulary in both; in row 1 the last 6 entries (world 3: a whole slice, no mass)
        s[:, 3] = -math.inf
        t[:, 3] = -math.inf
        s[1, VOCAB - 6:] = -math.inf
        t[1, VOCAB - 6:] = -math.inf
    return s.to(dtype), t.to(dtype)


def equivalence(rank: int, world: int, device: str = "cpu") -> str:
    """The one-process loss and gradient slices; ``device="cuda"``: CUDA tensors over gloo (one GPU
    shared by the ranks: NCCL needs one GPU per rank), the cuda and triton backends."""
    lo, hi = slices(world)[rank]
    dev = torch.device(device)
    fused = ("cpu", "triton") if dev.type == "cpu" else ("cuda", "triton")
    backends = ["torch"] + [b for b in fused if b in kdkernels.backends.implemented_backends("softmax_kl_div", dev)]
    checked = 0
    configs = itertools.product(backends, ("forward", "reverse", "jsd"), ("batchmean", "sum", "mean", "none"))
    for i, (backend, divergence, reduction) in enumerate(configs):
        s_full, t_full = _full_inputs(i, masked=i % 5 == 0)
        labels = torch.tensor([1, -100, 3, 0, -100]) if i % 2 else None
        teacher_grad = i % 3 == 0
        kw = dict(temperature=1.0 + (i % 3) * 0.75, divergence=divergence, beta=0.3, reduction=reduction,
                  labels=labels, t2_scale=i % 4 != 1)
        s_ref = s_full.clone().requires_grad_(True)
        t_ref = t_full.clone().requires_grad_(teacher_grad)
        ref = functional.softmax_kl_div(s_ref, t_ref, backend="torch", **kw)
        s = s_full[:, lo:hi].to(dev).requires_grad_(True)
        t = t_full[:, lo:hi].to(dev).requires_grad_(teacher_grad)
        if labels is not None:
            kw["labels"] = labels.to(dev)
        out = vocab_parallel_softmax_kl_div(s, t, backend=backend, **kw).cpu()
        what = f"{backend} {divergence} {reduction} config {i}"
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"loss, {what}: {m}")
        upstream = torch.rand(ref.shape, generator=torch.Generator().manual_seed(100 + i), dtype=ref.dtype) + 0.5
        wanted = [s_ref] + ([t_ref] if teacher_grad else [])
        got = [s] + ([t] if teacher_grad else [])
        g_ref = torch.autograd.grad(ref, wanted, upstream)
        g = torch.autograd.grad(out, got, upstream)
        for name, a, b in zip(("student", "teacher"), g, g_ref):
            torch.testing.assert_close(a.cpu(), b[:, lo:hi], rtol=1e-9, atol=1e-11, equal_nan=True,
                                       msg=lambda m: f"{name} gradient, {what}: {m}")
        checked += 1
    # float32 through the fused backend: fp32 tolerances against the float64 one-process loss
    s_full, t_full = _full_inputs(99)
    s = s_full[:, lo:hi].float().to(dev).requires_grad_(True)
    out = vocab_parallel_softmax_kl_div(s, t_full[:, lo:hi].float().to(dev), temperature=2.0, divergence="jsd",
                                        backend=backends[-1]).cpu()
    s_ref = s_full.clone().requires_grad_(True)
    ref = functional.softmax_kl_div(s_ref, t_full, temperature=2.0, divergence="jsd", backend="torch")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(out, s)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    torch.testing.assert_close(g.double().cpu(), g_ref[:, lo:hi], rtol=1e-4, atol=1e-6)
    return f"{checked + 1} configurations"


def _expect(exc_type, match: str, fn) -> None:
    try:
        fn()
    except exc_type as e:
        assert match in str(e), f"{exc_type.__name__} without {match!r}: {e}"
        return
    raise AssertionError(f"no {exc_type.__name__} ({match!r}) raised")


def bad_input(rank: int, world: int) -> str:
    lo, hi = slices(world)[rank]
    s_full, t_full = _full_inputs(0)
    # a different number of rows on one rank: every rank raises, none waits forever
    rows = ROWS - 1 if rank == world - 1 else ROWS
    _expect(ValueError, "same leading shape", lambda: vocab_parallel_softmax_kl_div(
        s_full[:rows, lo:hi], t_full[:rows, lo:hi]))
    # a bad tensor on rank 1 only: its own TypeError there, the same type naming rank 1 elsewhere
    s = s_full[:, lo:hi].to(torch.int64) if rank == 1 else s_full[:, lo:hi]
    _expect(TypeError, "student_logits" if rank == 1 else "rank 1 of the group rejected",
            lambda: vocab_parallel_softmax_kl_div(s, t_full[:, lo:hi]))
    # options that differ between ranks
    _expect(ValueError, "same options", lambda: vocab_parallel_softmax_kl_div(
        s_full[:, lo:hi], t_full[:, lo:hi], temperature=1.0 + rank))
    # a group this rank is not in (every rank creates it, as new_group requires)
    only_first = dist.new_group([0])
    if rank == 0:
        out = vocab_parallel_softmax_kl_div(s_full, t_full, group=only_first)  # a group of one: the local loss
        torch.testing.assert_close(out, functional.softmax_kl_div(s_full, t_full, backend="torch"))
    else:
        _expect(ValueError, "not in `group`", lambda: vocab_parallel_softmax_kl_div(
            s_full[:, lo:hi], t_full[:, lo:hi], group=only_first))
    # the group still works afterwards
    out = vocab_parallel_softmax_kl_div(s_full[:, lo:hi], t_full[:, lo:hi])
    torch.testing.assert_close(out, functional.softmax_kl_div(s_full, t_full, backend="torch"), rtol=1e-10, atol=1e-12)
    return "errors on every rank"


# ---- vocab-parallel fused linear + softmax-KL ---------------------------------------------------
HIDDEN, TEACHER_HIDDEN = 4, 6


def _linear_inputs(seed: int, dtype=torch.float64):
    """Full (unsharded) inputs: hidden states, head, bias, teacher logits, teacher hidden + head + bias."""
    gen = torch.Generator().manual_seed(seed)
    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
    return dict(h=rand(ROWS, HIDDEN), w=rand(VOCAB, HIDDEN, scale=1.5), b=rand(VOCAB), z_t=rand(ROWS, VOCAB, scale=3.0),
                h_t=rand(ROWS, TEACHER_HIDDEN), w_t=rand(VOCAB, TEACHER_HIDDEN, scale=1.5), b_t=rand(VOCAB))


def linear_equivalence(rank: int, world: int, device: str = "cpu") -> str:
    """Against the one-process fused_linear_softmax_kl_div of the whole head: every divergence,
    reduction and backend, bias or not, teacher as logits or as hidden + head (+ bias), labels,
    chunks of 1, 2 and auto rows; the hidden states' full gradient and each rank's weight/bias slices."""
    lo, hi = slices(world)[rank]
    dev = torch.device(device)
    fused = ("cpu", "triton") if dev.type == "cpu" else ("cuda", "triton")
    backends = ["torch"] + [b for b in fused
                            if b in kdkernels.backends.implemented_backends("fused_linear_softmax_kl_div", dev)]
    checked = 0
    configs = itertools.product(backends, ("forward", "reverse", "jsd"), ("batchmean", "sum", "mean", "none"))
    for i, (backend, divergence, reduction) in enumerate(configs):
        x = _linear_inputs(i)
        with_bias, teacher_as_logits = i % 2 == 0, i % 3 != 0
        labels = torch.tensor([1, -100, 3, 0, -100]) if i % 4 in (1, 2) else None
        kw = dict(temperature=1.0 + (i % 3) * 0.75, divergence=divergence, beta=0.3, reduction=reduction,
                  labels=labels, t2_scale=i % 4 != 1)
        full_teacher = (dict(teacher_logits=x["z_t"]) if teacher_as_logits else
                        dict(teacher_hidden=x["h_t"], teacher_weight=x["w_t"], teacher_bias=x["b_t"] if i % 5 else None))
        h_ref, w_ref = x["h"].clone().requires_grad_(True), x["w"].clone().requires_grad_(True)
        b_ref = x["b"].clone().requires_grad_(True) if with_bias else None
        ref = functional.fused_linear_softmax_kl_div(h_ref, w_ref, b_ref, backend="torch", **full_teacher, **kw)
        local_teacher = {k: (None if t is None else (t if k == "teacher_hidden" else
                                                     (t[:, lo:hi] if k == "teacher_logits" else t[lo:hi])).to(dev))
                         for k, t in full_teacher.items()}
        h = x["h"].to(dev).requires_grad_(True)
        w = x["w"][lo:hi].to(dev).requires_grad_(True)
        b = x["b"][lo:hi].to(dev).requires_grad_(True) if with_bias else None
        if labels is not None:
            kw["labels"] = labels.to(dev)
        out = vocab_parallel_fused_linear_softmax_kl_div(h, w, b, backend=backend, chunk_size=(1, 2, None)[i % 3],
                                                         **local_teacher, **kw).cpu()
        what = f"{backend} {divergence} {reduction} config {i}"
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"loss, {what}: {m}")
        upstream = torch.rand(ref.shape, generator=torch.Generator().manual_seed(100 + i), dtype=ref.dtype) + 0.5
        wanted = [h_ref, w_ref] + ([b_ref] if with_bias else [])
        got = [h, w] + ([b] if with_bias else [])
        g_ref = torch.autograd.grad(ref, wanted, upstream)
        if i % 7 == 0:  # a kept graph: the first backward must leave the saved gradients intact
            torch.autograd.grad(out, got, upstream, retain_graph=True)
        g = torch.autograd.grad(out, got, upstream)
        for name, a, r in zip(("hidden", "weight", "bias"), g, (g_ref[0],) + tuple(t[lo:hi] for t in g_ref[1:])):
            torch.testing.assert_close(a.cpu(), r, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name} gradient, {what}: {m}")
        checked += 1
    # float32 and bfloat16 heads through the fused backend, against the float64 one-process loss
    x = _linear_inputs(99)
    ref_h = x["h"].clone().requires_grad_(True)
    ref = functional.fused_linear_softmax_kl_div(ref_h, x["w"], x["b"], teacher_logits=x["z_t"], temperature=2.0,
                                                 divergence="jsd", backend="torch")
    (g_ref,) = torch.autograd.grad(ref, ref_h)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        h = x["h"].to(dtype).to(dev).requires_grad_(True)
        out = vocab_parallel_fused_linear_softmax_kl_div(
            h, x["w"][lo:hi].to(dtype).to(dev), x["b"][lo:hi].to(dtype).to(dev),
            teacher_logits=x["z_t"][:, lo:hi].to(dtype).to(dev), temperature=2.0, divergence="jsd",
            backend=backends[-1])
        torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
        (g,) = torch.autograd.grad(out, h)
        torch.testing.assert_close(g.double().cpu(), g_ref, rtol=10 * tol, atol=tol)
        checked += 1
    return f"{checked} configurations"


def linear_bad_input(rank: int, world: int) -> str:
    lo, hi = slices(world)[rank]
    x = _linear_inputs(0)
    h, w, z_t = x["h"], x["w"][lo:hi], x["z_t"][:, lo:hi]
    rows = ROWS - 1 if rank == world - 1 else ROWS
    _expect(ValueError, "same leading shape", lambda: vocab_parallel_fused_linear_softmax_kl_div(
        h[:rows], w, teacher_logits=z_t[:rows]))
    bad_w = w.to(torch.int64) if rank == 1 else w
    _expect(TypeError, "student_weight" if rank == 1 else "rank 1 of the group rejected",
            lambda: vocab_parallel_fused_linear_softmax_kl_div(h, bad_w, teacher_logits=z_t))
    _expect(ValueError, "same options", lambda: vocab_parallel_fused_linear_softmax_kl_div(
        h, w, teacher_logits=z_t, chunk_size=1 + rank))
    bias = x["b"][lo:hi] if rank == 0 else None
    _expect(ValueError, "optional tensors given", lambda: vocab_parallel_fused_linear_softmax_kl_div(
        h, w, bias, teacher_logits=z_t))
    out = vocab_parallel_fused_linear_softmax_kl_div(h, w, teacher_logits=z_t)  # the group still works
    torch.testing.assert_close(out, functional.fused_linear_softmax_kl_div(h, x["w"], teacher_logits=x["z_t"],
                                                                           backend="torch"), rtol=1e-10, atol=1e-12)
    return "errors on every rank"


# ---- global-batch relation losses (python_tests/test_distributed_global.py) ----------------------
GLOBAL_LOSSES = (("rkd_distance", {}), ("rkd_angle", {}), ("rkd", {}), ("rkd", {"angle_weight": 0.0}),
                 ("rkd", {"distance_weight": 0.0, "angle_weight": 1.5}), ("similarity_preserving", {}))


def global_counts(world: int) -> list[int]:
    """Uneven rows per rank: a rank with 1 row (world 2, 3) and an empty rank in the middle (world 3)."""
    return {2: [5, 1], 3: [1, 0, 5]}[world]


def _global_inputs(seed: int, student_shape: tuple, teacher_shape: tuple, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(student_shape, generator=gen, dtype=torch.float64)
    t = torch.randn(teacher_shape, generator=gen, dtype=torch.float64)
    return s.to(dtype), t.to(dtype)


def _global_fn(loss: str):
    from kdkernels import distributed

    return getattr(distributed, f"global_{loss}")


def global_equivalence(rank: int, world: int, device: str = "cpu") -> str:
    """Every loss x reduction x backend (rkd with a zero weight too): the loss against the one-process
    loss (``functional``, backend "torch") of the concatenated batch, the gradient against its slice."""
    counts = global_counts(world)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    batch = sum(counts)
    dev = torch.device(device)
    checked = 0
    configs = itertools.product(GLOBAL_LOSSES, ("mean", "sum", "batchmean", "none"), ("torch", "cpu", "cuda", "triton"))
    for i, ((loss, weights), reduction, backend) in enumerate(configs):
        if backend not in kdkernels.backends.implemented_backends(loss, dev):
            continue
        # student and teacher of different feature sizes; one (B, C, H, W) student and (B, C, L) teacher
        if i == 5:
            s_shape, t_shape = (batch, 2, 1, 2), (batch, 3, 2)
        else:
            s_shape, t_shape = (batch, 3 + i % 4), (batch, 6 - i % 3)
        s_full, t_full = _global_inputs(i, s_shape, t_shape)
        s_ref = s_full.clone().requires_grad_(True)
        ref = getattr(functional, loss)(s_ref, t_full, reduction=reduction, backend="torch", **weights)
        s = s_full[lo:hi].to(dev).requires_grad_(True)
        out = _global_fn(loss)(s, t_full[lo:hi].to(dev), reduction=reduction, backend=backend, **weights)
        what = f"{loss} {weights} {reduction} {backend} config {i}"
        assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, wanted {tuple(ref.shape)}"
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"loss, {what}: {m}")
        # a non-uniform upstream for "none", the same on every rank
        upstream = torch.rand(ref.shape, generator=torch.Generator().manual_seed(100 + i), dtype=ref.dtype) + 0.5
        (g_ref,) = torch.autograd.grad(ref, s_ref, upstream)
        (g,) = torch.autograd.grad(out, s, upstream.to(dev))
        assert g.shape == s.shape, f"{what}: gradient shape {tuple(g.shape)}"
        torch.testing.assert_close(g.cpu(), g_ref[lo:hi], rtol=1e-9, atol=1e-11,
                                   msg=lambda m: f"student gradient, {what}: {m}")
        checked += 1
    # float32 through the last fused backend: fp32 tolerances against the float64 one-process loss
    fused = [b for b in kdkernels.backends.implemented_backends("rkd", dev) if b != "torch"]
    s_full, t_full = _global_inputs(99, (batch, 5), (batch, 4))
    s = s_full[lo:hi].float().to(dev).requires_grad_(True)
    out = _global_fn("rkd")(s, t_full[lo:hi].float().to(dev), backend=fused[-1])
    s_ref = s_full.clone().requires_grad_(True)
    ref = functional.rkd(s_ref, t_full, backend="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(out, s)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    torch.testing.assert_close(g.double().cpu(), g_ref[lo:hi], rtol=1e-4, atol=1e-6)
    return f"{checked + 1} configurations"


def global_bad_input(rank: int, world: int) -> str:
    from kdkernels.distributed import global_rkd, global_rkd_distance, global_similarity_preserving

    counts = global_counts(world)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    s_full, t_full = _global_inputs(0, (sum(counts), 4), (sum(counts), 3))
    s, t = s_full[lo:hi], t_full[lo:hi]
    last = world - 1
    # student and teacher rows differ on the last rank: its own error there, naming it elsewhere
    t_bad = t_full[lo:hi - 1] if rank == last else t
    _expect(ValueError, "teacher must have the same batch size" if rank == last else f"rank {last} of the group rejected",
            lambda: global_rkd_distance(s, t_bad))
    # a feature size (student), a teacher feature shape, a dtype, an option that differ between ranks
    _expect(ValueError, "same student feature shape", lambda: global_rkd_distance(
        torch.randn(hi - lo, 4 + rank, dtype=torch.float64), t))
    _expect(ValueError, "same teacher feature shape", lambda: global_similarity_preserving(
        s, t.reshape(hi - lo, 3, 1) if rank == 1 else t))
    _expect(ValueError, "same (student, teacher) dtypes", lambda: global_rkd_distance(
        s.float() if rank == 1 else s, t))
    _expect(ValueError, "same options", lambda: global_rkd_distance(s, t, reduction="sum" if rank == 1 else "mean"))
    _expect(ValueError, "same options", lambda: global_rkd(s, t, angle_weight=2.0 + rank))
    _expect(ValueError, "same options", lambda: global_rkd(s, t, backend="cpu" if rank == 0 else "torch"))
    # a bad tensor / option on rank 1 only: its own error there, the same type naming rank 1 elsewhere
    _expect(TypeError, "student" if rank == 1 else "rank 1 of the group rejected",
            lambda: global_rkd_distance(s.to(torch.int64) if rank == 1 else s, t))
    _expect(ValueError, "reduction" if rank == 1 else "rank 1 of the group rejected",
            lambda: global_rkd_distance(s, t, reduction="bogus" if rank == 1 else "mean"))
    _expect(ValueError, "angle_weight" if rank == 1 else "rank 1 of the group rejected",
            lambda: global_rkd(s, t, angle_weight=-1.0 if rank == 1 else 2.0))
    _expect(ValueError, "at least 2 dimension" if rank == 1 else "rank 1 of the group rejected",
            lambda: global_rkd_distance(s[:, 0] if rank == 1 else s, t))
    # a global batch of fewer than 2 samples, raised the same on every rank
    few = [1] + [0] * (world - 1)
    _expect(ValueError, "global batch must have at least 2 samples", lambda: global_rkd_distance(
        s_full[:few[rank]], t_full[:few[rank]]))
    # a group this rank is not in (every rank creates it, as new_group requires)
    only_first = dist.new_group([0])
    if rank == 0:
        out = global_rkd_distance(s_full, t_full, group=only_first)  # a group of one: the local loss
        torch.testing.assert_close(out, functional.rkd_distance(s_full, t_full))
    else:
        _expect(ValueError, "not in `group`", lambda: global_rkd_distance(s, t, group=only_first))
    # the group still works afterwards
    out = global_rkd_distance(s, t)
    torch.testing.assert_close(out, functional.rkd_distance(s_full, t_full, backend="torch"), rtol=1e-10, atol=1e-12)
    return "errors on every rank"


def global_teacher_grad(rank: int, world: int) -> str:
    """A teacher that requires grad: the relation losses' UserWarning, and no gradient for it; a
    warning turned into an error on one rank raises on every rank."""
    import warnings

    from kdkernels.distributed import global_rkd_angle, global_similarity_preserving

    counts = global_counts(world)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    s_full, t_full = _global_inputs(1, (sum(counts), 4), (sum(counts), 3))
    s = s_full[lo:hi].clone().requires_grad_(True)
    t = t_full[lo:hi].clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = global_similarity_preserving(s, t)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("global_similarity_preserving: the teacher gets no gradient" in m for m in messages), messages
    assert all(w.filename == __file__ for w in caught), [w.filename for w in caught]  # the caller's line
    out.backward()
    assert t.grad is None, "the teacher got a gradient"
    assert s.grad is not None and s.grad.shape == s.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        global_rkd_angle(s, t.detach()).backward()  # a detached teacher: no warning
    # warnings are errors on rank 1 only: every rank raises, none waits
    with warnings.catch_warnings():
        warnings.simplefilter("error" if rank == 1 else "ignore")
        exc_type = UserWarning if rank == 1 else RuntimeError
        _expect(exc_type, "teacher gets no gradient", lambda: global_rkd_angle(s, t))
    return "teacher warned, no gradient"


SCENARIOS = {"equivalence": equivalence, "bad_input": bad_input,
             "equivalence_cuda": lambda rank, world: equivalence(rank, world, "cuda"),
             # vocab-parallel fused linear
             "linear_equivalence": linear_equivalence, "linear_bad_input": linear_bad_input,
             "linear_equivalence_cuda": lambda rank, world: linear_equivalence(rank, world, "cuda"),
             # global-batch relation losses
             "global_equivalence": global_equivalence, "global_bad_input": global_bad_input,
             "global_teacher_grad": global_teacher_grad,
             "global_equivalence_cuda": lambda rank, world: global_equivalence(rank, world, "cuda")}


def run(rank: int, world: int, port: int, scenarios: list[str], results) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.set_num_threads(1)
        details = [SCENARIOS[name](rank, world) for name in scenarios]
        results.put(("ok", rank, "; ".join(details)))
    except BaseException:  # noqa: BLE001 -- every failure goes back to the test
        results.put(("fail", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
