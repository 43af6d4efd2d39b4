"""The README's Python blocks run as written, each on its own, as a reader would paste it."""

import os
import re

import jax
import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 3


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_block_runs(i):
    code = _blocks()[i]
    if re.search(r"^import .*\btorch\b", code, flags=re.M):
        pytest.importorskip("torch")
    # A reader runs JAX's defaults, not this suite's strict promotion.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(compile(code, f"README.md block {i}", "exec"), {"__name__": f"readme_block_{i}"})
