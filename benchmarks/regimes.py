"""The main job: jaxlstm against flax and PyTorch over a grid of regimes, LSTM and GRU.

    python -m benchmarks.throughput            # this grid (a few minutes on 2 cores)
    python -m benchmarks.throughput --quick    # tiny shapes, seconds

Regimes ``(B, D, H, T)``: latency (1, 32, 64, 1000), small (8, 64, 128, 256), base
(32, 128, 256, 256), big-H (64, 512, 1024, 64), long-T (16, 64, 128, 4096). For each
regime, cell (LSTM, GRU) and mode (forward; train = value and grad of a mean-square
loss over all outputs w.r.t. params and inputs):

* jaxlstm and flax (``nn.RNN(OptimizedLSTMCell)`` / ``nn.RNN(GRUCell)``) are timed
  in this process, interleaved round by round (medians after a warm-up,
  ``block_until_ready``);
* ``torch.nn.LSTM`` / ``nn.GRU`` (when installed) are timed in a separate process,
  before any JAX work starts here: XLA's and PyTorch's thread pools both spin after
  work and steal each other's cores when they share a process;
* ``jaxlstm`` / ``jaxlstm-gru`` is what ``jaxlstm.lstm`` / ``jaxlstm.gru`` run by default:
  on CPU the native code (:mod:`jaxlstm._native`) where it is built and
  :mod:`jaxlstm.tuning` chose it on this machine; ``jaxlstm-xla`` / ``jaxlstm-gru-xla`` is
  the pure-XLA path beside it, the LSTM's with the forward layout the tuner chose
  (choices recorded under ``tuning``; ``JAXLSTM_AUTOTUNE=0`` for the defaults; the
  record says whether the native code was built);
* the *bare recurrent dot* of the shape, ``h @ w_hh`` (``[B, H]·[H, G·H]``, every
  output used) in a ``lax.scan`` of T steps, is timed with the JAX ones: the floor
  of a step. ``step/dot`` is jaxlstm's forward time per step over it.

Also the share of the machine's peak f32 matmul (best of 7 ``jnp.dot`` 2048², probed before
the grid and again after every regime; the best probe is the peak, and the spread of the probes
is printed where it says the machine was busy at times; a row faster than every probe is taken
as the peak, and said, so that no share exceeds 100 %). Before the grid, the load of other
processes is measured (``machine.other_load``) and a warning printed above a quarter of the
CPUs. The machine record names the CPU model, family and core count. Writes
``regimes.json`` to ``--out`` (default ``benchmarks/runs/<device>/``, untracked).

``--dtype bfloat16`` (``regimes-bfloat16.json``): every implementation's params and inputs in
bf16 (jaxlstm's and flax's GEMMs then take bf16 operands; PyTorch's module in bf16, its own
process), the share of peak taken of the bf16 peak (jaxlstm's bf16 GEMM on 2048², where the CPU
has AVX512_BF16: XLA:CPU has no bf16 GEMM of its own). The bare dot stays XLA's float32 one.
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

REGIMES = {
    "latency": (1, 32, 64, 1000),
    "small": (8, 64, 128, 256),
    "base": (32, 128, 256, 256),
    "big-H": (64, 512, 1024, 64),
    "long-T": (16, 64, 128, 4096),
}
QUICK = {"tiny": (2, 4, 8, 16), "tiny-long": (1, 3, 4, 64)}
# Rows of short calls get rounds past --repeats until their calls took this long (within --budget-s):
# the latency rows (1-2 ms) then have a median of ~40 rounds, not 7.
FILL_S = 0.5
GATES = {"lstm": 4, "gru": 3}
# jaxlstm's default, the peer, and jaxlstm's pure-XLA path beside its native CPU code.
IMPLS = {"lstm": ("jaxlstm", "flax-optimized", "jaxlstm-xla"), "gru": ("jaxlstm-gru", "flax-gru", "jaxlstm-gru-xla")}


def flops(cell: str, mode: str, B: int, T: int, D: int, H: int) -> float:
    fwd = 2.0 * B * T * GATES[cell] * H * (D + H)
    return fwd if mode == "forward" else 3.0 * fwd


# ---------------------------------------------------------------------------
# PyTorch, in its own process


def _torch_worker(grid: dict, repeats: int, budget_s: float, device: str = "cpu", dtype: str = "float32") -> list:
    """PyTorch's timings, on CUDA where ``device`` is ``"gpu"`` and torch sees one (cuDNN); in
    ``dtype`` (module and inputs: PyTorch's bf16 runs oneDNN's bf16 kernels)."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    gpu = device == "gpu" and torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    sync = torch.cuda.synchronize if gpu else (lambda: None)  # a CUDA call returns before its work ends
    out = []
    for name, (B, D, H, T) in grid.items():
        for cell in GATES:
            m = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](D, H, batch_first=True).to(dev, tdtype)
            x = torch.from_numpy(np.random.default_rng(0).standard_normal((B, T, D), dtype=np.float32))
            x = x.to(dev, tdtype)
            x.requires_grad_(True)

            def forward(m=m, x=x):
                with torch.no_grad():
                    y = m(x)[0]
                sync()
                return y

            def train(m=m, x=x):
                m.zero_grad(set_to_none=True)
                x.grad = None
                loss = m(x)[0].float().square().mean()
                loss.backward()
                sync()
                return loss

            times = C.time_interleaved({"forward": forward}, repeats, budget_s=budget_s)
            times.update(C.time_interleaved({"train": train}, repeats, budget_s=budget_s))
            for mode, ts in times.items():
                out.append(dict(regime=name, cell=cell, mode=mode, impl="torch", **C.summarize(ts)))
    return out


