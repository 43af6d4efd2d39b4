"""Examples, run from a checkout as ``python -m examples.<name>``."""

import os


def cpu_record() -> dict:
    """The CPU an example ran on (model name, family, model, cores), for its JSON."""
    from jaxlstm.tuning import cpu_info

    info = cpu_info()
    return {k: info[k] for k in ("model name", "cpu family", "model") if k in info} | {"cores": os.cpu_count()}
