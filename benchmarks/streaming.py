"""The per-call cost of one recurrent step: what online inference pays on every step (speech, RL actors
acting one step at a time, interactive models).

    python -m benchmarks.streaming              # the three shapes of issue 27, LSTM and GRU
    python -m benchmarks.streaming --quick      # seconds

Each implementation is called ``--calls`` times on the same state after a warm-up, one call at a time
(``jax.block_until_ready`` after each), and the median per-call time is reported:

* ``jaxlstm``: ``jax.jit(jaxlstm.step)``, the streaming step (on CPU the native one-step call);
* ``jaxlstm-cell``: ``jax.jit(jaxlstm.lstm_cell)`` / ``jax.jit(jaxlstm.gru_cell)``, the step as XLA operations;
* ``flax``: ``jax.jit`` of ``flax.linen.OptimizedLSTMCell`` / ``GRUCell``'s ``apply``;
* ``torch``: ``torch.nn.LSTMCell`` / ``GRUCell`` under ``torch.no_grad()``, in its own process (PyTorch and
  XLA both keep spinning thread pools).

Writes ``streaming.json`` to ``--out`` (default ``benchmarks/runs/<device>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlstm
from benchmarks import _common as C

SHAPES = [(1, 64, 64), (1, 256, 256), (16, 256, 256)]  # (B, D, H)
CELLS = ("lstm", "gru")


def per_call_us(fn, calls: int) -> float:
    """Median microseconds of ``fn()`` (which blocks until its result is ready) over ``calls`` calls."""
    for _ in range(min(100, calls)):
        fn()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def _jax_steps(cell: str, B: int, D: int, H: int) -> dict:
    """``{impl: fn}``, each one step on fixed inputs, blocking."""
    import flax.linen as nn

    key = jax.random.key(0)
    x = jax.random.normal(key, (B, D), jnp.float32)
    if cell == "lstm":
        params = jaxlstm.init_lstm(key, D, H)
        state = jaxlstm.zero_state(B, H)
        cell_fn = jax.jit(jaxlstm.lstm_cell)
        flax_cell = nn.OptimizedLSTMCell(H)
        carry = flax_cell.initialize_carry(key, (B, D))
    else:
        params = jaxlstm.init_gru(key, D, H)
        state = jnp.zeros((B, H), jnp.float32)
        cell_fn = jax.jit(jaxlstm.gru_cell)
        flax_cell = nn.GRUCell(H)
        carry = flax_cell.initialize_carry(key, (B, D))
    variables = flax_cell.init(key, carry, x)
    flax_step = jax.jit(flax_cell.apply)
    step = jax.jit(jaxlstm.step)
    return {
        "jaxlstm": lambda: jax.block_until_ready(step(params, state, x)),
        "jaxlstm-cell": lambda: jax.block_until_ready(cell_fn(params, state, x)),
        "flax": lambda: jax.block_until_ready(flax_step(variables, carry, x)),
    }


def _torch_worker(shapes: list, calls: int) -> list:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    out = []
    for B, D, H in shapes:
        for cell in CELLS:
            m = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[cell](D, H)
            x = torch.from_numpy(np.random.default_rng(0).standard_normal((B, D), dtype=np.float32))
            h = torch.zeros(B, H)
            state = (h, torch.zeros(B, H)) if cell == "lstm" else h

            def call(m=m, x=x, state=state):
                with torch.no_grad():
                    return m(x, state)

            out.append(dict(B=B, D=D, H=H, cell=cell, impl="torch", us=per_call_us(call, calls)))
    return out


def _torch_times(shapes, calls) -> list:
    if not C.torch_available():
        return []
    cmd = [sys.executable, "-m", "benchmarks.streaming", "--torch-worker", json.dumps([shapes, calls])]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(shapes, calls: int) -> dict:
    if C.torch_available():
        print("timing PyTorch in its own process first ...", flush=True)
    else:
        print('PyTorch is not installed: the "torch" column stays empty (pip install torch)', flush=True)
    records = _torch_times(shapes, calls)
    for B, D, H in shapes:
        for cell in CELLS:
            fns = _jax_steps(cell, B, D, H)
            for impl, fn in fns.items():
                records.append(dict(B=B, D=D, H=H, cell=cell, impl=impl, us=per_call_us(fn, calls)))
            here = [r for r in records if (r["B"], r["D"], r["H"], r["cell"]) == (B, D, H, cell)]
            print(f"B={B} D={D} H={H} {cell}: " + ", ".join(f"{r['impl']} {r['us']:.1f} µs" for r in here), flush=True)
    return {"machine": C.machine_info(), "calls": calls, "records": records}


def table(result: dict) -> str:
    impls = ["jaxlstm", "jaxlstm-cell", "flax", "torch"]
    lines = ["| cell | B, D, H | " + " | ".join(f"{i} µs" for i in impls) + " | jaxlstm vs torch |", "|---" * 7 + "|"]
    keys = sorted({(r["cell"], r["B"], r["D"], r["H"]) for r in result["records"]}, key=lambda k: (k[0], k[1], k[3]))
    for cell, B, D, H in keys:
        us = {r["impl"]: r["us"] for r in result["records"] if (r["cell"], r["B"], r["D"], r["H"]) == (cell, B, D, H)}
        ratio = f"{us['torch'] / us['jaxlstm']:.2f}x" if "torch" in us and "jaxlstm" in us else ""
        cells = " | ".join(f"{us[i]:.1f}" if i in us else "" for i in impls)
        lines.append(f"| {cell} | {B}, {D}, {H} | {cells} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="one small shape, 200 calls")
    ap.add_argument("--out", default=None, help="folder for streaming.json (default benchmarks/runs/<device>)")
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_worker:
        shapes, calls = json.loads(args.torch_worker)
        print(json.dumps(_torch_worker(shapes, calls)))
        return {}
    shapes, calls = (SHAPES[:1], 200) if args.quick else (SHAPES, args.calls)
    result = run([list(s) for s in shapes], calls)
    out = args.out or C.results_dir()
    C.write_json(os.path.join(out, "streaming.json"), result)
    print(table(result))
    print(f"wrote {os.path.join(out, 'streaming.json')}")
    return result


if __name__ == "__main__":
    main()
