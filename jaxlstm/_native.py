"""The native CPU code: the LSTM, GRU and Elman recurrences as XLA FFI custom calls.

``jaxlstm/csrc/`` is built by the package's own build (``pip install`` compiles it with
the machine's C++ compiler against the XLA FFI headers that jaxlib ships; where that fails
the package installs without it), once per ISA level with portable flags (``setup.py``):
``avx``, ``avx2``, ``avx512`` and ``avx512_bf16`` on x86-64, ``generic`` elsewhere, each a
library of its own (``jaxlstm/_native_<level>``). When a call first needs it, ``level`` asks the CPU
(``jaxlstm/_native_cpu``, built for the baseline) which levels it runs and loads the best
one built; ``JAXLSTM_NATIVE_ISA=<level>`` forces another (one the CPU runs). No library is
loaded that the CPU cannot run, so no instruction runs that it lacks. Each level registers
its calls under names of its own (``jaxlstm_<level>_forward``), so levels can be compared
in one process. ``native_info`` (``jaxlstm.native_info``) reports it all.

The library holds the two loops over time, forward and backward, with the hidden units
split over the machine's cores: each core keeps its slice of ``W_hh`` in its cache and
computes its units' gates with a register-blocked GEMM, and one spin barrier per step
publishes ``h``. The input projection runs inside the forward loop and the weight and
input gradients inside the backward loop (GEMMs over chunks of ~256 rows): on this
project's machines a ``[T, B, 4H]`` buffer between the loop and XLA cost more to first
touch (fresh pages on every call) than its GEMM took. One forward and one backward call
serve every cell (the ``cell`` attribute).

``jaxlstm.lstm`` runs ``native_lstm`` in place of ``jaxlstm._fused.fused_sequence``
where ``applies`` (float32 or bfloat16 GEMMs on CPU, no projection or variant, no recurrent
dropout or zoneout, no checkpointing, no device mesh; with ``compute_dtype=bfloat16`` the
``avx512_bf16`` level multiplies bf16 operands, ``bf16_dot``, the others the float32 ones)
and ``jaxlstm.tuning.native_path`` chose it: lengths, masks, resets and ``reverse`` are supported.
``jaxlstm.gru`` and ``jaxlstm.rnn`` run ``native_cell`` in place of ``jaxlstm._fused.fused_sequence``
on the same terms (the same loops, with the GRU's three gates or the Elman RNN's one). ``JAXLSTM_NATIVE=0``
turns it off (the XLA path, which is the reference it is tested against);
``JAXLSTM_NATIVE_THREADS=n`` sets its team of threads (default: by the work per step; either way at
most one per CPU this process may run on: a larger ``n`` is capped, one that is no positive integer is
a ``ValueError``). Each variable is read under its earlier name too (``JAXLSTM_KERNEL``,
``JAXLSTM_KERNEL_ISA``, ``JAXLSTM_KERNEL_THREADS``) where the new one is unset.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import importlib.util
import os
import platform
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import tuning
from ._engine import Steps, counted_steps, mesh_active, scan_masked
from ._fused import FusedConfig, fused_sequence
from ._gru import ELMAN, GRU, elman_step, gru_step
from ._step import LSTM, lstm_scan_core
from .params import LSTMParams, init_gru, init_lstm, init_rnn

__all__ = [
    "LEVELS",
    "NativeInfo",
    "applies",
    "available",
    "build_id",
    "enabled",
    "native_cell",
    "native_lstm",
    "level",
    "load_error",
    "native_info",
]

# The ISA levels the native code is compiled for (setup.py), lowest first: on x86-64 each needs the
# ones before it; "generic" is the compiler's baseline of any other architecture.
LEVELS = ("avx", "avx2", "avx512", "avx512_bf16", "generic")
_X86 = platform.machine().lower() in ("x86_64", "amd64")
ISA_VARIABLE = "JAXLSTM_NATIVE_ISA"
SWITCH_VARIABLE = "JAXLSTM_NATIVE"
THREADS_VARIABLE = "JAXLSTM_NATIVE_THREADS"
# The FFI calls' ``cell`` attribute (jaxlstm/csrc/cells.h) and the floats each saves per unit and step.
_CELLS = {"lstm": (0, 4), "gru": (1, 4), "rnn": (2, 1)}
_F32 = jnp.dtype(jnp.float32)
_BF16 = jnp.dtype(jnp.bfloat16)


def _env(variable: str) -> tuple[str, str | None]:
    """(the name it is set under, its value) of ``variable`` (one of the ``JAXLSTM_NATIVE*``
    above), read under its earlier name ``JAXLSTM_KERNEL*`` where it is unset (the C++ reads
    ``JAXLSTM_NATIVE_THREADS`` the same way: ``csrc/team.h``); ``(variable, None)`` where neither is."""
    for name in (variable, variable.replace("JAXLSTM_NATIVE", "JAXLSTM_KERNEL", 1)):
        value = os.environ.get(name)
        if value is not None:
            return name, value
    return variable, None


def _forced_isa() -> tuple[str, str | None]:
    name, value = _env(ISA_VARIABLE)
    return name, value or None


def _origin(name: str) -> str | None:
    spec = importlib.util.find_spec(f"jaxlstm.{name}")
    return None if spec is None or spec.origin is None else spec.origin


@functools.cache
def _cpu() -> ctypes.CDLL | None:
    """The CPU probe (``jaxlstm/csrc/cpu.cc``, compiled for the baseline), or ``None``."""
    origin = _origin("_native_cpu")
    if origin is None:
        return None
    try:
        lib = ctypes.CDLL(origin)
    except OSError:
        return None
    lib.JaxlstmCpuSupports.argtypes = [ctypes.c_char_p]
    lib.JaxlstmCpuName.restype = ctypes.c_char_p
    return lib


@functools.cache
def levels_built() -> tuple[str, ...]:
    """The levels whose library this installation holds, lowest first."""
    return tuple(lv for lv in LEVELS if _origin(f"_native_{lv}") is not None)


@functools.cache
def levels_supported() -> tuple[str, ...]:
    """The levels this CPU (and its OS) can run, of ``LEVELS``, asked of the CPU itself
    (cpuid, through the probe; an emulated CPU answers for itself). Without the probe, none."""
    cpu = _cpu()
    if cpu is None:
        return ()
    mine = LEVELS[:-1] if _X86 else ("generic",)
    return tuple(lv for lv in mine if cpu.JaxlstmCpuSupports(lv.encode()))


@functools.cache
def _choose(variable: str, forced: str | None) -> tuple[str | None, str | None]:
    """(the level to load, None) or (None, why there is none); ``forced`` is the level the
    environment ``variable`` names, where set."""
    built, supported = levels_built(), levels_supported()
    if forced is not None:
        if forced not in LEVELS:
            raise ValueError(f"{variable} must be one of {', '.join(LEVELS)}; got {forced!r}")
        if forced not in built:
            return None, f"{variable}={forced}: that level is not built (built: {', '.join(built) or 'none'})"
        if forced not in supported:
            return None, (
                f"{variable}={forced}: this CPU cannot run that level (it runs: {', '.join(supported) or 'none'})"
            )
        return forced, None
    if not built:
        return None, "the native code (jaxlstm/_native_*) is not built: reinstall with a C++ compiler"
    runnable = [lv for lv in built if lv in supported]
    if not runnable:
        return None, f"this CPU runs none of the built levels ({', '.join(built)})"
    return runnable[-1], None


def level() -> str | None:
    """The ISA level the native code runs at in this process (``None`` where it cannot run): the best
    one built that the CPU supports, or the one ``JAXLSTM_NATIVE_ISA`` names. Read where a call is
    traced, so a function ``jax.jit`` already traced keeps the level it was traced with."""
    return _choose(*_forced_isa())[0]


def _target(direction: str) -> str:
    return f"jaxlstm_{level()}_{direction}"


@functools.cache
def _library(lv: str) -> ctypes.CDLL:
    """Loads level ``lv`` (one the CPU supports: ``_choose`` checked) and registers its
    calls with XLA under names of its own, so that levels can be compared in one process."""
    lib = ctypes.CDLL(_origin(f"_native_{lv}"))
    lib.JaxlstmIsa.restype = ctypes.c_char_p
    compiled = lib.JaxlstmIsa().decode()
    if compiled != lv:
        raise OSError(f"jaxlstm/_native_{lv} was compiled for {compiled!r}")
    jax.ffi.register_ffi_target(f"jaxlstm_{lv}_forward", jax.ffi.pycapsule(lib.JaxlstmForward), platform="cpu")
    jax.ffi.register_ffi_target(f"jaxlstm_{lv}_backward", jax.ffi.pycapsule(lib.JaxlstmBackward), platform="cpu")
    lib.JaxlstmBf16Dot.restype = ctypes.c_int
    return lib


def _check_threads() -> None:
    """``JAXLSTM_NATIVE_THREADS``, where set, is a positive integer (the native code caps it at the
    CPUs this process may run on)."""
    name, value = _env(THREADS_VARIABLE)
    if value is not None and value.strip() and not (value.strip().isdigit() and int(value) > 0):
        raise ValueError(
            f"{name} must be a positive integer (threads per native call, at most one per CPU "
            f"this process may run on); got {value!r}"
        )


def _load() -> str | None:
    """Loads and registers the native code at ``level``; ``None`` on success, else why not."""
    _check_threads()
    lv, error = _choose(*_forced_isa())
    if lv is None:
        return error
    try:
        _library(lv)
    except (OSError, AttributeError) as e:
        return f"the native code jaxlstm/_native_{lv} did not load: {e}"
    return None


@functools.cache
def _build_id(lv: str) -> str:
    try:
        with open(_origin(f"_native_{lv}") or "", "rb") as f:
            return f"{lv}-{hashlib.sha1(f.read()).hexdigest()[:12]}"
    except OSError:
        return ""


def build_id() -> str:
    """The level in use and a short hash of its library (``""`` where none runs): tuning's
    choices between it and the XLA path are keyed on it, so a rebuilt library, or another
    level, is measured afresh."""
    lv = level()
    return "" if lv is None else _build_id(lv)


def load_error() -> str | None:
    """Why the native code is unavailable, or ``None`` when it is built and loaded."""
    return _load()


def available() -> bool:
    """The native code is built, runs on this CPU and is registered with XLA."""
    return _load() is None


def enabled() -> bool:
    """Available and not turned off with ``JAXLSTM_NATIVE=0``."""
    return not switched_off() and available()


def switched_off() -> bool:
    """``JAXLSTM_NATIVE=0`` (or its earlier name ``JAXLSTM_KERNEL=0``)."""
    return _env(SWITCH_VARIABLE)[1] == "0"


def bf16_gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The attainable bfloat16 matmul rate: the level's bf16 GEMM on ``[n, n]·[n, n]`` on every
    core the native code may use, best of ``repeats`` (GFLOP/s; 0.0 where the level has none). XLA:CPU
    has no bf16 GEMM of its own to probe: it widens bf16 operands to float32."""
    if not bf16_dot():
        return 0.0
    lib = _library(level())  # pyright: ignore[reportArgumentType]
    lib.JaxlstmBf16GemmGflops.restype = ctypes.c_double
    lib.JaxlstmBf16GemmGflops.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int]
    return float(lib.JaxlstmBf16GemmGflops(n, int(lib.JaxlstmMaxThreads()), repeats))


