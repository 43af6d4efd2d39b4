"""Hochreiter & Schmidhuber (1997), Experiments 4-6, on jaxlstm's LSTM, GRU and Elman RNN.

    python -m examples.lstm1997 --quick                 # seconds: tiny lengths, the suite runs it
    python -m examples.lstm1997                         # every row of Tables 7-9, the paper's trial counts
    python -m examples.lstm1997 --only adding --lengths 100 --trials 10 --models lstm

*Long Short-Term Memory*, Neural Computation 9(8):1735-1780, 1997. The data is
generated here exactly as Section 5 specifies it (see ``adding``,
``multiplication`` and ``temporal_order``); the paper's stopping criteria and its
test sets of 2,560 fresh sequences are kept:

- **Experiment 4, adding** (Table 7). Pairs (value in [-1, 1], marker); lengths
  uniform in [T, T + T/10]; one of the first ten pairs and one of the first
  T/2 - 1 are marked 1.0; the first and last markers are -1 otherwise; target
  0.5 + (X1 + X2) / 4 at the end. Correct: absolute error < 0.04. Stop: the mean
  squared error of the 2,000 most recent training sequences < 0.01 and all of
  them correct.
- **Experiment 5, multiplication** (Table 8). Values in [0, 1], X1 = 1.0 when
  the first pair is marked, target X1 * X2. Stop: fewer than ``n_seq`` of the
  2,000 most recent training sequences have absolute error > 0.04 (n_seq = 140
  and 13, the paper's two rows); the test reports the wrong ones and the MSE.
- **Experiment 6, temporal order** (Table 9). Lengths 100-110 over {a, b, c, d}
  between E (first) and B (last), with X or Y at two (6a: positions 10-20 and
  50-60, 4 classes) or three (6b: 10-20, 33-43, 66-76, 8 classes) places
  (1-based, as the paper counts). Correct: every output within 0.3 of its
  one-hot target. Stop: mean squared error < 0.1 and the 2,000 most recent
  sequences correct.

What differs from 1997, on purpose: minibatches with Adam in place of one
sequence at a time with plain gradient descent at rate 0.5 and truncated
gradients; the modern LSTM with a forget gate (the paper's had none), its gate
biases set by the "chrono" rule (Tallec & Ollivier, 2018: input gate ``-b``,
forget gate ``+b``, ``b = log(T)``), which stands in for the paper's negative
input-gate biases (its remedy for the drift of the internal state); the GRU's
update gate gets ``+b``; the Elman RNN an orthogonal recurrent kernel. Each model
reads its final hidden state with a linear layer (sigmoid outputs for the
classes of Experiment 6). "Sequences seen" counts training sequences as the
paper does (steps x batch), checked against the criterion after every batch on
the errors that batch had before its update (as the paper's online learner
measures them). A run that does not meet the criterion within ``--budget``
sequences is reported as not reaching it, with its test figures all the same.

Writes ``lstm1997.json`` (every trial) and ``lstm1997.png`` (learning curves: the
running error of the last 2,000 training sequences) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import deque
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

import jaxlstm
from examples import cpu_record, optional
from examples.long_memory import hidden_sizes, init_model, num_params

TEST_SIZE = 2560
WINDOW = 2000  # "the 2,000 most recent training sequences"

# Tables 7-9 of the paper (means over its trials; one sequence per update, learning rate 0.5).
PAPER = {
    "adding": {
        100: {"wrong": 1, "sequences": 74_000, "trials": 10, "lag": 50},
        500: {"wrong": 0, "sequences": 209_000, "trials": 10, "lag": 250},
        1000: {"wrong": 1, "sequences": 853_000, "trials": 10, "lag": 500, "range": [370_000, 2_020_000]},
    },
    "multiplication": {
        140: {"wrong": 139, "mse": 0.0223, "sequences": 482_000, "trials": 10},
        13: {"wrong": 14, "mse": 0.0139, "sequences": 1_273_000, "trials": 10},
    },
    "order": {
        "a": {"wrong": 1, "sequences": 31_390, "trials": 20},
        "b": {"wrong": 2, "sequences": 571_100, "trials": 10},
    },
}

SYMBOLS = "abcdEBXY"  # one-hot input channels of Experiment 6
ORDER_POSITIONS = {"a": [(10, 20), (50, 60)], "b": [(10, 20), (33, 43), (66, 76)]}  # 1-based, inclusive


# ---------------------------------------------------------------------------------------------------------------
# The data, as Section 5 of the paper specifies it (NumPy, one generator per stream)


def _marked_pairs(rng: np.random.Generator, n: int, T: int, low: float) -> tuple:
    """Lengths, pair values and markers shared by Experiments 4 and 5 (padded to T + T // 10)."""
    if T < 22:
        raise ValueError(f"T must be at least 22 (the second mark lies in the first T/2 - 1 pairs), got {T}")
    t_max = T + T // 10
    lengths = rng.integers(T, t_max + 1, size=n)
    values = rng.uniform(low, 1.0, size=(n, t_max))
    rows = np.arange(n)
    first = rng.integers(0, 10, size=n)  # one of the first ten pairs
    r = rng.integers(0, T // 2 - 2, size=n)  # one of the first T/2 - 1 pairs, other than the first mark
    second = r + (r >= first)
    markers = np.zeros((n, t_max))
    markers[:, 0] = -1.0
    markers[rows, lengths - 1] = -1.0
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    values[np.arange(t_max)[None, :] >= lengths[:, None]] = 0.0  # padding past the end
    return lengths, values, markers, first, second


def adding(rng: np.random.Generator, n: int, T: int):
    """Experiment 4: inputs ``[n, T + T//10, 2]`` (value, marker), lengths ``[n]``, targets ``[n, 1]``.

    If the first pair is one of the marked ones, its value X1 is 0 (the paper's rule)."""
    lengths, values, markers, first, second = _marked_pairs(rng, n, T, -1.0)
    values[markers[:, 0] == 1.0, 0] = 0.0  # either mark may fall on the first pair
    rows = np.arange(n)
    target = 0.5 + (values[rows, first] + values[rows, second]) / 4.0
    return np.stack([values, markers], -1).astype(np.float32), lengths, target[:, None].astype(np.float32)


def multiplication(rng: np.random.Generator, n: int, T: int):
    """Experiment 5: as ``adding`` with values in [0, 1], X1 = 1.0 when the first pair is marked,
    target X1 * X2."""
    lengths, values, markers, first, second = _marked_pairs(rng, n, T, 0.0)
    values[markers[:, 0] == 1.0, 0] = 1.0
    rows = np.arange(n)
    target = values[rows, first] * values[rows, second]
    return np.stack([values, markers], -1).astype(np.float32), lengths, target[:, None].astype(np.float32)


def temporal_order(rng: np.random.Generator, n: int, variant: str):
    """Experiment 6a/6b: one-hot inputs ``[n, 110, 8]`` over ``SYMBOLS``, lengths ``[n]`` in [100, 110],
    one-hot targets ``[n, 4]`` (6a) or ``[n, 8]`` (6b).

    The class is the X/Y word read at the marked positions, X = 0 and Y = 1, first position most significant
    (6a: XX, XY, YX, YY are classes 0-3)."""
    if variant not in ORDER_POSITIONS:
        raise ValueError(f"variant must be one of {sorted(ORDER_POSITIONS)}, got {variant!r}")
    t_max = 110
    lengths = rng.integers(100, t_max + 1, size=n)
    symbols = rng.integers(0, 4, size=(n, t_max))  # a, b, c, d
    rows = np.arange(n)
    symbols[:, 0] = SYMBOLS.index("E")
    symbols[rows, lengths - 1] = SYMBOLS.index("B")
    label = np.zeros(n, dtype=np.int64)
    for lo, hi in ORDER_POSITIONS[variant]:
        bit = rng.integers(0, 2, size=n)
        symbols[rows, rng.integers(lo, hi + 1, size=n) - 1] = SYMBOLS.index("X") + bit
        label = 2 * label + bit
    xs = np.eye(len(SYMBOLS), dtype=np.float32)[symbols]
    xs[np.arange(t_max)[None, :] >= lengths[:, None]] = 0.0
    classes = 2 ** len(ORDER_POSITIONS[variant])
    return xs, lengths, np.eye(classes, dtype=np.float32)[label]


# ---------------------------------------------------------------------------------------------------------------
# Tasks: their data, what "correct" means, and when training stops


def _wrong(abs_err, tol: float) -> int:
    """Sequences whose error is not below ``tol``: a NaN (a diverged model) is wrong."""
    return int((~(np.asarray(abs_err) < tol)).sum())


class Task:
    """One row of the paper's tables: a data stream and its criteria."""

    def __init__(self, experiment: str, setting, length: int | None = None):
        self.experiment, self.setting = experiment, setting
        if experiment == "adding":
            self.T, self.name = int(setting), f"adding T={setting}"
            self.data = partial(adding, T=self.T)
        elif experiment == "multiplication":
            self.T, self.n_seq, self.name = length or 100, int(setting), f"multiplication n_seq={setting}"
            self.data = partial(multiplication, T=self.T)
        elif experiment == "order":
            self.T, self.name = 100, f"temporal order 6{setting}"
            self.data = partial(temporal_order, variant=setting)
        else:
            raise ValueError(f"experiment must be adding, multiplication or order, got {experiment!r}")
        self.classify = experiment == "order"
        self.tol = 0.3 if self.classify else 0.04
        self.paper = PAPER[experiment].get(setting if experiment == "order" else int(setting))

    def stop(self, abs_err: np.ndarray, sq_err: np.ndarray) -> bool:
        """The paper's stopping rule on the last ``WINDOW`` training sequences' errors."""
        if len(abs_err) < WINDOW:
            return False
        wrong = _wrong(abs_err, self.tol)
        if self.experiment == "multiplication":
            return wrong < self.n_seq
        return wrong == 0 and float(sq_err.mean()) < (0.1 if self.classify else 0.01)


def _outputs(model: str, params, xs, lengths):
    h = {
        "lstm": lambda: jaxlstm.lstm(params["cell"], xs, seq_lengths=lengths)[1].h,
        "gru": lambda: jaxlstm.gru(params["cell"], xs, seq_lengths=lengths)[1],
        "rnn": lambda: jaxlstm.rnn(params["cell"], xs, seq_lengths=lengths)[1],
    }[model]()
    return h @ params["w_out"] + params["b_out"][None, :]


def _errors(classify: bool, out, targets):
    """Per sequence: the largest absolute error over the outputs, and the mean squared error."""
    y = jax.nn.sigmoid(out) if classify else out
    return jnp.abs(y - targets).max(-1), jnp.square(y - targets).mean(-1)


@partial(jax.jit, static_argnums=(0, 1))
def _evaluate(classify: bool, model: str, params, xs, lengths, targets):
    return _errors(classify, _outputs(model, params, xs, lengths), targets)


@lru_cache
def _trainer(classify: bool, model: str, lr: float):
    """Adam (global-norm clipped at 1) and its jitted step, built once per kind of run so trials share the
    compiled step. The loss: squared error (Experiments 4, 5), sigmoid cross-entropy (6)."""
    optax = optional("optax")
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))

    def loss(p, xs, lengths, targets):
        out = _outputs(model, p, xs, lengths)
        per = optax.sigmoid_binary_cross_entropy(out, targets) if classify else jnp.square(out - targets)
        return per.mean(), out

    @jax.jit
    def step(params, state, xs, lengths, targets):
        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params, xs, lengths, targets)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, _errors(classify, out, targets)

    return opt, step


