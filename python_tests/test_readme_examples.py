"""The README's "Distil your own model" code blocks run as written (so they cannot rot)."""
from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    text = README.read_text()
    section = text.split("## Distil your own model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_examples():
    assert len(_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_block_runs(index, capsys):
    exec(compile(_blocks()[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
    assert "loss" in capsys.readouterr().out
