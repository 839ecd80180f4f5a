"""Training loops: plain cross-entropy, and distillation with the loss step timed on its own."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.demo.data import Digits, batches
from kdkernels.demo.distill import DistillLoss


@dataclass
class Config:
    epochs: int = 15
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4


@dataclass
class Run:
    test_acc: list[float] = field(default_factory=list)   # test accuracy after each epoch
    epoch_s: list[float] = field(default_factory=list)    # wall time of each training epoch
    loss_s: list[float] = field(default_factory=list)     # of which: distillation losses, forward + backward

    @property
    def final(self) -> float:
        return self.test_acc[-1]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x)[0].argmax(1) == y).float().mean().item()


def _optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_plain(model: nn.Module, data: Digits, cfg: Config, seed: int) -> Run:
    """Cross-entropy only (the teacher, and the student alone)."""
    gen, opt, run = torch.Generator().manual_seed(seed), _optimizer(model.parameters(), cfg), Run()
    for _ in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        for idx in batches(len(data.y_train), cfg.batch_size, gen):
            loss = F.cross_entropy(model(data.x_train[idx])[0], data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        run.epoch_s.append(time.perf_counter() - t0)
        run.test_acc.append(accuracy(model, data.x_test, data.y_test))
    return run


def train_distilled(student: nn.Module, teacher: nn.Module, loss_fn: DistillLoss, data: Digits, cfg: Config,
                    seed: int) -> Run:
    """Cross-entropy + ``loss_fn`` against a frozen teacher.

    The distillation losses run on detached leaves of the student's outputs, so their forward and
    backward can be timed alone; the leaves' gradients are then sent through the student together
    with the cross-entropy's: the same gradients as one ``loss.backward()``.
    """
    teacher.eval()
    with torch.no_grad():  # the teacher is frozen and sees no augmentation: its outputs once
        t_all = teacher(data.x_train)
    params = list(student.parameters()) + list(loss_fn.parameters())  # + the hint's projection
    gen, opt, run = torch.Generator().manual_seed(seed), _optimizer(params, cfg), Run()
    for _ in range(cfg.epochs):
        student.train()
        loss_time, t0 = 0.0, time.perf_counter()
        for idx in batches(len(data.y_train), cfg.batch_size, gen):
            s_out = student(data.x_train[idx])
            leaves = [o.detach().requires_grad_() for o in s_out]
            opt.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            loss_fn(leaves, [t[idx] for t in t_all]).backward()
            loss_time += time.perf_counter() - t1
            ce = F.cross_entropy(s_out[0], data.y_train[idx])
            torch.autograd.backward([ce, *s_out], [None, *(leaf.grad for leaf in leaves)])
            opt.step()
        run.epoch_s.append(time.perf_counter() - t0)
        run.loss_s.append(loss_time)
        run.test_acc.append(accuracy(student, data.x_test, data.y_test))
    return run