def run_trial(task: Task, model: str, args, seed: int) -> dict:
    """Train one model from one seed until the paper's criterion or ``args.budget`` sequences; test it."""
    rng = np.random.default_rng([seed, 1997])
    xs0, _, y0 = task.data(rng, 1)
    D, C = xs0.shape[-1], y0.shape[-1]
    H = hidden_sizes(D, args.hidden)[model]
    gate_bias = float(np.log(task.T)) if args.gate_bias is None else args.gate_bias
    params = init_model(jax.random.key(seed), model, D, H, C, gate_bias)
    opt, step = _trainer(task.classify, model, args.lr)
    state = opt.init(params)
    abs_window, sq_window = deque(maxlen=WINDOW), deque(maxlen=WINDOW)
    curve, seen, reached = [], 0, False
    t0 = time.perf_counter()
    while seen < args.budget and not reached:
        xs, lengths, targets = task.data(rng, args.batch)
        params, state, (abs_err, sq_err) = step(params, state, xs, lengths, targets)
        abs_window.extend(np.asarray(abs_err).tolist())
        sq_window.extend(np.asarray(sq_err).tolist())
        seen += args.batch
        reached = task.stop(np.asarray(abs_window), np.asarray(sq_window))
        if seen % (args.batch * args.curve_every) == 0 or reached or seen >= args.budget:
            curve.append([seen, float(np.mean(sq_window)), _wrong(abs_window, task.tol)])
    wall = time.perf_counter() - t0
    test_rng = np.random.default_rng([seed, 2560])
    xs, lengths, targets = task.data(test_rng, TEST_SIZE)
    abs_err, sq_err = _evaluate(task.classify, model, params, xs, lengths, targets)
    return {
        "model": model,
        "seed": seed,
        "reached": reached,
        "sequences": seen,
        "wall_s": wall,
        "test_wrong": _wrong(abs_err, task.tol),
        "test_mse": float(np.mean(sq_err)),
        "diverged": not bool(np.isfinite(np.mean(sq_err))),
        "hidden_size": H,
        "num_params": num_params(params),
        "curve": curve,
    }


