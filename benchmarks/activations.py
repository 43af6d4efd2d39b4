"""What other activations and the ConvLSTM cost, in one process, interleaved (median of repeats after a
warm-up, ``block_until_ready``):

    python -m benchmarks.activations            # LSTM (16, 64, 128, 128) and ConvLSTM (4, 8, 32x32x1 -> 16)
    python -m benchmarks.activations --quick    # seconds

LSTM rows, forward and train (value and grad of a mean-square loss):

* ``default``: ``jaxlstm.lstm`` as it runs (the native code on CPU where the tuner chose it);
* ``default-xla``: σ and tanh on the pure-XLA fused path (``tuning.forced("xla")``);
* ``other-fused``: the same maths through *other* function objects (``gate_activation`` / ``activation``
  that compute σ and tanh), so the generic path runs: the XLA fused backward with saved derivatives;
* ``other-autodiff``: the same with ``backward="autodiff"``.

ConvLSTM rows: ``jaxlstm.conv_lstm`` (its fused backward, and ``-autodiff``) against
``flax.linen.RNN(ConvLSTMCell)`` with the same weights.
Writes ``activations.json`` to ``--out`` (default ``benchmarks/runs/<device>/``).
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxlstm
from benchmarks import _common as C
from jaxlstm import tuning


def sigmoid_again(z):
    """σ, as a function object other than ``jax.nn.sigmoid``: the generic activations path."""
    return 1.0 / (1.0 + jnp.exp(-z))


def tanh_again(z):
    return jnp.tanh(z) * 1.0


def _pair(apply, params, xs):
    fwd = jax.jit(apply)
    train = jax.jit(C.train_step(apply))
    return {
        "forward": lambda: jax.block_until_ready(fwd(params, xs)),
        "train": lambda: jax.block_until_ready(train(params, xs)),
    }


def lstm_rows(B, D, H, T, repeats):
    params = jaxlstm.init_lstm(jax.random.key(0), D, H)
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    other = dict(gate_activation=sigmoid_again, activation=tanh_again)
    impls = {
        "default": (lambda p, x: jaxlstm.lstm(p, x)[0], None),
        "default-xla": (lambda p, x: jaxlstm.lstm(p, x)[0], "xla"),
        "other-fused": (lambda p, x: jaxlstm.lstm(p, x, **other)[0], None),
        "other-autodiff": (lambda p, x: jaxlstm.lstm(p, x, backward="autodiff", **other)[0], None),
    }
    fns = {}
    for name, (apply, forced) in impls.items():
        if forced is None:
            pair = _pair(apply, params, xs)
        else:
            with tuning.forced(forced):
                pair = _pair(apply, params, xs)
                for f in pair.values():  # traced and compiled inside the block
                    f()
        fns.update({f"{name}/{mode}": f for mode, f in pair.items()})
    times = C.time_interleaved(fns, repeats)
    return {
        "shape": dict(B=B, D=D, H=H, T=T),
        "path": {"default": jaxlstm.path_of("lstm", params, xs), "other": jaxlstm.path_of("lstm", params, xs, **other)},
        "times": {k: C.summarize(v) for k, v in times.items()},
    }


def conv_rows(B, T, S, Cin, H, repeats):
    cell = nn.ConvLSTMCell(H, kernel_size=(3, 3))
    xs = jax.random.normal(jax.random.key(1), (B, T, S, S, Cin))
    variables = nn.RNN(cell).init(jax.random.key(0), xs)
    params = jaxlstm.convert.from_flax(variables)
    fns = {}
    for name, apply, p in (
        ("jaxlstm", lambda p, x: jaxlstm.conv_lstm(p, x)[0], params),
        ("jaxlstm-autodiff", lambda p, x: jaxlstm.conv_lstm(p, x, backward="autodiff")[0], params),
        ("flax", lambda v, x: nn.RNN(cell).apply(v, x), variables),
    ):
        fns.update({f"{name}/{mode}": f for mode, f in _pair(apply, p, xs).items()})
    with jax.numpy_rank_promotion("allow"):  # flax's cell is not strict-rank clean
        times = C.time_interleaved(fns, repeats)
    return {"shape": dict(B=B, T=T, spatial=(S, S), C=Cin, H=H, kernel=(3, 3)),
            "times": {k: C.summarize(v) for k, v in times.items()}}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    with jax.numpy_rank_promotion("allow"):
        lstm = lstm_rows(*((2, 8, 16, 16) if args.quick else (16, 64, 128, 128)), repeats)
        conv = conv_rows(*((1, 3, 8, 1, 4) if args.quick else (4, 8, 32, 1, 16)), repeats)
    result = {"machine": C.machine_info(), "lstm": lstm, "conv_lstm": conv}
    out = args.out or C.results_dir()
    os.makedirs(out, exist_ok=True)
    C.write_json(os.path.join(out, "activations.json"), result)
    print(f"machine: {result['machine']['cpu']} ({result['machine']['cores']} cores)")
    print(f"LSTM {lstm['shape']}, paths {lstm['path']}")
    for name, t in lstm["times"].items():
        print(f"  {name:24s} {1e3 * t['median_s']:9.2f} ms")
    print(f"ConvLSTM {conv['shape']}")
    for name, t in conv["times"].items():
        print(f"  {name:24s} {1e3 * t['median_s']:9.2f} ms")


if __name__ == "__main__":
    main()
