"""The two floors a step is compared with (docs/design.md §5), both measured in the same run.

**Copy floor** (every loss). A full step has to read every input once and write every gradient once;
nothing can do it faster than a plain tensor copy moves the same bytes. ``floor = bytes that must
move / copy bandwidth``, with the bandwidth of ``dst.copy_(src)`` over a large buffer (a copy reads
``n`` bytes and writes ``n``: bandwidth = ``2 n / time``). ``x_copy_floor = step time / floor`` is >= 1;
tight for the memory-bound losses (softmax-KL), a loose bound for the GEMM-bound ones.

**GEMM floor** (GEMM-bound losses: projected MSE, RKD distance, SP). The matrix products of a step's
useful FLOPs (``cases.LossSpec.gemms``: projected MSE's forward and two backward products; the
relation losses' two Gram matrices and the student's B x B x Ds gradient product), timed as plain
``torch.mm(a, b, out=c)`` on the case's device and dtype (a 4-tuple (b, m, k, n) is a batched product,
timed as ``torch.bmm``: FSP's per-sample Gram and gradient products): ``x_gemm_floor = step time / that time``.
A kernel that uses the Gram's symmetry (half its products) can go below 1. RKD angle and ``rkd``
have none: their work is B^3 element-wise triples, not GEMM FLOPs.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from kdkernels.bench.cases import Inputs
from kdkernels.bench.timing import clock_for, synchronize


@dataclass
class CopyBandwidth:
    bytes_per_s: float
    buffer_bytes: int
    copy_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return {"GBps": self.bytes_per_s / 1e9, "buffer_MiB": self.buffer_bytes / 2**20,
                "copy_ms": self.copy_ms, "repeats": self.repeats}


def copy_bandwidth(device: torch.device, buffer_mib: int = 256, repeats: int = 10) -> CopyBandwidth:
    """Median bandwidth of ``dst.copy_(src)`` on two fp32 buffers of ``buffer_mib`` MiB each."""
    n = buffer_mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # written once: its pages exist before timing
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    clock = clock_for(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        a = clock.mark()
        dst.copy_(src)
        b = clock.mark()
        clock.finish()
        times.append(clock.ms(a, b))
    ms = statistics.median(times)
    nbytes = n * 4
    del src, dst
    return CopyBandwidth(2 * nbytes / (ms * 1e-3), nbytes, ms, repeats)


def must_move_bytes(inputs: Inputs) -> int:
    """Read every input tensor once + write the gradient of every input that requires grad once."""
    return inputs.nbytes + inputs.grad_nbytes


def floor_ms(nbytes: int, bw: CopyBandwidth) -> float:
    return nbytes / bw.bytes_per_s * 1e3


@dataclass
class GemmFloor:
    ms: float  # median time of one pass over every product
    flops: float
    shapes: list  # (m, k, n) of each product
    dtype: str
    repeats: int

    def as_dict(self) -> dict:
        return {"ms": self.ms, "GFLOP": self.flops / 1e9, "TFLOPs": self.flops / (self.ms * 1e-3) / 1e12,
                "shapes": [list(s) for s in self.shapes], "dtype": self.dtype, "repeats": self.repeats}


def _batched(shape) -> tuple[int, int, int, int]:
    """(b, m, k, n) of an (m, k, n) product (b = 1) or of a batched (b, m, k, n) one."""
    return (1, *shape) if len(shape) == 3 else tuple(shape)


def _operand_shapes(shape) -> tuple[tuple, tuple, tuple]:
    """The (a, b, c) buffer shapes of one product: 2-D for torch.mm, 3-D for torch.bmm."""
    bt, m, k, n = _batched(shape)
    if len(shape) == 3:
        return (m, k), (k, n), (m, n)
    return (bt, m, k), (bt, k, n), (bt, m, n)


def gemm_bytes(shapes, dtype: torch.dtype) -> int:
    """Memory the GEMM floor allocates: one input buffer per distinct input shape, one output per output shape."""
    ops = [_operand_shapes(s) for s in shapes]
    ins = {a for a, _, _ in ops} | {b for _, b, _ in ops}
    outs = {c for _, _, c in ops}
    return (sum(math.prod(x) for x in ins) + sum(math.prod(x) for x in outs)) * dtype.itemsize


def gemm_floor(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device, budget_s: float = 0.3,
               min_repeats: int = 3, max_repeats: int = 20) -> GemmFloor:
    """Median time of ``torch.mm(a, b, out=c)`` over every (m, k, n) of ``shapes`` (``torch.bmm`` for a
    batched (b, m, k, n)), one after the other."""
    gen = torch.Generator(device=device).manual_seed(0)
    ins: dict = {}
    outs: dict = {}

    def buf(pool, shape):
        if shape not in pool:
            pool[shape] = (torch.randn(shape, generator=gen, device=device, dtype=dtype) if pool is ins
                           else torch.empty(shape, device=device, dtype=dtype))
        return pool[shape]

    prods = [(buf(ins, a), buf(ins, b), buf(outs, c)) for a, b, c in map(_operand_shapes, shapes)]

    def one_pass():
        for a, b, c in prods:
            (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out=c)

    one_pass()  # warm-up (BLAS threads, pages of the outputs)
    synchronize(device)
    clock = clock_for(device)
    times: list[float] = []
    target = min_repeats
    while len(times) < target:
        synchronize(device)
        a = clock.mark()
        one_pass()
        b = clock.mark()
        clock.finish()
        times.append(clock.ms(a, b))
        if len(times) == 1:
            target = max(min_repeats, min(max_repeats, int(budget_s * 1e3 / max(times[0], 1e-6))))
    flops = float(sum(2 * math.prod(_batched(s)) for s in shapes))
    del prods, ins, outs
    return GemmFloor(statistics.median(times), flops, list(shapes), str(dtype).replace("torch.", ""), len(times))
