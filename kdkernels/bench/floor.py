"""The copy-bandwidth floor (docs/design.md §5).

A full step has to read every input once and write every gradient once; nothing can do it faster
than a plain tensor copy moves the same bytes. ``floor = bytes that must move / copy bandwidth``,
with the bandwidth of ``dst.copy_(src)`` over a large buffer measured in the same run (a copy reads
``n`` bytes and writes ``n``: bandwidth = ``2 n / time``). A step's ``time / floor`` is then >= 1 for
a memory-bound loss; relation losses are compute-bound, so there it is a loose lower bound only.
"""
from __future__ import annotations

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
