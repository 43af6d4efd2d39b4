"""The precision contract, measured: each path's error against float64, values and gradients,
at the main job's regimes.

    python -m benchmarks.precision            # the regimes of benchmarks.regimes (about a minute)
    python -m benchmarks.precision --quick    # tiny shapes, seconds

For the LSTM and the GRU at each regime, with float32 params and inputs: the outputs ``ys``, the
final state and the gradients of ``sum(w * ys)`` (``w`` fixed, random) w.r.t. the params and the
inputs, from

* ``float32``: ``jaxlstm.lstm`` / ``jaxlstm.gru`` as they run by default (the native code on
  CPU where it is built);
* ``bfloat16``: the same with ``compute_dtype=bfloat16`` (bf16 GEMM operands, float32 sums, state
  and gate maths: docs/precision.md), on the native code and on the pure-XLA path;

against the float64 run of the same equations (``jax.enable_x64``, the XLA scan, plain autodiff).
Each error is ``max |a - ref| / max |ref|`` over the array (the worst element against the array's
scale). Writes ``precision.json`` to ``--out`` (default ``benchmarks/runs/<device>/``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlstm

from . import _common as C
from .regimes import QUICK, REGIMES

CELLS = {"lstm": (jaxlstm.init_lstm, jaxlstm.lstm), "gru": (jaxlstm.init_gru, jaxlstm.gru)}
PATHS = {"float32": (None, None), "bfloat16": (jnp.bfloat16, None), "bfloat16 (XLA path)": (jnp.bfloat16, "xla")}


def _outputs(run, params, xs, w, compute_dtype, **kw):
    """``(ys, final state leaves, grads w.r.t. params, dxs)``, all as float64 NumPy."""

    def f(p, x):
        ys, final = run(p, x, compute_dtype=compute_dtype, **kw)
        return jnp.sum(w * ys), (ys, final)

    (_, (ys, final)), (gp, gx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, xs)
    named = {"ys": ys, **{f"state.{k}": v for k, v in _named(final).items()}}
    named.update({f"d{k}": v for k, v in params_named(gp).items()})
    named["dxs"] = gx
    return {k: np.asarray(v, np.float64) for k, v in named.items()}


def _named(final):
    return final._asdict() if hasattr(final, "_asdict") else {"h": final}


def params_named(p):
    return {k: v for k, v in p._asdict().items() if v is not None}


def measure(cell: str, B: int, D: int, H: int, T: int) -> dict:
    init, run = CELLS[cell]
    k = jax.random.split(jax.random.key(0), 3)
    params = init(k[0], D, H)
    xs = jax.random.normal(k[1], (B, T, D), jnp.float32)
    w = jax.random.normal(k[2], (B, T, H), jnp.float32)
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)
        ref = _outputs(run, f64(params), f64(xs), f64(w), None, backward="autodiff")
    out = {}
    for name, (dtype, path) in PATHS.items():
        with jaxlstm.tuning.forced(path) if path else contextlib.nullcontext():
            got = _outputs(run, params, xs, w, dtype)
        out[name] = {key: float(np.abs(got[key] - r).max() / max(np.abs(r).max(), 1e-30)) for key, r in ref.items()}
    return out


def table(result: dict) -> str:
    lines = [
        "| regime (B, D, H, T) | cell | path | ys | final h | weight grads (worst) | dxs |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in result["records"]:
        shape = ", ".join(map(str, result["regimes"][rec["regime"]]))
        for path, errs in rec["errors"].items():
            weights = max(v for k, v in errs.items() if k.startswith("dw") or k.startswith("db"))
            lines.append(
                f"| {rec['regime']} ({shape}) | {rec['cell']} | {path} | {errs['ys']:.1e} | {errs['state.h']:.1e} | "
                f"{weights:.1e} | {errs['dxs']:.1e} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="default benchmarks/runs/<device>/ (untracked)")
    args = ap.parse_args(argv)
    grid = QUICK if args.quick else {k: REGIMES[k] for k in args.regimes}
    t0 = time.perf_counter()
    records = []
    for name, (B, D, H, T) in grid.items():
        for cell in CELLS:
            records.append(dict(regime=name, cell=cell, errors=measure(cell, B, D, H, T)))
            print(f"{name} {cell}: " + ", ".join(f"{p} ys {e['ys']:.1e}" for p, e in records[-1]["errors"].items()))
    result = {"machine": C.machine_info(), "regimes": grid, "records": records, "wall_s": time.perf_counter() - t0}
    print(table(result))
    out = args.out or C.results_dir()
    C.write_json(os.path.join(out, "precision.json"), result)
    print(f"wrote {out}/precision.json ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
