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
from kdkernels.distributed import vocab_parallel_softmax_kl_div

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


SCENARIOS = {"equivalence": equivalence, "bad_input": bad_input,
             "equivalence_cuda": lambda rank, world: equivalence(rank, world, "cuda")}


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
