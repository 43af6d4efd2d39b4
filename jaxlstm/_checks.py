"""Argument validation shared by every public entry point.

Everything here runs at trace time on static shapes and dtypes, so it costs
nothing at run time. Each error names the argument, the expected value and the
value given.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from .gates import DEFAULT_ACTIVATIONS, Activations
from .params import LSTMParams, LSTMState


def _shape(x) -> tuple:
    return tuple(np.shape(x))


def float_array(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, ...), got {x.dtype}")


def as_float_array(name: str, x):
    """``float_array``, and a NumPy array becomes a JAX array in its canonical
    dtype (float64 NumPy input with x64 off becomes float32 once, here, instead of
    warning at every cast inside)."""
    float_array(name, x)
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


def static_bool(name: str, value) -> bool:
    """A Python bool that chooses the program (not an array: it cannot be traced)."""
    if isinstance(value, Tracer):
        raise TypeError(
            f"{name} must be a Python bool, got a traced value: under jax.jit pass it as a static argument "
            f"(jax.jit(fn, static_argnames=({name!r},))) or close over it"
        )
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def one_of(name: str, value, options: tuple) -> None:
    if isinstance(value, Tracer) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def compute_dtype(dtype):
    """``None`` or a floating dtype."""
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"compute_dtype must be a floating dtype such as jnp.bfloat16, got {dtype!r}") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"compute_dtype must be a floating dtype (float32, bfloat16, ...), got {dt}")
    return dt


def _elementwise(name: str, fn) -> None:
    """``fn`` maps a float32 ``[2, 3]`` array to one of its shape and a floating dtype."""
    if not callable(fn):
        raise TypeError(f"{name} must be a JAX function (such as jax.nn.relu), got {fn!r} ({type(fn).__name__})")
    probe = jax.ShapeDtypeStruct((2, 3), jnp.float32)
    try:
        out = jax.eval_shape(fn, probe)
    except Exception as e:  # any failure to trace is the caller's function's
        raise TypeError(f"{name} must be an elementwise JAX function of one array, got {fn!r}: calling it on a "
                        f"float32 (2, 3) array failed with {type(e).__name__}: {e}") from e  # fmt: skip
    if not hasattr(out, "shape") or out.shape != (2, 3) or not jnp.issubdtype(out.dtype, jnp.floating):
        got = f"shape {out.shape}, dtype {out.dtype}" if hasattr(out, "shape") else type(out).__name__
        raise ValueError(f"{name} must be elementwise (same shape, floating dtype out): on a float32 (2, 3) "
                         f"array {fn!r} gave {got}")  # fmt: skip


def activations(gate_activation, activation) -> Activations | None:
    """The nonlinearities of a call, checked: ``None`` for the defaults (σ, tanh), which every path
    (the native code included) runs; else an ``Activations``, which the XLA paths run."""
    _elementwise("gate_activation", gate_activation)
    _elementwise("activation", activation)
    act = Activations(gate_activation, activation)
    return None if act == DEFAULT_ACTIVATIONS else act


def _what(x) -> str:
    if isinstance(x, (tuple, list)) and x and all(isinstance(e, (tuple, list)) for e in x):
        return "stack params (params[layer][direction]); pass them to jaxlstm.lstm_stack, or one params[l][d] here"
    if isinstance(x, dict):
        return (
            "a dict; convert flax variables with jaxlstm.convert.from_flax and a PyTorch state_dict with "
            "jaxlstm.convert.from_torch"
        )
    if hasattr(x, "shape"):
        return f"an array of shape {_shape(x)}; the order is lstm(params, xs)"
    return type(x).__name__


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def matrix(name: str, w, rows: int | None = None, cols: int | None = None) -> None:
    float_array(name, w)
    if w.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {_shape(w)}")
    if rows is not None and w.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {_shape(w)}")
    if cols is not None and w.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {_shape(w)}")


def vector(name: str, b, size: int) -> None:
    float_array(name, b)
    if _shape(b) != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {_shape(b)}")


def gated_params(name: str, params, n_gates: int) -> tuple[int, int]:
    """Checks ``w_ih [D, G*H]``, ``w_hh [R, G*H]``, ``b [G*H]``; returns ``(D, H)``."""
    matrix(f"{name}.w_ih", params.w_ih)
    D, GH = params.w_ih.shape
    if GH == 0 or GH % n_gates:
        raise ValueError(
            f"{name}.w_ih must have a multiple of {n_gates} columns ({n_gates} gates), got shape {_shape(params.w_ih)}"
        )
    matrix(f"{name}.w_hh", params.w_hh, cols=GH)
    if params.b is not None or not isinstance(params, LSTMParams):  # only the LSTM has bias-free layers
        vector(f"{name}.b", params.b, GH)
    return D, GH // n_gates


def lstm_params(params, name: str = "params") -> tuple[int, int, int]:
    """Validates ``LSTMParams`` (variants included); returns ``(D, H, R)``."""
    params_type(name, params, LSTMParams, "jaxlstm.init_lstm")
    if hasattr(params.w_hh, "ndim") and params.w_hh.ndim == 3:
        return _multi_head_params(params, name)
    D, H = gated_params(name, params, 4)
    _variant_fields(params, name, H)
    R = params.w_hh.shape[0]
    if params.w_hr is None:
        if R != H:
            raise ValueError(
                f"{name}.w_hh must have {H} rows (hidden_size, no projection), got shape {_shape(params.w_hh)}"
            )
    else:
        matrix(f"{name}.w_hr", params.w_hr, rows=H, cols=R)
    return D, H, R


def sequence(name: str, xs, input_size: int, time_major: bool) -> tuple[tuple, int]:
    """Validates ``xs`` (``[..., T, D]`` or ``[T, ..., D]``); returns ``(batch_shape, T)``."""
    float_array(name, xs)
    layout = "[T, ..., D]" if time_major else "[..., T, D]"
    if xs.ndim < 2:
        raise ValueError(f"{name} must have rank >= 2 {layout}, got shape {_shape(xs)}")
    if xs.shape[-1] != input_size:
        raise ValueError(
            f"{name} must have {input_size} features (last axis, the params' input size), got shape {_shape(xs)}"
        )
    if time_major:
        return tuple(xs.shape[1:-1]), xs.shape[0]
    return tuple(xs.shape[:-2]), xs.shape[-2]


_CELLS = {"LSTMParams": "lstm", "GRUParams": "gru", "RNNParams": "rnn"}


def params_type(name: str, params, cls: type, init: str) -> None:
    """``params`` is a ``cls`` (a params NamedTuple) with one dtype throughout."""
    if not isinstance(params, cls):
        kind = type(params).__name__
        if kind in _CELLS:
            what = f"{kind} (use jaxlstm.{_CELLS[kind]} / jaxlstm.{_CELLS[kind]}_cell for those)"
        else:
            what = _what(params)
        raise TypeError(f"{name} must be {cls.__name__} (see {init}), got {what}")
    same_dtype(name, params)


def same_dtype(name: str, params) -> None:
    """Every array of a params tuple has one dtype (a mixed set is almost always a mistake)."""
    dtypes = {f: jnp.dtype(a.dtype) for f, a in params._asdict().items() if hasattr(a, "dtype")}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{f} {d}" for f, d in dtypes.items())
        raise TypeError(f"{name} must have one dtype throughout (cast with jax.tree.map), got {listed}")


def step_input(name: str, x, input_size: int, batch_shape: tuple | None = None) -> None:
    """One step's input ``[..., D]``; with ``batch_shape`` (the state's), a rank
    mismatch blames ``x`` (a sequence passed as a step); other batch mismatches
    are reported on the state."""
    float_array(name, x)
    if x.ndim < 1 or x.shape[-1] != input_size:
        raise ValueError(f"{name} must have shape [..., {input_size}] (the params' input size), got {tuple(x.shape)}")
    if batch_shape is not None and x.ndim != len(batch_shape) + 1:
        raise ValueError(
            f"{name} must have rank {len(batch_shape) + 1}, shape {tuple(batch_shape) + (input_size,)} (the state's "
            f"batch shape, then features: one step, not a sequence), got {tuple(x.shape)}"
        )


def state_array(name: str, x, expected: tuple) -> None:
    float_array(name, x)
    if _shape(x) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {_shape(x)}")


def lstm_state(name: str, state, batch_shape: tuple, H: int, R: int) -> None:
    """``LSTMState(h [*batch_shape, R], c [*batch_shape, H])``."""
    if not isinstance(state, LSTMState):
        hint = (
            " (wrap a pair as jaxlstm.LSTMState(h, c): h first; flax cells carry (c, h))"
            if isinstance(state, tuple)
            else ""
        )
        raise TypeError(f"{name} must be an LSTMState(h, c){hint}, got {type(state).__name__}")
    state_array(f"{name}.h", state.h, tuple(batch_shape) + (R,))
    state_array(f"{name}.c", state.c, tuple(batch_shape) + (H,))


def seq_lengths(seq_lengths, batch_shape: tuple, T: int):
    """Validates ``seq_lengths [*batch_shape]`` of integers in ``[0, T]`` (checked when concrete)."""
    if seq_lengths is None:
        return None
    if not hasattr(seq_lengths, "dtype"):
        # A list may hold tracers (jit flattens it into scalars): jnp, not np.
        seq_lengths = jnp.asarray(seq_lengths)
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise TypeError(f"seq_lengths must have an integer dtype, got {seq_lengths.dtype}")
    if _shape(seq_lengths) != tuple(batch_shape):
        raise ValueError(
            f"seq_lengths must have shape {tuple(batch_shape)} (the batch shape of xs), got {_shape(seq_lengths)}"
        )
    if not isinstance(seq_lengths, Tracer):
        # Concrete: checked here (traced values are clipped by the engine).
        values = np.asarray(seq_lengths)
        if values.size and (values.min() < 0 or values.max() > T):
            raise ValueError(
                f"seq_lengths must lie in [0, {T}] (T, the sequence length), got values in "
                f"[{values.min()}, {values.max()}]"
            )
    return seq_lengths


def step_flags(name: str, flags, batch_shape: tuple, T: int, time_major: bool):
    """A boolean ``[*batch_shape, T]`` (``[T, *batch_shape]`` if ``time_major``) per-step
    flag array (``mask``, ``resets``), or ``None``."""
    if flags is None:
        return None
    if not hasattr(flags, "dtype"):
        flags = jnp.asarray(flags)
    if flags.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {flags.dtype}")
    expected = (T,) + tuple(batch_shape) if time_major else tuple(batch_shape) + (T,)
    layout = "[T, ...] (time_major)" if time_major else "[..., T]"
    if _shape(flags) != expected:
        raise ValueError(
            f"{name} must have shape {expected} ({layout}, the batch shape and T of xs), got {_shape(flags)}"
        )
    return flags


def rate(name: str, p) -> float:
    """A dropout probability: a Python float in ``[0, 1)`` (it chooses the program)."""
    if isinstance(p, Tracer) or isinstance(p, bool) or not isinstance(p, (int, float, np.floating)):
        raise TypeError(f"{name} must be a Python float in [0, 1), got {p!r}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {p}")
    return float(p)


def _variant_fields(params, name: str, H: int) -> None:
    for field, shape in (("peephole", (3, H)), ("ln_gates", (4, 4 * H)), ("ln_cell", (2, H))):
        v = getattr(params, field)
        if v is not None:
            float_array(f"{name}.{field}", v)
            if _shape(v) != shape:
                raise ValueError(f"{name}.{field} must have shape {shape}, got {_shape(v)}")


def _multi_head_params(params, name: str) -> tuple[int, int, int]:
    """``w_hh [k, R/k, 4H/k]``: the blocks of a multi-head recurrent kernel."""
    matrix(f"{name}.w_ih", params.w_ih)
    D, GH = params.w_ih.shape
    if GH == 0 or GH % 4:
        raise ValueError(f"{name}.w_ih must have a multiple of 4 columns (4 gates), got shape {_shape(params.w_ih)}")
    H = GH // 4
    float_array(f"{name}.w_hh", params.w_hh)
    k, rk, gk = params.w_hh.shape
    if k == 0 or H % k or gk * k != GH:
        raise ValueError(
            f"{name}.w_hh of a multi-head LSTM must have shape [k, R/k, {GH}/k] with k dividing H={H}, "
            f"got {_shape(params.w_hh)}"
        )
    R = k * rk
    if params.b is not None:
        vector(f"{name}.b", params.b, GH)
    _variant_fields(params, name, H)
    if params.w_hr is None:
        if R != H:
            raise ValueError(f"{name}.w_hh must have {H} rows over its heads (k * R/k = H), got {_shape(params.w_hh)}")
    else:
        matrix(f"{name}.w_hr", params.w_hr, rows=H, cols=R)
    return D, H, R
