"""One step at a time, at the cost of one call: ``jaxlstm.step`` for streaming inference (speech, an RL
actor acting step by step, interactive models), for the LSTM, the GRU, the Elman RNN and stacks.

``jaxlstm.lstm_cell`` / ``gru_cell`` / ``rnn_cell`` are the step as JAX operations: XLA:CPU runs each
call as a handful of small operations, each with its own dispatch. On CPU, where the compiled code
applies (float32 sums; no projection, variant or zoneout), ``step`` runs the native code's one-step
call instead: one custom call that reads the weights in place (no panels are laid out for a single
step). Elsewhere it is the cell. It has the native code's reverse-mode derivative, not forward mode
(``jax.jvp``): use the cells for that.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import _checks, _native, _path
from .gates import DEFAULT_ACTIVATIONS, Activations
from .params import GRUParams, LSTMParams, LSTMState, RNNParams
from .recurrence import check_cell, lstm_cell
from .rnn import check_cell as check_rnn_cell
from .rnn import gru_cell, rnn_cell
from .stack import check_stack

__all__ = ["step"]


def _native_applies(kind: str, params, x, compute_dtype, batch: int, act):
    """``(applies, bf16)``: whether the native one-step call runs this step, and with bf16 GEMMs."""
    mm, acc = _path.dtypes(kind, params, x.dtype, compute_dtype)
    ok = act is None and _native.applies(params, mm, acc, batch=batch, steps=1, h_mask=None, zoneout=None)
    return ok, jnp.dtype(mm) == jnp.bfloat16


def _lstm_step(params: LSTMParams, state: LSTMState, x, compute_dtype, act: Activations | None):
    x = check_cell(params, state, x)
    lead, D = x.shape[:-1], x.shape[-1]
    B = math.prod(lead)
    native, bf16 = _native_applies("lstm", params, x, compute_dtype, B, act)
    if not native:
        gate, cell = act or DEFAULT_ACTIVATIONS
        return lstm_cell(params, state, x, compute_dtype=compute_dtype, gate_activation=gate, activation=cell)
    H = params.w_hh.shape[0]
    f32 = jnp.float32
    carry = (state.h.reshape(B, H).astype(f32), state.c.reshape(B, H).astype(f32))
    # (custom_vjp functions return an untyped object to pyright: hence the ignore)
    _, (h, c) = _native.native_lstm(True, params, carry, x.reshape(B, 1, D), None, carry, bf16=bf16)  # pyright: ignore[reportGeneralTypeIssues]
    y = h.reshape(lead + (H,)).astype(x.dtype)
    return LSTMState(y, c.reshape(lead + (H,))), y


def _cell_step(kind: str, params, h, x, compute_dtype, act: Activations | None, reset_after: bool):
    x = check_rnn_cell(kind, params, h, x)
    lead, D = x.shape[:-1], x.shape[-1]
    B = math.prod(lead)
    native, bf16 = _native_applies(kind, params, x, compute_dtype, B, act)
    if not native or not reset_after:
        gate, cell = act or DEFAULT_ACTIVATIONS
        if kind == "gru":
            return gru_cell(
                params, h, x, compute_dtype=compute_dtype, gate_activation=gate, activation=cell,
                reset_after=reset_after,
            )  # fmt: skip
        return rnn_cell(params, h, x, compute_dtype=compute_dtype, activation=cell)
    H = params.w_hh.shape[0]
    h0 = h.reshape(B, H).astype(jnp.float32)
    _, h_new = _native.native_cell(kind, True, params, h0, x.reshape(B, 1, D), None, h0, bf16=bf16)  # pyright: ignore[reportGeneralTypeIssues]
    h_new = h_new.reshape(lead + (H,)).astype(x.dtype)
    return h_new, h_new


def step(
    params,
    state,
    x,
    *,
    compute_dtype=None,
    gate_activation: Callable = jax.nn.sigmoid,
    activation: Callable = jnp.tanh,
    reset_after: bool = True,
):
    """One step of an LSTM, GRU, Elman RNN or unidirectional LSTM stack: ``(new_state, y)``.

    Args:
      params: ``LSTMParams``, ``GRUParams``, ``RNNParams``, or a stack's ``params[layer][direction]``
        with one direction (a reverse direction needs the whole sequence).
      state: ``LSTMState(h [..., R], c [..., H])``; ``h [..., H]`` for the GRU and the Elman RNN; a
        stack's ``LSTMState`` with the layers first, ``[num_layers, ..., R]`` (as ``lstm_stack`` returns).
      x: the input ``[..., D]``, with the state's leading dims.
      compute_dtype: the matmul operands' dtype (``jnp.bfloat16``), as for the sequences.
      gate_activation, activation: the nonlinearities, as for the sequences (other than σ and
        tanh, the step is the cell's).
      reset_after: the GRU's form, as ``jaxlstm.gru`` takes it (``False``: the cell's step).

    Returns:
      ``(new_state, y)``, ``y`` the (last layer's) output ``[..., R]``; the same numbers as the
      cell (``lstm_cell`` / ``gru_cell`` / ``rnn_cell``), and as the sequence call split into steps.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> params = jaxlstm.init_lstm(jax.random.key(0), 8, 16)
      >>> state = jaxlstm.zero_state(4, 16)
      >>> state, y = jax.jit(jaxlstm.step)(params, state, jnp.ones((4, 8)))
      >>> y.shape
      (4, 16)
    """
    act = _checks.activations(gate_activation, activation)
    reset_after = _checks.static_bool("reset_after", reset_after)
    if isinstance(params, LSTMParams):
        return _lstm_step(params, state, x, compute_dtype, act)
    if isinstance(params, (GRUParams, RNNParams)):
        kind = "gru" if isinstance(params, GRUParams) else "rnn"
        return _cell_step(kind, params, state, x, compute_dtype, act, reset_after)
    num_layers, dirs, _, _, _ = check_stack(params)
    if dirs != 1:
        raise ValueError("a bidirectional stack cannot run a step at a time: its reverse direction reads the "
                         "whole sequence (use jaxlstm.lstm_stack)")  # fmt: skip
    if not isinstance(state, LSTMState):
        raise TypeError(f"state must be the stack's LSTMState (layers first), got {type(state).__name__}")
    for name in ("h", "c"):
        shape = jnp.shape(getattr(state, name))
        if shape[:1] != (num_layers,):
            raise ValueError(f"state.{name} must hold the stack's {num_layers} layers first, got shape {shape}")
    hs, cs = [], []
    for l in range(num_layers):
        layer_state, x = _lstm_step(params[l][0], LSTMState(state.h[l], state.c[l]), x, compute_dtype, act)
        hs.append(layer_state.h)
        cs.append(layer_state.c)
    return LSTMState(jnp.stack(hs), jnp.stack(cs)), x