def bf16_dot() -> bool:
    """Whether the level in use multiplies bfloat16 operands (``avx512_bf16``: VDPBF16PS); at the
    other levels a ``compute_dtype=bfloat16`` call runs the float32 GEMMs on the same data."""
    return available() and bool(_library(level()).JaxlstmBf16Dot())  # pyright: ignore[reportArgumentType]


@dataclasses.dataclass(frozen=True)
class NativeInfo:
    """What ``jaxlstm.native_info`` reports of the native CPU code."""

    available: bool  # built, runs on this CPU, registered with XLA
    enabled: bool  # available and not turned off with JAXLSTM_NATIVE=0
    isa: str | None  # the level in use
    isa_built: tuple[str, ...]  # the levels this installation holds
    isa_supported: tuple[str, ...]  # the levels this CPU runs
    isa_forced: str | None  # JAXLSTM_NATIVE_ISA, where set
    threads: int | None  # the most threads a call uses (one per CPU; JAXLSTM_NATIVE_THREADS, capped there)
    cpu: str  # the CPU's name, family and model, as cpuid gives them
    build_id: str  # the level and a hash of its library
    error: str | None  # why it is unavailable
    bf16_dot: bool = False  # the level multiplies bfloat16 operands (compute_dtype=bfloat16 calls)

    def __str__(self) -> str:
        state = "enabled" if self.enabled else ("available, turned off (JAXLSTM_NATIVE=0)" if self.available else "off")
        lines = [
            f"jaxlstm native code: {state}" + (f": {self.error}" if self.error else ""),
            f"  ISA level in use: {self.isa or '-'}" + (f" (forced by {_forced_isa()[0]})" if self.isa_forced else ""),
            f"  bfloat16 GEMMs: {'yes (VDPBF16PS)' if self.bf16_dot else 'no (bf16 calls run the float32 GEMMs)'}",
            f"  levels built: {', '.join(self.isa_built) or 'none'}; this CPU runs: "
            f"{', '.join(self.isa_supported) or 'unknown'}",
            f"  threads per call: at most {self.threads if self.threads else '-'}",
            f"  CPU: {self.cpu or 'unknown'}",
        ]
        return "\n".join(lines)


