"""Formulations chosen by measurement on the machine in use.

The same step layout won on one CPU and lost on the next (``benchmarks/results/``:
feature-major ``[4H, B]`` steps were faster on a Zen 4 at every T, batch-major
``[B, 4H]`` steps faster on a Zen 5 from T=256 on). Two choices are made per
machine and shape:

* ``native_path``: whether an LSTM, GRU or Elman RNN on CPU (float32 or bfloat16
  GEMMs, each timed apart) runs on the native code (``jaxlstm._native``) or on the
  pure-XLA fused path (timed on training steps, per cell); the native code is the default.
* ``forward_layout``: on the pure-XLA path, the forward scan that
  ``jaxlstm.lstm`` runs outside training (the primal of the fused path, and the
  whole ``backward="autodiff"`` path): ``"feature"``, feature-major steps, one dot
  ``[w_ih; w_hh]ᵀ·[x; h]`` (the default), or ``"batch"``, batch-major steps,
  ``x @ w_ih + h @ w_hh``. The XLA fused backward pass is feature-major, so its
  training runs feature-major steps.

The first time a (machine, shape, dtype) is seen, the candidates are compiled on a
probe of at most ``PROBE_STEPS`` (512) steps of that shape and timed interleaved, in rounds
of 9 after a warm-up, until the decision is clear: the other candidate is chosen when its
median is ``MARGIN`` (5 %) faster than the default's and it won at least 70 % of the rounds;
the default is kept when it is within half the margin or won half the rounds; after
``MAX_ROUNDS`` (27) rounds without a clear answer, the default. The native code's choices are
keyed on a hash of its build, so a rebuilt library is timed afresh. The choice is cached in
memory and, with its margin, rounds and the machine's load, on disk
(``$JAXLSTM_CACHE_DIR/tuning.json``, default ``~/.cache/jaxlstm``), unless other processes
kept more than ``BUSY`` (25 %) of the CPUs busy while it was timed: then it holds for this
process only (a warning says so), and the next process times it again. From then on it
costs a dictionary look-up at trace time. ``python -m jaxlstm.tuning show`` lists the
cached choices, ``retune`` times this machine's again (a choice that now measures
otherwise is replaced), ``clear`` deletes them; ``recheck`` times one shape's again (the main
job calls it where a training row ran the native code and the XLA path beside it was faster by
more than ``MARGIN``).

Turn it off with ``JAXLSTM_AUTOTUNE=0`` (then the defaults are used, deterministically);
force a path with ``with jaxlstm.tuning.forced("batch"): ...`` (``"native"``;
``"xla"``, ``"feature"`` or ``"batch"`` mean pure XLA; ``"kernel"``, the earlier
spelling, is an alias of ``"native"`` with a ``DeprecationWarning``). All candidates compute
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
import warnings
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
    "NATIVE",
    "cache_file",
    "clear",
    "cpu_info",
    "decide",
    "default_unroll",
    "enabled",
    "forced",
    "forward_layout",
    "kernel_path",
    "native_path",
    "other_load",
    "recheck",
    "register",
    "retune",
    "show",
]

CANDIDATES = ("feature", "batch")
DEFAULT = "feature"
NATIVE = "native"
FORCEABLE = CANDIDATES + (NATIVE, "xla")
KERNEL = "kernel"  # the native code's name before the glossary: an alias of NATIVE in ``forced``
PROBE_STEPS = 512
ROUNDS = 9
MAX_ROUNDS = 27
MARGIN = 0.05
BUSY = 0.25

_lock = threading.Lock()
_memory: dict[str, str] = {}
_forced: list[str] = []


def _forced_key():
    """A JAX configuration state that ``jax.jit`` keys its traces and compilations on, set
    by ``forced``. JAX's ``State`` class is internal: where it is not there (another
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
    """Within the block, every trace of ``jaxlstm.lstm`` uses ``layout``: ``"native"``
    (the native code where it applies, else the pure-XLA path with its forward
    layout tuned as usual), ``"xla"`` (the pure-XLA path, its layout tuned), or the pure-XLA path with
    ``"feature"`` or ``"batch"`` forward steps. ``jaxlstm.gru`` and ``jaxlstm.rnn``
    take the native code under ``"native"`` (where it applies) and the pure-XLA path under the others.
    ``"kernel"`` (the earlier spelling) means ``"native"`` and warns (``DeprecationWarning``).

    The choice is made when a call is traced, and the block is part of what ``jax.jit`` keys
    its caches on: a function it traced outside the block is traced afresh inside it (and
    the other way round), so that a comparison of two paths never compares one with itself.
    (Where JAX lacks the configuration state this relies on, ``KEYED`` is false and a
    function already traced keeps its program.)"""
    if layout == KERNEL:
        warnings.warn(
            'jaxlstm.tuning.forced("kernel") is spelled forced("native") now', DeprecationWarning, stacklevel=3
        )
        layout = NATIVE
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


