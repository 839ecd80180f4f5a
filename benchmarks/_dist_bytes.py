"""Byte counting for the torchrun benchmarks of kdkernels.distributed (vocab_parallel_bytes.py,
vocab_parallel_linear_bytes.py, global_relation_bytes.py): the payload this rank contributes to each
collective of one step."""
from __future__ import annotations

import pickle

import torch.distributed as dist


class ByteCounter:
    """Counts the payload of dist.all_reduce / all_gather / all_gather_object while active."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self._orig = {}

    def __enter__(self):
        for name in ("all_reduce", "all_gather", "all_gather_object"):
            self._orig[name] = getattr(dist, name)

        def all_reduce(t, *a, **k):
            self.bytes += t.numel() * t.element_size()
            self.calls += 1
            return self._orig["all_reduce"](t, *a, **k)

        def all_gather(out, t, *a, **k):
            self.bytes += t.numel() * t.element_size()
            self.calls += 1
            return self._orig["all_gather"](out, t, *a, **k)

        def all_gather_object(out, obj, *a, **k):
            self.bytes += len(pickle.dumps(obj))
            self.calls += 1
            return self._orig["all_gather_object"](out, obj, *a, **k)

        dist.all_reduce, dist.all_gather, dist.all_gather_object = all_reduce, all_gather, all_gather_object
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)
