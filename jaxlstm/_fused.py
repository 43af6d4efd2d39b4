"""The training fast path: a ``custom_vjp`` over a whole LSTM sequence.

``fused_lstm`` is the time-major core ``xs [T, B, D]`` that
``jaxlstm.lstm`` runs by default. Inside, both scans run feature-major
(``[F, B]`` per step, see ``jaxlstm._step``).

* The forward pass saves the activated gates ``a [4H, B]`` and ``c`` of every
  step (``Saved``), or, with ``checkpoint_every=k``, only the state at each
  chunk start (``Checkpoints``): stored activations O(T/k + k).
* The backward pass is a reverse ``lax.scan`` that carries ``(dh, dc)`` and
  applies ``jaxlstm._step.lstm_step_vjp`` per step, writing ``dz`` into a
  ``[4H, T, B]`` buffer. After the loop ``dW_ih = Xᵀ·dZ``, ``dW_hh = H_prevᵀ·dZ``,
  ``db = ΣdZ``, ``dX = dZ·W_ihᵀ`` (and ``dW_hr = Mᵀ·dH``) are each one GEMM over
  all T·B columns, where autodiff of a scan leaves T small GEMMs in the loop.
  Checkpointed, it recomputes one chunk at a time and sums the weight gradients.

Steps past a sequence's length pass ``(dh, dc)`` through and contribute nothing,
mirroring the forward's masking. A ``custom_vjp`` has no forward-mode AD;
``lstm(..., backward="autodiff")`` is the path for ``jax.jvp``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._engine import (
    Steps,
    mesh_active,
    operand,
    resets_at,
    route_state_cotangent,
    scan_masked,
    valid_steps,
    where_valid,
    without_residuals,
)
from ._engine import transpose_features as _t
from ._step import GATE_AXIS_FM, Zoneout, keep_weight, lstm_step, lstm_step_vjp
from .gates import Activations, split_gates
from .params import LSTMParams


class FusedConfig(NamedTuple):
    """Static settings of ``fused_lstm`` (hashable: it is a ``nondiff_argnum``)."""

    mm_dtype: np.dtype
    acc_dtype: np.dtype
    unroll: int = 1
    checkpoint_every: int | None = None
    # 1: unrolling the reverse scan measured slower (python -m benchmarks.layout).
    backward_unroll: int = 1
    # The primal (no gradient) scan's step layout, "feature" or "batch" (jaxlstm.tuning);
    # the training forward pass is always feature-major, as the backward pass is.
    forward_layout: str = "feature"
    # Zoneout rates: with per-step masks (training) the masks decide, without them
    # (evaluation) each step mixes by the rates.
    zoneout: Zoneout | None = None
    # The nonlinearities (jaxlstm.gates.Activations), or None for σ and tanh.
    act: Activations | None = None


class Segment(NamedTuple):
    """A run of consecutive steps, feature-major: the state entering it
    ``(h [R, B], c [H, B])``, its inputs ``xs [T, D, B]``, the state a reset
    restores (``init``), and the per-step ``mask`` / ``resets`` ``[T, B]`` (or ``None``)."""

    carry0: tuple
    xs: jax.Array
    init: tuple
    mask: jax.Array | None = None
    resets: jax.Array | None = None
    h_mask: jax.Array | None = None  # recurrent dropout on h(t-1), [R, B]
    zc: jax.Array | None = None  # zoneout keep masks of c [T, H, B] and h [T, R, B]
    zh: jax.Array | None = None


class Saved(NamedTuple):
    """Residuals without checkpointing: every step's output and gates (and, with a
    mask or resets, the state entering each step, which is then no shift of the outputs)."""

    params: LSTMParams
    segment: Segment
    lengths: jax.Array | None
    ys: jax.Array  # [T, R, B]
    acts: jax.Array  # [T, 4H, B]
    cs: jax.Array  # [T, H, B]
    carry_in: tuple | None  # ([T, R, B], [T, H, B])


class Checkpoints(NamedTuple):
    """Residuals with checkpointing: the state at each of the ``n`` chunk starts
    ``(h [n, R, B], c [n, H, B])``, the inputs in chunks ``[n, k, B, D]`` and the
    per-step flags in chunks ``[n, k, B]``."""

    params: LSTMParams
    starts: tuple
    xs_chunks: jax.Array
    lengths: jax.Array | None
    init: tuple
    mask_chunks: jax.Array | None
    resets_chunks: jax.Array | None
    h_mask: jax.Array | None
    zc_chunks: jax.Array | None
    zh_chunks: jax.Array | None


def _forward(cfg: FusedConfig, params, seg: Segment, lengths, t_offset=0, save: bool = True):
    """``(carry, ys, residuals)``; residuals ``((acts, cs), carry_in or None)``."""
    step = lstm_step(params, cfg.mm_dtype, cfg.acc_dtype, True, seg.h_mask, cfg.zoneout, cfg.act)
    steps = Steps(lengths, seg.mask, seg.resets)
    # With zoneout the state entering a step is no shift of the outputs either.
    carry_in = steps.per_step or cfg.zoneout is not None
    carry, ys, aux = scan_masked(
        step if save else without_residuals(step),
        seg.carry0,
        seg.xs if cfg.zoneout is None else (seg.xs, seg.zc, seg.zh),  # what the step reads
        steps,
        unroll=cfg.unroll,
        t_offset=t_offset,
        feature_major=True,
        reset_to=seg.init,
        save_carry_in=save and carry_in,
    )
    if save and not carry_in:
        aux = (aux, None)
    return carry, ys, aux


def shift(first: jax.Array, seq: jax.Array) -> jax.Array:
    """``[first, seq[0], ..., seq[T-2]]``: the value entering each step."""
    return jnp.concatenate([first[None], seq[:-1]], axis=0)


def _backward(cfg: FusedConfig, params: LSTMParams, seg: Segment, saved: tuple, dys, dcarry, lengths, t_offset=0):
    """Backward pass over one segment, given its saved ``(ys, (acts, cs), carry_in)``
    and the cotangents ``dys [T, R, B]`` and ``dcarry``. Returns ``(dcarry0, dinit,
    grads, dxs [T, D, B])``: ``dinit`` is what flowed into the reset state (zeros
    without resets)."""
    mm, acc = cfg.mm_dtype, cfg.acc_dtype
    ys, (acts, cs), carry_in = saved
    T, D, B = seg.xs.shape
    dinit = jax.tree_util.tree_map(jnp.zeros_like, dcarry)
    if T == 0:  # no step: the state's cotangent passes straight through
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, acc), params)
        return dcarry, dinit, zeros, jnp.zeros((0, D, B), acc)
    proj = params.w_hr is not None
    if carry_in is None:
        h_prev, c_prev = shift(seg.carry0[0], ys.astype(acc)), shift(seg.carry0[1], cs)
    else:
        h_prev, c_prev = carry_in[0].astype(acc), carry_in[1]

    zo = cfg.zoneout or Zoneout()

    def body(carry, inp):
        (dh, dc), dinit, bufs = carry
        t, m, r, zc, zh, dy, a, c, cp = inp
        valid = valid_steps(t_offset + t, lengths, True, m)
        dh_tot = where_valid(valid, dy.astype(acc), 0) + dh
        # Zoneout: h = k_h h(t-1) + (1 - k_h) h̃ (and so c); the step's own VJP
        # sees the candidates' share, the rest goes straight to the previous state.
        kh, kc = keep_weight(zh, zo.h, acc), keep_weight(zc, zo.c, acc)
        dh_new = dh_tot if kh is None else dh_tot * (1 - kh)
        dc_new = dc if kc is None else dc * (1 - kc)
        g = lstm_step_vjp(params.w_hh, params.w_hr, a, c, cp, dh_new, dc_new, mm, acc, seg.h_mask, cfg.act)
        d_prev = (
            g.dh_prev if kh is None else g.dh_prev + kh * dh_tot,
            g.dc_prev if kc is None else g.dc_prev + kc * dc,
        )
        dz = where_valid(valid, g.dz, 0)
        reset = resets_at(valid, r, feature_major=True)
        dcarry, dinit = route_state_cotangent(valid, reset, d_prev, (dh, dc), dinit)
        # Written straight into [F, T, B] buffers, whose [F, T*B] views feed the
        # GEMMs below without a transpose of the whole stack.
        outs = (dz, where_valid(valid, dh_new, 0)) if proj else (dz,)
        bufs = tuple(
            jax.lax.dynamic_update_slice_in_dim(b, v[:, None].astype(b.dtype), t, axis=1)
            for b, v in zip(bufs, outs, strict=True)
        )
        return (dcarry, dinit, bufs), None

    ts = jnp.arange(T, dtype=jnp.int32)  # the buffers need the step index even without lengths
    widths = [params.w_hh.shape[1]] + ([params.w_hr.shape[1]] if params.w_hr is not None else [])
    bufs = tuple(jnp.zeros((n, T, B), acc) for n in widths)
    ins = (ts, seg.mask, seg.resets, seg.zc, seg.zh, dys, acts, cs, c_prev)
    (dcarry0, dinit, bufs), _ = jax.lax.scan(body, (dcarry, dinit, bufs), ins, reverse=True, unroll=cfg.backward_unroll)

    # The weight gradients: one GEMM each, contracting all T*B columns at once
    # (on [F, T*B] views, or as einsums under a device mesh: engine.mesh_active).
    sharded = mesh_active()

    def contract(a, buf):  # a [T, F1, B], buf [F2, T, B] -> [F1, F2]
        a, buf = operand(a, mm, acc), operand(buf, mm, acc)
        if sharded:
            return jnp.einsum("tfb,gtb->fg", a, buf, preferred_element_type=acc)
        cols = jnp.swapaxes(a, 0, 1).reshape((a.shape[1], -1))
        return jnp.matmul(cols, buf.reshape((buf.shape[0], -1)).T, preferred_element_type=acc)

    d_w_hr = None
    if proj:
        gates = acts[0] if isinstance(acts, tuple) else acts  # (a, a') with other activations
        m = split_gates(gates, GATE_AXIS_FM)[3] * (jnp.tanh if cfg.act is None else cfg.act.cell)(cs)
        d_w_hr = contract(m, bufs[1])
    d_b = None if params.b is None else bufs[0].sum(axis=(1, 2))
    h_in = h_prev if seg.h_mask is None else h_prev * seg.h_mask[None]  # what the recurrent dot read
    grads = LSTMParams(contract(seg.xs, bufs[0]), contract(h_in, bufs[0]), d_b, d_w_hr)
    w_ih, dz = operand(params.w_ih, mm, acc), operand(bufs[0], mm, acc)
    dxs = jnp.einsum("dg,gtb->dtb", w_ih, dz, preferred_element_type=acc)
    dxs = jnp.swapaxes(dxs, 0, 1)
    return dcarry0, dinit, grads, dxs


def flags(steps: Steps | None):
    return (None, None, None) if steps is None else tuple(steps)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_lstm(
    cfg: FusedConfig, params: LSTMParams, carry0, xs, steps: Steps | None, reset_carry, h_mask=None, zs=None
):
    """Time-major core: ``xs [T, B, D]``, ``carry0 = (h [B, R], c [B, H])`` in the
    accumulation dtype, ``steps`` time-major (``mask``/``resets`` ``[T, B]``),
    ``reset_carry`` (like ``carry0``) the state that ``steps.resets`` restore,
    ``h_mask [B, R]`` (or ``None``) the recurrent dropout mask on ``h(t-1)``,
    ``zs = (zc [T, B, H], zh [T, B, R])`` (boolean, either may be ``None``) the
    zoneout keep masks of training, or ``None`` (then ``cfg.zoneout``'s rates mix).
    Returns ``(ys [T, B, R], (h, c))``.

    The layout changes to feature-major happen inside, per chunk when
    checkpointing, so that a checkpointed step keeps no O(T) transposed copies.
    Outside differentiation (this primal) ``cfg.forward_layout`` may pick
    batch-major steps instead."""
    lengths, mask, resets = flags(steps)
    zc, zh = zs or (None, None)
    if cfg.forward_layout == "batch":
        step = without_residuals(lstm_step(params, cfg.mm_dtype, cfg.acc_dtype, False, h_mask, cfg.zoneout, cfg.act))
        inputs = xs if cfg.zoneout is None else (xs, zc, zh)
        carry, ys, _ = scan_masked(step, carry0, inputs, steps, unroll=cfg.unroll, reset_to=reset_carry)
        return ys, carry
    seg = Segment(_t(carry0), _t(xs), _t(reset_carry), mask, resets, _t(h_mask), _t(zc), _t(zh))
    carry, ys, _ = _forward(cfg, params, seg, lengths, save=False)
    return _t(ys), _t(carry)


def chunked(x, n, k) -> Any:  # [n * k, ...] -> [n, k, ...]; None stays None
    return None if x is None else x.reshape((n, k) + x.shape[1:])


def pad_time(x, total) -> Any:
    if x is None:
        return None
    pad = total - x.shape[0]
    return x if pad == 0 else jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)


def _fused_forward_pass(cfg: FusedConfig, params, carry0, xs, steps, reset_carry, h_mask=None, zs=None):
    lengths, mask, resets = flags(steps)
    zc, zh = zs or (None, None)
    k = cfg.checkpoint_every
    T, B = xs.shape[:2]
    init, h_mask = _t(reset_carry), _t(h_mask)
    if k is None or k >= T:
        seg = Segment(_t(carry0), _t(xs), init, mask, resets, h_mask, _t(zc), _t(zh))
        carry, ys, ((acts, cs), carry_in) = _forward(cfg, params, seg, lengths)
        return (_t(ys), _t(carry)), Saved(params, seg, lengths, ys, acts, cs, carry_in)

    n = -(-T // k)
    if lengths is None and n * k != T:
        lengths = jnp.full((B,), T, jnp.int32)  # mask the padding steps
    xs_c, mask_c, resets_c, zc_c, zh_c = (chunked(pad_time(a, n * k), n, k) for a in (xs, mask, resets, zc, zh))

    def chunk(carry, inp):
        j, x, m, r, zc, zh = inp
        seg = Segment(carry, _t(x), init, m, r, h_mask, _t(zc), _t(zh))
        new, ys, _ = _forward(cfg, params, seg, lengths, t_offset=j * k, save=False)
        return new, (_t(ys), carry)

    ins = (jnp.arange(n, dtype=jnp.int32), xs_c, mask_c, resets_c, zc_c, zh_c)
    carry, (ys_c, starts) = jax.lax.scan(chunk, _t(carry0), ins)
    ys = ys_c.reshape((n * k,) + ys_c.shape[2:])[:T]
    checkpoints = Checkpoints(params, starts, xs_c, lengths, init, mask_c, resets_c, h_mask, zc_c, zh_c)
    return (ys, _t(carry)), checkpoints


def cast_like(tree, like):
    return jax.tree_util.tree_map(
        lambda g, p: None if p is None else g.astype(p.dtype), tree, like, is_leaf=lambda x: x is None
    )


def _fused_backward_pass(cfg: FusedConfig, res, cotangents):
    dys, dcarry = cotangents
    acc = cfg.acc_dtype
    dcarry = _t(tuple(d.astype(acc) for d in dcarry))
    params = res.params
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
    if isinstance(res, Saved):
        saved = (res.ys, (res.acts, res.cs), res.carry_in)
        dcarry0, dinit, grads, dxs = _backward(cfg, params, res.segment, saved, _t(dys), dcarry, res.lengths)
        dxs = _t(dxs).astype(res.segment.xs.dtype)
        return cast_like(grads, params), _t(dcarry0), dxs, None, _t(dinit), None, None

    n, k = res.xs_chunks.shape[:2]
    T = dys.shape[0]
    dys_c = chunked(pad_time(dys, n * k), n, k)
    zero_grads = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, acc), params)

    def chunk(carry, inp):
        dcarry, dinit, grads = carry
        j, start, x, m, r, zc, zh, dy = inp
        seg = Segment(start, _t(x), res.init, m, r, res.h_mask, _t(zc), _t(zh))
        _, ys, saved = _forward(cfg, params, seg, res.lengths, t_offset=j * k)
        dstart, di, g, dx = _backward(cfg, params, seg, (ys, *saved), _t(dy), dcarry, res.lengths, t_offset=j * k)
        return (dstart, add(dinit, di), add(grads, g)), _t(dx)

    ins = (
        jnp.arange(n, dtype=jnp.int32),
        res.starts,
        res.xs_chunks,
        res.mask_chunks,
        res.resets_chunks,
        res.zc_chunks,
        res.zh_chunks,
        dys_c,
    )
    zero_init = jax.tree_util.tree_map(jnp.zeros_like, dcarry)
    (dcarry0, dinit, grads), dxs_c = jax.lax.scan(chunk, (dcarry, zero_init, zero_grads), ins, reverse=True)
    dxs = dxs_c.reshape((n * k,) + dxs_c.shape[2:])[:T]
    return cast_like(grads, params), _t(dcarry0), dxs.astype(res.xs_chunks.dtype), None, _t(dinit), None, None


fused_lstm.defvjp(_fused_forward_pass, _fused_backward_pass)
