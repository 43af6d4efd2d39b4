"""Formulations chosen by measurement on the machine in use.

The same step layout won on one CPU and lost on the next (``benchmarks/results/``:
feature-major ``[4H, B]`` steps were faster on a Zen 4 at every T, batch-major
``[B, 4H]`` steps faster on a Zen 5 from T=256 on). Two choices are made per
machine and shape:

* :func:`kernel_path`: whether an LSTM, GRU or Elman RNN on CPU (float32 or bfloat16
  GEMMs, each timed apart) runs on the compiled kernel (:mod:`jaxlstm._kernel`) or on the
  pure-XLA fused path (timed on training steps, per cell); the kernel is the default.
* :func:`forward_layout`: on the pure-XLA path, the forward scan that
  :func:`jaxlstm.lstm` runs outside training (the primal of the fused path, and the
  whole ``backward="autodiff"`` path): ``"feature"``, feature-major steps, one dot
  ``[w_ih; w_hh]ᵀ·[x; h]`` (the default), or ``"batch"``, batch-major steps,
  ``x @ w_ih + h @ w_hh``. The XLA fused backward pass is feature-major, so its
  training runs feature-major steps.

The first time a (machine, shape, dtype) is seen, the candidates are compiled on a
probe of at most 128 steps of that shape and timed interleaved (medians of 9 rounds
after a warm-up; the other candidate must be 5 % faster than the default to be
chosen; the kernel's choices are keyed on a hash of its build, so a rebuilt kernel is timed
afresh); the choice is cached in memory and on disk (``$JAXLSTM_CACHE_DIR/tuning.json``,
default ``~/.cache/jaxlstm``); from then on it costs a dictionary look-up at trace time.

Turn it off with ``JAXLSTM_AUTOTUNE=0`` (then the defaults are used, deterministically);
force a path with ``with jaxlstm.tuning.forced("batch"): ...`` (``"kernel"``;
``"xla"``, ``"feature"`` or ``"batch"`` mean pure XLA). All candidates compute
the same LSTM and are tested against the reference.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX (Windows): the cache is written without a lock
    fcntl = None

__all__ = [
    "CANDIDATES",
    "DEFAULT",
    "KERNEL",
    "cache_file",
    "cpu_info",
    "default_unroll",
    "enabled",
    "forced",
    "forward_layout",
    "kernel_path",
]

CANDIDATES = ("feature", "batch")
DEFAULT = "feature"
KERNEL = "kernel"
FORCEABLE = CANDIDATES + (KERNEL, "xla")
PROBE_STEPS = 128
ROUNDS = 9
MARGIN = 0.05

_lock = threading.Lock()
_memory: dict[str, str] = {}
_forced: list[str] = []


def _forced_key():
    """A JAX configuration state that ``jax.jit`` keys its traces and compilations on, set
    by :func:`forced`. JAX's ``State`` class is internal: where it is not there (another
    JAX), ``None``."""
    try:
        from jax._src import config as jax_config

        return jax_config.State(
            "jaxlstm_forced_path",
            "",
            "jaxlstm.tuning.forced's path: part of jit's cache key",
            include_in_jit_key=True,
            include_in_trace_context=True,
        )
    except Exception:  # noqa: BLE001 - any failure of an internal API leaves forced unkeyed
        return None


_FORCED_KEY = _forced_key()
# Whether a function jax.jit already traced is traced afresh inside a forced block.
KEYED = _FORCED_KEY is not None


def enabled() -> bool:
    """Autotuning is on unless ``JAXLSTM_AUTOTUNE=0``."""
    return os.environ.get("JAXLSTM_AUTOTUNE", "1") != "0"


def cache_file() -> str:
    base = os.environ.get("JAXLSTM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxlstm")
    return os.path.join(base, "tuning.json")


@contextlib.contextmanager
def forced(layout: str) -> Iterator[None]:
    """Within the block, every trace of :func:`jaxlstm.lstm` uses ``layout``: ``"kernel"``
    (the compiled kernel where it applies, else the pure-XLA path with its forward
    layout tuned as usual), ``"xla"`` (the pure-XLA path, its layout tuned), or the pure-XLA path with
    ``"feature"`` or ``"batch"`` forward steps. :func:`jaxlstm.gru` and :func:`jaxlstm.rnn`
    take the kernel under ``"kernel"`` (where it applies) and the pure-XLA path under the others.

    The choice is made when a call is traced, and the block is part of what ``jax.jit`` keys
    its caches on: a function it traced outside the block is traced afresh inside it (and
    the other way round), so that a comparison of two paths never compares one with itself.
    (Where JAX lacks the configuration state this relies on, :data:`KEYED` is false and a
    function already traced keeps its program.)"""
    if layout not in FORCEABLE:
        raise ValueError(f"layout must be one of {FORCEABLE}, got {layout!r}")
    _forced.append(layout)
    try:
        with _FORCED_KEY("/".join(_forced)) if _FORCED_KEY is not None else contextlib.nullcontext():
            yield
    finally:
        _forced.pop()


def cpu_info() -> dict:
    """``model name``, ``cpu family``, ``model`` ... of the first CPU in ``/proc/cpuinfo``
    (empty where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
    except OSError:
        pass
    return fields


@functools.cache
def _machine() -> str:
    dev = jax.devices()[0]
    name = dev.device_kind
    if dev.platform == "cpu":
        cpu = cpu_info()
        name = f"{cpu.get('model name', platform.processor())} family {cpu.get('cpu family')} model {cpu.get('model')}"
        name += f" x{os.cpu_count()}"
    return f"{dev.platform}:{name}:jax {jax.__version__}"


def _probe(layout: str, B: int, D: int, H: int, R: int, T: int, mm, acc, unroll: int):
    """A compiled forward scan of ``layout`` on random inputs, as a no-argument callable."""
    from ._step import lstm_scan_core
    from .params import init_lstm

    params = init_lstm(jax.random.key(0), D, H, proj_size=None if R == H else R)
    run = lstm_scan_core(params, mm, acc, feature_major=layout == "feature", unroll=unroll)
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float32).astype(mm)
    carry = (jnp.zeros((B, R), acc), jnp.zeros((B, H), acc))
    compiled = jax.jit(lambda x, c: run(x, (c, c, None), None)).lower(xs, carry).compile()
    return lambda: jax.block_until_ready(compiled(xs, carry))


