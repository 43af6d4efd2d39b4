"""Vanilla (Elman) RNN and GRU on the same engine as the LSTM.

Both go through the engine's ``apply_sequence`` and ``scan_masked``
(``jaxlstm._engine``), so ``seq_lengths``, ``reverse``,
``time_major``, leading batch dims and the argument checks behave exactly as in
``jaxlstm.lstm``. Both have a fused backward pass (``jaxlstm._fused``, their cells in ``jaxlstm._gru``), and
``backward="autodiff"`` is plain JAX autodiff of the scan. In float32 on CPU the fused
path runs on the native code (``jaxlstm._native``) where it applies, as the LSTM's does.

Elman RNN (``RNNParams``: ``w_ih [D, H]``, ``w_hh [H, H]``, ``b [H]``)::

    h(t) = tanh(x(t) @ w_ih + h(t-1) @ w_hh + b)

GRU, PyTorch's equations and gate order **r, z, n** (``GRUParams``:
``w_ih [D, 3H]``, ``w_hh [H, 3H]``, ``b [3H]``, ``b_hn [H]``)::

    r = σ(x @ W_ir + h @ W_hr + b_r)
    z = σ(x @ W_iz + h @ W_hz + b_z)
    n = tanh(x @ W_in + b_n + r ∗ (h @ W_hn + b_hn))
    h(t) = (1 - z) ∗ n + z ∗ h(t-1)

``b`` is PyTorch's ``b_ih + b_hh`` on the r and z slices and ``b_in`` on the n
slice; ``b_hn`` stays separate because r multiplies it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from . import _checks, _hints, _path
from ._engine import scan_masked, without_residuals
from ._fused import FusedConfig, fused_sequence
from ._gru import ELMAN, GRU, GRU_RESET_BEFORE, elman_step, gru_step
from ._hints import hints
from ._native import native_cell
from ._step import zoneout_rates
from .params import GRUParams, RNNParams, init_gru, init_rnn

__all__ = ["GRUParams", "RNNParams", "gru", "gru_cell", "init_gru", "init_rnn", "rnn", "rnn_cell"]


def _plain(make_step):
    """The fused backward pass's step without its residuals, for the autodiff scan and the cells."""
    return lambda params, mm, acc, h_mask=None, zoneout=None, act=None: without_residuals(
        make_step(params, mm, acc, h_mask, zoneout, act)
    )


_rnn_step = _plain(elman_step)
_gru_step = _plain(gru_step)
_gru_reset_before_step = _plain(partial(gru_step, reset_after=False))


def check_cell(kind: str, params, h, x):
    """Validates a one-step call of the GRU or Elman RNN (``gru_cell``, ``rnn_cell``, ``jaxlstm.step``);
    returns ``x`` as a float array."""
    D, H, _ = _path.cell_params(kind, params)
    _checks.float_array("h", h)
    x = _checks.as_float_array("x", x)
    _checks.step_input("x", x, D, batch_shape=h.shape[:-1])
    _checks.state_array("h", h, tuple(x.shape[:-1]) + (H,))
    return x


def _cell(kind, make_step, params, h, x, compute_dtype, zoneout_h, gate_activation, activation):
    x = check_cell(kind, params, h, x)
    mm, acc = _path.dtypes(kind, params, x.dtype, compute_dtype)
    zoneout = zoneout_rates(zoneout_h=zoneout_h)  # evaluation: the rate mixes
    act = _checks.activations(gate_activation, activation)
    h, _, _ = make_step(params, mm, acc, None, zoneout, act)(h.astype(acc), x if zoneout is None else (x, None))
    h = h.astype(x.dtype)
    return h, h


