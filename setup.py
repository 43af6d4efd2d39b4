"""The optional native CPU code (``jaxlstm/csrc/``, see ``jaxlstm/_native.py``).

Everything else about the package is in ``pyproject.toml``. The native code is built with the
machine's C++ compiler against the XLA FFI headers that jaxlib ships (jaxlib is a build
requirement), once per ISA level, each into a library of its own (``jaxlstm/_native_<level>``),
with portable flags: on x86-64 ``avx`` (x86-64-v2 + AVX, the least jaxlib runs on), ``avx2``
(x86-64-v3), ``avx512`` (x86-64-v4) and ``avx512_bf16`` (x86-64-v4 and AVX512_BF16: the
bfloat16 GEMMs of ``jaxlstm/csrc/bf16.h``); elsewhere ``generic`` (the compiler's baseline).
``jaxlstm/_native_cpu`` (baseline flags) asks the CPU which levels it runs, and jaxlstm loads
the best of those, so a wheel built on one machine runs on any other that runs JAX. Where a
level cannot be built the package installs without it; where none can, ``jaxlstm.lstm`` runs the
pure-XLA path. ``JAXLSTM_BUILD_NATIVE=0`` (or its earlier name ``JAXLSTM_BUILD_KERNEL=0``) skips
the build.
"""

import importlib.util
import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The levels and their flags, lowest first (jaxlstm/_native.py keeps the same order).
X86_LEVELS = {
    "avx": ["-march=x86-64-v2", "-mavx"],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4"],
    "avx512_bf16": ["-march=x86-64-v4", "-mavx512bf16"],
}
FLAGS = ["-std=c++17", "-O3", "-g0", "-ffp-contract=fast", "-fno-math-errno", "-fvisibility=hidden", "-pthread"]
SOURCES = ["simd.h", "gemm.h", "bf16.h", "cells.h", "loops.h", "team.h"]


def _ffi_include() -> str | None:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = os.path.join(list(spec.submodule_search_locations)[0], "include")
    return include if os.path.exists(os.path.join(include, "xla", "ffi", "api", "ffi.h")) else None


def _levels() -> dict[str, list[str]]:
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return X86_LEVELS if x86 else {"generic": []}


def _skipped() -> bool:
    """``JAXLSTM_BUILD_NATIVE=0``, or its earlier name ``JAXLSTM_BUILD_KERNEL=0`` where it is unset."""
    value = os.environ.get("JAXLSTM_BUILD_NATIVE", os.environ.get("JAXLSTM_BUILD_KERNEL", "1"))
    return value == "0"


def _extensions() -> list[Extension]:
    include = _ffi_include()
    if _skipped() or include is None:
        return []
    # optional: a level that fails to build leaves the others (and the pure-XLA path), not a failed install
    native = [
        Extension(
            f"jaxlstm._native_{level}",
            sources=["jaxlstm/csrc/ffi.cc"],
            depends=[f"jaxlstm/csrc/{name}" for name in SOURCES],
            include_dirs=[include],
            language="c++",
            define_macros=[("JAXLSTM_ISA", f'"{level}"')],
            extra_compile_args=[*FLAGS, *flags],
            extra_link_args=["-pthread"],
            optional=True,
        )
        for level, flags in _levels().items()
    ]
    cpu = Extension(
        "jaxlstm._native_cpu",
        sources=["jaxlstm/csrc/cpu.cc"],
        language="c++",
        extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden"],
        optional=True,
    )
    return [cpu, *native]


class BuildNative(build_ext):
    """Every level from ``jaxlstm/csrc/ffi.cc`` with its own flags, in a build folder of its
    own, and always afresh: a library or object left from another build (other flags, other
    sources) is never packaged or linked again. Says so where no level was built (``pip``
    shows it with ``-v``; at run time jaxlstm warns on its first call on CPU)."""

    def finalize_options(self):
        super().finalize_options()
        self.force = True

    def run(self):
        super().run()
        levels = [
            e.name for e in self.extensions if e.name.startswith("jaxlstm._native_") and e.name != "jaxlstm._native_cpu"
        ]
        built = [n for n in levels if os.path.exists(self.get_ext_fullpath(n))]
        if _skipped():
            return
        if not levels or not built:
            why = "no XLA FFI headers in jaxlib" if not levels else "every level failed to compile (is g++ there?)"
            print(f"WARNING: jaxlstm's native CPU code was not built ({why}): jaxlstm runs its pure-XLA path",
                  file=sys.stderr)  # fmt: skip
        elif len(built) < len(levels):
            missing = sorted(set(levels) - set(built))
            print(f"WARNING: jaxlstm native levels not built: {', '.join(missing)}", file=sys.stderr)

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildNative})
