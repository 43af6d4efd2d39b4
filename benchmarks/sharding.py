"""What sharding costs or buys on simulated host devices: data parallel and gate-axis model parallel.

    python -m benchmarks.sharding          # sets XLA_FLAGS for 8 host devices itself, ~2 minutes

* Data parallel: the LSTM train step (B=64, D=128, H=256, T=128) on one device,
  and batch-sharded over meshes of 2, 4 and 8 devices under ``jax.set_mesh``.
* Model parallel: the LSTM at H=2048 (B=16, D=512, T=32), forward and train step,
  unsharded against the gate axis (``4H``) of ``w_ih``, ``w_hh`` and ``b``
  sharded over 2, 4 and 8 devices (``P(None, 'model')``): XLA inserts the
  collectives each step needs (the gate blocks of one unit live on different
  devices and the next step's dot needs all of ``h``).

Simulated host devices share this machine's cores: the figures say what the
partitioned programs cost here (their communication and per-device overhead), not
what they would gain on real devices with cores of their own. Interleaved medians;
writes ``sharding.json``.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxlstm  # noqa: E402

from . import _common as C  # noqa: E402


def _train(p, x):
    return jax.grad(lambda p, x: (jaxlstm.lstm(p, x)[0] ** 2).mean(), argnums=(0, 1))(p, x)


def _forward(p, x):
    return jaxlstm.lstm(p, x)[0]


def _case(fn, params, xs, mesh, param_spec, x_spec):
    """A timed callable: ``fn`` jitted on inputs placed as given (one device without a mesh)."""
    if mesh is None:
        f = jax.jit(fn)
        return lambda: jax.block_until_ready(f(params, xs))
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
    p = jax.tree.map(put, params, param_spec)
    x = put(xs, x_spec)
    f = jax.jit(fn)

    def run():
        with jax.set_mesh(mesh):
            return jax.block_until_ready(f(p, x))

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (seconds)")
    ap.add_argument("--out", default=None, help="default benchmarks/runs/<device>")
    args = ap.parse_args(argv)
    devices = jax.devices()
    sizes = [n for n in ((2,) if args.quick else (2, 4, 8)) if n <= len(devices)]
    rows = []

    # data parallel
    if args.quick:
        args.repeats = 2
    B, D, H, T = (8, 8, 16, 8) if args.quick else (64, 128, 256, 128)
    params = jaxlstm.init_lstm(jax.random.key(0), D, H)
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    replicated = jax.tree.map(lambda _: P(), params)
    fns = {"1 device": _case(_train, params, xs, None, None, None)}
    for n in sizes:
        mesh = Mesh(np.array(devices[:n]), ("data",))
        fns[f"data x{n}"] = _case(_train, params, xs, mesh, replicated, P("data"))
    times = C.time_interleaved(fns, args.repeats)
    base = C.summarize(times["1 device"])["median_s"]
    for name, ts in times.items():
        s = C.summarize(ts)
        rows.append(
            {"kind": "data", "mode": "train", "shape": [B, D, H, T], "case": name, **s, "vs_1": base / s["median_s"]}
        )

    # model parallel at large H
    B, D, H, T = (4, 8, 64, 8) if args.quick else (16, 512, 2048, 32)
    params = jaxlstm.init_lstm(jax.random.key(2), D, H)
    xs = jax.random.normal(jax.random.key(3), (B, T, D))
    gate_axis = jaxlstm.LSTMParams(P(None, "model"), P(None, "model"), P("model"), None)
    for mode, fn in (("forward", _forward), ("train", _train)):
        fns = {"1 device": _case(fn, params, xs, None, None, None)}
        for n in sizes:
            mesh = Mesh(np.array(devices[:n]), ("model",))
            fns[f"model x{n}"] = _case(fn, params, xs, mesh, gate_axis, P())
        times = C.time_interleaved(fns, args.repeats)
        base = C.summarize(times["1 device"])["median_s"]
        for name, ts in times.items():
            s = C.summarize(ts)
            rows.append(
                {"kind": "model", "mode": mode, "shape": [B, D, H, T], "case": name, **s, "vs_1": base / s["median_s"]}
            )

    print(f"{'kind':6s} {'mode':8s} {'(B, D, H, T)':22s} {'case':10s} {'median ms':>10s} {'speed vs 1 device':>18s}")
    for r in rows:
        print(
            f"{r['kind']:6s} {r['mode']:8s} {str(tuple(r['shape'])):22s} {r['case']:10s} "
            f"{r['median_s'] * 1e3:10.1f} {r['vs_1']:17.2f}x"
        )
    out = args.out or C.results_dir()
    C.write_json(
        os.path.join(out, "sharding.json"), {"machine": C.machine_info(), "devices": len(devices), "rows": rows}
    )
    print(f"wrote {out}/sharding.json")
    return rows


if __name__ == "__main__":
    main()
