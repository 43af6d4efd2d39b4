"""The native CPU code at each ISA level, A/B in one process, over the main job's regimes.

    python -m benchmarks.isa              # every level built that this CPU runs
    python -m benchmarks.isa --native     # and the same sources built with -march=native
    python -m benchmarks.isa --quick      # tiny shapes, seconds
    python -m benchmarks.isa --pause 0    # calls back to back (default: 20 ms of rest before each)
    python -m benchmarks.isa --shapes 3x64x128x512   # other rows than the grid's (B x D x H x T)

``pip install`` builds one library per level with portable flags (``setup.py``), and jaxlstm
runs the best one the CPU supports (``jaxlstm.native_info()``). This times ``jaxlstm.lstm`` and
``jaxlstm.gru`` (forward; train = value and grad w.r.t. params and inputs, as the main job) at
each level, forced with ``JAXLSTM_NATIVE_ISA`` while each program is traced, interleaved round
by round in this one process (medians after a warm-up, ``block_until_ready``). ``--native``
compiles ``jaxlstm/csrc/ffi.cc`` with ``-march=native`` (g++, the same other flags as
``setup.py``) into a temporary library and times it beside them: what a build for this very
machine would gain over the portable default. The tuner is off (every row runs the native code).
Writes ``isa.json`` to ``--out`` (default ``benchmarks/runs/<device>/``, untracked).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import subprocess
import sys
import tempfile

os.environ["JAXLSTM_AUTOTUNE"] = "0"  # before jaxlstm reads it: the native code in every row

import jax  # noqa: E402

from jaxlstm import _native  # noqa: E402

from . import _common as C  # noqa: E402
from .regimes import QUICK, REGIMES  # noqa: E402

# setup.py's flags but -march (the portable levels' own there).
FLAGS = ["-std=c++17", "-O3", "-g0", "-ffp-contract=fast", "-fno-math-errno", "-fvisibility=hidden", "-pthread"]
IMPLS = {"lstm": "jaxlstm", "gru": "jaxlstm-gru"}


def build_native(folder: str, flags: tuple = ("-march=native",), checkout: str | None = None) -> str:
    """``jaxlstm/csrc/ffi.cc`` (this checkout's, or ``checkout``'s: another revision's root) built
    with ``-march=native`` (or ``flags``) into ``folder``, registered with XLA as the level ``native``."""
    import jaxlib

    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    root = checkout or os.path.dirname(os.path.dirname(_native.__file__))
    source = os.path.join(root, "jaxlstm", "csrc", "ffi.cc")
    if not os.path.isfile(source):
        sys.exit(f"--native-source must be a checkout of jaxlstm (its root): {source} does not exist")
    path = os.path.join(folder, "native.so")
    cmd = ["g++", *FLAGS, *flags, '-DJAXLSTM_ISA="native"', f"-I{include}", "-fPIC", "-shared", source]
    done = subprocess.run([*cmd, "-o", path], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {' '.join(flags)} build failed:\n{done.stderr[-3000:]}")
    lib = ctypes.CDLL(path)
    for direction, fn in (("forward", lib.JaxlstmForward), ("backward", lib.JaxlstmBackward)):
        jax.ffi.register_ffi_target(f"jaxlstm_native_{direction}", jax.ffi.pycapsule(fn), platform="cpu")
    return path


@contextlib.contextmanager
def at_level(level: str):
    """Traces jaxlstm's native calls at ``level`` (a built level, or ``native``)."""
    if level == "native":
        real = _native.level
        _native.level = lambda: "native"  # the calls' target names; loading stays with the default level
        try:
            yield
        finally:
            _native.level = real
        return
    old = os.environ.get(_native.ISA_VARIABLE)
    os.environ[_native.ISA_VARIABLE] = level
    try:
        yield
    finally:
        if old is None:
            del os.environ[_native.ISA_VARIABLE]
        else:
            os.environ[_native.ISA_VARIABLE] = old


def run(
    grid: dict, levels: list[str], repeats: int, budget_s: float, dtype: str = "float32", pause_s: float = 0.02
) -> dict:
    records = []
    for name, (B, D, H, T) in grid.items():
        for cell, impl in IMPLS.items():
            built = {}
            for level in levels:
                with at_level(level):
                    built[level] = C.build(impl, B, T, D, H, dtype)
            for mode in ("forward", "train"):
                times = C.time_interleaved(
                    {lv: b[mode] for lv, b in built.items()}, repeats, budget_s=budget_s, pause_s=pause_s
                )
                for level, ts in times.items():
                    records.append(dict(regime=name, cell=cell, mode=mode, level=level, **C.summarize(ts)))
                print(_row(records[-len(levels) :], levels), flush=True)
    return {
        "machine": C.machine_info(),
        "regimes": grid,
        "levels": levels,
        "dtype": dtype,
        "pause_s": pause_s,
        "records": records,
    }


def _row(recs: list, levels: list[str]) -> str:
    r0 = recs[0]
    ms = {r["level"]: r["median_s"] * 1e3 for r in recs}
    default = _native.level() or levels[-1]
    ratio = f"{ms['native'] / ms[default]:.3f}" if "native" in ms and default in ms else ""
    cells = " | ".join(f"{ms[lv]:.2f}" for lv in levels)
    return f"| {r0['regime']} | {r0['cell']} | {r0['mode']} | {cells} | {ratio} |"


def table(result: dict) -> str:
    levels = result["levels"]
    default = _native.level()
    head = "| regime | cell | mode | " + " | ".join(f"{lv} ms" for lv in levels)
    head += f" | native / {default} (>1: the default faster) |\n"
    head += "|---" * (len(levels) + 4) + "|\n"
    recs = result["records"]
    return head + "\n".join(_row(recs[i : i + len(levels)], levels) for i in range(0, len(recs), len(levels)))


def _shape(text: str) -> tuple[int, int, int, int]:
    parts = text.split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        sys.exit(f"--shapes: each shape is BxDxHxT, four positive integers (e.g. 3x64x128x512); got {text!r}")
    B, D, H, T = map(int, parts)
    return B, D, H, T


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--native", action="store_true", help="also time a -march=native build of the same sources")
    p.add_argument(
        "--native-flags",
        default="-march=native",
        help="that build's flags in place of -march=native (to try other flags; its column stays 'native')",
    )
    p.add_argument(
        "--native-source",
        default=None,
        help="build that column from another checkout's sources (its root: an A/B of two revisions, float32 "
        "calls; with --native-flags a level's own flags)",
    )
    p.add_argument("--levels", default=None, help="comma-separated built levels to time (default: all this CPU runs)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16: inputs and GEMMs in bf16, as the main job's --dtype (compare levels that multiply bf16)",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test in seconds")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default 15; 3 with --quick)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per row before stopping early")
    p.add_argument(
        "--pause",
        type=float,
        default=0.02,
        help="seconds of rest before each timed call (default 0.02, the main job's; 0: back to back, as a training "
        "loop calls)",
    )
    p.add_argument("--regimes", default=None, help="comma-separated regimes of the grid (default: all)")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated BxDxHxT shapes to time in place of the grid (e.g. 3x64x128x512: rows the grid lacks)",
    )
    p.add_argument("--out", default=None, help="folder for isa.json (default benchmarks/runs/<device>/)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.shapes and (args.regimes or args.quick):
        sys.exit("--shapes takes the place of the grid: give it without --regimes and --quick")
    if not (math.isfinite(args.pause) and args.pause >= 0):
        sys.exit(f"--pause must be a finite number of seconds >= 0; got {args.pause}")
    # the flags' own values first: a bad one is named on any machine, the native code built or not
    grid = QUICK if args.quick else REGIMES
    if args.shapes:
        grid = {shape: _shape(shape) for shape in args.shapes.split(",")}
    if args.regimes:
        unknown = set(args.regimes.split(",")) - set(grid)
        if unknown:
            sys.exit(f"--regimes: unknown {sorted(unknown)}; the grid has {', '.join(grid)}")
        grid = {k: v for k, v in grid.items() if k in args.regimes.split(",")}
    if _native.load_error() is not None:
        sys.exit(f"the native code does not run here: {_native.load_error()}")
    levels = [lv for lv in _native.levels_built() if lv in _native.levels_supported()]
    if args.levels:
        unknown = set(args.levels.split(",")) - set(levels)
        if unknown:
            sys.exit(f"--levels: {sorted(unknown)} not built or not run by this CPU; it runs {', '.join(levels)}")
        levels = [lv for lv in levels if lv in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.native or args.native_source:
            build_native(tmp, tuple(args.native_flags.split()), args.native_source)
            levels.append("native")
        result = run(grid, levels, args.repeats or (3 if args.quick else 15), args.budget, args.dtype, args.pause)
    out = args.out or C.results_dir()
    C.write_json(os.path.join(out, "isa.json"), result)
    print(f"\n{jax.numpy.zeros(0).device} — {result['machine']['native']['cpu']}\n\n" + table(result))
    return result


if __name__ == "__main__":
    main()
