"""Peak temporary memory of a train step against sequence length, with and without checkpointing.

    python -m benchmarks.memory                 # T = 256 ... 16384, plus the throughput trade-off at T=4096
    python -m benchmarks.memory --quick

Memory is XLA's own accounting of the compiled train step
(``jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``): what the
step allocates beyond its inputs and outputs. Ratios compare each variant with
the un-checkpointed run of the same layout (``jaxlstm`` or ``jaxlstm-tm``, the
latter fed time-major inputs, which saves the batch-major <-> time-major copies). Nothing is executed for it, so long
sequences cost only a compile. Throughput (tokens/s of the same train step,
interleaved medians) is measured at ``--time-seq-lens``.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from tqdm import tqdm

from . import _common as C


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--time-seq-lens", type=int, nargs="*", default=[4096])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument(
        "--impls",
        nargs="+",
        default=[
            "jaxlstm",
            "jaxlstm-ckpt64",
            "jaxlstm-ckpt256",
            "jaxlstm-tm",
            "jaxlstm-tm-ckpt64",
            "jaxlstm-tm-ckpt256",
            "jaxlstm-autodiff",
            "flax-optimized",
        ],
        help="jaxlstm[-tm][-ckptK]: -tm feeds time-major [T, B, D] inputs (no layout copies)",
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_lens, args.time_seq_lens, args.batch, args.input_size, args.hidden_size = [16, 64], [64], 2, 4, 8
        args.impls, args.repeats = ["jaxlstm", "jaxlstm-ckpt8", "jaxlstm-tm", "jaxlstm-tm-ckpt8", "flax-optimized"], 3
    out = args.out or C.results_dir()
    B, D, H = args.batch, args.input_size, args.hidden_size
    records = []
    for T in tqdm(args.seq_lens, desc="seq_len"):
        timed = {}
        for impl in args.impls:
            shape = C.input_shape(impl, B, T, D)
            xs = jax.ShapeDtypeStruct(shape, jnp.float32)
            init, apply = C.jax_impl(impl, B, D, H)
            params = init(jax.random.key(0))
            compiled = jax.jit(C.train_step(apply)).lower(params, xs).compile()
            mem = compiled.memory_analysis()
            rec = dict(
                impl=impl,
                mode="train",
                batch=B,
                seq_len=T,
                input_size=D,
                hidden_size=H,
                dtype="float32",
                temp_bytes=int(mem.temp_size_in_bytes),
                argument_bytes=int(mem.argument_size_in_bytes),
                output_bytes=int(mem.output_size_in_bytes),
            )
            records.append(rec)
            if T in args.time_seq_lens:
                x = jax.random.normal(jax.random.key(1), shape)
                timed[impl] = (rec, lambda c=compiled, p=params, x=x: jax.block_until_ready(c(p, x)))
        if timed:
            times = C.time_interleaved({k: v[1] for k, v in timed.items()}, args.repeats)
            for impl, ts in times.items():
                s = C.summarize(ts)
                timed[impl][0].update(tokens_per_s=B * T / s["median_s"], **s)
    # each variant against its own layout's un-checkpointed run
    base_of = lambda impl: "jaxlstm-tm" if impl.startswith("jaxlstm-tm") else "jaxlstm"
    base = {(r["impl"], r["seq_len"]): r for r in records if r["impl"] in ("jaxlstm", "jaxlstm-tm")}
    print(f"{'T':>6s} {'impl':18s} {'temp MiB':>10s} {'vs base':>11s} {'tok/s':>9s} {'tok/s vs base':>17s}")
    for r in records:
        b = base.get((base_of(r["impl"]), r["seq_len"]))
        r["temp_ratio_vs_base"] = None if b is None else r["temp_bytes"] / max(b["temp_bytes"], 1)
        r["throughput_ratio_vs_base"] = (
            r["tokens_per_s"] / b["tokens_per_s"]
            if b is not None and "tokens_per_s" in r and "tokens_per_s" in b
            else None
        )
        tps = f"{r['tokens_per_s']:9.0f}" if "tokens_per_s" in r else " " * 9
        tr = f"{r['throughput_ratio_vs_base']:.2f}x" if r["throughput_ratio_vs_base"] else ""
        print(
            f"{r['seq_len']:6d} {r['impl']:18s} {r['temp_bytes'] / 2**20:10.1f} "
            f"{r['temp_ratio_vs_base'] or 0:10.3f}x {tps} {tr:>17s}"
        )
    result = {"machine": C.machine_info(), "records": records}
    os.makedirs(out, exist_ok=True)
    C.write_json(os.path.join(out, "memory.json"), result)
    _plot(records, os.path.join(out, "memory.png"))
    print(f"wrote {out}/memory.json and memory.png")
    return result


def _plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for impl in dict.fromkeys(r["impl"] for r in records):
        rs = sorted((r for r in records if r["impl"] == impl), key=lambda r: r["seq_len"])
        ax.plot([r["seq_len"] for r in rs], [r["temp_bytes"] / 2**20 for r in rs], marker="o", label=impl)
    r0 = records[0]
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="sequence length T",
        ylabel="peak temp memory of a train step (MiB)",
        title=f"train step, B={r0['batch']} D={r0['input_size']} H={r0['hidden_size']} float32",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