def _sequence(
    kind,
    make_step,
    params,
    xs,
    initial_state,
    *,
    seq_lengths,
    mask,
    resets,
    reset_state,
    input_dropout,
    recurrent_dropout,
    zoneout_h,
    key,
    deterministic,
    reverse,
    time_major,
    unroll,
    checkpoint_every,
    compute_dtype,
    backward,
    gate_activation,
    activation,
    reset_after=True,
):
    call = _path.prepare(
        kind, params, xs, initial_state, seq_lengths=seq_lengths, mask=mask, resets=resets, reset_state=reset_state,
        input_dropout=input_dropout, recurrent_dropout=recurrent_dropout, zoneout_h=zoneout_h, key=key,
        deterministic=deterministic, reverse=reverse, time_major=time_major, unroll=unroll,
        checkpoint_every=checkpoint_every, compute_dtype=compute_dtype, backward=backward,
        gate_activation=gate_activation, activation=activation, reset_after=reset_after,
    )  # fmt: skip
    path = _path.select(call)
    mm, acc, unroll, zoneout, per_step, act = call.mm, call.acc, call.unroll, call.zoneout, call.per_step, call.act

    def core(inputs, hs, steps, batch_major=False):
        if path == _path.NATIVE:
            # bf16 inputs and outputs as they are, any other dtype float32; bf16 GEMM operands where mm is bf16
            return native_cell(kind, batch_major, params, hs[0], inputs, steps, hs[1], bf16=mm == jnp.bfloat16)
        if path == _path.FUSED:
            xs_tm, zh = (inputs, None) if per_step is None else inputs
            cfg = FusedConfig(mm, acc, unroll, call.checkpoint_every, zoneout=zoneout, act=act)
            cell = ELMAN if kind == "rnn" else GRU if call.reset_after else GRU_RESET_BEFORE
            ys, (h,) = fused_sequence(cfg, cell, params, (hs[0],), xs_tm, steps, (hs[1],), hs[2], (zh,))
            return ys, h
        step = (make_step if call.reset_after else _gru_reset_before_step)(params, mm, acc, hs[2], zoneout, act)
        h, ys, _ = scan_masked(step, hs[0], inputs, steps, unroll=unroll, reset_to=hs[1])
        return ys, h

    ys, h = _path.run(call, path, core)
    return ys.astype(call.dtype), h.astype(call.dtype)


def rnn_cell(
    params: RNNParams,
    h: jax.Array,
    x: jax.Array,
    *,
    compute_dtype=None,
    zoneout_h: float = 0.0,
    activation: Callable = jnp.tanh,
):
    """One Elman step. Returns ``(h, h)`` (new state and output). ``zoneout_h``: the
    training rate, mixed in as ``rnn`` does with ``deterministic=True``; ``activation``
    as ``rnn`` takes it."""
    return _cell("rnn", _rnn_step, params, h, x, compute_dtype, zoneout_h, jax.nn.sigmoid, activation)


def gru_cell(
    params: GRUParams,
    h: jax.Array,
    x: jax.Array,
    *,
    compute_dtype=None,
    zoneout_h: float = 0.0,
    gate_activation: Callable = jax.nn.sigmoid,
    activation: Callable = jnp.tanh,
    reset_after: bool = True,
):
    """One GRU step. Returns ``(h, h)`` (new state and output). ``zoneout_h``: the
    training rate, mixed in as ``gru`` does with ``deterministic=True``; the activations
    and ``reset_after`` as ``gru`` takes them."""
    step = _gru_step if _checks.static_bool("reset_after", reset_after) else _gru_reset_before_step
    return _cell("gru", step, params, h, x, compute_dtype, zoneout_h, gate_activation, activation)


