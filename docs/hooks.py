"""mkdocs hook: the plots the guides show are the committed results of the examples (examples/results/*.png),
served under img/ rather than copied into docs/."""

from __future__ import annotations

import glob
import os

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_files(files, config):
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "results", "*.png"))):
        files.append(File.generated(config, f"img/{os.path.basename(path)}", abs_src_path=path))
    return files
