"""Vanilla (Elman) RNN and GRU on the same engine as the LSTM.

Both go through the engine's ``apply_sequence`` and ``scan_masked``
(``jaxlstm._engine``), so ``seq_lengths``, ``reverse``,
``time_major``, leading batch dims and the argument checks behave exactly as in
``jaxlstm.lstm``. Both have a fused backward pass (``jaxlstm._fused_gru``), and
``backward="autodiff"`` is plain JAX autodiff of the scan. In float32 on CPU the fused
path runs on the compiled kernel (``jaxlstm._kernel``) where it applies, as the LSTM's does.

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

import jax
import jax.numpy as jnp

from . import _checks, _hints, _kernel, tuning
from ._engine import (
    accum_dtype,
    apply_sequence,
    batch_size,
    matmul_dtype,
    scan_masked,
)
from ._fused import FusedConfig
from ._fused_gru import ELMAN, GRU, elman_step, fused_cell, gru_step
from ._hints import hints
from ._kernel import kernel_cell
from ._step import regularisation, zoneout_rates
from .params import GRUParams, RNNParams, init_gru, init_rnn

__all__ = ["GRUParams", "RNNParams", "gru", "gru_cell", "init_gru", "init_rnn", "rnn", "rnn_cell"]


def _without_residuals(make_step):
    """The fused backward pass's step, for the autodiff scan and the cells."""

    def make(params, mm, acc, h_mask=None, zoneout=None):
        step = make_step(params, mm, acc, h_mask, zoneout)
        return lambda h, x: step(h, x)[:2] + (None,)

    return make


_rnn_step = _without_residuals(elman_step)
_gru_step = _without_residuals(gru_step)


def _check(params, kind: str):
    cls, n_gates = {"rnn": (RNNParams, 1), "gru": (GRUParams, 3)}[kind]
    _checks.params_type("params", params, cls, f"jaxlstm.init_{kind}")
    D, H = _checks.gated_params("params", params, n_gates)
    if params.w_hh.shape[0] != H:
        raise ValueError(f"params.w_hh must have {H} rows (hidden_size), got shape {tuple(params.w_hh.shape)}")
    if kind == "gru":
        _checks.vector("params.b_hn", params.b_hn, H)
    return D, H


def _dtypes(params, x_dtype, compute_dtype):
    compute_dtype = _checks.compute_dtype(compute_dtype)
    acc = accum_dtype(x_dtype, params.w_ih.dtype)
    mm = matmul_dtype(compute_dtype, x_dtype, params.w_ih.dtype, params.w_hh.dtype)
    return mm, acc


