"""Examples, run from a checkout as ``python -m examples.<name>``."""

import importlib
import os
from types import ModuleType

# Which pyproject extra installs each optional library an example imports.
EXTRAS = {"gymnax": "rl", "aeon": "scale", "orbax": "scale", "optax": "examples", "matplotlib": "examples",
          "tqdm": "examples", "sklearn": "examples"}  # fmt: skip


def optional(module: str) -> ModuleType:
    """``import module``, or a ``ModuleNotFoundError`` that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        extra = EXTRAS[module.split(".")[0]]
        raise ModuleNotFoundError(
            f"{module} is not installed: this example needs jaxlstm's {extra!r} extra: "
            f'pip install -e ".[{extra}]" (from the checkout)'
        ) from e


def cpu_record() -> dict:
    """The CPU an example ran on (model name, family, model, cores), for its JSON."""
    from jaxlstm.tuning import cpu_info

    info = cpu_info()
    return {k: info[k] for k in ("model name", "cpu family", "model") if k in info} | {"cores": os.cpu_count()}
