"""scikit-learn's bundled digits (1797 8x8 images, no download), one fixed stratified split."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SPLIT_SEED = 0       # the split never changes with the training seed
TEST_FRACTION = 0.25


@dataclass
class Digits:
    x_train: Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    y_train: Tensor  # (N,) int64
    x_test: Tensor
    y_test: Tensor
    num_classes: int = 10


def load() -> Digits:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - exercised only without scikit-learn
        raise SystemExit("the demo needs scikit-learn: pip install scikit-learn (`make demo` does)") from exc
    digits = load_digits()
    x = digits.images.reshape(-1, 1, 8, 8) / 16.0  # pixel values are 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=TEST_FRACTION,
                                              stratify=digits.target, random_state=SPLIT_SEED)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return Digits(f(x_tr), i(y_tr), f(x_te), i(y_te))


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches; the last incomplete batch is dropped (relation losses need B >= 2)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start:start + batch_size]