def _cell(kind, make_step, params, h, x, compute_dtype, zoneout_h):
    D, H = _check(params, kind)
    _checks.float_array("h", h)
    x = _checks.as_float_array("x", x)
    _checks.step_input("x", x, D, batch_shape=h.shape[:-1])
    _checks.state_array("h", h, tuple(x.shape[:-1]) + (H,))
    mm, acc = _dtypes(params, x.dtype, compute_dtype)
    zoneout = zoneout_rates(zoneout_h=zoneout_h)  # evaluation: the rate mixes
    h, _, _ = make_step(params, mm, acc, None, zoneout)(h.astype(acc), x if zoneout is None else (x, None))
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
    compute_dtype,
    backward,
):
    D, H = _check(params, kind)
    xs = _checks.as_float_array("xs", xs)
    batch_shape, T = _checks.sequence("xs", xs, D, time_major)
    seq_lengths = _checks.seq_lengths(seq_lengths, batch_shape, T)
    mask = _checks.step_flags("mask", mask, batch_shape, T, time_major)
    resets = _checks.step_flags("resets", resets, batch_shape, T, time_major)
    _checks.static_bool("reverse", reverse)
    _checks.static_bool("time_major", time_major)
    unroll = tuning.default_unroll() if unroll is None else _checks.positive_int("unroll", unroll)
    mm, acc = _dtypes(params, xs.dtype, compute_dtype)
    h0 = h_reset = jnp.zeros(batch_shape + (H,), acc)
    if initial_state is not None:
        _checks.state_array("initial_state", initial_state, batch_shape + (H,))
        h0 = initial_state.astype(acc)
    if reset_state is not None:
        _checks.state_array("reset_state", reset_state, batch_shape + (H,))
        h_reset = reset_state.astype(acc)
    _checks.one_of("backward", backward, ("fused", "autodiff"))
    zoneout = zoneout_rates(zoneout_h=zoneout_h)
    xs, h_mask, per_step = regularisation(
        xs,
        batch_shape,
        T,
        H,
        H,
        acc,
        time_major,
        input_dropout=input_dropout,
        recurrent_dropout=recurrent_dropout,
        zoneout=zoneout,
        key=key,
        deterministic=deterministic,
    )
    per_step = None if per_step is None else per_step[1:]  # the step reads (x, zh): no cell state
    B = batch_size(batch_shape)
    # On CPU the compiled kernel (jaxlstm._kernel) runs the plain float32 cell where it can
    # (no recurrent dropout or zoneout then) and tuning chose it.
    kernel = _kernel.chosen(kind, params, mm, acc, backward=backward, batch=B, steps=T, h_mask=h_mask, zoneout=zoneout)

    def core(inputs, hs, steps, batch_major=False):
        if kernel:  # float32 in and out; bfloat16 GEMM operands where mm is bfloat16 (the precision contract)
            return kernel_cell(kind, batch_major, params, hs[0], inputs, steps, hs[1], bf16=mm == jnp.bfloat16)
        if backward == "fused":
            xs_tm, zh = (inputs, None) if per_step is None else inputs
            cfg = FusedConfig(mm, acc, unroll, zoneout=zoneout)
            return fused_cell(cfg, GRU if kind == "gru" else ELMAN, params, hs[0], xs_tm, steps, hs[1], hs[2], zh)
        step = make_step(params, mm, acc, hs[2], zoneout)
        h, ys, _ = scan_masked(step, hs[0], inputs, steps, unroll=unroll, reset_to=hs[1])
        return ys, h

    ys, h = apply_sequence(
        core,
        xs,
        (h0, h_reset, h_mask),
        batch_shape,
        seq_lengths=seq_lengths,
        reverse=reverse,
        time_major=time_major,
        supports_jvp=backward == "autodiff",
        mask=mask,
        resets=resets,
        per_step=per_step,
        batch_major_core=kernel,
    )
    return ys.astype(xs.dtype), h.astype(xs.dtype)


def rnn_cell(params: RNNParams, h: jax.Array, x: jax.Array, *, compute_dtype=None, zoneout_h: float = 0.0):
    """One Elman step. Returns ``(h, h)`` (new state and output). ``zoneout_h``: the
    training rate, mixed in as ``rnn`` does with ``deterministic=True``."""
    return _cell("rnn", _rnn_step, params, h, x, compute_dtype, zoneout_h)


def gru_cell(params: GRUParams, h: jax.Array, x: jax.Array, *, compute_dtype=None, zoneout_h: float = 0.0):
    """One GRU step. Returns ``(h, h)`` (new state and output). ``zoneout_h``: the
    training rate, mixed in as ``gru`` does with ``deterministic=True``."""
    return _cell("gru", _gru_step, params, h, x, compute_dtype, zoneout_h)


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
    compute_dtype=None,
    backward: str = "fused",
):
    """Elman RNN over a sequence; arguments as ``jaxlstm.lstm`` (``mask``,
    ``resets``, ``reset_state``, the dropouts, ``zoneout_h`` and ``deterministic``
    included), the state is ``h [..., H]``.

    ``backward="fused"`` (default): a hand-written backward pass for the whole
    sequence (``jaxlstm._fused_gru``, the GRU's engine); ``"autodiff"``: plain
    JAX autodiff of the scan, for forward-mode AD.

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
        compute_dtype=compute_dtype,
        backward=backward,
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
    compute_dtype=None,
    backward: str = "fused",
):
    """GRU over a sequence; arguments as ``jaxlstm.lstm`` (``mask``, ``resets``,
    ``reset_state``, the dropouts, ``zoneout_h`` and ``deterministic`` included), the
    state is ``h [..., H]``.

    ``backward="fused"`` (default): a hand-written backward pass for the whole
    sequence (``jaxlstm._fused_gru``); ``"autodiff"``: plain JAX autodiff of the
    scan, for forward-mode AD.

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
        compute_dtype=compute_dtype,
        backward=backward,
    )
