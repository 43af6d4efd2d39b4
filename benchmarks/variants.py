"""What each LSTM variant costs against the plain LSTM, at one shape, forward and train.

    python -m benchmarks.variants              # base (32, 128, 256, 256) and big-H (64, 512, 1024, 64), ~2 min
    python -m benchmarks.variants --quick      # tiny shapes (seconds)

Rows: the plain LSTM (its own fused engine), peepholes, layer norm, multi-head
recurrence with 2, 4 and 8 heads at the same H (the recurrent dot costs 1/k of the
dense one), and all three together, each with the fused backward pass. Interleaved
medians after warm-up; ``speed vs plain`` > 1 is faster than the plain LSTM.
Writes ``variants.json``.
"""

from __future__ import annotations

import argparse
import os

import jax

import jaxlstm

from . import _common as C

VARIANTS = {
    "plain": {},
    "peephole": {"peephole": True},
    "layer_norm": {"layer_norm": True},
    "heads=2": {"num_heads": 2},
    "heads=4": {"num_heads": 4},
    "heads=8": {"num_heads": 8},
    "peephole+ln+heads=4": {"peephole": True, "layer_norm": True, "num_heads": 4},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=int, nargs="+", default=[32, 128, 256, 256, 64, 512, 1024, 64], help="B D H T ...")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="default benchmarks/runs/<device>")
    args = ap.parse_args(argv)
    flat = [4, 8, 16, 8] if args.quick else args.shapes
    rows = []
    for i in range(0, len(flat), 4):
        rows += _measure(*flat[i : i + 4], repeats=2 if args.quick else args.repeats)
    print(f"{'(B, D, H, T)':22s} {'variant':22s} {'mode':8s} {'median ms':>10s} {'speed vs plain':>15s}")
    for r in rows:
        shape = str(tuple(r["shape"]))
        print(f"{shape:22s} {r['variant']:22s} {r['mode']:8s} {r['median_s'] * 1e3:10.2f} {r['vs_plain']:14.2f}x")
    out = args.out or C.results_dir()
    C.write_json(os.path.join(out, "variants.json"), {"machine": C.machine_info(), "rows": rows})
    print(f"wrote {out}/variants.json")
    return rows


def _measure(B, D, H, T, repeats):
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    rows = []
    for mode in ("forward", "train"):
        fns = {}
        for name, kw in VARIANTS.items():
            params = jaxlstm.init_lstm(jax.random.key(0), D, H, **kw)
            if mode == "forward":
                f = jax.jit(lambda p, x: jaxlstm.lstm(p, x)[0])
            else:
                f = jax.jit(jax.grad(lambda p, x: (jaxlstm.lstm(p, x)[0] ** 2).mean(), argnums=(0, 1)))
            fns[name] = (lambda f, p: lambda: jax.block_until_ready(f(p, xs)))(f, params)
        times = C.time_interleaved(fns, repeats)
        base = C.summarize(times["plain"])["median_s"]
        for name, ts in times.items():
            s = C.summarize(ts)
            rows.append({"shape": [B, D, H, T], "variant": name, "mode": mode, **s, "vs_plain": base / s["median_s"]})
    return rows


if __name__ == "__main__":
    main()
