"""Evidence for the scan-body layout of jaxlstm's forward (the choices in jaxlstm/_step.py).

    python -m benchmarks.layout

Times the forward of one LSTM layer (B=32, D=128, H=256, float32) written in
several ways, against ``flax.linen.RNN(OptimizedLSTMCell)`` in the same process:

* ``hoist-4H``:   ``xs @ w_ih + b`` for all steps before the scan, the body slices
                  four gates out of the ``[T, B, 4H]`` row it reads;
* ``hoist-gate``: the same, but the scan reads four per-gate ``[T, B, H]`` arrays;
* ``inloop``:     ``x_t @ w_ih + h @ w_hh + b`` inside the body (four activations);
* ``inloop-act``: in-loop, one fused activation over ``[B, 4H]``;
* ``fm-inloop-act``: the same feature-major: ``h [H, B]``, ``z = w_ihᵀ·x + w_hhᵀ·h + b``
                  ``[4H, B]``, gates as contiguous row blocks;
* ``fm-inloop-cat``: feature-major with one dot, ``z = [w_ih; w_hh]ᵀ·[x; h] + b``
                  (what jaxlstm does);
* ``fm-hoist``:   feature-major with ``w_ihᵀ·X + b`` for all steps as one GEMM
                  into ``[4H, T, B]``, the body reading its ``[4H, B]`` slice;
each with ``unroll`` 1 and 8. Also the fused backward with its reverse scan
unrolled 1 and 4 (``jaxlstm._fused`` uses 1). Writes ``layout.json``.
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxlstm
from jaxlstm.gates import cell_update, hidden_output, lstm_pointwise, split_gates

from . import _common as C


def _cell(h, c, zi, zf, zg, zo):
    """Four separate activations, then jaxlstm's cell update and hidden output."""
    c = cell_update(jax.nn.sigmoid(zf), c, jax.nn.sigmoid(zi), jnp.tanh(zg))
    return hidden_output(jax.nn.sigmoid(zo), c), c