def summarize(trials: list[dict]) -> dict:
    """Means over trials, as the paper reports them; sequences over the trials that reached the criterion."""
    ok = [t for t in trials if t["reached"]]
    seqs = [t["sequences"] for t in ok]
    return {
        "trials": len(trials),
        "reached": len(ok),
        "sequences_mean": float(np.mean(seqs)) if seqs else None,
        "sequences_range": [min(seqs), max(seqs)] if seqs else None,
        "test_wrong_mean": float(np.mean([t["test_wrong"] for t in trials])),
        "test_mse_mean": float(np.mean([t["test_mse"] for t in trials])),
        "diverged": sum(bool(t.get("diverged")) for t in trials),
        "wall_s_mean": float(np.mean([t["wall_s"] for t in trials])),
    }


def tasks(args) -> list[Task]:
    out = []
    if "adding" in args.only:
        out += [Task("adding", T) for T in args.lengths]
    if "multiplication" in args.only:
        out += [Task("multiplication", n, length=args.mult_length) for n in args.n_seq]
    if "order" in args.only:
        out += [Task("order", v) for v in args.order]
    return out


def trials_for(task: Task, args) -> int:
    """``--trials`` if given, else the paper's count (at most ``--max-trials``)."""
    if args.trials is not None:
        return args.trials
    return min(task.paper["trials"], args.max_trials) if task.paper else 1