def _cpu_name() -> str:
    cpu = _cpu()
    if cpu is None:
        return platform.processor()
    fm = cpu.JaxlstmCpuFamilyModel()
    name = cpu.JaxlstmCpuName().decode(errors="replace").strip()
    return f"{name} (family {fm // 1000}, model {fm % 1000})" if fm else (name or platform.processor())


def native_info() -> NativeInfo:
    """The native CPU code as this process sees it: whether it is built and why not,
    the ISA level in use (the best one built that the CPU supports; ``JAXLSTM_NATIVE_ISA``
    forces a lower one), the levels built and supported, the threads per call and the CPU.

    Examples:
      >>> import jaxlstm
      >>> info = jaxlstm.native_info()
      >>> info.isa in info.isa_built if info.available else info.error is not None
      True
    """
    forced = _forced_isa()[1]
    try:
        error = _load()
    except ValueError as e:  # a JAXLSTM_NATIVE_ISA or _THREADS jaxlstm.lstm would reject: it raises it
        error = str(e)
    lv = level() if error is None else None
    threads = None
    if lv is not None:
        threads = int(_library(lv).JaxlstmMaxThreads())
    return NativeInfo(
        available=error is None,
        enabled=error is None and enabled(),
        isa=lv,
        isa_built=levels_built(),
        isa_supported=levels_supported(),
        isa_forced=forced,
        threads=threads,
        cpu=_cpu_name(),
        build_id="" if lv is None else _build_id(lv),
        error=error,
        bf16_dot=lv is not None and bf16_dot(),
    )


