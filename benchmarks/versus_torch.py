"""jaxlstm against PyTorch in alternating processes, round by round.

    python -m benchmarks.versus_torch --dtype bfloat16 --regimes small base big-H --rounds 5

The main job (``benchmarks.regimes``) times PyTorch in one process before the JAX grid: one sitting
each, minutes apart. On a machine whose speed drifts (a shared VM: the same program's time moved
1.5x within minutes on the Zen 4 of ``benchmarks/results``) one busy sitting moves every "vs torch"
ratio of a run. Here each round times PyTorch in a fresh process and then jaxlstm (its default
path, as ``jaxlstm.lstm`` / ``jaxlstm.gru`` run it) in another, at the same shapes, LSTM and GRU,
forward and training; a row's ratio is the median of its rounds' ratios (each round's pair timed
seconds apart), with their spread. Medians of interleaved repeats after a warm-up in each process,
``block_until_ready``; the two never share a process (their thread pools spin and steal each
other's cores). Writes ``versus-torch-<dtype>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from . import _common as C
from . import regimes as R

IMPL = {"lstm": "jaxlstm", "gru": "jaxlstm-gru"}


def _jax_worker(grid: dict, repeats: int, budget_s: float, dtype: str) -> dict:
    """jaxlstm's timings (its default path) and the machine record, as ``regimes._torch_worker``'s."""
    out = []
    for name, (B, D, H, T) in grid.items():
        for cell in R.GATES:
            built = C.build(IMPL[cell], B, T, D, H, dtype)
            for mode in ("forward", "train"):
                ts = C.time_interleaved({mode: built[mode]}, repeats, budget_s=budget_s)[mode]
                path = C.jaxlstm_path(cell, B, T, D, H, dtype)
                out.append(dict(regime=name, cell=cell, mode=mode, impl="jaxlstm", path=path, **C.summarize(ts)))
    return {"records": out, "machine": C.machine_info()}


def _worker(kind: str, spec: list):
    cmd = [sys.executable, "-m", "benchmarks.versus_torch", f"--{kind}-worker", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(grid: dict, rounds: int, repeats: int, budget_s: float, dtype: str) -> dict:
    spec = [grid, repeats, budget_s, dtype]
    sittings, machine = [], {}
    for r in range(rounds):
        t0 = time.perf_counter()
        torch_recs = _worker("torch", [grid, repeats, budget_s, "cpu", dtype])
        jax_out = _worker("jax", spec)
        machine = jax_out["machine"]
        sittings.append({"torch": torch_recs, "jaxlstm": jax_out["records"]})
        print(f"round {r + 1}/{rounds}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for name in grid:
        for cell in R.GATES:
            for mode in ("forward", "train"):
                pick = lambda recs: next(x for x in recs if (x["regime"], x["cell"], x["mode"]) == (name, cell, mode))
                torch_s = [pick(s["torch"])["median_s"] for s in sittings]
                ours = [pick(s["jaxlstm"]) for s in sittings]
                ours_s = [x["median_s"] for x in ours]
                ratios = [t / o for t, o in zip(torch_s, ours_s, strict=True)]
                rows.append(dict(regime=name, cell=cell, mode=mode, path=ours[-1]["path"],
                                 torch_ms=[1e3 * t for t in torch_s], jaxlstm_ms=[1e3 * o for o in ours_s],
                                 vs_torch=float(np.median(ratios)), vs_torch_min=min(ratios),
                                 vs_torch_max=max(ratios)))  # fmt: skip
    machine["dtype"] = dtype
    return {"machine": machine, "regimes": grid, "rounds": rounds, "rows": rows, "sittings": sittings}


def table(result: dict) -> str:
    lines = [
        "| regime (B, D, H, T) | cell | mode | torch ms (median of rounds) | jaxlstm ms "
        "| vs torch: median of rounds [min–max] |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        shape = ", ".join(map(str, result["regimes"][r["regime"]]))
        lines.append(
            f"| {r['regime']} ({shape}) | {r['cell']} | {r['mode']} | {np.median(r['torch_ms']):.2f} | "
            f"{np.median(r['jaxlstm_ms']):.2f} | {r['vs_torch']:.2f}x "
            f"[{r['vs_torch_min']:.2f}–{r['vs_torch_max']:.2f}] |"
        )
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", nargs="+", default=list(R.REGIMES), choices=list(R.REGIMES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds, seconds")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=3.0, help="per row and process: stop after this, min 3 calls")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=None, help="default benchmarks/runs/<device>/ (untracked)")
    ap.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--jax-worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.torch_worker is not None:
        print(json.dumps(R._torch_worker(*json.loads(args.torch_worker))))
        return {}
    if args.jax_worker is not None:
        print(json.dumps(_jax_worker(*json.loads(args.jax_worker))))
        return {}
    if not C.torch_available():
        raise SystemExit("PyTorch is not installed: pip install torch (the optional extra) to compare with it")
    if args.rounds < 1 and not args.quick:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    grid = R.QUICK if args.quick else {k: R.REGIMES[k] for k in args.regimes}
    rounds, repeats, budget = (2, 3, 0.3) if args.quick else (args.rounds, args.repeats, args.budget_s)
    result = run(grid, rounds, repeats, budget, args.dtype)
    m = result["machine"]
    print(f"{m['cpu']} (family {m.get('cpu_family')}, model {m.get('cpu_model')}, {m['cores']} cores), {args.dtype}")
    print(table(result))
    out = args.out or C.results_dir()
    path = os.path.join(out, f"versus-torch-{args.dtype}.json")
    C.write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
