"""Why LSTM: a vanilla RNN forgets the start of a long sequence, an LSTM remembers it.

    python -m examples.long_memory --quick     # about a minute or two on 2 CPU cores
    python -m examples.long_memory             # longer sequences

Task ("recall the first token"): step 0 carries one of ``K`` classes (one-hot,
plus a marker channel), the next ``T - 1`` steps carry Gaussian noise, and the
model must output the class at the end. Chance is ``1/K``. Everything the answer
depends on sits ``T - 1`` steps before the answer, so it tests memory across
exactly that distance. The data is generated here.

Models: an Elman RNN, an LSTM and a GRU from jaxlstm, each followed by a linear
read-out of the final hidden state, sized to similar parameter counts, trained
with Adam on the same batches. "Solved" means held-out accuracy >= 0.9.

Initialisation, each model at its best practice for memory: the RNN's
recurrent kernel is orthogonal (jaxlstm's default); the LSTM uses the "chrono"
recipe (Tallec & Ollivier, 2018) with forget-gate bias ``+b`` and input-gate
bias ``-b``, ``b = --gate-bias`` (default ``log(T)``, the chrono value for
sequences of length T), so that at initialisation the cell
keeps what it holds and lets little noise in; the GRU gets update-gate bias
``+b``, its equivalent. This is the near-identity memory path a gated cell has
and a plain RNN has no parameter for. With jaxlstm's general-purpose default
(forget bias 1, input bias 0) the LSTM needs far more training at T >= 300.

Also measured: the gradient norm ``||dL/dx_t||`` against t at initialisation,
averaged over a batch; for the RNN it decays exponentially with the distance
from the end (the vanishing gradient), the LSTM's cell state carries it back.

Writes ``long_memory.json``, ``long_memory_accuracy.png`` and
``long_memory_gradients.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxlstm

SOLVED = 0.9


def make_batch(key, batch: int, seq_len: int, num_classes: int = 4, noise: float = 1.0):
    """Inputs ``[batch, seq_len, K + 1]`` and labels ``[batch]``.

    Step 0: ``3 * one_hot(label)`` and marker 1. Steps 1..T-1: ``noise * N(0, 1)``
    on the class channels, marker 0."""
    k1, k2 = jax.random.split(key)
    labels = jax.random.randint(k1, (batch,), 0, num_classes)
    xs = noise * jax.random.normal(k2, (batch, seq_len, num_classes))
    xs = xs.at[:, 0].set(3.0 * jax.nn.one_hot(labels, num_classes))
    marker = jnp.zeros((batch, seq_len, 1)).at[:, 0].set(1.0)
    return jnp.concatenate([xs, marker], axis=-1), labels


MODELS = {
    # name: (init, run(params, xs, compute_dtype) -> the final hidden state)
    "rnn": (jaxlstm.init_rnn, lambda p, x, dt: jaxlstm.rnn(p, x, compute_dtype=dt)[1]),
    "lstm": (jaxlstm.init_lstm, lambda p, x, dt: jaxlstm.lstm(p, x, compute_dtype=dt)[1].h),
    "gru": (jaxlstm.init_gru, lambda p, x, dt: jaxlstm.gru(p, x, compute_dtype=dt)[1]),
}


def init_model(key, model: str, input_size: int, hidden: int, num_classes: int, gate_bias: float = 1.0):
    k1, k2 = jax.random.split(key)
    cell = MODELS[model][0](k1, input_size, hidden)
    if model == "lstm":  # chrono: input gate (slice i of i, f, g, o) -b, forget gate (slice f) +b
        cell = cell._replace(b=cell.b.at[:hidden].set(-gate_bias).at[hidden : 2 * hidden].set(gate_bias))
    if model == "gru":  # update gate: slice z of r, z, n
        cell = cell._replace(b=cell.b.at[hidden : 2 * hidden].set(gate_bias))
    w_out = jax.nn.initializers.glorot_uniform()(k2, (hidden, num_classes))
    return {"cell": cell, "w_out": w_out, "b_out": jnp.zeros((num_classes,))}


def logits_fn(model: str, params, xs, compute_dtype=None):
    """The read-out of the final hidden state; ``compute_dtype`` (``"bfloat16"``) the cell's
    GEMM operands (docs/precision.md): parameters, state and gradients stay float32."""
    h = MODELS[model][1](params["cell"], xs, compute_dtype).astype(jnp.float32)
    return h @ params["w_out"] + params["b_out"][None, :]


def loss_fn(model, params, xs, labels, compute_dtype=None):
    logits = logits_fn(model, params, xs, compute_dtype)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def num_params(params) -> int:
    return sum(a.size for a in jax.tree.leaves(params))


def hidden_sizes(input_size: int, lstm_hidden: int) -> dict:
    """Hidden sizes giving each model about the LSTM's parameter count."""
    target = 4 * lstm_hidden * (input_size + lstm_hidden + 1)
    solve = lambda gates: int(round((-(input_size + 1) + np.sqrt((input_size + 1) ** 2 + 4 * target / gates)) / 2))
    return {"lstm": lstm_hidden, "rnn": solve(1), "gru": solve(3)}


def gate_bias(args, seq_len: int) -> float:
    return args.gate_bias if args.gate_bias is not None else max(1.0, float(np.log(seq_len)))