@functools.cache
def _warn_not_built() -> None:
    """Once per process: on CPU without the native code, a user sees why it is slower than it could be
    (``pip`` shows a build's messages only with ``-v``)."""
    warnings.warn(
        "jaxlstm: the native CPU code is not built in this installation (no C++ compiler, or no XLA FFI "
        "headers in jaxlib, when it was installed), so jaxlstm.lstm/gru/rnn run the pure-XLA path, about "
        "1.3-2.5x slower on CPU. Reinstall with g++ available (pip install -v --force-reinstall --no-deps "
        "<jaxlstm>); jaxlstm.native_info() says what this process sees.",
        RuntimeWarning,
        stacklevel=4,
    )


def applies(params, mm_dtype, acc_dtype, *, batch: int, steps: int, h_mask, zoneout, checkpoint_every=None) -> bool:
    """Whether the native code can run this ``jaxlstm.lstm`` (``LSTMParams``), ``jaxlstm.gru``
    or ``jaxlstm.rnn`` call (its fused path); ``jaxlstm.tuning.native_path`` then says
    whether it should."""
    if not levels_built() and not switched_off() and jax.default_backend() == "cpu":
        _warn_not_built()
    plain = not isinstance(params, LSTMParams) or (not params.is_variant and params.w_hr is None)
    return (
        enabled()
        and jax.default_backend() == "cpu"
        and jnp.dtype(mm_dtype) in (_F32, _BF16)
        and jnp.dtype(acc_dtype) == _F32
        and all(w is None or w.dtype in (_F32, _BF16) for w in params)
        and plain
        and h_mask is None
        and zoneout is None
        and checkpoint_every is None
        and batch * steps > 0
        and not mesh_active()
    )


