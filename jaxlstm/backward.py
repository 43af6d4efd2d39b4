"""The training fast path: a hand-written VJP for a whole LSTM sequence.

``fused_lstm`` is a ``jax.custom_vjp`` over the time-major core ``xs [T, B, D]``.
Inside, both scans run feature-major (``[F, B]`` per step; see
:mod:`jaxlstm.recurrence` for why). The equations below are written batch-major
for readability:

* the forward scan saves the activated gates ``a = [i, f, g, o]`` ``[4H, B]``
  and ``c`` per step;
* the backward is a reverse ``lax.scan`` that carries only ``(dh, dc)`` and
  emits the pre-activation gradients ``dz [B, 4H]`` per step::

      dh  = dy(t) + dh(t+1)                     (dm = dh @ w_hrᵀ with a projection)
      dc  = dc(t+1) + dm ∗ o ∗ (1 - tanh²c)
      dz  = [dc∗g, dc∗c(t-1), dc∗i, dm∗tanh(c)] ∗ [i(1-i), f(1-f), 1-g², o(1-o)]
      dh(t-1) = dz @ w_hhᵀ,  dc(t-1) = dc ∗ f

* after the loop, ``dW_ih = Xᵀ·dZ``, ``dW_hh = H_prevᵀ·dZ``, ``db = ΣdZ``,
  ``dX = dZ·W_ihᵀ`` (and ``dW_hr = Mᵀ·dH``) are each one GEMM over all T·B
  rows, where XLA's autodiff of a scan would leave T small GEMMs in the loop.
  They run on ``[F, T·B]`` views of the saved ``[T, F, B]`` arrays.

Steps past a sequence's length pass ``(dh, dc)`` through and contribute nothing,
mirroring the forward's masking. With ``checkpoint_every=k`` the forward keeps
only the state at chunk starts; the backward recomputes one chunk of ``k`` steps
at a time and accumulates the weight gradients chunk by chunk, so stored
activations are O(T/k + k).

Forward-mode AD (``jax.jvp``) does not apply to a ``custom_vjp``; ``lstm(...,
backward="autodiff")`` selects plain autodiff for that.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from .gates import split_gates
from .params import LSTMParams
from .recurrence import dot, lstm_step, scan_masked, swap_feature_axis as _swap, time_mask

# Every array below is feature-major: ``[F, B]`` per step, ``[T, F, B]`` stacked.
_GATE_AXIS = -2


class FusedConfig(NamedTuple):
    unroll: int
    checkpoint_every: Optional[int]
    mm_dtype: str
    acc_dtype: str
    # Unrolling the reverse scan by 4 measured 11-26% slower on XLA:CPU (benchmarks/layout.py).
    backward_unroll: int = 1


def _shift(first: jax.Array, seq: jax.Array) -> jax.Array:
    """``[first, seq[0], ..., seq[T-2]]``: the value entering each step."""
    return jnp.concatenate([first[None], seq[:-1]], axis=0)


def _forward(cfg: FusedConfig, params, carry0, xs, lengths, t_offset=0):
    step = lstm_step(params, cfg.mm_dtype, cfg.acc_dtype, feature_major=True)
    return scan_masked(step, carry0, xs, lengths, unroll=cfg.unroll, t_offset=t_offset, feature_major=True)


def _backward(cfg: FusedConfig, params, carry0, xs, ys, acts, cs, dys, dcarry, lengths, t_offset=0):
    """Backward over one segment. Returns ``(dcarry0, weight_grads, dxs)``."""
    mm, acc = cfg.mm_dtype, cfg.acc_dtype
    proj = params.w_hr is not None
    h_prev = _shift(carry0[0], ys.astype(acc))
    c_prev = _shift(carry0[1], cs)

    def body(carry, inp):
        (dh, dc), bufs = carry
        t, dy, a, c, cp = inp
        i, f, g, o = split_gates(a, _GATE_AXIS)
        valid = None if lengths is None else time_mask(t_offset + t, lengths, feature_major=True)
        dy = dy.astype(acc)
        if valid is not None:
            dy = jnp.where(valid, dy, jnp.zeros((), acc))
        dh_tot = dy + dh
        dm = dot(params.w_hr, dh_tot, mm, acc) if proj else dh_tot
        tc = jnp.tanh(c)
        dc_tot = dc + dm * o * (1 - tc * tc)
        dz = _gate_grads(a, dc_tot, cp, dm * tc)
        if valid is not None:
            dz = jnp.where(valid, dz, jnp.zeros((), acc))
        dh_prev = dot(params.w_hh, dz, mm, acc)
        dc_prev = dc_tot * f
        if valid is not None:
            dh_prev = jnp.where(valid, dh_prev, dh)
            dc_prev = jnp.where(valid, dc_prev, dc)
            if proj:
                dh_tot = jnp.where(valid, dh_tot, jnp.zeros((), acc))
        # Written straight into [F, T, B] buffers, whose [F, T*B] views feed the
        # GEMMs below without a transpose of the whole stack.
        put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v[:, None].astype(buf.dtype), t, axis=1)
        bufs = tuple(put(b, v) for b, v in zip(bufs, (dz, dh_tot)))
        return ((dh_prev, dc_prev), bufs), None

    T, D, B = xs.shape
    ts = jnp.arange(T, dtype=jnp.int32)
    bufs = tuple(jnp.zeros((n, T, B), acc) for n in [params.w_hh.shape[1]] + ([params.w_hr.shape[1]] if proj else []))
    (dcarry0, bufs), _ = jax.lax.scan(body, (dcarry, bufs), (ts, dys, acts, cs, c_prev), reverse=True,
                                      unroll=cfg.backward_unroll)

    # The weight gradients: one GEMM each over all T*B columns, on [F, T*B] views.
    # (Contracting the [T, F, B] stacks over (T, B) directly, as an einsum,
    # measured 1.3x slower on XLA:CPU.)
    cols = lambda a: jnp.swapaxes(a, 0, 1).reshape((a.shape[1], -1)).astype(mm)
    flat = lambda buf: buf.reshape((buf.shape[0], -1)).astype(mm)
    dz2 = flat(bufs[0])
    gemm = lambda a, b: jnp.matmul(a, b.T, preferred_element_type=acc)
    d_w_ih = gemm(cols(xs), dz2)
    d_w_hh = gemm(cols(h_prev), dz2)
    d_b = bufs[0].sum(axis=(1, 2))
    d_w_hr = None
    if proj:
        m = split_gates(acts, _GATE_AXIS)[3] * jnp.tanh(cs)
        d_w_hr = gemm(cols(m), flat(bufs[1]))
    dxs = jnp.swapaxes(dot(params.w_ih, dz2, mm, acc).reshape((D, T, B)), 0, 1)
    return dcarry0, LSTMParams(d_w_ih, d_w_hh, d_b, d_w_hr), dxs


def _gate_grads(a, dc, c_prev, do):
    """``dz = [dc∗g, dc∗c(t-1), dc∗i, do] ∗ act'(a)`` ``[4H, B]``.

    Feature-major, the gate blocks are contiguous rows and a concatenate fuses
    into one loop (a select over a gate axis, as batch-major needed, was split
    into two fusions by XLA:CPU and measured 1.4x slower in the backward). The
    derivatives are :func:`jaxlstm.gates.activation_derivative` written per block:
    multiplying the concatenate by it measured 3–5 % slower."""
    i, f, g, o = split_gates(a, _GATE_AXIS)
    return jnp.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                            do * o * (1 - o)], axis=_GATE_AXIS)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_lstm(cfg: FusedConfig, params: LSTMParams, carry0, xs, lengths):
    """Time-major core: ``xs [T, B, D]``, ``carry0 = (h [B, R], c [B, H])`` in the
    accumulation dtype. Returns ``(ys [T, B, R], (h, c))``.

    The layout changes to feature-major happen inside, per chunk when
    checkpointing, so that a checkpointed step keeps no O(T) transposed copies."""
    carry, ys, _ = _forward(cfg, params, _swap(carry0), _swap(xs), lengths)
    return _swap(ys), _swap(carry)


def _chunked(x, n, k):
    return x.reshape((n, k) + x.shape[1:])


def _pad_time(x, total):
    pad = total - x.shape[0]
    return x if pad == 0 else jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)


def _fused_fwd(cfg, params, carry0, xs, lengths):
    k = cfg.checkpoint_every
    carry0 = _swap(carry0)
    if k is None or k >= xs.shape[0]:
        xs = _swap(xs)
        carry, ys, (acts, cs) = _forward(cfg, params, carry0, xs, lengths)
        return (_swap(ys), _swap(carry)), (params, carry0, xs, lengths, ys, acts, cs)

    T, B = xs.shape[:2]
    n = -(-T // k)
    if lengths is None and n * k != T:
        lengths = jnp.full((B,), T, jnp.int32)  # mask the padding steps
    xs_c = _chunked(_pad_time(xs, n * k), n, k)
    step = lstm_step(params, cfg.mm_dtype, cfg.acc_dtype, feature_major=True)

    def no_residuals(carry, x):
        carry, y, _ = step(carry, x)
        return carry, y, None

    def chunk(carry, inp):
        j, x = inp
        new, ys, _ = scan_masked(no_residuals, carry, _swap(x), lengths, unroll=cfg.unroll, t_offset=j * k,
                                 feature_major=True)
        return new, (_swap(ys), carry)

    carry, (ys_c, starts) = jax.lax.scan(chunk, carry0, (jnp.arange(n, dtype=jnp.int32), xs_c))
    ys = ys_c.reshape((n * k,) + ys_c.shape[2:])[:T]
    return (ys, _swap(carry)), (params, starts, xs_c, lengths, None, None, None)


def _cast_like(tree, like):
    return jax.tree_util.tree_map(lambda g, p: None if p is None else g.astype(p.dtype), tree, like,
                                  is_leaf=lambda x: x is None)


def _fused_bwd(cfg, res, cotangents):
    dys, dcarry = cotangents
    acc = cfg.acc_dtype
    dcarry = _swap(tuple(d.astype(acc) for d in dcarry))
    params, carry0, xs, lengths, ys, acts, cs = res
    if ys is not None:
        dcarry0, grads, dxs = _backward(cfg, params, carry0, xs, ys, acts, cs, _swap(dys), dcarry, lengths)
        return _cast_like(grads, params), _swap(dcarry0), _swap(dxs).astype(xs.dtype), None

    # Checkpointed: carry0 holds the (feature-major) state at each chunk start,
    # xs is batch-inner [n, k, B, D].
    starts, xs_c = carry0, xs
    n, k = xs_c.shape[:2]
    T = dys.shape[0]
    dys_c = _chunked(_pad_time(dys, n * k), n, k)
    zero_grads = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, acc), params)

    def chunk(carry, inp):
        dcarry, grads = carry
        j, start, x, dy = inp
        x = _swap(x)
        _, ys, (acts, cs) = _forward(cfg, params, start, x, lengths, t_offset=j * k)
        dstart, g, dx = _backward(cfg, params, start, x, ys, acts, cs, _swap(dy), dcarry, lengths, t_offset=j * k)
        grads = jax.tree_util.tree_map(jnp.add, grads, g)
        return (dstart, grads), _swap(dx)

    (dcarry0, grads), dxs_c = jax.lax.scan(
        chunk, (dcarry, zero_grads), (jnp.arange(n, dtype=jnp.int32), starts, xs_c, dys_c), reverse=True
    )
    dxs = dxs_c.reshape((n * k,) + dxs_c.shape[2:])[:T]
    return _cast_like(grads, params), _swap(dcarry0), dxs.astype(xs.dtype), None


fused_lstm.defvjp(_fused_fwd, _fused_bwd)
