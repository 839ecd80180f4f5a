"""Where the random values of an input come from: the one choice the tests and the bench make differently.

* :class:`Float64Source` (the tests): values drawn in float64 on a seeded CPU generator, shaped in
  float64 (patterns, masks), then rounded to the case's dtype and moved to the device. The float64
  spec is then evaluated on exactly the values the kernel sees, and a case's values are the same
  on every device.
* :class:`DeviceSource` (the bench): values drawn directly in the case's dtype on the device, from a
  generator seeded on that device: no float64 copy and no host-to-device transfer at bench sizes.
  On the ``meta`` device only sizes exist (the bench's guards need bytes before anything is allocated).

A family's input maker draws through ``normal`` / ``uniform`` / ``integers`` in a fixed order (the
order decides the values) and hands each finished tensor to ``finish``.
"""
from __future__ import annotations

import torch


class Float64Source:
    """Draws in float64 on the CPU (seed ``seed``); ``finish`` rounds to ``dtype`` and moves to ``device``."""

    def __init__(self, seed: int, dtype: torch.dtype, device):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.device = device

    def normal(self, shape, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale

    def fan_in_normal(self, shape, fan_in: int) -> torch.Tensor:
        """Normal values divided by sqrt(fan_in) (a weight whose products keep unit scale)."""
        return torch.randn(shape, generator=self.gen, dtype=torch.float64) / max(1, fan_in) ** 0.5

    def uniform(self, shape) -> torch.Tensor:
        """Uniform [0, 1) values (float32: masks and row selections compare them with a threshold)."""
        return torch.rand(shape, generator=self.gen)

    def integers(self, high: int, shape) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.gen)

    def finish(self, values: torch.Tensor, requires_grad: bool, memory_format=None) -> torch.Tensor:
        out = values.to(device=self.device, dtype=self.dtype)
        if memory_format is not None:
            out = out.contiguous(memory_format=memory_format)
        return out.requires_grad_(requires_grad)

    def finish_index(self, values: torch.Tensor) -> torch.Tensor:
        """An integer tensor (labels): kept as drawn, moved to the device."""
        return values.to(self.device)


class DeviceSource:
    """Draws in ``dtype`` on ``device`` (seed ``seed`` on that device's generator); ``meta``: sizes only."""

    def __init__(self, seed: int, dtype: torch.dtype, device):
        self.device = torch.device(device)
        self.dtype = dtype
        self.gen = None if self.device.type == "meta" else torch.Generator(device=self.device).manual_seed(seed)

    def normal(self, shape, scale: float = 1.0) -> torch.Tensor:
        if self.gen is None:
            return torch.empty(shape, dtype=self.dtype, device=self.device)
        t = torch.randn(shape, dtype=self.dtype, device=self.device, generator=self.gen)
        if scale != 1.0:
            t.mul_(scale)  # in place: no second tensor of a bench-sized input
        return t

    def fan_in_normal(self, shape, fan_in: int) -> torch.Tensor:
        """Normal values times fan_in ** -0.5, in place."""
        return self.normal(shape, fan_in ** -0.5)

    def uniform(self, shape) -> torch.Tensor:
        if self.gen is None:
            return torch.empty(shape, device=self.device)
        return torch.rand(shape, device=self.device, generator=self.gen)

    def integers(self, high: int, shape) -> torch.Tensor:
        if self.gen is None:
            return torch.empty(shape, dtype=torch.int64, device=self.device)
        return torch.randint(0, high, shape, device=self.device, generator=self.gen)

    def finish(self, values: torch.Tensor, requires_grad: bool, memory_format=None) -> torch.Tensor:
        if memory_format is not None:
            values = values.contiguous(memory_format=memory_format)
        return values.requires_grad_(requires_grad)

    def finish_index(self, values: torch.Tensor) -> torch.Tensor:
        return values
