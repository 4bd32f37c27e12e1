"""The README's Python examples and the docstring examples run as written."""
import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no python examples"
    ns = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)
    assert ns["out"].shape == (7, 8, 64)


@pytest.mark.parametrize("module", ["elit_kernels.attention", "elit_kernels.layout", "elit_kernels.models.elit_dit",
                                    "elit_kernels.reference.attention", "elit_kernels.reference.modulate"])
def test_docstring_examples(module):
    res = doctest.testmod(importlib.import_module(module), extraglobs={"torch": importlib.import_module("torch")})
    assert res.attempted > 0 and res.failed == 0, res
