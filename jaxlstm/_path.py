"""What every sequence call shares: its preparation, and the one choice of the path it runs on.

``prepare`` validates and normalises a call of ``jaxlstm.lstm``, ``jaxlstm.gru`` or ``jaxlstm.rnn``
(one code for the three: shapes, flags, dtypes, states, regularisers); ``select`` is the one function
that says which implementation runs it, a named value (``PATHS``); ``run`` applies that path's core over
the sequence (lengths, masks, resets, reverse and layouts: ``jaxlstm._engine.apply_sequence``). The
entry points build the core of their cell for the path ``select`` names, and nothing else decides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _checks, _native, tuning
from ._engine import accum_dtype, apply_sequence, batch_size, matmul_dtype
from ._step import regularisation, zoneout_rates
from .params import GRUParams, LSTMParams, RNNParams

NATIVE = "native"  # the compiled CPU code (jaxlstm._native), forward and backward
FUSED = "xla-fused"  # lax.scan with the hand-written backward pass (jaxlstm._fused)
VARIANT = "xla-fused-variant"  # peepholes, layer norm, heads: the same engine, their cell (jaxlstm._variant)
AUTODIFF = "xla-autodiff"  # lax.scan differentiated by JAX (backward="autodiff")
PATHS = (NATIVE, FUSED, VARIANT, AUTODIFF)

_PARAMS = {"lstm": LSTMParams, "gru": GRUParams, "rnn": RNNParams}


class Call(NamedTuple):
    """A validated sequence call, as the paths need it: ``xs`` with the input dropout applied,
    ``carries = (carry0, reset_carry, h_mask)`` in the accumulation dtype (the LSTM's carries are
    ``(h, c)`` pairs), ``per_step`` the zoneout masks the step reads beside ``x``."""

    kind: str
    params: Any
    xs: jax.Array
    dtype: Any  # of the caller's xs: the outputs'
    batch_shape: tuple
    T: int
    D: int
    H: int
    R: int
    seq_lengths: Any
    mask: Any
    resets: Any
    reverse: bool
    time_major: bool
    unroll: int
    checkpoint_every: int | None
    backward: str
    mm: Any
    acc: Any
    carries: tuple
    per_step: Any
    zoneout: Any
    act: Any  # jaxlstm.gates.Activations, or None for σ and tanh
    reset_after: bool  # the GRU's form (False: reset-before, Keras' reset_after=False, hk.GRU)

    @property
    def batch(self) -> int:
        return batch_size(self.batch_shape)


def cell_params(kind: str, params) -> tuple[int, int, int]:
    """``(D, H, R)`` of validated params of ``kind`` (``R = H`` but for a projected LSTM)."""
    if kind == "lstm":
        return _checks.lstm_params(params)
    cls, n_gates = (GRUParams, 3) if kind == "gru" else (RNNParams, 1)
    _checks.params_type("params", params, cls, f"jaxlstm.init_{kind}")
    D, H = _checks.gated_params("params", params, n_gates)
    if params.w_hh.shape[0] != H:
        raise ValueError(f"params.w_hh must have {H} rows (hidden_size), got shape {tuple(params.w_hh.shape)}")
    if kind == "gru":
        _checks.vector("params.b_hn", params.b_hn, H)
    return D, H, H


def dtypes(kind: str, params, x_dtype, compute_dtype) -> tuple:
    """``(matmul dtype, accumulation dtype)`` of a call (docs/precision.md)."""
    compute_dtype = _checks.compute_dtype(compute_dtype)
    if kind == "lstm":
        weights = [w.dtype for w in params if w is not None]
        return matmul_dtype(compute_dtype, x_dtype, *weights), accum_dtype(x_dtype, *weights)
    mm = matmul_dtype(compute_dtype, x_dtype, params.w_ih.dtype, params.w_hh.dtype)
    return mm, accum_dtype(x_dtype, params.w_ih.dtype)


def _state(kind: str, name: str, state, batch_shape: tuple, H: int, R: int, acc):
    if kind == "lstm":
        _checks.lstm_state(name, state, batch_shape, H, R)
        return (state.h.astype(acc), state.c.astype(acc))
    _checks.state_array(name, state, batch_shape + (H,))
    return state.astype(acc)


def prepare(
    kind: str,
    params,
    xs,
    initial_state=None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    reset_state=None,
    input_dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    zoneout_c: float = 0.0,
    zoneout_h: float = 0.0,
    key=None,
    deterministic: bool = False,
    reverse: bool = False,
    time_major: bool = False,
    unroll: int | None = None,
    checkpoint_every: int | None = None,
    compute_dtype=None,
    backward: str = "fused",
    gate_activation: Callable = jax.nn.sigmoid,
    activation: Callable = jnp.tanh,
    reset_after: bool = True,
) -> Call:
    """Validates a ``kind`` (``"lstm"``, ``"gru"``, ``"rnn"``) sequence call, arguments as
    ``jaxlstm.lstm`` takes them (``zoneout_c`` is the LSTM's only)."""
    D, H, R = cell_params(kind, params)
    xs = _checks.as_float_array("xs", xs)
    batch_shape, T = _checks.sequence("xs", xs, D, time_major)
    seq_lengths = _checks.seq_lengths(seq_lengths, batch_shape, T)
    mask = _checks.step_flags("mask", mask, batch_shape, T, time_major)
    resets = _checks.step_flags("resets", resets, batch_shape, T, time_major)
    _checks.static_bool("reverse", reverse)
    _checks.static_bool("time_major", time_major)
    _checks.one_of("backward", backward, ("fused", "autodiff"))
    unroll = tuning.default_unroll() if unroll is None else _checks.positive_int("unroll", unroll)
    if checkpoint_every is not None:
        checkpoint_every = _checks.positive_int("checkpoint_every", checkpoint_every)
        if backward != "fused":
            raise ValueError("checkpoint_every requires backward='fused', got backward='autodiff'")
    mm, acc = dtypes(kind, params, xs.dtype, compute_dtype)
    act = _checks.activations(gate_activation, activation)
    if not _checks.static_bool("reset_after", reset_after) and kind != "gru":
        raise ValueError(f"reset_after=False is the GRU's reset-before form; the {kind} has no reset gate")
    zero_h = jnp.zeros(batch_shape + (R,), acc)
    zeros = (zero_h, jnp.zeros(batch_shape + (H,), acc)) if kind == "lstm" else zero_h
    carry0 = zeros if initial_state is None else _state(kind, "initial_state", initial_state, batch_shape, H, R, acc)
    reset_carry = zeros if reset_state is None else _state(kind, "reset_state", reset_state, batch_shape, H, R, acc)
    zoneout = zoneout_rates(zoneout_c, zoneout_h) if kind == "lstm" else zoneout_rates(zoneout_h=zoneout_h)
    # The step reads (x, zc, zh) with zoneout (x, zh without a cell state): masks in training, none
    # (the rates mix) in evaluation.
    dtype = xs.dtype
    xs, h_mask, per_step = regularisation(
        xs, batch_shape, T, H, R, acc, time_major, input_dropout=input_dropout, recurrent_dropout=recurrent_dropout,
        zoneout=zoneout, key=key, deterministic=deterministic,
    )  # fmt: skip
    if per_step is not None and kind != "lstm":
        per_step = per_step[1:]
    return Call(
        kind, params, xs, dtype, batch_shape, T, D, H, R, seq_lengths, mask, resets, reverse, time_major, unroll,
        checkpoint_every, backward, mm, acc, (carry0, reset_carry, h_mask), per_step, zoneout, act,
        reset_after,
    )  # fmt: skip


def select(call: Call) -> str:
    """The path that runs ``call``: ``NATIVE`` on CPU where the compiled code can run it (the fused
    backward, σ and tanh, float32 sums, no recurrent dropout, zoneout, projection, variant or
    checkpointing, nor the reset-before GRU: ``jaxlstm._native.applies``) and the tuner chose it for the
    shape (``jaxlstm.tuning.native_path``); else the XLA path: ``VARIANT`` for a peephole / layer-norm /
    multi-head LSTM, ``FUSED``, or ``AUTODIFF`` where the caller asked for ``backward="autodiff"``."""
    if (
        call.backward == "fused"
        and call.reset_after
        and call.act is None
        and _native.applies(
            call.params, call.mm, call.acc, batch=call.batch, steps=call.T, h_mask=call.carries[2],
            zoneout=call.zoneout, checkpoint_every=call.checkpoint_every,
        )
        and tuning.native_path(call.batch, call.D, call.H, call.T, cell=call.kind, dtype=call.mm)
    ):  # fmt: skip
        return NATIVE
    if call.backward == "autodiff":
        return AUTODIFF
    return VARIANT if call.kind == "lstm" and call.params.is_variant else FUSED


def run(call: Call, path: str, core: Callable):
    """``(ys, final carry)`` of ``core`` (the path's, for this cell) over the call's sequence."""
    return apply_sequence(
        core,
        call.xs,
        call.carries,
        call.batch_shape,
        seq_lengths=call.seq_lengths,
        reverse=call.reverse,
        time_major=call.time_major,
        supports_jvp=path == AUTODIFF,
        mask=call.mask,
        resets=call.resets,
        per_step=call.per_step,
        batch_major_core=path == NATIVE,
    )


def path_of(kind: str, params, xs, initial_state=None, **kwargs) -> str:
    """The path a ``jaxlstm.lstm`` / ``gru`` / ``rnn`` call (``kind``: ``"lstm"``, ``"gru"``, ``"rnn"``)
    with these arguments runs on, one of ``PATHS``: ``"native"`` (the compiled CPU code),
    ``"xla-fused"``, ``"xla-fused-variant"`` or ``"xla-autodiff"``. It validates the call as the
    entry point does and asks the tuner as it would (timing the shape if it is new), without running it.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> params = jaxlstm.init_lstm(jax.random.key(0), 8, 16)
      >>> jaxlstm.path_of("lstm", params, jnp.ones((4, 10, 8)), backward="autodiff")
      'xla-autodiff'
    """
    _checks.one_of("kind", kind, tuple(_PARAMS))
    return select(prepare(kind, params, xs, initial_state, **kwargs))