@hints(_hints.SEQUENCE)
def rnn(
    params: RNNParams,
    xs,
    initial_state: jax.Array | None = None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    reset_state=None,
    input_dropout=0.0,
    recurrent_dropout=0.0,
    zoneout_h=0.0,
    key=None,
    deterministic=False,
    reverse=False,
    time_major=False,
    unroll=None,
    checkpoint_every=None,
    compute_dtype=None,
    backward: str = "fused",
    activation: Callable = jnp.tanh,
):
    """Elman RNN over a sequence; arguments as ``jaxlstm.lstm`` (``mask``,
    ``resets``, ``reset_state``, the dropouts, ``zoneout_h`` and ``deterministic``
    included), the state is ``h [..., H]``. ``activation``: in place of tanh,
    ``h(t) = activation(x @ w_ih + h(t-1) @ w_hh + b)`` (PyTorch's
    ``nonlinearity="relu"`` is ``activation=jax.nn.relu``); other than tanh, the
    call runs on the XLA path.

    ``backward="fused"`` (default): a hand-written backward pass for the whole
    sequence (``jaxlstm._fused``); ``"autodiff"``: plain
    JAX autodiff of the scan, for forward-mode AD. ``checkpoint_every=k``: as
    ``jaxlstm.lstm``'s (stored activations O(T/k + k); on the XLA path).

    Returns ``(ys [..., T, H], h_final [..., H])``.
    """
    return _sequence(
        "rnn",
        _rnn_step,
        params,
        xs,
        initial_state,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        reset_state=reset_state,
        input_dropout=input_dropout,
        recurrent_dropout=recurrent_dropout,
        zoneout_h=zoneout_h,
        key=key,
        deterministic=deterministic,
        reverse=reverse,
        time_major=time_major,
        unroll=unroll,
        checkpoint_every=checkpoint_every,
        compute_dtype=compute_dtype,
        backward=backward,
        gate_activation=jax.nn.sigmoid,
        activation=activation,
    )


@hints(_hints.SEQUENCE)
def gru(
    params: GRUParams,
    xs,
    initial_state: jax.Array | None = None,
    *,
    seq_lengths=None,
    mask=None,
    resets=None,
    reset_state=None,
    input_dropout=0.0,
    recurrent_dropout=0.0,
    zoneout_h=0.0,
    key=None,
    deterministic=False,
    reverse=False,
    time_major=False,
    unroll=None,
    checkpoint_every=None,
    compute_dtype=None,
    backward: str = "fused",
    gate_activation: Callable = jax.nn.sigmoid,
    activation: Callable = jnp.tanh,
    reset_after: bool = True,
):
    """GRU over a sequence; arguments as ``jaxlstm.lstm`` (``mask``, ``resets``,
    ``reset_state``, the dropouts, ``zoneout_h`` and ``deterministic`` included), the
    state is ``h [..., H]``. ``gate_activation`` in place of σ (r, z) and
    ``activation`` in place of tanh (n), as Keras' ``recurrent_activation`` and
    ``activation``; other than σ and tanh, the call runs on the XLA path.

    ``reset_after=False``: the reset-before GRU (Keras' ``reset_after=False``, Haiku's
    ``hk.GRU``, Cho et al. 2014), ``n = tanh(x @ W_in + b_n + (r ∗ h) @ W_hn + b_hn)``,
    with the same params; it runs on the XLA path (``"xla-fused"``, its own fused backward pass).

    ``backward="fused"`` (default): a hand-written backward pass for the whole
    sequence (``jaxlstm._fused``); ``"autodiff"``: plain JAX autodiff of the
    scan, for forward-mode AD. ``checkpoint_every=k``: as ``jaxlstm.lstm``'s
    (stored activations O(T/k + k); on the XLA path).

    Returns ``(ys [..., T, H], h_final [..., H])``.
    """
    return _sequence(
        "gru",
        _gru_step,
        params,
        xs,
        initial_state,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        reset_state=reset_state,
        input_dropout=input_dropout,
        recurrent_dropout=recurrent_dropout,
        zoneout_h=zoneout_h,
        key=key,
        deterministic=deterministic,
        reverse=reverse,
        time_major=time_major,
        unroll=unroll,
        checkpoint_every=checkpoint_every,
        compute_dtype=compute_dtype,
        backward=backward,
        gate_activation=gate_activation,
        activation=activation,
        reset_after=reset_after,
    )
