"""The optional compiled CPU kernel (``jaxlstm/csrc/lstm_cpu.cc``, see ``jaxlstm/_kernel.py``).

Everything else about the package is in ``pyproject.toml``. The kernel is built with
the machine's C++ compiler against the XLA FFI headers that jaxlib ships (jaxlib is a
build requirement); ``-march=native`` by default, since the package is built on the
machine that runs it (``JAXLSTM_KERNEL_MARCH=x86-64-v3``, say, for a wheel that runs
elsewhere). Where it cannot be built, the package installs without it and
``jaxlstm.lstm`` runs the pure-XLA path; ``JAXLSTM_BUILD_KERNEL=0`` skips it.
"""

import importlib.util
import os

from setuptools import Extension, setup


def _ffi_include() -> str | None:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = os.path.join(list(spec.submodule_search_locations)[0], "include")
    return include if os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")) else None


def _extensions() -> list[Extension]:
    include = _ffi_include()
    if os.environ.get("JAXLSTM_BUILD_KERNEL", "1") == "0" or include is None:
        return []
    march = os.environ.get("JAXLSTM_KERNEL_MARCH", "native")
    return [
        Extension(
            "jaxlstm._lstm_cpu",
            sources=["jaxlstm/csrc/lstm_cpu.cc"],
            include_dirs=[include],
            language="c++",
            extra_compile_args=[
                "-std=c++17",
                "-O3",
                f"-march={march}",
                "-ffp-contract=fast",
                "-fno-math-errno",
                "-fvisibility=hidden",
                "-pthread",
            ],
            extra_link_args=["-pthread"],
            optional=True,  # a failed build leaves the pure-XLA path, not a failed install
        )
    ]


setup(ext_modules=_extensions())
