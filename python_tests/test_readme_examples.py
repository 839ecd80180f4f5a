"""Every ```python block of the README runs (so none can rot).

"Distil your own model" blocks define their own models and data and run as written. The "Usage"
blocks are fragments of a training step (they use ``student``, ``teacher``, ``x``, ``y``, ``ce``,
``s_emb``, ``t_emb`` as the prose describes them): they run in order in one namespace holding tiny
stand-ins with exactly the shapes their comments give.
"""
from __future__ import annotations

import pathlib
import re

import pytest
import torch
from torch import nn

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _section(name: str) -> str:
    return README.read_text().split(f"## {name}", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", _section(section), flags=re.S)


class _Net(nn.Module):
    """x (B, 3, H, W) -> ((B, V) logits, (B, channels, H, W) features), as the Usage block's comments say."""

    def __init__(self, channels: int, vocab: int = 10) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, channels, 3, padding=1)
        self.head = nn.Linear(channels, vocab)

    def forward(self, x):
        f = self.features(x)
        return self.head(f.mean((2, 3))), f


def _usage_namespace() -> dict:
    torch.manual_seed(0)
    return {"__name__": "__readme__", "student": _Net(128), "teacher": _Net(256), "x": torch.randn(8, 3, 4, 4),
            "y": torch.randint(0, 10, (8,)), "ce": nn.CrossEntropyLoss(),
            "s_emb": torch.randn(8, 16, requires_grad=True), "t_emb": torch.randn(8, 32)}


def test_every_python_block_is_covered():
    total = len(re.findall(r"```python\n", README.read_text()))
    assert len(_blocks("Usage")) >= 2 and len(_blocks("Distil your own model")) >= 2
    assert total == len(_blocks("Usage")) + len(_blocks("Distil your own model")), \
        "a README python block outside 'Usage' / 'Distil your own model' is not run by a test"


def test_usage_blocks_run_in_order():
    ns = _usage_namespace()
    for i, block in enumerate(_blocks("Usage")):
        exec(compile(block, f"README.md Usage block {i}", "exec"), ns)
    assert torch.isfinite(ns["loss"]).all() and ns["loss"].dim() == 0
    # the last block's loss reaches the embeddings (s_feat's graph was spent by the first block's step)
    (grad,) = torch.autograd.grad(ns["loss"], ns["s_emb"])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("index", range(len(_blocks("Distil your own model"))))
def test_distil_block_runs(index, capsys):
    exec(compile(_blocks("Distil your own model")[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    assert "loss" in capsys.readouterr().out