def _torch_times(grid, repeats, budget_s, device="cpu", dtype="float32") -> list:
    """Runs :func:`_torch_worker` in a fresh interpreter; [] without torch."""
    if not C.torch_available():
        return []
    spec = json.dumps([grid, repeats, budget_s, device, dtype])
    cmd = [sys.executable, "-m", "benchmarks.regimes", "--torch-worker", spec]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# JAX, here


def _bare_dot(B, H, G, T):
    """A ``lax.scan`` of ``h @ w_hh`` over T steps, all G·H outputs used."""
    import jax
    import jax.numpy as jnp

    w = jax.random.normal(jax.random.key(0), (H, G * H), jnp.float32) / np.sqrt(H)

    def run(w, h0):
        def body(h, _):
            z = h @ w
            return jnp.tanh(z.reshape(B, G, H).sum(1)), None

        return jax.lax.scan(body, h0, None, length=T)[0]

    h0 = jnp.ones((B, H), jnp.float32)
    f = jax.jit(run).lower(w, h0).compile()
    return lambda: jax.block_until_ready(f(w, h0))


def _platform() -> str:
    """JAX's default platform, asked in a fresh interpreter: the PyTorch worker runs first
    and must not share a process with JAX's runtime."""
    cmd = [sys.executable, "-c", "import jax; print(jax.default_backend())"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return res.stdout.strip().splitlines()[-1]


def run(grid: dict, repeats: int, budget_s: float, quick: bool = False, dtype: str = "float32") -> dict:
    """Times the grid in ``dtype`` (bfloat16: every implementation's params and inputs, jaxlstm's
    and flax's GEMMs in bf16, PyTorch's module); a progress bar on stderr and a line per finished
    row on stdout."""
    from tqdm import tqdm

    platform = _platform()
    if C.torch_available():
        print("timing PyTorch in its own process first ...", flush=True)
    else:
        print('PyTorch is not installed: the "vs torch" column stays empty (pip install torch)', flush=True)
    torch_recs = _torch_times(grid, repeats, budget_s, platform, dtype)  # before any JAX work here
    from jaxlstm import tuning

    info = C.machine_info()
    info["dtype"] = dtype
    info["other_load"] = tuning.other_load(1.0)
    if info["other_load"] is not None and info["other_load"] > tuning.BUSY:
        print(
            f"warning: other processes keep {100 * info['other_load']:.0f} % of the CPUs busy: the timings "
            "and the tuner's choices will be off (the tuner keeps none made now on disk)",
            flush=True,
        )
    n = 512 if quick else 2048
    probe = C.peak_bf16_gflops if dtype == "bfloat16" else C.peak_matmul_gflops
    peaks = [probe(n)]  # the peak is probed again after every regime: its best is the machine's
    f32_peaks = peaks if dtype == "float32" else [C.peak_matmul_gflops(n)]
    records = list(torch_recs)
    rechecked = []
    bar = tqdm(total=len(grid) * len(GATES) * 2, desc="regimes", unit="row", file=sys.stderr, leave=False)
    for name, (B, D, H, T) in grid.items():
        for cell in GATES:
            built = {impl: C.build(impl, B, T, D, H, dtype) for impl in IMPLS[cell]}
            if dtype != "float32":  # jaxlstm's own float32 beside it, interleaved: what bf16 gains
                built[IMPLS[cell][0] + "@float32"] = C.build(IMPLS[cell][0], B, T, D, H, "float32")
            if cell == "lstm" and platform == "gpu":
                try:  # jax.experimental.rnn's cuDNN LSTM: experimental, its signature may move
                    built["jax-cudnn"] = C.build("jax-cudnn", B, T, D, H, dtype)
                except Exception as e:  # noqa: BLE001 - reported, and the grid goes on without it
                    print(f"jax-cudnn skipped at {name}: {type(e).__name__}: {e}", file=sys.stderr)
            dot = _bare_dot(B, H, GATES[cell], T)
            path = C.jaxlstm_path(cell, B, T, D, H, dtype)
            for mode in ("forward", "train"):
                fns = {impl: b[mode] for impl, b in built.items()}
                if mode == "forward":
                    fns["bare-dot"] = dot
                times = C.time_interleaved(fns, repeats, budget_s=budget_s, fill_s=0.0 if quick else FILL_S)
                if mode == "train":  # the tuner's word against this row's: the same programs timed again
                    rechecked += _recheck(name, cell, path, times, fns, (B, D, H, T), dtype)
                for impl, ts in times.items():
                    rec = dict(regime=name, cell=cell, mode=mode, impl=impl, **C.summarize(ts), times_s=ts)
                    if impl in built:
                        rec["compile_s"] = built[impl][mode + "_compile_s"]
                    if impl == IMPLS[cell][0]:
                        rec["path"] = path
                    records.append(rec)
                ms = {impl: 1e3 * C.summarize(ts)["median_s"] for impl, ts in times.items()}
                ours, peer = IMPLS[cell][:2]
                bar.write(f"{name} {cell} {mode}: jaxlstm {ms[ours]:.2f} ms, {peer} {ms[peer]:.2f} ms "
                          f"({C.paired_ratio(times[peer], times[ours]):.2f}x; jaxlstm on {path})")  # fmt: skip
                bar.update()
            del built
        peaks.append(probe(n))
    bar.close()
    for r in records:
        B, D, H, T = grid[r["regime"]]
        r.update(batch=B, input_size=D, hidden_size=H, seq_len=T, tokens_per_s=B * T / r["median_s"])
        if r["impl"] != "bare-dot":
            r["gflops"] = flops(r["cell"], r["mode"], B, T, D, H) / r["median_s"] / 1e9
    peak = _peak(info, peaks, [r for r in records if "gflops" in r], dtype)
    if dtype != "float32":
        info["peak_matmul_gflops"] = max(f32_peaks)
    for r in records:
        if "gflops" in r:
            r["fraction_of_peak"] = r["gflops"] / peak
    return {"machine": info, "regimes": grid, "records": records, "tuning": _tuning_choices(), "rechecked": rechecked}


def contradicts_tuner(cell: str, path: str, times: dict) -> float | None:
    """Where a training row ran the native code (the tuner's choice) while the pure-XLA path beside it, in
    the same interleaved rounds, was more than the tuner's margin faster (the median over rounds of the
    time ratio XLA / default, as the tuner compares, below ``1 - jaxlstm.tuning.MARGIN``): that ratio;
    else ``None``. The tuner decides on training steps, so forward rows are not its word to check."""
    from jaxlstm import tuning

    ours, xla = IMPLS[cell][0], IMPLS[cell][2]
    if path != "native" or ours not in times or xla not in times:
        return None
    ratio = C.paired_ratio(times[xla], times[ours])
    return ratio if ratio < 1 - tuning.MARGIN else None


def _recheck(name, cell, path, times, fns, shape, dtype) -> list:
    """The row's two programs (jaxlstm's default and its XLA path) timed again by the tuner's rule
    (``jaxlstm.tuning.recheck``), its choice for this shape replaced where they now say otherwise."""
    from jaxlstm import tuning

    ratio = contradicts_tuner(cell, path, times)
    if ratio is None or not tuning.enabled():  # autotuning off: the native code is the default, no choice
        return []
    print(f"jaxlstm.tuning chose the native code for {name} {cell} training, where the XLA path beside it "
          f"measured {1 / ratio:.2f}x faster here: timing the two again", file=sys.stderr)  # fmt: skip
    probes = {"native": fns[IMPLS[cell][0]], "xla": fns[IMPLS[cell][2]]}
    line = tuning.recheck(*shape, cell, dtype=C.jnp.dtype(dtype), probes=probes)  # the GEMMs' dtype, as path_of
    if line is None:
        return []
    print(f"  {line}", file=sys.stderr)
    return [dict(regime=name, cell=cell, vs_xla_path=ratio, now=line)]


def _peak(info: dict, probes: list, records: list, dtype: str) -> float:
    """The machine's peak: the best of the probes around the rows, recorded with all of them; a
    warning where they spread (a busy machine); where a row ran faster still (the probes all
    fell in busy moments), that row's rate, said: no share of peak above 100 %."""
    name = "peak_bf16_gflops" if dtype == "bfloat16" else "peak_matmul_gflops"
    info[name.replace("_gflops", "_probes_gflops")] = probes
    peak = max(probes)
    if min(probes) < 0.75 * peak:
        print(
            f"warning: the {dtype} peak probes ranged {min(probes):.0f}-{peak:.0f} GFLOP/s over the run: the "
            "machine was busy at times (shares of peak use the best; compare ratios within a row)",
            flush=True,
        )
    fastest = max(records, key=lambda r: r["gflops"], default=None)
    if fastest is not None and fastest["gflops"] > peak:
        print(
            f"note: {fastest['regime']} {fastest['cell']} {fastest['mode']} ({fastest['impl']}) ran at "
            f"{fastest['gflops']:.0f} GFLOP/s, above every peak probe ({peak:.0f}): it is taken as the peak",
            flush=True,
        )
        info[name.replace("_gflops", "_from_row")] = f"{fastest['regime']} {fastest['cell']} {fastest['mode']}"
        peak = fastest["gflops"]
    info[name] = peak
    return peak


def _tuning_choices() -> dict:
    """What jaxlstm.tuning chose on this machine (its disk cache), and whether the native code is built."""
    from jaxlstm import _native, tuning

    rec = {"enabled": tuning.enabled(), "native": _native.available(), "native_error": _native.load_error()}
    try:
        with open(tuning.cache_file()) as f:
            return {**rec, "choices": json.load(f)}
    except (OSError, ValueError):
        return {**rec, "choices": {}}


def _ratio(other: dict | None, ours: dict) -> float | None:
    """``other``'s time over ours: round by round where both were timed in the same interleaved
    rounds (``times_s``, the same mode; ``benchmarks._common.paired_ratio``), else (PyTorch, timed in its own
    process; results written before ``times_s`` was recorded) the ratio of the medians."""
    if other is None:
        return None
    if "times_s" in other and "times_s" in ours and other["mode"] == ours["mode"]:
        return C.paired_ratio(other["times_s"], ours["times_s"])
    return other["median_s"] / ours["median_s"]


def rows(result: dict) -> list:
    """One row per (regime, cell, mode): the ratios the issue's targets are stated in, those between
    programs timed in the same process the median of their per-round ratios."""
    recs = result["records"]
    get = lambda reg, cell, mode, impl: next(
        (r for r in recs if (r["regime"], r["cell"], r["mode"], r["impl"]) == (reg, cell, mode, impl)), None
    )
    out = []
    for reg in result["regimes"]:
        for cell in GATES:
            ours_name, flax_name, xla_name = IMPLS[cell]
            for mode in ("forward", "train"):
                ours, flax = get(reg, cell, mode, ours_name), get(reg, cell, mode, flax_name)
                xla, f32 = get(reg, cell, mode, xla_name), get(reg, cell, mode, ours_name + "@float32")
                torch, dot = get(reg, cell, mode, "torch"), get(reg, cell, "forward", "bare-dot")
                cudnn = get(reg, cell, mode, "jax-cudnn")
                if ours is None or flax is None:
                    continue
                T = ours["seq_len"]
                row = dict(
                    regime=reg,
                    cell=cell,
                    mode=mode,
                    jaxlstm_tokens_per_s=ours["tokens_per_s"],
                    path=ours.get("path"),
                    vs_flax=_ratio(flax, ours),
                    vs_xla_path=_ratio(xla, ours),
                    vs_own_float32=_ratio(f32, ours),
                    vs_torch=_ratio(torch, ours),
                    vs_cudnn=_ratio(cudnn, ours),
                    fraction_of_peak=ours["fraction_of_peak"],
                    step_us=1e6 * ours["median_s"] / T,
                    dot_us=None if dot is None else 1e6 * dot["median_s"] / T,
                )
                row["step_over_dot"] = None if dot is None else _ratio(ours, dot)  # forward: the same rounds
                out.append(row)
    return out


def table(result: dict) -> str:
    fmt = lambda v, f=".2f", unit="x": "" if v is None else format(v, f) + unit
    rs = rows(result)
    cudnn = any(r.get("vs_cudnn") for r in rs)  # jax.experimental.rnn, on GPUs only
    own = any(r.get("vs_own_float32") for r in rs)  # the bf16 grid: jaxlstm's float32 beside it
    head = ["regime (B, D, H, T)", "cell", "mode", "jaxlstm tok/s", "vs flax", "vs torch"]
    head += ["vs jax cuDNN"] * cudnn + ["vs XLA path"] + ["vs own f32"] * own
    head += ["% of peak", "step µs", "dot µs", "step/dot"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rs:
        shape = ", ".join(map(str, result["regimes"][r["regime"]]))
        step_dot = fmt(r["step_over_dot"]) if r["mode"] == "forward" else ""
        cells = [f"{r['regime']} ({shape})", r["cell"], r["mode"], f"{r['jaxlstm_tokens_per_s']:.0f}"]
        cells += [fmt(r["vs_flax"]), fmt(r["vs_torch"])] + [fmt(r.get("vs_cudnn"))] * cudnn
        cells += [fmt(r["vs_xla_path"])] + [fmt(r.get("vs_own_float32"))] * own
        cells += [f"{100 * r['fraction_of_peak']:.0f}%", f"{r['step_us']:.1f}", fmt(r["dot_us"], ".1f", ""), step_dot]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=4.0, help="per timing group: stop after this, min 3 rounds")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16: params and inputs in bf16 for every implementation (docs/precision.md)",
    )
    ap.add_argument("--thp", action="store_true", help=f"restart with GLIBC_TUNABLES={C.THP_TUNABLE}")
    ap.add_argument("--out", default=None, help="default benchmarks/runs/<device>/ (untracked)")
    ap.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.torch_worker is not None:
        print(json.dumps(_torch_worker(*json.loads(args.torch_worker))))
        return {}
    if args.thp:
        C.reexec_with_thp("benchmarks.throughput", sys.argv[1:] if argv is None else argv)
    grid = QUICK if args.quick else {k: REGIMES[k] for k in args.regimes}
    repeats, budget = (3, 0.3) if args.quick else (args.repeats, args.budget_s)
    t0 = time.perf_counter()
    result = run(grid, repeats, budget, quick=args.quick, dtype=args.dtype)
    result["wall_s"] = time.perf_counter() - t0
    m = result["machine"]
    peaks = f"peak f32 {m['peak_matmul_gflops']:.0f} GFLOP/s"
    if "peak_bf16_gflops" in m:
        peaks += f", bf16 {m['peak_bf16_gflops']:.0f} GFLOP/s (the % of peak column: of bf16's)"
    print(f"{m['cpu']} (family {m.get('cpu_family')}, {m['cores']} cores), {args.dtype}; {peaks}")
    print(table(result))
    out = args.out or C.results_dir()
    os.makedirs(out, exist_ok=True)
    name = "regimes.json" if args.dtype == "float32" else f"regimes-{args.dtype}.json"
    C.write_json(os.path.join(out, name), result)
    print(f"wrote {out}/{name} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