def _train_probe(path: str, B: int, D: int, H: int, T: int, cell: str = "lstm", mm=jnp.float32):
    """A compiled training step (value and gradient of a mean square over all outputs,
    w.r.t. the params and the inputs) of the fused ``cell`` (``"lstm"``, ``"gru"`` or
    ``"rnn"``) on ``path``, ``"kernel"`` or ``"xla"``, with GEMM operands of dtype ``mm``."""
    from ._fused import FusedConfig, fused_lstm
    from ._fused_gru import ELMAN, GRU, fused_cell
    from ._kernel import kernel_cell, kernel_lstm
    from .params import init_lstm
    from .rnn import init_gru, init_rnn

    f32 = jnp.dtype(jnp.float32)
    params = {"lstm": init_lstm, "gru": init_gru, "rnn": init_rnn}[cell](jax.random.key(0), D, H)
    xs = jax.random.normal(jax.random.key(1), (T, B, D), f32)
    h = jnp.zeros((B, H), f32)
    mm = jnp.dtype(mm)
    cfg, bf16 = FusedConfig(mm, f32), mm == jnp.bfloat16
    # (custom_vjp functions return an untyped object to pyright: hence the ignores)
    if cell != "lstm":
        kind = GRU if cell == "gru" else ELMAN
        if path == KERNEL:
            run = lambda p, x: kernel_cell(cell, False, p, h, x, None, h, bf16)[0]  # pyright: ignore[reportIndexIssue]
        else:
            run = lambda p, x: fused_cell(cfg, kind, p, h, x, None, h)[0]  # pyright: ignore[reportIndexIssue]
    elif path == KERNEL:
        run = lambda p, x: kernel_lstm(False, p, (h, h), x, None, (h, h), bf16)[0]  # pyright: ignore[reportIndexIssue]
    else:
        run = lambda p, x: fused_lstm(cfg, p, (h, h), x, None, (h, h))[0]  # pyright: ignore[reportIndexIssue]
    step = jax.value_and_grad(lambda p, x: jnp.mean(jnp.square(run(p, x))), argnums=(0, 1))
    compiled = jax.jit(step).lower(params, xs).compile()
    return lambda: jax.block_until_ready(compiled(params, xs))


def _measure(B, D, H, R, T, mm, acc, unroll) -> str:
    # Usually called while jax.jit traces the user's function: the probes run eagerly.
    with jax.ensure_compile_time_eval():
        probes = {name: _probe(name, B, D, H, R, min(T, PROBE_STEPS), mm, acc, unroll) for name in CANDIDATES}
        return _pick(probes, DEFAULT)


def _pick(probes: dict[str, Callable[[], object]], default: str) -> str:
    """Times the probes interleaved (medians of ``ROUNDS`` after a warm-up); the other
    candidate must beat ``default`` by ``MARGIN``: the two are often within the machine's noise."""
    names = list(probes)
    times: dict[str, list[float]] = {name: [] for name in names}
    for f in probes.values():
        f()
    for r in range(ROUNDS):
        for name in names[r % 2 :] + names[: r % 2]:
            t0 = time.perf_counter()
            probes[name]()
            times[name].append(time.perf_counter() - t0)
    median = {n: statistics.median(ts) for n, ts in times.items()}
    other = next(n for n in names if n != default)
    return other if median[other] < (1 - MARGIN) * median[default] else default