def variants(p, B, T, D, H):
    zeros = (jnp.zeros((B, H)), jnp.zeros((B, H)))
    b = p.b[None, :]

    def hoist_4h(xs, unroll):
        xp = (jnp.swapaxes(xs, 0, 1).reshape(T * B, D) @ p.w_ih + b).reshape(T, B, 4 * H)

        def body(carry, x):
            h, c = _cell(*carry, *split_gates(x + carry[0] @ p.w_hh))
            return (h, c), h

        return jax.lax.scan(body, zeros, xp, unroll=unroll)[1]

    def hoist_gate(xs, unroll):
        xp = (jnp.swapaxes(xs, 0, 1).reshape(T * B, D) @ p.w_ih + b).reshape(T, B, 4, H)
        parts = tuple(xp[:, :, j] for j in range(4))

        def body(carry, x):
            zh = split_gates(carry[0] @ p.w_hh)
            h, c = _cell(*carry, *(zh[j] + x[j] for j in range(4)))
            return (h, c), h

        return jax.lax.scan(body, zeros, parts, unroll=unroll)[1]

    def inloop(xs, unroll):
        def body(carry, x):
            h, c = _cell(*carry, *split_gates(x @ p.w_ih + carry[0] @ p.w_hh + b))
            return (h, c), h

        return jax.lax.scan(body, zeros, jnp.swapaxes(xs, 0, 1), unroll=unroll)[1]

    def inloop_act(xs, unroll):
        def body(carry, x):
            h, c, _ = lstm_pointwise(x @ p.w_ih + carry[0] @ p.w_hh + b, carry[1])
            return (h, c), h

        return jax.lax.scan(body, zeros, jnp.swapaxes(xs, 0, 1), unroll=unroll)[1]

    zeros_fm = (jnp.zeros((H, B)), jnp.zeros((H, B)))
    w_ih_t, w_hh_t, b_col = p.w_ih.T, p.w_hh.T, p.b[:, None]

    def fm_cell(carry, z):
        h, c, _ = lstm_pointwise(z, carry[1], axis=-2)
        return (h, c), h

    def fm_inloop_act(xs, unroll):
        body = lambda carry, x: fm_cell(carry, w_ih_t @ x + w_hh_t @ carry[0] + b_col)
        ys = jax.lax.scan(body, zeros_fm, jnp.transpose(xs, (1, 2, 0)), unroll=unroll)[1]
        return jnp.transpose(ys, (0, 2, 1))

    w_in_t = jnp.concatenate([p.w_ih, p.w_hh], axis=0).T

    def fm_inloop_cat(xs, unroll):
        body = lambda carry, x: fm_cell(carry, w_in_t @ jnp.concatenate([x, carry[0]], axis=0) + b_col)
        ys = jax.lax.scan(body, zeros_fm, jnp.transpose(xs, (1, 2, 0)), unroll=unroll)[1]
        return jnp.transpose(ys, (0, 2, 1))

    def fm_hoist(xs, unroll):
        zx = (w_ih_t @ jnp.transpose(xs, (2, 1, 0)).reshape(D, T * B) + b_col).reshape(4 * H, T, B)

        def body(carry, t):
            return fm_cell(carry, jax.lax.dynamic_index_in_dim(zx, t, axis=1, keepdims=False) + w_hh_t @ carry[0])

        ys = jax.lax.scan(body, zeros_fm, jnp.arange(T), unroll=unroll)[1]
        return jnp.transpose(ys, (0, 2, 1))

    return {
        "hoist-4H": hoist_4h,
        "hoist-gate": hoist_gate,
        "inloop": inloop,
        "inloop-act": inloop_act,
        "fm-inloop-act": fm_inloop_act,
        "fm-inloop-cat": fm_inloop_cat,
        "fm-hoist": fm_hoist,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or C.results_dir()
    B, D, H = 32, 128, 256
    p = jaxlstm.init_lstm(jax.random.key(0), D, H)
    records = []
    for T in args.seq_lens:
        xs = jax.random.normal(jax.random.key(1), (B, T, D))
        rnn = nn.RNN(nn.OptimizedLSTMCell(H))
        fp = rnn.init(jax.random.key(0), xs)
        flax_fwd = jax.jit(lambda v, x: rnn.apply(v, x))
        fns = {"flax-optimized": lambda: jax.block_until_ready(flax_fwd(fp, xs))}
        for name, f in variants(p, B, T, D, H).items():
            for u in (1, 8):
                j = jax.jit(lambda x, f=f, u=u: f(x, u))
                fns[f"{name}/unroll{u}"] = lambda j=j: jax.block_until_ready(j(xs))
        times = C.time_interleaved(fns, args.repeats)
        # the fused backward's reverse scan, unrolled or not (full train step)
        # (an internal knob, so the private core is called directly)
        from jaxlstm._fused import FusedConfig, fused_sequence
        from jaxlstm._step import LSTM

        f32 = jnp.dtype(jnp.float32)
        train = {}
        for u in (1, 4):

            def loss(p, x, u=u):
                cfg = FusedConfig(mm_dtype=f32, acc_dtype=f32, backward_unroll=u)
                zeros = (jnp.zeros((B, H)), jnp.zeros((B, H)))
                ys, _ = fused_sequence(cfg, LSTM, p, zeros, jnp.swapaxes(x, 0, 1), None, zeros)
                return jnp.mean(jnp.square(ys))

            g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            train[f"train/backward-unroll{u}"] = lambda g=g: jax.block_until_ready(g(p, xs))
        times.update(C.time_interleaved(train, args.repeats))
        base = C.summarize(times["flax-optimized"])["median_s"]
        base_train = C.summarize(times["train/backward-unroll1"])["median_s"]
        for name, ts in times.items():
            s = C.summarize(ts)
            ref = base_train if name.startswith("train/") else base
            records.append(
                dict(
                    variant=name,
                    seq_len=T,
                    batch=B,
                    input_size=D,
                    hidden_size=H,
                    tokens_per_s=B * T / s["median_s"],
                    ratio=ref / s["median_s"],
                    **s,
                )
            )
            print(
                f"T={T:5d} {name:26s} {B * T / s['median_s']:9.0f} tok/s  {ref / s['median_s']:.2f}x "
                f"{'vs backward-unroll1' if name.startswith('train/') else 'vs flax'}"
            )
    os.makedirs(out, exist_ok=True)
    C.write_json(os.path.join(out, "layout.json"), {"machine": C.machine_info(), "records": records})
    print(f"wrote {out}/layout.json")


if __name__ == "__main__":
    main()
