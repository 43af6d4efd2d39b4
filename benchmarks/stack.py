"""Bidirectional layers: both directions in one vmapped scan against two separate calls.

    python -m benchmarks.stack

Forward and train step of ``lstm_stack`` (2 layers, bidirectional, B=32, D=128,
H=256, float32) with ``fuse_directions=True`` and ``False``, interleaved, and
flax's ``Bidirectional(RNN(OptimizedLSTMCell))`` x2 as the baseline; one
sequence of the batch is half length, so the padding-aware reversal is exercised. Writes ``stack.json``.
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxlstm

from . import _common as C


class FlaxBiStack(nn.Module):
    hidden: int
    layers: int

    @nn.compact
    def __call__(self, xs, seq_lengths):
        for _ in range(self.layers):
            bi = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(self.hidden)), nn.RNN(nn.OptimizedLSTMCell(self.hidden)))
            xs = bi(xs, seq_lengths=seq_lengths)
        return xs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or C.results_dir()
    B, D, H, L = 32, 128, 256, 2
    params = jaxlstm.init_lstm_stack(jax.random.key(0), D, H, L, bidirectional=True)
    flax_model = FlaxBiStack(H, L)
    records = []
    for T in args.seq_lens:
        xs = jax.random.normal(jax.random.key(1), (B, T, D))
        lengths = jnp.full((B,), T, jnp.int32).at[0].set(T // 2)
        fp = flax_model.init(jax.random.key(0), xs, lengths)
        impls = {
            "jaxlstm-fused-directions": (
                lambda p, x: jaxlstm.lstm_stack(p, x, seq_lengths=lengths, fuse_directions=True)[0],
                params,
            ),
            "jaxlstm-separate-directions": (
                lambda p, x: jaxlstm.lstm_stack(p, x, seq_lengths=lengths, fuse_directions=False)[0],
                params,
            ),
            "flax-optimized": (lambda p, x: flax_model.apply(p, x, lengths), fp),
        }
        for mode in ("forward", "train"):
            fns = {}
            for name, (f, p) in impls.items():
                g = (
                    jax.jit(f)
                    if mode == "forward"
                    else jax.jit(jax.value_and_grad(lambda p, x, f=f: jnp.mean(jnp.square(f(p, x))), argnums=(0, 1)))
                )
                c = g.lower(p, xs).compile()
                fns[name] = lambda c=c, p=p: jax.block_until_ready(c(p, xs))
            times = C.time_interleaved(fns, args.repeats)
            base = C.summarize(times["jaxlstm-separate-directions"])["median_s"]
            for name, ts in times.items():
                s = C.summarize(ts)
                records.append(
                    dict(
                        impl=name,
                        mode=mode,
                        seq_len=T,
                        batch=B,
                        input_size=D,
                        hidden_size=H,
                        num_layers=L,
                        tokens_per_s=B * T / s["median_s"],
                        ratio_vs_separate=base / s["median_s"],
                        **s,
                    )
                )
                print(
                    f"{mode:8s} T={T:5d} {name:28s} {B * T / s['median_s']:9.0f} tok/s  "
                    f"{base / s['median_s']:.2f}x vs separate"
                )
    os.makedirs(out, exist_ok=True)
    C.write_json(os.path.join(out, "stack.json"), {"machine": C.machine_info(), "records": records})
    print(f"wrote {out}/stack.json")


if __name__ == "__main__":
    main()