def _flags(steps: Steps | None, T: int, B: int):
    """``valid`` and ``reset`` ``[T, B]`` as bytes: the step counts; it starts from the reset state."""
    lengths, mask, resets = (None, None, None) if steps is None else steps
    valid = counted_steps(T, B, lengths, mask)
    reset = jnp.zeros((T, B), bool) if resets is None else resets & valid
    return valid.astype(jnp.uint8), reset.astype(jnp.uint8)


def _require() -> None:
    error = _load()
    if error is not None:
        raise RuntimeError(error)


def _out(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, _F32)


# A buffer the cell does not have (the c of a GRU, ...). NumPy, not jnp: a jnp array here would
# start JAX's backend when jaxlstm is imported, before a user's jax.config / jax.distributed setup.
_NONE = np.zeros((0,), np.float32)


def _run_forward(kind: str, batch_major: bool, bf16: bool, params, h0, c0, xs, steps, hr, cr, save: bool):
    """The forward call for any cell: ``c0``/``cr`` the LSTM's (``None`` for the others); ``bf16``:
    bfloat16 GEMM operands where the level has them. Returns ``ys, h(T), c(T), saved``
    (``c(T)`` ``None`` but for the LSTM)."""
    _require()
    cell, saved_per_unit = _CELLS[kind]
    lstm = kind == "lstm"
    B, T = xs.shape[:2] if batch_major else xs.shape[1::-1]
    GH, H = params.w_hh.shape[1], params.w_hh.shape[0]
    b = jnp.zeros((GH,), _F32) if params.b is None else params.b
    b_hn = params.b_hn if kind == "gru" else _NONE
    valid, reset = _flags(steps, T, B)
    cs = (T, B, H) if save and lstm else (0,)
    saved = (_out(T, B, saved_per_unit * H), _out(*cs), _out(T, B, H)) if save else (_out(0),) * 3
    ys = jax.ShapeDtypeStruct((B, T, H) if batch_major else (T, B, H), xs.dtype)  # f32 or bf16 (_io)
    outs = (ys, _out(B, H), _out(*((B, H) if lstm else (0,))), *saved)
    call = jax.ffi.ffi_call(_target("forward"), outs, vmap_method="sequential")
    ys, h, c, acts, cs, h_in = call(
        xs, params.w_ih, b, b_hn, params.w_hh, h0, _NONE if c0 is None else c0, hr, _NONE if cr is None else cr,
        valid, reset, batch_major=np.int32(batch_major), cell=np.int32(cell), bf16=np.int32(bf16),
    )  # fmt: skip
    return ys, h, (c if lstm else None), (acts, cs, h_in, valid, reset)


def _run_backward(kind: str, batch_major: bool, bf16: bool, params, xs, c0, cr, saved, dys, dh, dc):
    """The backward call for any cell. Returns ``grads, dh0, dc0, dxs, dh_reset, dc_reset``
    (``dc0``, ``dc_reset`` ``None`` but for the LSTM)."""
    cell, _ = _CELLS[kind]
    lstm = kind == "lstm"
    acts, cs, h_in, valid, reset = saved
    (D, GH), H = params.w_ih.shape, params.w_hh.shape[0]
    B = dh.shape[0]
    state = (B, H) if lstm else (0,)
    shapes = (
        _out(*xs.shape), _out(D, GH), _out(H, GH), _out(GH), _out(H if kind == "gru" else 0),
        _out(B, H), _out(*state), _out(B, H), _out(*state),
    )  # fmt: skip
    call = jax.ffi.ffi_call(_target("backward"), shapes, vmap_method="sequential")
    none = lambda a: _NONE if a is None else a
    dxs, dw_ih, dw_hh, db, db_hn, dh0, dc0, dh_reset, dc_reset = call(
        xs, params.w_ih, params.w_hh, acts, cs, h_in, none(c0), none(cr), valid, reset, dys, dh, none(dc),
        batch_major=np.int32(batch_major), cell=np.int32(cell), bf16=np.int32(bf16),
    )  # fmt: skip
    if kind == "lstm":
        grads = LSTMParams(dw_ih, dw_hh, None if params.b is None else db, None)
    elif kind == "gru":
        grads = type(params)(dw_ih, dw_hh, db, db_hn)
    else:
        grads = type(params)(dw_ih, dw_hh, db)
    return grads, dh0, (dc0 if lstm else None), dxs, dh_reset, (dc_reset if lstm else None)