def _read_disk() -> dict:
    try:
        with open(cache_file()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` (created) across processes: ``fcntl.flock`` where there is
    one (POSIX); elsewhere none, and concurrent writers may drop each other's keys."""
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _write_disk(key: str, value: str) -> None:
    """Adds ``key`` to the cache file: read, merge and replace under a lock, so that processes
    tuning at once (data-parallel jobs of one host, ``pytest -n``) keep every key."""
    try:
        path = cache_file()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _file_lock(path + ".lock"):
            data = _read_disk()
            data[key] = value
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choice still holds for this process


def _cached(key: str, candidates: tuple, measure: Callable[[], str], default: str) -> str:
    with _lock:
        if key in _memory:
            return _memory[key]
        choice = _read_disk().get(key)
        if not isinstance(choice, str) or choice not in candidates:
            try:
                choice = measure()
                _write_disk(key, choice)
            except Exception:  # timing impossible here (out of memory, say): the default, not cached on disk
                choice = default
        _memory[key] = choice
        return choice


def _bucket(T: int) -> int:
    return 1 << max(0, int(np.ceil(np.log2(max(T, 1)))))


# The forward scan's unroll on GPUs where the caller leaves it to jaxlstm (``unroll=None``):
# each step of XLA's loop there costs kernel launches and a wait, and on an NVIDIA H200
# unroll=16 made the forward pass 1.35-2.64x faster than 1 and training 1.2-1.8x
# (benchmarks/results/h200/unroll_probe.json, four regimes, LSTM and GRU).
GPU_UNROLL = 16


def _backend() -> str:
    return jax.default_backend()


def default_unroll() -> int:
    """The forward scan's unroll when a caller passes ``unroll=None`` (the default):
    :data:`GPU_UNROLL` where JAX's default backend is a GPU, else 1 (on CPUs the
    compiled kernel runs where it applies, and ``benchmarks.layout`` measured the XLA
    path's unrolled scans no faster there)."""
    return GPU_UNROLL if _backend() == "gpu" else 1


def forward_layout(B: int, D: int, H: int, R: int, T: int, mm_dtype, acc_dtype, unroll: int = 1) -> str:
    """The pure-XLA forward step layout for this shape on this machine (see the module docstring)."""
    if _forced and _forced[-1] in CANDIDATES:
        return _forced[-1]
    if not enabled() or B * T == 0:
        return DEFAULT
    mm, acc = jnp.dtype(mm_dtype).name, jnp.dtype(acc_dtype).name
    key = f"{_machine()}|lstm-forward|B={B} D={D} H={H} R={R} T<={_bucket(T)} unroll={unroll}|{mm}/{acc}"
    return _cached(key, CANDIDATES, lambda: _measure(B, D, H, R, T, mm_dtype, acc_dtype, unroll), DEFAULT)


def kernel_path(B: int, D: int, H: int, T: int, cell: str = "lstm", dtype=jnp.float32) -> bool:
    """Whether a ``cell`` (``"lstm"``, ``"gru"`` or ``"rnn"``) of this shape with GEMM operands
    of ``dtype`` (float32 or bfloat16), which the compiled kernel can run
    (:func:`jaxlstm._kernel.applies`), runs on it rather than on the pure-XLA fused path.

    The default (autotuning off) is the kernel. With autotuning, the first time a shape is
    seen both training steps are timed on a probe of at most ``PROBE_STEPS`` steps, and XLA
    is chosen only when it is ``MARGIN`` faster (it was at B=64, D=512, H=1024 on a Zen 5,
    where both are bound by the arithmetic). A forced ``"feature"`` / ``"batch"`` layout
    means the pure-XLA path."""
    if _forced:
        return _forced[-1] == KERNEL
    if not enabled():
        return True
    from ._kernel import build_id

    dtype = jnp.dtype(dtype)
    key = f"{_machine()}|{cell}-kernel {build_id()}|B={B} D={D} H={H} T<={_bucket(T)}|{dtype.name}"

    def measure() -> str:
        with jax.ensure_compile_time_eval():
            probes = {name: _train_probe(name, B, D, H, min(T, PROBE_STEPS), cell, dtype) for name in (KERNEL, "xla")}
            return _pick(probes, KERNEL)

    return _cached(key, (KERNEL, "xla"), measure, KERNEL) == KERNEL
