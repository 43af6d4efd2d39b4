"""Writes ``SUMMARY.md`` from the JSON files of one results folder.

python -m benchmarks.summary [benchmarks/results/zen4]   # default: this machine's runs folder
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks._common import results_dir


def _load(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def throughput_table(tp) -> str:
    recs = tp["records"]
    impls = list(dict.fromkeys(r["impl"] for r in recs))
    lines = []
    for mode in ("forward", "train"):
        lens = sorted({r["seq_len"] for r in recs if r["mode"] == mode})
        lines.append(f"\n**{mode}**, tokens/s (ratio to flax-optimized, share of peak f32 matmul)\n")
        lines.append("| impl | " + " | ".join(f"T={T}" for T in lens) + " |")
        lines.append("|---|" + "---|" * len(lens))
        for impl in impls:
            cells = []
            for T in lens:
                r = next((r for r in recs if r["impl"] == impl and r["mode"] == mode and r["seq_len"] == T), None)
                cells.append(
                    ""
                    if r is None
                    else f"{r['tokens_per_s'] / 1e3:.1f}k ({r['ratio_vs_flax']:.2f}x, "
                    f"{100 * r['fraction_of_peak']:.0f}%)"
                )
            lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    if "torch" in impls:
        lines.append(
            "\n`torch` in this table ran in the same process as XLA, whose thread pools and PyTorch's steal each "
            "other's cores: indicative only. The regime grid (`regimes.json`) times PyTorch in its own process."
        )
    return "\n".join(lines)


def memory_table(mem) -> str:
    recs = mem["records"]
    lens = sorted({r["seq_len"] for r in recs})
    impls = list(dict.fromkeys(r["impl"] for r in recs))
    lines = [
        "| impl | "
        + " | ".join(f"T={T} MiB (vs base)" for T in lens)
        + " | tokens/s at timed T (vs same layout, no checkpointing) |",
        "|---|" + "---|" * (len(lens) + 1),
    ]
    for impl in impls:
        cells, tput = [], ""
        for T in lens:
            r = next((r for r in recs if r["impl"] == impl and r["seq_len"] == T), None)
            cells.append(
                ""
                if r is None
                else f"{r['temp_bytes'] / 2**20:.0f} ({r['temp_ratio_vs_base']:.2f}x)"
                if r.get("temp_ratio_vs_base")
                else ""
                if r is None
                else f"{r['temp_bytes'] / 2**20:.0f}"
            )
            if r is not None and "tokens_per_s" in r:
                tput = f"{r['tokens_per_s'] / 1e3:.1f}k at T={T} ({r['throughput_ratio_vs_base']:.2f}x)"
        lines.append(f"| {impl} | " + " | ".join(cells) + f" | {tput} |")
    return "\n".join(lines)


def compile_table(ct) -> str:
    recs = ct["records"]
    lines = [
        "| impl | mode | unroll | " + " | ".join(f"T={T}" for T in sorted({r["seq_len"] for r in recs})) + " |",
        "|---|---|---|" + "---|" * len({r["seq_len"] for r in recs}),
    ]
    keys = list(dict.fromkeys((r["impl"], r["mode"], r["unroll"]) for r in recs))
    for impl, mode, u in keys:
        rs = sorted(
            (r for r in recs if (r["impl"], r["mode"], r["unroll"]) == (impl, mode, u)), key=lambda r: r["seq_len"]
        )
        lines.append(f"| {impl} | {mode} | {u} | " + " | ".join(f"{r['total_s']:.2f}s" for r in rs) + " |")
    return "\n".join(lines)


def _regimes_section(rg) -> str:
    from . import regimes

    m = rg["machine"]
    tuning = rg.get("tuning", {})
    # each choice a record (its margin, rounds, load), or a bare string from before records
    layouts = sorted({v.get("choice") if isinstance(v, dict) else v for v in tuning.get("choices", {}).values()})
    built = tuning.get("native", tuning.get("kernel"))  # "kernel": a record from before the glossary
    error = tuning.get("native_error", tuning.get("kernel_error"))
    native_code = {True: "built", False: f"not built ({error})"}.get(built, "not recorded (a run before it)")
    native = m.get("native") or {}
    if built and native.get("isa"):
        native_code += f", ISA level {native['isa']} (levels built: {', '.join(native.get('isa_built', []))})"
    gpu = m.get("platform") == "gpu"
    bf16 = m.get("dtype", "float32") != "float32"
    flag, peak = "", ""
    if bf16:
        flag, peak = f" --dtype {m['dtype']}", f", bf16 {m.get('peak_bf16_gflops', 0):.0f} (the share of peak: of it)"
    return (
        f"## Regimes (`benchmarks.throughput{flag}`, the main job)\n\n"
        + (f"Device: {m['device']} (JAX on the GPU; PyTorch on CUDA, cuDNN), host " if gpu else "Machine: ")
        + f"{m['cpu']} (cpu family {m.get('cpu_family')}), {m['cores']} cores, jax {m['jax']}, "
        f"flax {m['flax']}, torch {m.get('torch')}; peak f32 matmul {m['peak_matmul_gflops']:.0f} GFLOP/s{peak}. "
        "Ratios are speed-ups of jaxlstm (>1: jaxlstm faster); torch timed in its own process; "
        "step/dot: jaxlstm's forward step over the bare recurrent dot of the shape; vs XLA path: jaxlstm's "
        "default (the native CPU code where it runs) over its pure-XLA path"
        + ("; vs jax cuDNN: over `jax.experimental.rnn.lstm`. " if gpu else ". ")
        + f"Native code: {native_code}. Choices of jaxlstm.tuning: {layouts}.\n\n"
        + regimes.table(rg)
        + "\n"
        + "".join(
            f"\nRechecked: {r['regime']} {r['cell']} training ran the native code at {r['vs_xla_path']:.2f}x the "
            f"XLA path, so the tuner timed it again: {r['now']}\n"
            for r in rg.get("rechecked", [])
        )
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="the folder of JSON files (default: where this machine's runs go)")
    folder = parser.parse_args(argv).folder or results_dir()
    if not os.path.isdir(folder):
        parser.error(f"folder must be a folder of benchmark JSON files, got {folder!r} (not a folder)")
    parts = ["# Benchmark results\n", "Generated by `python -m benchmarks.summary` from the JSON files here.\n"]
    tp = _load(folder, "throughput.json")
    if tp:
        m = tp["machine"]
        tunables = m.get("malloc_env", {}).get("GLIBC_TUNABLES")
        parts.append(
            f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']}, flax {m['flax']}, torch {m.get('torch')}; "
            f"peak f32 matmul {m['peak_matmul_gflops']:.0f} GFLOP/s; malloc: {m.get('allocator', 'default')}"
            f"{f' (GLIBC_TUNABLES={tunables})' if tunables else ''}. "
            f"B={tp['records'][0]['batch']}, D={tp['records'][0]['input_size']}, H={tp['records'][0]['hidden_size']}, "
            f"{tp['records'][0]['dtype']}; medians of interleaved rounds.\n"
        )
        parts.append("## Throughput (`benchmarks.throughput`)\n" + throughput_table(tp) + "\n")
    for name in ("regimes.json", "regimes-bfloat16.json"):
        rg = _load(folder, name)
        if rg:
            parts.append(_regimes_section(rg))
    for dtype in ("float32", "bfloat16"):
        vt = _load(folder, f"versus-torch-{dtype}.json")
        if vt:
            from . import versus_torch

            m = vt["machine"]
            parts.append(
                f"## Against PyTorch in alternating processes (`benchmarks.versus_torch --dtype {dtype}`)\n\n"
                f"Machine: {m['cpu']} (cpu family {m.get('cpu_family')}), {m['cores']} cores, torch "
                f"{m.get('torch')}; {vt['rounds']} rounds, each a PyTorch process then a jaxlstm one.\n\n"
                + versus_torch.table(vt)
                + "\n"
            )
    pr = _load(folder, "precision.json")
    if pr:
        from . import precision

        m = pr["machine"]
        parts.append(
            "## Error against float64 (`benchmarks.precision`)\n\n"
            f"Machine: {m['cpu']} (cpu family {m.get('cpu_family')}), {m['cores']} cores; each error is "
            "max |a - ref| / max |ref| over the array (weight grads: the worst of them).\n\n"
            + precision.table(pr)
            + "\n"
        )
    mem = _load(folder, "memory.json")
    if mem:
        parts.append("## Train-step temp memory (`benchmarks.memory`)\n\n" + memory_table(mem) + "\n")
    ct = _load(folder, "compile_time.json")
    if ct:
        parts.append(
            "## Compile time: trace + lower + compile (`benchmarks.compile_time`)\n\n" + compile_table(ct) + "\n"
        )
    for name, title in (
        ("layout.json", "Scan-body layout (`benchmarks.layout`)"),
        ("stack.json", "Bidirectional (`benchmarks.stack`)"),
    ):
        d = _load(folder, name)
        if d:
            parts.append(f"## {title}\n")
            key = "variant" if name == "layout.json" else "impl"
            ratio = "ratio" if name == "layout.json" else "ratio_vs_separate"
            parts.append("| case | T | tokens/s | ratio |\n|---|---|---|---|")
            parts.extend(
                f"| {r.get('mode', '') + ' ' if 'mode' in r else ''}{r[key]} | {r['seq_len']} | "
                f"{r['tokens_per_s'] / 1e3:.1f}k | {r[ratio]:.2f}x |"
                for r in d["records"]
            )
            parts.append("")
    for name, title, note, columns, ratio in (
        ("variants.json", "LSTM variants against the plain LSTM (`benchmarks.variants`)",
         "fused backward pass for all", ("variant", "mode"), ("vs_plain", "speed vs plain")),
        ("sharding.json", "Sharding on simulated host devices (`benchmarks.sharding`)",
         "shared by every simulated device", ("kind", "mode", "case"), ("vs_1", "speed vs 1 device")),
    ):  # fmt: skip
        d = _load(folder, name)
        if d:
            parts.append(f"## {title}\n\nMachine: {d['machine']['cpu']}, {d['machine']['cores']} cores; {note}.\n")
            head = ["(B, D, H, T)", *columns, "median", ratio[1]]
            parts.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
            parts.extend(
                f"| {tuple(r['shape'])} | "
                + " | ".join(str(r[c]) for c in columns)
                + f" | {r['median_s'] * 1e3:.1f} ms | {r[ratio[0]]:.2f}x |"
                for r in d["rows"]
            )
            parts.append("")
    text = "\n".join(parts)
    with open(os.path.join(folder, "SUMMARY.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