# ---------------------------------------------------------------------------------------------------------------
# Report


def _fmt(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def table(result: dict) -> str:
    """The Markdown table of jaxlstm's rows beside the paper's."""
    lines = [
        "| task | model | trials | reached | sequences to criterion (mean) | range | wrong of 2,560 (mean) | "
        "test MSE | wall s / trial |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        p = row["paper"]
        if p:
            rng = p.get("range")
            lines.append(
                f"| {row['task']} | paper (LSTM 1997) | {p['trials']} | {p['trials']} | {_fmt(p['sequences'])} | "
                f"{'-' if rng is None else f'{rng[0]:,}-{rng[1]:,}'} | {p['wrong']} | {p.get('mse', '-')} | - |"
            )
        for model, s in row["summary"].items():
            rng = s["sequences_range"]
            lines.append(
                f"| {row['task']} | jaxlstm {model} | {s['trials']} | {s['reached']} | {_fmt(s['sequences_mean'])} | "
                f"{'-' if rng is None else f'{rng[0]:,}-{rng[1]:,}'} | {s['test_wrong_mean']:.1f} | "
                f"{s['test_mse_mean']:.4f} | {s['wall_s_mean']:.0f} |"
            )
    return "\n".join(lines)


def compact_table(result: dict) -> str:
    """One line per task: the paper's LSTM beside jaxlstm's LSTM, GRU and RNN (trials that reached the
    criterion / trials, mean sequences over those that did, mean wrong of 2,560)."""

    def cell(s):
        if s is None:
            return "-"
        seqs = "" if s["sequences_mean"] is None else f", {_fmt(s['sequences_mean'])} seq."
        return f"{s['reached']}/{s['trials']}{seqs}, {s['test_wrong_mean']:.1f} wrong"

    lines = [
        "| task | paper's LSTM (1997): sequences, wrong | jaxlstm LSTM | GRU | Elman RNN |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        p, s = row["paper"], row["summary"]
        paper = "-" if not p else f"{_fmt(p['sequences'])}, {p['wrong']} wrong ({p['trials']} trials)"
        models = " | ".join(cell(s.get(m)) for m in ("lstm", "gru", "rnn"))
        lines.append(f"| {row['task']} | {paper} | {models} |")
    return "\n".join(lines)


def plot(result: dict, out: str) -> None:
    matplotlib = optional("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ncols = min(4, len(rows))
    nrows = -(-len(rows) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(rows) :]:
        ax.set_visible(False)
    colors = {"lstm": "C0", "gru": "C2", "rnn": "C3"}
    for ax, row in zip(axes.flat, rows, strict=False):
        for model, trials in row["trials"].items():
            for j, t in enumerate(trials):
                c = np.asarray(t["curve"], dtype=float).reshape(-1, 3)
                ax.plot(c[:, 0], c[:, 1], color=colors[model], lw=0.9, alpha=0.7, label=model if j == 0 else None)
        if row["paper"]:
            ax.axvline(row["paper"]["sequences"], color="k", ls=":", lw=1, label="paper (mean)")
        ax.set(xscale="log", yscale="log", title=row["task"], xlabel="training sequences seen")
        ax.title.set_fontsize(9)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"MSE of the last {WINDOW:,} sequences")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lstm1997.png"), dpi=100)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=["adding", "multiplication", "order"],
                    choices=["adding", "multiplication", "order"])  # fmt: skip
    ap.add_argument("--models", nargs="+", default=["lstm", "gru", "rnn"], choices=["lstm", "gru", "rnn"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[100, 500, 1000], help="Experiment 4's T")
    ap.add_argument("--n-seq", type=int, nargs="+", default=[140, 13], help="Experiment 5's stopping n_seq")
    ap.add_argument("--mult-length", type=int, default=100, help="Experiment 5's T")
    ap.add_argument("--order", nargs="+", default=["a", "b"], choices=["a", "b"], help="Experiment 6a / 6b")
    ap.add_argument("--trials", type=int, default=None, help="per row and model (default: the paper's count)")
    ap.add_argument("--max-trials", type=int, default=10, help="caps the paper's count when --trials is not given")
    ap.add_argument("--budget", type=int, default=500_000, help="training sequences before a run gives up")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=16, help="LSTM hidden size; the others match its parameters")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--gate-bias", type=float, default=None, help="chrono bias b (default log(T))")
    ap.add_argument("--curve-every", type=int, default=25, help="batches between the learning curve's points")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="join saved runs' rows into one table, train nothing")
    ap.add_argument("--quick", action="store_true", help="T=30, 6a, 2 trials, small budgets: for the suite")
    ap.add_argument("--out", default=os.path.join("examples", "runs"),
                    help="untracked by default; the committed results: --out examples/results")  # fmt: skip
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.n_seq, args.order, args.trials = [30], [140], ["a"], args.trials or 2
        args.budget, args.curve_every = min(args.budget, 4096), 8
    return args


def merge(paths: list[str]) -> dict:
    """Several saved runs (run side by side, a part of the table each) as one result: the trials of a
    task from every run, under one row per task, in the order first seen."""
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    rows: dict[str, dict] = {}
    for trial in (t for run in runs for row in run["rows"] for ts in row["trials"].values() for t in ts):
        # runs saved before a NaN counted as wrong: a diverged model's outputs are all NaN (its weights are)
        if not np.isfinite(trial["test_mse"]):
            trial.update(test_wrong=TEST_SIZE, diverged=True)
    for row in (row for run in runs for row in run["rows"]):
        merged = rows.setdefault(row["task"], {**row, "trials": {}})
        for model, trials in row["trials"].items():
            merged["trials"].setdefault(model, []).extend(trials)
    for row in rows.values():
        row["summary"] = {m: summarize(t) for m, t in row["trials"].items()}
    return {
        "rows": list(rows.values()),
        "config": [run["config"] for run in runs],
        "machine": runs[0]["machine"],
        "wall_s": sum(run["wall_s"] for run in runs),
    }


CURVE_POINTS = 100


def _thin(curve: list, n: int = CURVE_POINTS) -> list:
    """At most ``n`` points of a learning curve, spaced evenly on the log axis it is drawn on, the last
    point (where the run stopped) always kept."""
    if len(curve) <= n:
        return curve
    keep = np.unique(np.geomspace(1, len(curve), n).astype(int) - 1)
    return [curve[i] for i in keep]


def _write(result: dict, out: str) -> None:
    for row in result["rows"]:
        for trials in row["trials"].values():
            for t in trials:
                t["curve"] = _thin(t["curve"])
    with open(os.path.join(out, "lstm1997.json"), "w") as f:  # a row per trial: the file stays readable
        f.write(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1)[:-2] + ',\n "rows": [\n')
        for i, row in enumerate(result["rows"]):
            head = {k: v for k, v in row.items() if k != "trials"}
            trials = ",\n".join(
                f"  {json.dumps(m)}: [\n" + ",\n".join("   " + json.dumps(t) for t in ts) + "\n  ]"
                for m, ts in row["trials"].items()
            )
            f.write(" " + json.dumps(head)[:-1] + ', "trials": {\n' + trials + "\n }}")
            f.write(",\n" if i + 1 < len(result["rows"]) else "\n")
        f.write(" ]\n}\n")
    plot(result, out)
    print(table(result))
    print()
    print(compact_table(result))
    print(f"wrote {out}/lstm1997.json and lstm1997.png ({result['wall_s']:.0f}s of training and testing)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        result = merge(args.merge)
        _write(result, args.out)
        return result
    tqdm = optional("tqdm").tqdm
    rows = []
    t0 = time.time()
    for task in tasks(args):
        n = trials_for(task, args)
        trials = {}
        for model in args.models:
            trials[model] = []
            for k in tqdm(range(n), desc=f"{task.name} {model}", leave=False):
                trials[model].append(run_trial(task, model, args, seed=args.seed + k))
            s = summarize(trials[model])
            tqdm.write(
                f"{task.name:28s} {model:4s} reached {s['reached']}/{s['trials']}  sequences "
                f"{_fmt(s['sequences_mean'])}  wrong {s['test_wrong_mean']:.1f}/2560  MSE {s['test_mse_mean']:.4f}"
            )
        rows.append({
            "task": task.name, "experiment": task.experiment, "setting": task.setting, "T": task.T,
            "paper": task.paper, "trials": trials, "summary": {m: summarize(t) for m, t in trials.items()},
        })  # fmt: skip
    result = {
        "rows": rows,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpu": cpu_record(), "jax": jax.__version__, "native": str(jaxlstm.native_info().isa)},
        "wall_s": time.time() - t0,
    }
    _write(result, args.out)
    return result


if __name__ == "__main__":
    main()