class _Load:
    """The share of the machine's CPU time that other processes used between ``__enter__``
    and ``__exit__`` (Linux: ``/proc/stat`` against this process's own CPU time); ``share``
    is ``None`` where it cannot be read."""

    share: float | None = None

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, AttributeError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        own = os.times()
        return sum(fields), idle, (own.user + own.system) * hz

    def __enter__(self):
        self._start = self._read()
        return self

    def __exit__(self, *exc):
        end = self._read()
        if self._start is not None and end is not None:
            total, idle, own = (e - s for e, s in zip(end, self._start, strict=True))
            if total > 0:
                self.share = min(1.0, max(0.0, (total - idle - own) / total))
        return False


def other_load(seconds: float = 0.5) -> float | None:
    """The share of the CPUs that other processes keep busy, measured over ``seconds``
    (``None`` where ``/proc/stat`` cannot be read)."""
    with _Load() as load:
        time.sleep(seconds)
    return load.share


# What times each kind of choice, registered by the module that owns the probe (``jaxlstm._step``:
# the forward layout; ``jaxlstm._native``: native code or XLA), so that this module imports no other
# module of jaxlstm: ``register(kind, measure, tag)``; ``measure(*shape) -> decision`` (``decide``'s
# record), ``tag()`` a string the cache key carries (the native library's build).
_PROBES: dict[str, tuple[Callable[..., dict], Callable[[], str]]] = {}


def register(kind: str, measure: Callable[..., dict], tag: Callable[[], str] = lambda: "") -> None:
    """Makes ``measure`` the timing of the choices of ``kind`` (``"forward"``, ``"native"``)."""
    _PROBES[kind] = (measure, tag)


def _probe(kind: str) -> tuple[Callable[..., dict], Callable[[], str]]:
    try:
        return _PROBES[kind]
    except KeyError:
        raise RuntimeError(f"jaxlstm.tuning: nothing registered to time {kind!r} choices (import jaxlstm)") from None


def _measure(B, D, H, R, T, mm_dtype, acc_dtype, unroll) -> dict:
    return _probe("forward")[0](B, D, H, R, T, mm_dtype, acc_dtype, unroll)


def _measure_native(B, D, H, T, cell, dtype) -> dict:
    return _probe(NATIVE)[0](B, D, H, T, cell, dtype)


def decide(probes: dict[str, Callable[[], object]], default: str) -> dict:
    """Times the probes interleaved, ``ROUNDS`` at a time after a warm-up, until the decision is
    clear (see the module docstring; at most ``MAX_ROUNDS``): the two are often within the
    machine's noise, and then the default stays. Returns the decision: ``choice``, ``ratio``
    (the other's median time over the default's), ``rounds``, ``clear`` (False: the default
    kept for want of a clear answer), ``load`` (other processes' share of the CPUs meanwhile)
    and ``when``."""
    names = list(probes)
    other = next(n for n in names if n != default)
    ratios: list[float] = []
    choice, clear = default, False
    with _Load() as load:
        for f in probes.values():
            f()
        for r in range(MAX_ROUNDS):
            t = {}
            for name in names[r % 2 :] + names[: r % 2]:
                t0 = time.perf_counter()
                probes[name]()
                t[name] = time.perf_counter() - t0
            ratios.append(t[other] / t[default])
            if (r + 1) % ROUNDS:
                continue
            ratio, wins = statistics.median(ratios), sum(x < 1 for x in ratios) / len(ratios)
            if ratio < 1 - MARGIN and wins >= 0.7:
                choice, clear = other, True
                break
            if ratio > 1 - MARGIN / 2 or wins <= 0.5:
                clear = True
                break
    return dict(
        choice=choice, ratio=statistics.median(ratios), rounds=len(ratios), clear=clear, load=load.share,
        when=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )  # fmt: skip


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


def _update_disk(update: Callable[[dict], object]) -> None:
    """Applies ``update`` to the cache file's dict: read, change and replace under a lock, so
    that processes tuning at once (data-parallel jobs of one host, ``pytest -n``) keep every key."""
    try:
        path = cache_file()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _file_lock(path + ".lock"):
            data = _read_disk()
            update(data)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choice still holds for this process


