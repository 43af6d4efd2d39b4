"""Shared pieces of the benchmark scripts: implementations, timing, machine info."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxlstm
from jaxlstm.tuning import cpu_info


def device_name() -> str:
    d = jax.devices()[0]
    return d.platform if d.platform == "cpu" else re.sub(r"[^a-z0-9]+", "-", d.device_kind.lower()).strip("-")


# glibc's malloc serves large blocks (XLA's per-call buffers) from fresh mmaps, so a
# train step page-faults its temporaries in again on every call. With this tunable
# malloc asks for transparent huge pages: 512x fewer faults. It must be set before
# the process starts; ``--thp`` re-executes the script with it.
THP_TUNABLE = "glibc.malloc.hugetlb=1"


def allocator() -> str:
    """``"thp"`` when glibc malloc uses transparent huge pages, else ``"default"``."""
    return "thp" if THP_TUNABLE in os.environ.get("GLIBC_TUNABLES", "") else "default"


def reexec_with_thp(module: str, argv) -> None:
    """Restarts ``python -m module argv`` with :data:`THP_TUNABLE` set (no-op if it already is)."""
    if allocator() == "thp":
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), THP_TUNABLE) if t)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def results_dir() -> str:
    """Where a run writes by default: ``benchmarks/runs/<device>[-thp]``, which git
    ignores. The committed results under ``benchmarks/results/`` are regenerated on
    purpose, with ``--out``."""
    return os.path.join("benchmarks", "runs", device_name() + ("-thp" if allocator() == "thp" else ""))


def machine_info() -> dict:
    cpuinfo = cpu_info()
    info = {
        "cpu": cpuinfo.get("model name", platform.processor()),
        "cpu_family": cpuinfo.get("cpu family"),
        "cpu_model": cpuinfo.get("model"),
        "cores": os.cpu_count(),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "allocator": allocator(),
        "malloc_env": {
            k: os.environ[k]
            for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
            if k in os.environ
        },
    }
    for mod in ("flax", "optax", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    # The native CPU code as this process runs it: its ISA level, the levels built, the CPU.
    info["native"] = dataclasses.asdict(jaxlstm.native_info())
    return info


def torch_available() -> bool:
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------
# implementations: the one registry every script uses.
#
#   jaxlstm[-tm][-ckptK][-unrollN][-bf16][-autodiff]   jaxlstm.lstm with those options
#                                                      (-tm: time-major [T, B, D] inputs)
#   jaxlstm-gru[-xla]                                  jaxlstm.gru (-xla: the pure-XLA path)
#   flax-optimized, flax-lstmcell, flax-gru            nn.RNN(OptimizedLSTMCell / LSTMCell / GRUCell)
#   jax-cudnn                                          jax.experimental.rnn (GPU only)
#   torch                                              torch.nn.LSTM (see build)


def input_shape(impl: str, B: int, T: int, D: int) -> tuple:
    return (T, B, D) if "-tm" in impl else (B, T, D)


def jax_impl(impl: str, B: int, D: int, H: int, dtype: str = "float32", unroll: int | None = None):
    """``(init(key) -> params, apply(params, xs) -> ys)`` of a JAX implementation; ``unroll``
    None: each library's default (jaxlstm's per backend, flax's 1). ``dtype`` is the GEMMs'
    (flax's ``dtype``, jaxlstm's ``compute_dtype``); the params stay float32 (flax's default
    ``param_dtype``), as in mixed-precision training."""
    jdtype = jnp.dtype(dtype)
    mixed = None if jdtype == jnp.float32 else jdtype
    if impl in ("jaxlstm-gru", "jaxlstm-gru-xla"):
        init = lambda key: jaxlstm.init_gru(key, D, H)

        def apply_gru(p, x):
            with jaxlstm.tuning.forced("xla") if impl.endswith("-xla") else contextlib.nullcontext():
                return jaxlstm.gru(p, x, unroll=unroll, compute_dtype=mixed)[0]

        return init, apply_gru
    if impl == "flax-gru":
        import flax.linen as nn

        model = nn.RNN(nn.GRUCell(H, dtype=jdtype), unroll=unroll or 1)
        return lambda key: model.init(key, jnp.zeros((B, 1, D), jdtype)), model.apply
    if impl.startswith("jaxlstm"):
        kw = {"unroll": unroll, "compute_dtype": mixed}
        path = None
        for opt in impl.split("-")[1:]:
            if opt == "tm":
                kw["time_major"] = True
            elif opt.startswith("ckpt"):
                kw["checkpoint_every"] = int(opt[4:])
            elif opt.startswith("unroll"):
                kw["unroll"] = int(opt[6:])
            elif opt == "bf16":
                kw["compute_dtype"] = jnp.bfloat16
            elif opt == "autodiff":
                kw["backward"] = "autodiff"
            elif opt == "xla":  # the pure-XLA path, not the native CPU code
                path = "xla"
            else:
                raise ValueError(f"unknown jaxlstm option {opt!r} in {impl!r}")

        def init(key):
            return jaxlstm.init_lstm(key, D, H)

        def apply(p, x):
            with jaxlstm.tuning.forced(path) if path else contextlib.nullcontext():
                return jaxlstm.lstm(p, x, **kw)[0]

        return init, apply
    if impl in ("flax-optimized", "flax-lstmcell"):
        import flax.linen as nn

        cell = {"flax-optimized": nn.OptimizedLSTMCell, "flax-lstmcell": nn.LSTMCell}[impl]
        model = nn.RNN(cell(H, dtype=jdtype), unroll=unroll or 1)
        return lambda key: model.init(key, jnp.zeros((B, 1, D), jdtype)), model.apply
    if impl == "jax-cudnn":
        from jax.experimental import rnn as jrnn

        def apply(w, x):
            h0 = jnp.zeros((1, x.shape[0], H), jdtype)
            lengths = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
            return jrnn.lstm(x, h0, h0, w, lengths, D, H, 1, 0.0, False)[0]

        return lambda key: jrnn.init_lstm_weight(key, D, H, 1, False), apply
    raise ValueError(f"unknown JAX impl {impl!r}")


def train_step(apply: Callable) -> Callable:
    """Value and grad of a mean-square loss over all outputs, w.r.t. params and inputs."""
    loss = lambda p, x: jnp.mean(jnp.square(apply(p, x).astype(jnp.float32)))
    return jax.value_and_grad(loss, argnums=(0, 1))


def _jax_pair(apply: Callable, params, xs):
    """jit-compiles forward and train, timing the compiles."""
    out = {}
    for mode, fn in (("forward", jax.jit(apply)), ("train", jax.jit(train_step(apply)))):
        t0 = time.perf_counter()
        compiled = fn.lower(params, xs).compile()
        out[mode + "_compile_s"] = time.perf_counter() - t0
        out[mode] = lambda c=compiled: jax.block_until_ready(c(params, xs))
    return out


def jaxlstm_path(cell: str, B: int, T: int, D: int, H: int, dtype: str) -> str:
    """The path (``jaxlstm.PATHS``) that ``jaxlstm.lstm`` / ``gru`` take by default for this row."""
    init = {"lstm": jaxlstm.init_lstm, "gru": jaxlstm.init_gru}[cell]
    jdtype = jnp.dtype(dtype)
    mixed = None if jdtype == jnp.float32 else jdtype
    return jaxlstm.path_of(cell, init(jax.random.key(0), D, H), jnp.zeros((B, T, D), jdtype), compute_dtype=mixed)


def build(impl: str, B: int, T: int, D: int, H: int, dtype: str):
    """``{"forward": fn, "train": fn, "<mode>_compile_s": s}``, fns of no arguments."""
    key = jax.random.key(0)
    xs = jax.random.normal(key, input_shape(impl, B, T, D), jnp.float32).astype(jnp.dtype(dtype))
    if impl == "torch":
        return _torch_pair(B, D, H, dtype, xs)
    init, apply = jax_impl(impl, B, D, H, dtype)
    return _jax_pair(apply, init(key), xs)


def _torch_pair(B, D, H, dtype, xs):
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    m = torch.nn.LSTM(D, H, batch_first=True).to(tdtype)
    x = torch.from_numpy(np.array(xs.astype(jnp.float32))).to(tdtype).requires_grad_(True)

    def forward():
        with torch.no_grad():
            return m(x)[0]

    def train():
        m.zero_grad(set_to_none=True)
        x.grad = None
        loss = m(x)[0].float().square().mean()
        loss.backward()
        return loss

    return {"forward": forward, "train": train, "forward_compile_s": 0.0, "train_compile_s": 0.0}


ALL_IMPLS = [
    "jaxlstm",
    "jaxlstm-xla",
    "jaxlstm-unroll8",
    "jaxlstm-ckpt64",
    "jaxlstm-bf16",
    "jaxlstm-autodiff",
    "flax-optimized",
    "flax-lstmcell",
    "torch",
    "jax-cudnn",
]


def available_impls(full: bool = False) -> list[str]:
    """The default set (``full=False``) keeps the main job to a few minutes on 2 cores."""
    impls = ["jaxlstm", "jaxlstm-ckpt64", "flax-optimized", "flax-lstmcell"]
    if full:
        impls[1:1] = ["jaxlstm-unroll8", "jaxlstm-bf16", "jaxlstm-autodiff"]
    if torch_available():
        impls.append("torch")
    if jax.devices()[0].platform == "gpu":
        impls.append("jax-cudnn")
    return impls


def time_interleaved(
    fns: dict[str, Callable],
    repeats: int,
    min_repeats: int = 3,
    budget_s: float = 1e9,
    pause_s: float = 0.02,
    fill_s: float = 0.0,
    seed: int = 0,
):
    """Calls each fn once to warm up, then ``repeats`` rounds, one call of each per round.

    Each round calls them in a fresh order (shuffled, seeded), and a short pause (untimed)
    separates calls, so that one implementation's aftermath (torch's OpenMP threads spin for
    a while after a call; a large program's buffers freed and mapped anew) lands on every
    neighbour alike: a rotation would keep each one's predecessor fixed (the cyclic order
    never changes). Stops early (after ``min_repeats``) once ``budget_s`` is spent. ``fill_s``:
    short calls get more rounds, past ``repeats`` (up to 10x) until the calls themselves took
    that long, so that a row of 1-2 ms calls has a median of more than 7 (the main job's latency
    rows moved by 7 % between runs with 7). Returns per-name lists, the i-th entries of one
    round (``paired_ratio`` compares them round by round)."""
    names = list(fns)
    times = {n: [] for n in names}
    order = random.Random(seed)
    for f in fns.values():
        f()
    start = time.perf_counter()
    for r in range(10 * repeats):
        for n in order.sample(names, len(names)):
            time.sleep(pause_s)
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
        if r + 1 >= min_repeats and time.perf_counter() - start > budget_s:
            break
        if r + 1 >= repeats and sum(sum(v) for v in times.values()) >= fill_s:
            break
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """How many times ``den``'s calls fit in ``num``'s: the median over rounds of the two calls'
    ratio in the same round (as ``jaxlstm.tuning.decide`` compares), so that a machine whose
    speed drifts from round to round (a VM's neighbours) moves both sides of each ratio alike.
    Lists of unequal length (not from one ``time_interleaved`` call) fall back to the ratio of
    medians."""
    if len(num) != len(den) or not num:
        return statistics.median(num) / statistics.median(den)
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def summarize(ts: list[float]) -> dict:
    q = np.percentile(ts, [25, 75]) if len(ts) > 1 else (ts[0], ts[0])
    return {"median_s": statistics.median(ts), "q25_s": float(q[0]), "q75_s": float(q[1]), "repeats": len(ts)}


def peak_matmul_gflops(n: int = 2048) -> float:
    """Best of 7 large f32 ``jnp.dot`` s: the machine's attainable matmul rate."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    ts = time_interleaved({"dot": lambda: jax.block_until_ready(f(a))}, 7, pause_s=0.0)["dot"]
    return 2 * n**3 / min(ts) / 1e9


def peak_bf16_gflops(n: int = 2048) -> float:
    """The attainable bfloat16 matmul rate: jaxlstm's bf16 GEMM (the ``avx512_bf16`` native level's,
    on every core) where it runs; else XLA's ``jnp.dot`` of bf16 operands (XLA:CPU widens them to
    float32), best of 7."""
    from jaxlstm import _native

    if _native.bf16_dot():
        return _native.bf16_gemm_gflops(n)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    ts = time_interleaved({"dot": lambda: jax.block_until_ready(f(a))}, 7, pause_s=0.0)["dot"]
    return 2 * n**3 / min(ts) / 1e9


def lstm_flops(mode: str, B: int, T: int, D: int, H: int) -> float:
    fwd = 2.0 * B * T * 4 * H * (D + H)
    return fwd if mode == "forward" else 3.0 * fwd


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
