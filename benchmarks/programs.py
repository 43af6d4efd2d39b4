"""The main job's XLA-path programs, compiled and written out, to compare two revisions of the code.

    python -m benchmarks.programs OUT                                  # this checkout's jaxlstm
    python -m benchmarks.programs OUT2 --source /path/to/other/checkout   # another revision's
    python -m benchmarks.programs OUT --compare OUT2

Compiles (runs nothing) the programs of ``benchmarks.regimes``' "vs XLA path" column: the LSTM and
the GRU at each regime, forward (both step layouts) and train step (``jax.value_and_grad``), with the
native code off (``JAXLSTM_NATIVE=0``). ``--features`` adds small programs of every sequence feature on
the XLA path (lengths, reverse, masks, resets, projection, checkpointing, zoneout, recurrent dropout,
other activations, time-major; the variants; the GRU and the Elman RNN). Each is written as XLA's
optimised HLO without what does not change the program (source metadata, the stack-frame tables).

Two revisions whose programs are the same run the same code: a refactor that changes no program cannot
make a row of the grid slower, which a timing A/B on a noisy machine can only show within its noise.
``--compare`` lists the programs that differ, ignoring instruction names (one renumbered constant is the
same program).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys


def normalised(hlo: str) -> str:
    """The instructions of an HLO module, without source metadata and stack-frame tables."""
    lines = []
    for line in hlo.splitlines():
        if re.match(r"^\s*\d+ ", line) or not ("%" in line or line.startswith(("ENTRY", "}", "HloModule"))):
            continue
        lines.append(re.sub(r",?\s*(metadata=\{[^}]*\}|stack_frame_id=\d+)", "", line))
    return "\n".join(lines) + "\n"


def _unnamed(text: str) -> list[str]:
    return [re.sub(r"%[\w.-]+", "%_", line) for line in text.splitlines()]


def _feature_cases(jax, jnp, jaxlstm):
    """``(name, run, params, kwargs)``: small calls that reach every branch of the XLA path."""
    B, T, D, H = 3, 7, 4, 5
    k = jax.random.key
    lengths = jnp.array([7, 4, 0])
    mask = jax.random.bernoulli(k(2), 0.7, (B, T))
    resets = jax.random.bernoulli(k(3), 0.3, (B, T))
    zo = dict(zoneout_h=0.2, key=k(5))
    p, pp = jaxlstm.init_lstm(k(0), D, H), jaxlstm.init_lstm(k(0), D, H, proj_size=3)
    pv = jaxlstm.init_lstm(k(0), D, H + 1, peephole=True, layer_norm=True, num_heads=2)
    yield "lstm_plain", jaxlstm.lstm, p, {}
    yield "lstm_len_rev", jaxlstm.lstm, p, dict(seq_lengths=lengths, reverse=True)
    yield "lstm_proj_ck", jaxlstm.lstm, pp, dict(seq_lengths=lengths, checkpoint_every=3)
    yield "lstm_mask_resets", jaxlstm.lstm, p, dict(mask=mask, resets=resets)
    yield "lstm_zo_drop", jaxlstm.lstm, pp, dict(zoneout_c=0.3, recurrent_dropout=0.25, **zo)
    yield "lstm_zo_ck", jaxlstm.lstm, p, dict(zoneout_c=0.3, checkpoint_every=2, seq_lengths=lengths, **zo)
    yield "lstm_act", jaxlstm.lstm, pp, dict(gate_activation=jax.nn.hard_sigmoid, activation=jax.nn.relu)
    yield "lstm_tm", jaxlstm.lstm, p, dict(time_major=True)
    yield "var_plain", jaxlstm.lstm, pv, {}
    yield "var_len_ck", jaxlstm.lstm, pv, dict(seq_lengths=lengths, checkpoint_every=3)
    yield "var_mask_resets_zo", jaxlstm.lstm, pv, dict(mask=mask, resets=resets, zoneout_c=0.3, **zo)
    yield "var_act", jaxlstm.lstm, pv, dict(gate_activation=jax.nn.hard_sigmoid, recurrent_dropout=0.2, key=k(6))
    for kind, init, run in (("gru", jaxlstm.init_gru, jaxlstm.gru), ("rnn", jaxlstm.init_rnn, jaxlstm.rnn)):
        q = init(k(0), D, H)
        yield f"{kind}_plain", run, q, {}
        yield f"{kind}_len_rev", run, q, dict(seq_lengths=lengths, reverse=True)
        yield f"{kind}_mask_resets", run, q, dict(mask=mask, resets=resets)
        yield f"{kind}_zo_drop", run, q, dict(recurrent_dropout=0.25, **zo)
        yield f"{kind}_act", run, q, dict(activation=jax.nn.relu, seq_lengths=lengths)


def write(out: str, source: str | None = None, features: bool = False) -> None:
    os.environ["JAXLSTM_NATIVE"] = "0"  # the XLA path's programs
    if source is not None:
        sys.path.insert(0, os.path.abspath(source))
    import jax
    import jax.numpy as jnp

    import jaxlstm

    from .regimes import REGIMES  # (imports jaxlstm: after --source is on the path)

    print("jaxlstm from", os.path.dirname(jaxlstm.__file__), flush=True)
    os.makedirs(out, exist_ok=True)
    cells = {"lstm": (jaxlstm.init_lstm, jaxlstm.lstm), "gru": (jaxlstm.init_gru, jaxlstm.gru)}
    for name, (B, D, H, T) in REGIMES.items():
        xs = jnp.zeros((B, T, D))
        for kind, (init, run) in cells.items():
            params = init(jax.random.key(0), D, H)
            loss = lambda p, x, run=run: jnp.mean(jnp.square(run(p, x)[0]))
            train = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            forward = jax.jit(lambda p, x, run=run: run(p, x)[0])
            for mode, f, layouts in (("train", train, ("feature",)), ("forward", forward, ("feature", "batch"))):
                for layout in layouts:
                    with jaxlstm.tuning.forced(layout):
                        hlo = f.lower(params, xs).compile().as_text()
                    with open(os.path.join(out, f"{name}.{kind}.{mode}.{layout}.hlo"), "w") as fh:
                        fh.write(normalised(hlo))
        print(name, flush=True)
    if not features:
        return
    xs = jax.random.normal(jax.random.key(1), (3, 7, 4))
    for name, run, params, kw in _feature_cases(jax, jnp, jaxlstm):
        x = jnp.swapaxes(xs, 0, 1) if kw.get("time_major") else xs

        def loss(p, x, run=run, kw=kw):
            ys, state = run(p, x, **kw)
            return jnp.sum(ys * jnp.cos(ys)) + sum(jnp.sum(jnp.sin(s)) for s in jax.tree.leaves(state))

        train = jax.jit(jax.grad(loss, argnums=(0, 1)))
        forward = jax.jit(lambda p, x, run=run, kw=kw: run(p, x, **kw))
        for mode, f, layout in (
            ("train", train, "feature"),
            ("forward", forward, "feature"),
            ("forward", forward, "batch"),
        ):
            with jaxlstm.tuning.forced(layout):
                hlo = f.lower(params, x).compile().as_text()
            with open(os.path.join(out, f"feature-{name}.{mode}.{layout}.hlo"), "w") as fh:
                fh.write(normalised(hlo))
    print("features", flush=True)


def compare(a: str, b: str) -> int:
    names = sorted(set(os.listdir(a)) | set(os.listdir(b)))
    differ = 0
    for n in names:
        pa, pb = os.path.join(a, n), os.path.join(b, n)
        if not (os.path.exists(pa) and os.path.exists(pb)):
            print(f"{n}: in one only")
            differ += 1
            continue
        with open(pa) as fa, open(pb) as fb:
            la, lb = _unnamed(fa.read()), _unnamed(fb.read())
        if la != lb:
            changed = sum(1 for d in difflib.unified_diff(la, lb, lineterm="", n=0) if d[:1] in "+-") - 2
            print(f"{n}: differs ({changed} lines)")
            differ += 1
    print(f"{len(names) - differ} of {len(names)} programs the same")
    return differ


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the folder to write the programs to (or the first of two to compare)")
    ap.add_argument("--compare", metavar="OTHER", help="compare the programs in OUT and OTHER instead")
    ap.add_argument("--source", metavar="CHECKOUT", help="compile another checkout's jaxlstm (its root folder)")
    ap.add_argument("--features", action="store_true", help="add small programs of every sequence feature")
    args = ap.parse_args(argv)
    if args.compare:
        return 1 if compare(args.out, args.compare) else 0
    write(args.out, args.source, args.features)
    return 0


if __name__ == "__main__":
    sys.exit(main())