def _write_disk(key: str, record: dict) -> None:
    """Adds ``key`` to the cache file (merged under the lock: ``_update_disk``)."""
    _update_disk(lambda data: data.__setitem__(key, record))


def _choice(record) -> str | None:
    """The choice a cache entry holds (a decision record; a bare string from before them)."""
    return record.get("choice") if isinstance(record, dict) else record if isinstance(record, str) else None


def _busy(decision: dict) -> bool:
    """A decision not to keep: other processes kept more than ``BUSY`` of the CPUs busy while it
    was timed. Even a clear one: load does not slow the candidates alike (a grid run beside one
    busy process on 2 cores chose the XLA path, 1.2-12x faster then, for shapes where the native code
    is 1.3-2x faster on the idle machine: its team of threads waits at every step for the one
    that shares a CPU)."""
    return decision.get("load") is not None and decision["load"] > BUSY


def _cached(key: str, candidates: tuple, measure: Callable[[], dict], default: str, args: dict) -> str:
    with _lock:
        if key in _memory:
            return _memory[key]
        choice = _choice(_read_disk().get(key))
        if choice is None or choice not in candidates:
            try:
                decision = measure()
                choice = str(decision["choice"])
                if _busy(decision):
                    warnings.warn(
                        f"jaxlstm.tuning: other processes kept {100 * decision['load']:.0f} % of the CPUs busy "
                        f"while {key.split('|', 1)[1]} was timed; its choice ({choice!r}) holds for this process "
                        "only and is timed again in the next one",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                else:
                    _write_disk(key, {**decision, "args": args})
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
    ``GPU_UNROLL`` where JAX's default backend is a GPU, else 1 (on CPUs the
    native code runs where it applies, and ``benchmarks.layout`` measured the XLA
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
    args = dict(kind="forward", B=B, D=D, H=H, R=R, T=T, mm=mm, acc=acc, unroll=unroll)
    return _cached(key, CANDIDATES, lambda: _measure(B, D, H, R, T, mm_dtype, acc_dtype, unroll), DEFAULT, args)


def native_path(B: int, D: int, H: int, T: int, cell: str = "lstm", dtype=jnp.float32) -> bool:
    """Whether a ``cell`` (``"lstm"``, ``"gru"`` or ``"rnn"``) of this shape with GEMM operands
    of ``dtype`` (float32 or bfloat16), which the native code can run
    (``jaxlstm._native.applies``), runs on it rather than on the pure-XLA fused path.

    The default (autotuning off) is the native code. With autotuning, the first time a shape is
    seen both training steps are timed on a probe of at most ``PROBE_STEPS`` steps, and XLA
    is chosen only when it is ``MARGIN`` faster (it was at B=64, D=512, H=1024 on a Zen 5,
    where both are bound by the arithmetic). A forced ``"feature"`` / ``"batch"`` layout
    means the pure-XLA path."""
    if _forced:
        return _forced[-1] == NATIVE
    if not enabled():
        return True
    key, args = _native_key(B, D, H, T, cell, dtype)
    return _cached(key, (NATIVE, "xla"), lambda: _measure_native(B, D, H, T, cell, dtype), NATIVE, args) == NATIVE


def _native_key(B, D, H, T, cell, dtype) -> tuple[str, dict]:
    """The cache key of ``native_path``'s choice for this shape, and the shape as the record keeps it."""
    dtype = jnp.dtype(dtype)
    key = f"{_machine()}|{cell}-native {_probe(NATIVE)[1]()}|B={B} D={D} H={H} T<={_bucket(T)}|{dtype.name}"
    return key, dict(kind=NATIVE, B=B, D=D, H=H, T=T, cell=cell, dtype=dtype.name)


def recheck(
    B: int, D: int, H: int, T: int, cell: str = "lstm", dtype=jnp.float32, probes: dict | None = None
) -> str | None:
    """Times ``native_path``'s choice for this shape again, now, and replaces the cached one where it
    measures otherwise: for a caller that measured the native code slower than the XLA path where the
    cache chose it (the main job does, on its training rows), so that a choice made in a noisy moment
    is not trusted forever. ``probes``, ``{"native": f, "xla": g}`` (compiled training steps of this
    shape, functions of no argument that block until ready), are what is timed, by ``decide``'s rule;
    by default the tuner's own probe. A decision timed while the machine is busy is not cached (as
    ever). Returns a line saying what the choice was and is; ``None`` where autotuning is off, a path
    is forced, or nothing times the choice."""
    for name, v in zip("BDHT", (B, D, H, T), strict=True):  # jaxlstm.tuning is a leaf: no _checks here
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if cell not in ("lstm", "gru", "rnn"):
        raise ValueError(f"cell must be one of 'lstm', 'gru', 'rnn', got {cell!r}")
    if probes is not None and set(probes) != {NATIVE, "xla"}:
        raise ValueError(f"probes must have the keys 'native' and 'xla', got {sorted(probes)}")
    if _forced or not enabled() or NATIVE not in _PROBES:
        return None
    key, args = _native_key(B, D, H, T, cell, dtype)
    decision = None if probes is None else decide(probes, NATIVE)
    return _retime(key, args, _read_disk().get(key), decision)


def kernel_path(B: int, D: int, H: int, T: int, cell: str = "lstm", dtype=jnp.float32) -> bool:
    """``native_path``, under its name before the glossary (kept as an alias)."""
    return native_path(B, D, H, T, cell, dtype)


# ---------------------------------------------------------------------------
# python -m jaxlstm.tuning show | clear | retune


def _describe(key: str, record) -> str:
    where = key.split("|", 1)[1] if "|" in key else key
    if not isinstance(record, dict):
        return f"{where}: {record!r} (no record of how it was chosen)"
    load = "?" if record.get("load") is None else f"{100 * record['load']:.0f} %"
    clear = "" if record.get("clear", True) else ", no clear answer: the default"
    return (
        f"{where}: {record.get('choice')!r} (other/default time {record.get('ratio', float('nan')):.3f} "
        f"over {record.get('rounds')} rounds{clear}; other processes' load {load}; {record.get('when')})"
    )


def show() -> list[str]:
    """One line per cached choice (of every machine that shares the cache file)."""
    return [_describe(k, v) for k, v in sorted(_read_disk().items())]


def clear() -> None:
    """Deletes the cache file and this process's choices: every shape is timed afresh."""
    with _lock:
        _memory.clear()
        with contextlib.suppress(FileNotFoundError):
            os.remove(cache_file())


def retune() -> list[str]:
    """Times this machine's cached choices again (the native code's: those of the build in use) and
    replaces those that now measure otherwise; a choice timed while the machine was busy is left
    as it was. One line per choice: what it was, what it is."""
    build = _probe(NATIVE)[1]() if NATIVE in _PROBES else None
    lines = []
    prefix = _machine() + "|"
    for key, record in sorted(_read_disk().items()):
        args = record.get("args") if isinstance(record, dict) else None
        if not key.startswith(prefix):
            continue
        if args is None:
            lines.append(f"{key.split('|', 1)[1]}: kept (recorded without its shape: `clear` to time it afresh)")
            continue
        if args["kind"] in (NATIVE, KERNEL) and f"-native {build}|" not in key:
            lines.append(f"{key.split('|', 1)[1]}: skipped (another build of the native code, or an earlier jaxlstm)")
            continue
        lines.append(_retime(key, args, record))
    return lines


def _retime(key: str, args: dict, record, decision: dict | None = None) -> str:
    """Times the choice under ``key`` (of the shape ``args``) again (or takes ``decision``, timed by the
    caller) and caches the decision, unless the machine was busy; one line: what it was (``record``, or
    nothing cached), what it is."""
    a = args
    if decision is None and a["kind"] == NATIVE:
        decision = _measure_native(a["B"], a["D"], a["H"], a["T"], a["cell"], a["dtype"])
    elif decision is None:
        decision = _measure(a["B"], a["D"], a["H"], a["R"], a["T"], a["mm"], a["acc"], a["unroll"])
    old = _choice(record)
    if _busy(decision):
        was = "nothing cached" if record is None else _describe(key, record)
        return f"{was}: kept, the machine was busy ({_describe(key, decision)})"
    _write_disk(key, {**decision, "args": args})
    with _lock:
        _memory.pop(key, None)
    change = "unchanged" if decision["choice"] == old else ("was not cached" if old is None else f"was {old!r}")
    return f"{_describe(key, decision)} [{change}]"


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m jaxlstm.tuning", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("command", choices=["show", "clear", "retune"])
    args = ap.parse_args(argv)
    print(f"jaxlstm tuning cache: {cache_file()}")
    if args.command == "clear":
        clear()
        print("cleared")
        return
    lines = show() if args.command == "show" else retune()
    print("\n".join(lines) if lines else "(no choices)")


if __name__ == "__main__":
    from jaxlstm import tuning as _tuning  # the package's module, not this __main__ copy

    _tuning.main()
