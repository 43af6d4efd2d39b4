"""The forward step's formulation, chosen by measurement on the machine in use.

The same step layout won on one CPU and lost on the next (``benchmarks/results/``:
feature-major ``[4H, B]`` steps were faster on a Zen 4 at every T, batch-major
``[B, 4H]`` steps faster on a Zen 5 from T=256 on). So the forward scan that
:func:`jaxlstm.lstm` runs outside training (the primal of the fused path, and the
whole ``backward="autodiff"`` path) has two candidates:

* ``"feature"``: feature-major steps, one dot ``[w_ih; w_hh]ᵀ·[x; h]`` (the default);
* ``"batch"``: batch-major steps, ``x @ w_ih + h @ w_hh``.

The first time a (machine, shape, dtype) is seen, :func:`forward_layout` compiles
both on a probe of at most 128 steps of that shape, times them interleaved
(medians of 9 rounds after a warm-up; the other candidate must be 5 % faster than
the default to be chosen) and caches the choice in memory and on disk
(``$JAXLSTM_CACHE_DIR/tuning.json``, default ``~/.cache/jaxlstm``); from then on it
costs a dictionary look-up at trace time. The fused backward pass is
feature-major, so training always runs feature-major steps.

Turn it off with ``JAXLSTM_AUTOTUNE=0`` (then the default is used, deterministically);
force a layout with ``with jaxlstm.tuning.forced("batch"): ...``. Both candidates
compute the same LSTM and are tested against the reference.
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
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CANDIDATES", "DEFAULT", "cache_file", "cpu_info", "enabled", "forced", "forward_layout"]

CANDIDATES = ("feature", "batch")
DEFAULT = "feature"
PROBE_STEPS = 128
ROUNDS = 9
MARGIN = 0.05

_lock = threading.Lock()
_memory: dict[str, str] = {}
_forced: list[str] = []


def enabled() -> bool:
    """Autotuning is on unless ``JAXLSTM_AUTOTUNE=0``."""
    return os.environ.get("JAXLSTM_AUTOTUNE", "1") != "0"


def cache_file() -> str:
    base = os.environ.get("JAXLSTM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxlstm")
    return os.path.join(base, "tuning.json")


@contextlib.contextmanager
def forced(layout: str) -> Iterator[None]:
    """Within the block, every trace of :func:`jaxlstm.lstm` uses ``layout``."""
    if layout not in CANDIDATES:
        raise ValueError(f"layout must be one of {CANDIDATES}, got {layout!r}")
    _forced.append(layout)
    try:
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


def _measure(B, D, H, R, T, mm, acc, unroll) -> str:
    # Usually called while jax.jit traces the user's function: the probes run eagerly.
    with jax.ensure_compile_time_eval():
        return _time_probes(B, D, H, R, T, mm, acc, unroll)


def _time_probes(B, D, H, R, T, mm, acc, unroll) -> str:
    probes = {name: _probe(name, B, D, H, R, min(T, PROBE_STEPS), mm, acc, unroll) for name in CANDIDATES}
    times = {name: [] for name in probes}
    for f in probes.values():
        f()
    for r in range(ROUNDS):
        for name in CANDIDATES[r % 2 :] + CANDIDATES[: r % 2]:
            t0 = time.perf_counter()
            probes[name]()
            times[name].append(time.perf_counter() - t0)
    median = {n: statistics.median(ts) for n, ts in times.items()}
    # Leave the default only for a clear win: the two are often within the machine's noise.
    other = next(n for n in CANDIDATES if n != DEFAULT)
    return other if median[other] < (1 - MARGIN) * median[DEFAULT] else DEFAULT


def _read_disk() -> dict:
    try:
        with open(cache_file()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_disk(key: str, value: str) -> None:
    try:
        path = cache_file()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_disk()
        data[key] = value
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choice still holds for this process


def forward_layout(B: int, D: int, H: int, R: int, T: int, mm_dtype, acc_dtype, unroll: int = 1) -> str:
    """The forward step layout for this shape on this machine (see the module docstring)."""
    if _forced:
        return _forced[-1]
    if not enabled() or B * T == 0:
        return DEFAULT
    T_bucket = 1 << max(0, int(np.ceil(np.log2(max(T, 1)))))
    mm, acc = jnp.dtype(mm_dtype).name, jnp.dtype(acc_dtype).name
    key = f"{_machine()}|lstm-forward|B={B} D={D} H={H} R={R} T<={T_bucket} unroll={unroll}|{mm}/{acc}"
    with _lock:
        if key in _memory:
            return _memory[key]
        choice = _read_disk().get(key)
        if choice not in CANDIDATES:
            try:
                choice = _measure(B, D, H, R, T, mm_dtype, acc_dtype, unroll)
                _write_disk(key, choice)
            except Exception:  # timing impossible here (out of memory, say): the default, not cached on disk
                choice = DEFAULT
        _memory[key] = choice
        return choice
