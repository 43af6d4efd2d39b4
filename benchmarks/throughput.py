"""The main job. By default the regime grid of :mod:`benchmarks.regimes` (LSTM and GRU,
forward and train, against flax and PyTorch); with ``--sweep``, sequence length
against tokens/s at one shape, for jaxlstm and its peers:

    python -m benchmarks.throughput                    # the regime grid (a few minutes on 2 cores)
    python -m benchmarks.throughput --quick            # the grid on tiny shapes
    python -m benchmarks.throughput --sweep            # T = 16 ... 4096 at B=32 D=128 H=256
    python -m benchmarks.throughput --sweep --quick    # smoke run, tiny shapes

The sweep:
Every implementation is compiled first (compile time recorded separately), warmed
up, then timed round by round, one call of each per round, so that machine noise
hits them alike. Reports medians and the interquartile range, the ratio to
``flax.linen.RNN(OptimizedLSTMCell)`` and the fraction of the machine's measured
peak f32 matmul. Writes ``throughput.json`` and ``throughput.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from . import _common as C
from . import regimes

BASELINE = "flax-optimized"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="the T sweep at one shape instead of the regime grid")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--impls",
        nargs="+",
        default=None,
        choices=C.ALL_IMPLS,
        help="default: jaxlstm, jaxlstm-ckpt64, both flax cells, torch if installed, cuDNN on GPU",
    )
    ap.add_argument("--all-impls", action="store_true", help="also the unroll8 / bf16 / autodiff variants")
    ap.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--budget-s", type=float, default=6.0, help="per (T, mode): stop repeating after this, min 3 rounds"
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 lengths, every available implementation")
    ap.add_argument(
        "--thp",
        action="store_true",
        help=f"restart with glibc malloc on transparent huge pages (GLIBC_TUNABLES={C.THP_TUNABLE}); "
        "results go to benchmarks/runs/<device>-thp/",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="default benchmarks/runs/<device>/ (untracked); committed results: --out benchmarks/results/<name>",
    )
    args = ap.parse_args(argv)
    if args.thp:
        C.reexec_with_thp("benchmarks.throughput", argv)
    if args.quick:
        args.seq_lens, args.batch, args.input_size, args.hidden_size = [4, 8, 16], 2, 4, 8
        args.repeats, args.budget_s = 3, 0.5
    args.impls = args.impls or C.available_impls(full=args.all_impls or args.quick)
    args.out = args.out or C.results_dir()
    return args


def run(args) -> dict:
    info = C.machine_info()
    info["peak_matmul_gflops"] = C.peak_matmul_gflops(512 if args.quick else 2048)
    B, D, H = args.batch, args.input_size, args.hidden_size
    records = []
    for T in tqdm(args.seq_lens, desc="seq_len"):
        built = {impl: C.build(impl, B, T, D, H, args.dtype) for impl in args.impls}
        for mode in args.modes:
            times = C.time_interleaved({i: b[mode] for i, b in built.items()}, args.repeats, budget_s=args.budget_s)
            for impl, ts in times.items():
                s = C.summarize(ts)
                records.append(
                    dict(
                        impl=impl,
                        mode=mode,
                        batch=B,
                        seq_len=T,
                        input_size=D,
                        hidden_size=H,
                        dtype=args.dtype,
                        tokens_per_s=B * T / s["median_s"],
                        tokens_per_s_q25=B * T / s["q75_s"],
                        tokens_per_s_q75=B * T / s["q25_s"],
                        compile_s=built[impl][mode + "_compile_s"],
                        gflops=C.lstm_flops(mode, B, T, D, H) / s["median_s"] / 1e9,
                        **s,
                    )
                )
        del built
    for r in records:
        base = next(
            (b for b in records if b["impl"] == BASELINE and b["mode"] == r["mode"] and b["seq_len"] == r["seq_len"]),
            None,
        )
        r["ratio_vs_flax"] = None if base is None else r["tokens_per_s"] / base["tokens_per_s"]
        r["fraction_of_peak"] = r["gflops"] / info["peak_matmul_gflops"]
    return {"machine": info, "config": {k: v for k, v in vars(args).items() if k != "out"}, "records": records}


def table(result: dict) -> str:
    lines = [
        f"{'mode':8s} {'T':>5s} {'impl':18s} {'tok/s':>10s} {'IQR':>17s} {'vs flax':>8s} {'%peak':>6s} {'compile':>8s}"
    ]
    for r in sorted(result["records"], key=lambda r: (r["mode"], r["seq_len"])):
        ratio = "" if r["ratio_vs_flax"] is None else f"{r['ratio_vs_flax']:.2f}x"
        lines.append(
            f"{r['mode']:8s} {r['seq_len']:5d} {r['impl']:18s} {r['tokens_per_s']:10.0f} "
            f"{r['tokens_per_s_q25']:8.0f}-{r['tokens_per_s_q75']:<8.0f} {ratio:>8s} "
            f"{100 * r['fraction_of_peak']:5.1f}% {r['compile_s']:7.2f}s"
        )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    modes = sorted({r["mode"] for r in recs})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for impl in dict.fromkeys(r["impl"] for r in recs):
            rs = sorted((r for r in recs if r["impl"] == impl and r["mode"] == mode), key=lambda r: r["seq_len"])
            ax.errorbar(
                [r["seq_len"] for r in rs],
                [r["tokens_per_s"] for r in rs],
                yerr=[
                    [r["tokens_per_s"] - r["tokens_per_s_q25"] for r in rs],
                    [r["tokens_per_s_q75"] - r["tokens_per_s"] for r in rs],
                ],
                marker="o",
                label=impl,
                lw=2.5 if impl == "jaxlstm" else 1.2,
                capsize=2,
            )
        r0 = recs[0]
        ax.set(
            xscale="log",
            xlabel="sequence length T",
            ylabel="tokens / s",
            title=f"{mode}: B={r0['batch']} D={r0['input_size']} H={r0['hidden_size']} {r0['dtype']}",
        )
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{result['machine']['cpu']} ({result['machine']['cores']} cores), jax {result['machine']['jax']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--sweep" not in argv:
        return regimes.main(argv)
    args = parse(argv)
    result = run(args)
    print(table(result))
    if "torch" in args.impls:
        print(
            "(torch ran in this process, where its thread pool and XLA's contend: indicative only; "
            "the default regime grid times it in its own process)"
        )
    os.makedirs(args.out, exist_ok=True)
    C.write_json(os.path.join(args.out, "throughput.json"), result)
    plot(result, os.path.join(args.out, "throughput.png"))
    print(f"wrote {args.out}/throughput.json and throughput.png")
    return result


if __name__ == "__main__":
    main()