def train(model, seq_len, args, key):
    D = args.num_classes + 1
    H = hidden_sizes(D, args.hidden)[model]
    params = init_model(key, model, D, H, args.num_classes, gate_bias(args, seq_len))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        xs, labels = make_batch(key, args.batch, seq_len, args.num_classes, args.noise)
        loss, grads = jax.value_and_grad(partial(loss_fn, model, compute_dtype=args.dtype))(params, xs, labels)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    keys = jax.random.split(jax.random.fold_in(key, 1), args.steps)
    for i in range(args.steps):
        params, state, loss = step(params, state, keys[i])
    xs, labels = make_batch(jax.random.key(12345), 1024, seq_len, args.num_classes, args.noise)
    acc = float((logits_fn(model, params, xs, args.dtype).argmax(-1) == labels).mean())
    return {
        "model": model,
        "seq_len": seq_len,
        "metric": acc,
        "metric_name": "accuracy",
        "solved": acc >= SOLVED,
        "final_loss": float(loss),
        "hidden_size": H,
        "num_params": num_params(params),
        "chance": 1.0 / args.num_classes,
        "gate_bias": gate_bias(args, seq_len),
    }


def gradient_norms(model, seq_len, args, key):
    """``||dL/dx_t||`` averaged over a batch, for t = 0 .. T-1, at initialisation."""
    D = args.num_classes + 1
    params = init_model(key, model, D, hidden_sizes(D, args.hidden)[model], args.num_classes, gate_bias(args, seq_len))
    xs, labels = make_batch(jax.random.key(7), 256, seq_len, args.num_classes, args.noise)
    per_example = jax.vmap(jax.grad(lambda x, y: loss_fn(model, params, x[None], y[None])))(xs, labels)
    return np.asarray(jnp.linalg.norm(per_example, axis=-1).mean(0)).tolist()


def plot(result, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    models = list(dict.fromkeys(r["model"] for r in result["results"]))
    styles = ["-", "--", ":", "-."]
    for i, m in enumerate(models):
        rs = [r for r in result["results"] if r["model"] == m]
        # where two models coincide (both at 1.0) the later one is drawn thinner and dashed over the
        # earlier, with another marker, so that neither line hides the other
        ax.plot([r["seq_len"] for r in rs], [r["metric"] for r in rs], marker="osD^"[i % 4], ms=max(3, 8 - 2 * i),
                lw=max(0.8, 2.5 - 0.7 * i), ls=styles[i % 4], label=m, zorder=2 + i)  # fmt: skip
    ax.axhline(SOLVED, ls="--", c="gray", lw=1, label=f"solved ({SOLVED})")
    ax.axhline(result["config"]["chance"], ls=":", c="gray", lw=1, label="chance")
    ax.set(
        xscale="log",
        xlabel="distance to remember (sequence length T)",
        ylabel="held-out accuracy",
        title="recall the first token after T-1 distractors",
        ylim=(0, 1.05),
    )
    lens = sorted({r["seq_len"] for r in result["results"]})
    ax.set_xticks(lens, [str(t) for t in lens])  # every length measured is labelled (a log axis skips 30)
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "long_memory_accuracy.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, g in result["grad_norms"].items():
        g = np.asarray(g)
        ax.plot(np.arange(len(g))[::-1], g, label=m)  # distance from the end = T-1-t
    ax.set(
        yscale="log",
        xlabel="distance from the loss (T-1-t)",
        ylabel="||dL/dx_t|| at initialisation",
        title=f"gradient reaching step t, T={result['grad_norm_seq_len']}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "long_memory_gradients.png"), dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    ap.add_argument("--models", nargs="+", default=["rnn", "lstm", "gru"], choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=32, help="LSTM hidden size; the others match its parameter count")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--num-classes", type=int, default=4)
    ap.add_argument("--noise", type=float, default=1.0, help="std of the distractor noise")
    ap.add_argument(
        "--gate-bias",
        type=float,
        default=None,
        help="chrono init: LSTM forget bias +b, input bias -b; GRU update bias +b (default log(T), at least 1)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="the cells' GEMM operands (compute_dtype)"
    )
    ap.add_argument("--quick", action="store_true", help="3 lengths up to 100, fewer steps")
    ap.add_argument("--replot", metavar="JSON", help="redraw the plots of a saved long_memory.json, train nothing")
    ap.add_argument(
        "--out",
        default=os.path.join("examples", "runs"),
        help="untracked by default; the committed results: --out examples/results",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_lens, args.steps = [10, 30, 100], 400
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        plot(result, args.out)
        return result
    results = []
    key = jax.random.key(args.seed)
    t0 = time.time()
    for T in tqdm(args.seq_lens, desc="seq_len"):
        for m in args.models:
            r = train(m, T, args, jax.random.fold_in(key, T))
            results.append(r)
            tqdm.write(f"T={T:5d} {m:5s} accuracy={r['metric']:.3f} solved={r['solved']} params={r['num_params']}")
    T_grad = max(args.seq_lens)
    grads = {m: gradient_norms(m, T_grad, args, jax.random.fold_in(key, T_grad)) for m in args.models}
    result = {
        "results": results,
        "grad_norms": grads,
        "grad_norm_seq_len": T_grad,
        "solved_threshold": SOLVED,
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "chance": 1.0 / args.num_classes},
        "wall_s": time.time() - t0,
    }
    with open(os.path.join(args.out, "long_memory.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.out)
    for m in args.models:
        g = np.asarray(grads[m])
        print(f"{m:5s} ||dL/dx_0|| / ||dL/dx_T-1|| = {g[0] / g[-1]:.2e}")
    print(f"wrote {args.out}/long_memory.json and plots ({result['wall_s']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
