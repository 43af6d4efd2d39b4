"""Trace, lower and compile time of jaxlstm and flax against sequence length and unroll.

    python -m benchmarks.compile_time
    python -m benchmarks.compile_time --quick

A scan compiles its body once, so compile time should stay flat in T; unroll
multiplies the body. Each (impl, mode, T, unroll) gets a fresh function, so no
cache is reused.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from . import _common as C


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16, 256, 4096])
    ap.add_argument("--unrolls", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_lens, args.batch, args.input_size, args.hidden_size = [4, 16], 2, 4, 8
    out = args.out or C.results_dir()
    B, D, H = args.batch, args.input_size, args.hidden_size
    params = {impl: C.jax_impl(impl, B, D, H)[0](jax.random.key(0)) for impl in ("jaxlstm", "flax-optimized")}
    records = []
    grid = [(i, m, T, u) for T in args.seq_lens for u in args.unrolls for i in params for m in ("forward", "train")]
    for impl, mode, T, unroll in tqdm(grid, desc="compile"):
        xs = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
        apply = C.jax_impl(impl, B, D, H, unroll=unroll)[1]
        f = jax.jit(apply if mode == "forward" else C.train_step(apply))
        t0 = time.perf_counter()
        traced = f.trace(params[impl], xs)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        lowered.compile()
        t3 = time.perf_counter()
        records.append(
            dict(
                impl=impl,
                mode=mode,
                seq_len=T,
                unroll=unroll,
                batch=B,
                input_size=D,
                hidden_size=H,
                trace_s=t1 - t0,
                lower_s=t2 - t1,
                compile_s=t3 - t2,
                total_s=t3 - t0,
            )
        )
    print(f"{'impl':15s} {'mode':8s} {'T':>5s} {'unroll':>6s} {'trace':>7s} {'lower':>7s} {'compile':>8s}")
    for r in records:
        print(
            f"{r['impl']:15s} {r['mode']:8s} {r['seq_len']:5d} {r['unroll']:6d} "
            f"{r['trace_s']:7.3f} {r['lower_s']:7.3f} {r['compile_s']:8.3f}"
        )
    result = {"machine": C.machine_info(), "records": records}
    os.makedirs(out, exist_ok=True)
    C.write_json(os.path.join(out, "compile_time.json"), result)
    print(f"wrote {out}/compile_time.json")
    return result


if __name__ == "__main__":
    main()