def _xla_reference(kind: str, batch_major: bool, bf16: bool, params, h0, c0, xs, steps, hr, cr):
    """The pure-XLA scan of a native call, differentiated by plain autodiff: ``(ys, h, c)``
    (``c`` ``None`` but for the LSTM). Its derivatives are the native code's derivatives of second
    order (the rules of ``_forward_saving`` and ``_backward``)."""
    xs_tm = jnp.swapaxes(xs, 0, 1) if batch_major else xs
    acc = params.w_hh.dtype  # float32 for the native code's calls (float64 where a test checks the rules)
    mm = _BF16 if bf16 else acc
    if kind == "lstm":
        core = lstm_scan_core(params, mm, acc, feature_major=False)
        ys, (h, c) = core(xs_tm, ((h0, c0), (hr, cr), None), steps)
    else:
        step = (gru_step if kind == "gru" else elman_step)(params, mm, acc)
        h, ys, _ = scan_masked(step, h0, xs_tm, steps, reset_to=hr)
        c = None
    return (jnp.swapaxes(ys, 0, 1) if batch_major else ys), h, c


def _zero_tangent(a):
    return jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact) else np.zeros(a.shape, jax.dtypes.float0)


# The native code's forward (saving) and backward calls, each with a JVP rule through the XLA
# reference, so that the first-order pass runs on the native code and whatever differentiates
# it again (grad of grad, jax.hessian, jvp of grad) runs on XLA. The JVP rules treat the
# saved activations as what they are, functions of the primal inputs: their tangents are
# zeros, and the backward call's tangent is taken from the primal inputs alone.


@partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _forward_saving(kind: str, batch_major: bool, bf16: bool, params, h0, c0, xs, steps, hr, cr):
    """``(ys, h, c, saved)``: the native code's forward call, saving for ``_backward``."""
    return _run_forward(kind, batch_major, bf16, params, h0, c0, xs, steps, hr, cr, save=True)


@_forward_saving.defjvp
def _forward_saving_jvp(kind, batch_major, bf16, primals, tangents):
    params, h0, c0, xs, steps, hr, cr = primals
    out = _forward_saving(kind, batch_major, bf16, *primals)
    ref = lambda p, h0, c0, x, hr, cr: _xla_reference(kind, batch_major, bf16, p, h0, c0, x, steps, hr, cr)
    dp, dh0, dc0, dx, _, dhr, dcr = tangents
    _, (dys, dh, dc) = jax.jvp(ref, (params, h0, c0, xs, hr, cr), (dp, dh0, dc0, dx, dhr, dcr))
    return out, (dys.astype(out[0].dtype), dh, dc, jax.tree.map(_zero_tangent, out[3]))


@partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _backward(kind: str, batch_major: bool, bf16: bool, params, h0, c0, xs, steps, hr, cr, saved, cts):
    """The native code's backward call: ``cts = (dys, dh, dc)`` to ``(grads, dh0, dc0, dxs, dhr, dcr)``."""
    del h0, hr  # its JVP rule's: the call reads what the forward call saved
    return _run_backward(kind, batch_major, bf16, params, xs, c0, cr, saved, *cts)


@_backward.defjvp
def _backward_jvp(kind, batch_major, bf16, primals, tangents):
    params, h0, c0, xs, steps, hr, cr, saved, cts = primals
    out = _backward(kind, batch_major, bf16, *primals)

    def pullback(p, h0, c0, x, hr, cr, cts):
        ref = lambda p, h0, c0, x, hr, cr: _xla_reference(kind, batch_major, bf16, p, h0, c0, x, steps, hr, cr)
        grads, dh0, dc0, dxs, dhr, dcr = jax.vjp(ref, p, h0, c0, x, hr, cr)[1](cts)
        return grads, dh0, dc0, dxs, dhr, dcr

    dp, dh0, dc0, dx, _, dhr, dcr, _, dcts = tangents
    _, t_out = jax.jvp(pullback, (params, h0, c0, xs, hr, cr, cts), (dp, dh0, dc0, dx, dhr, dcr, dcts))
    return out, t_out


