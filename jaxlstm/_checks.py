"""Argument validation shared by every public entry point.

Everything here runs at trace time on static shapes and dtypes, so it costs
nothing at run time. Each error names the argument, the expected value and the
value given.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _shape(x) -> tuple:
    return tuple(np.shape(x))


def _dtype(x):
    return jnp.result_type(x)


def float_array(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, ...), got {x.dtype}")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def matrix(name: str, w, rows: Optional[int] = None, cols: Optional[int] = None) -> None:
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


def gated_params(name: str, params, n_gates: int) -> Tuple[int, int]:
    """Checks ``w_ih [D, G*H]``, ``w_hh [R, G*H]``, ``b [G*H]``; returns ``(D, H)``."""
    matrix(f"{name}.w_ih", params.w_ih)
    D, GH = params.w_ih.shape
    if GH == 0 or GH % n_gates:
        raise ValueError(
            f"{name}.w_ih must have a multiple of {n_gates} columns ({n_gates} gates), got shape {_shape(params.w_ih)}"
        )
    matrix(f"{name}.w_hh", params.w_hh, cols=GH)
    vector(f"{name}.b", params.b, GH)
    return D, GH // n_gates


def lstm_params(params, name: str = "params") -> Tuple[int, int, int]:
    """Validates ``LSTMParams``; returns ``(D, H, R)``."""
    D, H = gated_params(name, params, 4)
    R = params.w_hh.shape[0]
    if params.w_hr is None:
        if R != H:
            raise ValueError(
                f"{name}.w_hh must have {H} rows (hidden_size, no projection), got shape {_shape(params.w_hh)}"
            )
    else:
        matrix(f"{name}.w_hr", params.w_hr, rows=H, cols=R)
    return D, H, R


def sequence(name: str, xs, input_size: int, time_major: bool) -> Tuple[tuple, int]:
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


def step_input(name: str, x, input_size: int) -> None:
    """One step's input ``[..., D]``."""
    float_array(name, x)
    if x.ndim < 1 or x.shape[-1] != input_size:
        raise ValueError(f"{name} must have shape [..., {input_size}] (the params' input size), got {tuple(x.shape)}")


def state_array(name: str, x, expected: tuple) -> None:
    float_array(name, x)
    if _shape(x) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {_shape(x)}")


def seq_lengths(seq_lengths, batch_shape: tuple, T: int):
    """Validates ``seq_lengths [*batch_shape]`` of integers in ``[0, T]`` (checked when concrete)."""
    if seq_lengths is None:
        return None
    if not hasattr(seq_lengths, "dtype"):
        seq_lengths = np.asarray(seq_lengths)
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise TypeError(f"seq_lengths must have an integer dtype, got {seq_lengths.dtype}")
    if _shape(seq_lengths) != tuple(batch_shape):
        raise ValueError(
            f"seq_lengths must have shape {tuple(batch_shape)} (the batch shape of xs), got {_shape(seq_lengths)}"
        )
    if not isinstance(seq_lengths, jax.core.Tracer):
        values = np.asarray(seq_lengths)
        if values.size and (values.min() < 0 or values.max() > T):
            raise ValueError(
                f"seq_lengths must lie in [0, {T}] (T, the sequence length), got values in "
                f"[{values.min()}, {values.max()}]"
            )
    return seq_lengths


def batch_size(batch_shape: Sequence[int]) -> int:
    return math.prod(batch_shape)
