"""The README's and the documentation's Python blocks run as written, each on its own, as a reader would
paste it; the documentation site builds with warnings as errors (mkdocs --strict), as CI requires."""

import glob
import os
import re
import subprocess
import sys

import jax
import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _blocks():
    out = []
    for page in PAGES:
        with open(page, encoding="utf-8") as f:
            text = f.read()
        name = os.path.relpath(page, ROOT)
        out += [(name, i, code) for i, code in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S))]
    return out


def test_readme_and_docs_have_python_blocks():
    names = [name for name, _, _ in _blocks()]
    assert names.count("README.md") >= 2 and len(set(names)) >= 6


@pytest.mark.parametrize("name,i,code", _blocks(), ids=[f"{n}:{i}" for n, i, _ in _blocks()])
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")  # Keras' Variable
def test_block_runs(name, i, code):
    for optional in ("torch", "keras", "haiku"):  # the peers a block converts from: skipped without them
        if re.search(rf"^import .*\b{optional}\b", code, flags=re.M):
            pytest.importorskip(optional)
    # A reader runs JAX's defaults, not this suite's strict promotion.
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        exec(compile(code, f"{name} block {i}", "exec"), {"__name__": f"doc_block_{i}"})


def test_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocstrings", reason='the docs extra: pip install -e ".[docs]"')
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
    with open(tmp_path / "site" / "api" / "index.html", encoding="utf-8") as f:
        api = f.read()
    assert "seq_lengths" in api and "LSTMParams" in api  # the reference holds the docstrings