def _backward_of(kind: str, batch_major: bool, bf16: bool, params, h0, c0, xs, steps, hr, cr, saved, cts):
    """``_backward`` of a call whose ``xs`` and ``ys`` may be bfloat16 (``_io``): the backward call
    reads them widened to float32, here, outside its custom JVP; ``dxs`` in the dtype of ``xs``."""
    dys, dh, dc = cts
    out = _backward(kind, batch_major, bf16, params, h0, c0, xs.astype(_F32), steps, hr, cr, saved,
                    (dys.astype(_F32), dh, dc))  # fmt: skip
    grads, dh0, dc0, dxs, dhr, dcr = out
    return grads, dh0, dc0, dxs.astype(xs.dtype), dhr, dcr


def _io(xs):
    """The inputs as the forward call reads them: bfloat16 as they are (the call writes bf16 ``ys``
    then, with no float32 copy of the sequence on either side), anything else as float32."""
    return xs if xs.dtype == _BF16 else xs.astype(_F32)


def _as_f32(params):
    """The native code's calls read float32 params (bfloat16 params are cast here, outside the custom
    VJPs, so that autodiff casts their gradients back)."""
    return jax.tree.map(lambda w: w.astype(_F32), params)


def native_lstm(batch_major: bool, params: LSTMParams, carry0, xs, steps: Steps | None, reset_carry, bf16=False):
    """``jaxlstm._fused.fused_sequence``'s contract for the LSTM on the native code: ``xs [T, B, D]``
    (``[B, T, D]`` with ``batch_major``), ``carry0`` / ``reset_carry`` ``(h [B, H], c [B, H])``,
    ``steps`` time-major (``[T, B]`` flags). Returns ``(ys, (h, c))``, ``ys`` ``[T, B, H]``
    (``[B, T, H]``), bfloat16 for bfloat16 ``xs``, else float32. ``bf16``: the GEMMs take bfloat16
    operands (weights, x, h and the gate cotangents rounded; float32 accumulation) where the level
    has them (``bf16_dot``).
    Reverse mode runs the native code's backward call; differentiated again (grad of grad,
    ``jax.hessian``, ``jax.jvp`` of ``jax.grad``), the XLA scan's derivatives."""
    return _kernel_lstm(batch_major, bool(bf16), _as_f32(params), carry0, _io(xs), steps, reset_carry)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_lstm(batch_major: bool, bf16: bool, params: LSTMParams, carry0, xs, steps: Steps | None, reset_carry):
    (h0, c0), (hr, cr) = carry0, reset_carry
    ys, h, c, _ = _run_forward("lstm", batch_major, bf16, params, h0, c0, xs, steps, hr, cr, save=False)
    return ys, (h, c)


def _kernel_fwd(batch_major, bf16, params, carry0, xs, steps, reset_carry):
    (h0, c0), (hr, cr) = carry0, reset_carry
    ys, h, c, saved = _forward_saving("lstm", batch_major, bf16, params, h0, c0, xs, steps, hr, cr)
    return (ys, (h, c)), (params, carry0, reset_carry, xs, steps, saved)


def _kernel_bwd(batch_major, bf16, res, cotangents):
    params, (h0, c0), (hr, cr), xs, steps, saved = res
    dys, (dh, dc) = cotangents
    grads, dh0, dc0, dxs, dhr, dcr = _backward_of("lstm", batch_major, bf16, params, h0, c0, xs, steps, hr, cr,
                                                  saved, (dys, dh, dc))  # fmt: skip
    return grads, (dh0, dc0), dxs, None, (dhr, dcr)


_kernel_lstm.defvjp(_kernel_fwd, _kernel_bwd)


def native_cell(kind: str, batch_major: bool, params, h0, xs, steps: Steps | None, h_reset, bf16=False):
    """``jaxlstm._fused.fused_sequence``'s contract on the native code, for ``kind`` ``"gru"``
    (``GRUParams``) or ``"rnn"`` (``RNNParams``): ``xs [T, B, D]`` (``[B, T, D]`` with
    ``batch_major``), ``h0`` / ``h_reset`` ``[B, H]``, ``steps`` time-major. Returns
    ``(ys, h)``, ``ys`` ``[T, B, H]`` (``[B, T, H]``). ``bf16`` and derivatives as ``native_lstm``'s."""
    return _native_cell(kind, batch_major, bool(bf16), _as_f32(params), h0, _io(xs), steps, h_reset)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _native_cell(kind: str, batch_major: bool, bf16: bool, params, h0, xs, steps: Steps | None, h_reset):
    ys, h, _, _ = _run_forward(kind, batch_major, bf16, params, h0, None, xs, steps, h_reset, None, save=False)
    return ys, h


def _cell_fwd(kind, batch_major, bf16, params, h0, xs, steps, h_reset):
    ys, h, _, saved = _forward_saving(kind, batch_major, bf16, params, h0, None, xs, steps, h_reset, None)
    return (ys, h), (params, h0, h_reset, xs, steps, saved)


def _cell_bwd(kind, batch_major, bf16, res, cotangents):
    params, h0, h_reset, xs, steps, saved = res
    dys, dh = cotangents
    grads, dh0, _, dxs, dhr, _ = _backward_of(kind, batch_major, bf16, params, h0, None, xs, steps, h_reset, None,
                                              saved, (dys, dh, None))  # fmt: skip
    return grads, dh0, dxs, None, dhr


_native_cell.defvjp(_cell_fwd, _cell_bwd)


def _train_probe(path: str, B: int, D: int, H: int, T: int, cell: str = "lstm", mm=jnp.float32):
    """A compiled training step (value and gradient of a mean square over all outputs,
    w.r.t. the params and the inputs) of the fused ``cell`` (``"lstm"``, ``"gru"`` or
    ``"rnn"``) on ``path``, ``"native"`` or ``"xla"``, with GEMM operands of dtype ``mm``."""
    f32 = jnp.dtype(jnp.float32)
    params = {"lstm": init_lstm, "gru": init_gru, "rnn": init_rnn}[cell](jax.random.key(0), D, H)
    xs = jax.random.normal(jax.random.key(1), (T, B, D), f32)
    h = jnp.zeros((B, H), f32)
    mm = jnp.dtype(mm)
    cfg, bf16 = FusedConfig(mm, f32), mm == jnp.bfloat16
    # (custom_vjp functions return an untyped object to pyright: hence the ignores)
    if cell != "lstm":
        kind = GRU if cell == "gru" else ELMAN
        if path == tuning.NATIVE:
            run = lambda p, x: native_cell(cell, False, p, h, x, None, h, bf16)[0]  # pyright: ignore[reportIndexIssue]
        else:
            run = lambda p, x: fused_sequence(cfg, kind, p, (h,), x, None, (h,))[0]
    elif path == tuning.NATIVE:
        run = lambda p, x: native_lstm(False, p, (h, h), x, None, (h, h), bf16)[0]  # pyright: ignore[reportIndexIssue]
    else:
        run = lambda p, x: fused_sequence(cfg, LSTM, p, (h, h), x, None, (h, h))[0]
    step = jax.value_and_grad(lambda p, x: jnp.mean(jnp.square(run(p, x))), argnums=(0, 1))
    compiled = jax.jit(step).lower(params, xs).compile()
    return lambda: jax.block_until_ready(compiled(params, xs))


def _time_paths(B, D, H, T, cell, dtype) -> dict:
    """``jaxlstm.tuning.native_path``'s timing: training steps on the native code and on the XLA path."""
    with jax.ensure_compile_time_eval():
        steps = min(T, tuning.PROBE_STEPS)
        probes = {name: _train_probe(name, B, D, H, steps, cell, dtype) for name in (tuning.NATIVE, "xla")}
        return tuning.decide(probes, tuning.NATIVE)


tuning.register(tuning.NATIVE, _time_paths, tag=build_id)
