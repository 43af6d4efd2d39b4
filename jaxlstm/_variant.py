"""LSTM variants on one engine: peepholes, layer normalisation, multi-head recurrence.

The step, batch-major (``[B, F]``), with ``a = x·W_ih`` and ``r = h(t-1)·W_hh``::

    z = LN(a; γ_x, β_x) + LN(r; γ_h, β_h) + b        (layer norm; else z = a + r + b)
    i = σ(z_i + p_i ∗ c(t-1)),  f = σ(z_f + p_f ∗ c(t-1)),  g = tanh(z_g)
    c(t) = f ∗ c(t-1) + i ∗ g
    o = σ(z_o + p_o ∗ c(t))                            (peepholes p; else p = 0)
    h(t) = o ∗ tanh(LN(c(t); γ_c, β_c))                (layer norm; else tanh(c(t)))

and with ``k`` heads ``W_hh`` is block-diagonal: head j's gates read only head j's
hidden units (``jaxlstm.params.block_diagonal`` gives the dense matrix), so
``r`` costs ``1/k`` of the dense dot. Projection (``w_hr``), zoneout and recurrent
dropout apply as in the plain LSTM.

``fused_variant`` is the training fast path, a ``custom_vjp`` over the
sequence in the manner of ``jaxlstm._fused``: the forward pass saves ``a``,
``r`` and the state entering each step (or, with ``checkpoint_every``, the state
at chunk starts); the reverse scan takes the VJP of the step's pointwise part
(everything after the two projections: ``jax.vjp`` of ``pointwise``, elementwise
and per-row reductions only), maps ``dr`` back through ``W_hhᵀ`` for ``dh(t-1)``,
and after the loop ``dW_ih = Xᵀ·dA``, ``dX = dA·W_ihᵀ`` and ``dW_hh`` (per head)
are each one GEMM over all T·B rows.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._engine import (
    Steps,
    add_bias,
    contract_rows,
    dot,
    mesh_active,
    operand,
    resets_at,
    route_state_cotangent,
    rows_dot_t,
    scan_masked,
    valid_steps,
    where_valid,
    without_residuals,
)
from ._fused import FusedConfig, cast_like, chunked, flags, pad_time
from ._step import keep_weight, zoneout_mix
from .gates import DEFAULT_ACTIVATIONS, Activations, cell_update, hidden_output, split_gates
from .params import LSTMParams

LN_EPS = 1e-5


def _row(w, like):
    """A ``[F]`` vector shaped to multiply ``like [..., F]`` (strict rank promotion)."""
    return w.astype(like.dtype).reshape((1,) * (like.ndim - 1) + w.shape)


def layer_norm(v, gain, bias):
    """Layer normalisation over the last axis (Ba et al. 2016), ``ε = 1e-5``."""
    mean = v.mean(-1, keepdims=True)
    d = v - mean
    var = (d * d).mean(-1, keepdims=True)
    return add_bias(d * jax.lax.rsqrt(var + LN_EPS) * _row(gain, v), bias)


def recurrent_dot(h, w_hh, mm, acc):
    """``h [B, R] -> [B, 4H]`` through a dense ``[R, 4H]`` or a block-diagonal
    ``[k, R/k, 4H/k]`` kernel (head j's columns are its units' i, f, g, o blocks)."""
    if w_hh.ndim == 2:
        return dot(h, w_hh, mm, acc)
    k, rk, gk = w_hh.shape
    B = h.shape[0]
    hk, w = operand(h.reshape(B, k, rk), mm, acc), operand(w_hh, mm, acc)
    r = jnp.einsum("bkr,krg->bkg", hk, w, preferred_element_type=acc)
    return jnp.swapaxes(r.reshape(B, k, 4, gk // 4), 1, 2).reshape(B, 4 * (gk // 4) * k)


def recurrent_dot_t(dr, w_hh, mm, acc):
    """The transpose of ``recurrent_dot``: ``dr [B, 4H] -> [B, R]``."""
    if w_hh.ndim == 2:
        return dot(dr, w_hh.T, mm, acc)
    k, rk, gk = w_hh.shape
    B = dr.shape[0]
    d = jnp.swapaxes(dr.reshape(B, 4, k, gk // 4), 1, 2).reshape(B, k, gk)
    d, w = operand(d, mm, acc), operand(w_hh, mm, acc)
    return jnp.einsum("bkg,krg->bkr", d, w, preferred_element_type=acc).reshape(B, k * rk)


def recurrent_kernel_grad(h, dr, w_hh, mm, acc):
    """``dW_hh`` from ``h [T, B, R]`` and ``dr [T, B, 4H]``, summed over T and B, in
    the layout of ``w_hh``."""
    if w_hh.ndim == 2:
        return contract_rows(h, dr, mm, acc)
    T, B = h.shape[:2]
    h, dr = operand(h, mm, acc), operand(dr, mm, acc)
    k, rk, gk = w_hh.shape
    hk = h.reshape(T, B, k, rk)
    dk = jnp.swapaxes(dr.reshape(T, B, 4, k, gk // 4), 2, 3).reshape(T, B, k, gk)
    return jnp.einsum("tbkr,tbkg->krg", hk, dk, preferred_element_type=acc)


class Theta(NamedTuple):
    """What the pointwise part of a step reads besides its inputs (``None`` where absent)."""

    b: Any
    peephole: Any
    ln_gates: Any
    ln_cell: Any
    w_hr: Any


def theta_of(params: LSTMParams) -> Theta:
    return Theta(params.b, params.peephole, params.ln_gates, params.ln_cell, params.w_hr)


def pointwise(a, r, h_prev, c_prev, th: Theta, kc, kh, mm, acc, act: Activations | None = None):
    """Everything after the two projections: ``(h(t), c(t))`` from ``a``, ``r``, the
    state entering the step and the zoneout weights ``kc``, ``kh`` (or ``None``);
    ``act`` the nonlinearities (``None``: σ and tanh)."""
    act = act or DEFAULT_ACTIVATIONS
    if th.ln_gates is not None:
        g = th.ln_gates.astype(acc)
        z = layer_norm(a, g[0], g[1]) + layer_norm(r, g[2], g[3])
    else:
        z = a + r
    if th.b is not None:
        z = add_bias(z, th.b.astype(acc))
    zi, zf, zg, zo = split_gates(z)
    p = None if th.peephole is None else th.peephole.astype(acc)
    if p is not None:
        zi, zf = zi + _row(p[0], c_prev) * c_prev, zf + _row(p[1], c_prev) * c_prev
    c = cell_update(act.gate(zf), c_prev, act.gate(zi), act.cell(zg))
    o = act.gate(zo if p is None else zo + _row(p[2], c) * c)
    c_out = c if th.ln_cell is None else layer_norm(c, th.ln_cell[0].astype(acc), th.ln_cell[1])
    h = hidden_output(o, c_out, act.cell)
    if th.w_hr is not None:
        h = dot(h, th.w_hr, mm, acc)
    return zoneout_mix(kh, h_prev, h), zoneout_mix(kc, c_prev, c)


def variant_step(params: LSTMParams, mm, acc, h_mask=None, zoneout=None, act=None):
    """The batch-major step ``(carry, x) -> (carry, h, (a, r))``; with ``zoneout`` it
    reads ``(x, zc, zh)`` as ``jaxlstm._step.lstm_step`` does."""
    th = theta_of(params)

    def step(carry, x):
        h, c = carry
        zc = zh = None
        if zoneout is not None:
            x, zc, zh = x
        a = dot(x, params.w_ih, mm, acc)
        r = recurrent_dot(h if h_mask is None else h * h_mask, params.w_hh, mm, acc)
        kc = None if zoneout is None else keep_weight(zc, zoneout.c, acc)
        kh = None if zoneout is None else keep_weight(zh, zoneout.h, acc)
        h, c = pointwise(a, r, h, c, th, kc, kh, mm, acc, act)
        return (h, c), h, (a, r)

    return step


def variant_scan_core(params: LSTMParams, mm, acc, *, unroll: int = 1, zoneout=None, act=None):
    """The plain (autodiff) scan of the variant step as an engine core (see
    ``jaxlstm._step.lstm_scan_core``)."""

    def core(xs, carries, steps):
        step = variant_step(params, mm, acc, carries[2], zoneout, act)
        carry, ys, _ = scan_masked(without_residuals(step), carries[0], xs, steps, unroll=unroll, reset_to=carries[1])
        return ys, carry

    return core


class _Segment(NamedTuple):
    carry0: Any  # None in the chunked residuals, where the chunk starts are kept apart
    xs: jax.Array  # [T, B, D]
    mask: Any
    resets: Any
    zc: Any
    zh: Any


def _inputs(cfg, seg: _Segment):
    return seg.xs if cfg.zoneout is None else (seg.xs, seg.zc, seg.zh)


def _forward(cfg, params, seg: _Segment, lengths, init, h_mask, t_offset=0, save=True):
    step = variant_step(params, cfg.mm_dtype, cfg.acc_dtype, h_mask, cfg.zoneout, cfg.act)
    body = step if save else (lambda carry, x: step(carry, x)[:2] + (None,))
    steps = Steps(lengths, seg.mask, seg.resets)
    inputs = _inputs(cfg, seg)
    return scan_masked(
        body, seg.carry0, inputs, steps, unroll=cfg.unroll, t_offset=t_offset, reset_to=init, save_carry_in=save
    )


def _backward(cfg, params, seg: _Segment, saved, dys, dcarry, lengths, h_mask, t_offset=0):
    """One segment's backward pass from its saved ``((a, r), carry_in)``; returns
    ``(dcarry0, dinit, grads, dxs)``."""
    mm, acc = cfg.mm_dtype, cfg.acc_dtype
    (a_s, r_s), (h_in, c_in) = saved
    T, B, D = seg.xs.shape
    th = theta_of(params)
    zo = cfg.zoneout
    # Under a device mesh (engine.mesh_active) the pointwise parameters' gradients are
    # kept per batch row through the loop and summed over the batch after it: a sum
    # over a sharded batch inside the loop would be an all-reduce per step. (w_hr, a
    # matrix, is summed per step as autodiff does.) On one device the per-step sum
    # measured faster (benchmarks.variants: 139 against 165 ms, all variants, base train).
    sharded = mesh_active()
    rows = lambda p, f: None if p is None else (p if f == "w_hr" else jnp.broadcast_to(p, (B,) + p.shape))
    th_in = Theta(*(rows(p, f) for p, f in zip(th, Theta._fields, strict=True))) if sharded else th
    th_axes = Theta(*(None if f == "w_hr" else 0 for f in Theta._fields))
    dth0 = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, acc), th_in)

    def body(carry, inp):
        (dh, dc), dinit, dth = carry
        t, m, rs, zc, zh, dy, a, r, hp, cp = inp
        valid = valid_steps(t_offset + t, lengths, False, m)
        dh_tot = where_valid(valid, dy.astype(acc), 0) + dh
        kc = None if zo is None else keep_weight(zc, zo.c, acc)
        kh = None if zo is None else keep_weight(zh, zo.h, acc)
        k_axes = tuple(0 if hasattr(k, "shape") else None for k in (kc, kh))
        step = lambda a, r, hp, cp, th, kc, kh: pointwise(a, r, hp, cp, th, kc, kh, mm, acc, cfg.act)
        if sharded:  # one row at a time: per-row parameter cotangents, no sum over the batch
            step = jax.vmap(step, in_axes=(0, 0, 0, 0, th_axes, *k_axes))
        _, vjp = jax.vjp(lambda a, r, hp, cp, th: step(a, r, hp, cp, th, kc, kh), a, r, hp, cp, th_in)
        # Rows of steps that do not count get a zero cotangent: no gradient from them.
        da, dr, dhp, dcp, dth_t = vjp((where_valid(valid, dh_tot, 0), where_valid(valid, dc, 0)))
        dh_rec = recurrent_dot_t(dr, params.w_hh, mm, acc)
        dhp = dhp + (dh_rec if h_mask is None else dh_rec * h_mask)
        reset = resets_at(valid, rs)
        dcarry, dinit = route_state_cotangent(valid, reset, (dhp, dcp), (dh, dc), dinit)
        dth = jax.tree_util.tree_map(lambda s, g: s + g.astype(acc), dth, dth_t)
        return (dcarry, dinit, dth), (da, dr)

    ts = jnp.arange(T, dtype=jnp.int32)
    dinit = jax.tree_util.tree_map(jnp.zeros_like, dcarry)
    ins = (ts, seg.mask, seg.resets, seg.zc, seg.zh, dys, a_s, r_s, h_in, c_in)
    (dcarry0, dinit, dth), (da, dr) = jax.lax.scan(body, (dcarry, dinit, dth0), ins, reverse=True)
    if sharded:
        dth = Theta(*(g if g is None or f == "w_hr" else g.sum(0) for g, f in zip(dth, Theta._fields, strict=True)))

    d_w_ih, dxs = contract_rows(seg.xs, da, mm, acc), rows_dot_t(da, params.w_ih, mm, acc)
    h_rec = h_in if h_mask is None else h_in * h_mask[None]  # what the recurrent dot read
    d_w_hh = recurrent_kernel_grad(h_rec, dr, params.w_hh, mm, acc)
    grads = LSTMParams(d_w_ih, d_w_hh, dth.b, dth.w_hr, dth.peephole, dth.ln_gates, dth.ln_cell)
    return dcarry0, dinit, grads, dxs


class _Saved(NamedTuple):
    params: LSTMParams
    seg: _Segment
    lengths: Any
    init: tuple
    h_mask: Any
    saved: Any


class _Checkpoints(NamedTuple):
    params: LSTMParams
    starts: tuple
    chunks: _Segment  # every field in chunks [n, k, ...]
    lengths: Any
    init: tuple
    h_mask: Any


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_variant(cfg: FusedConfig, params: LSTMParams, carry0, xs, steps, reset_carry, h_mask=None, zs=None):
    """Time-major core, arguments as ``jaxlstm._fused.fused_lstm`` (batch-major steps)."""
    lengths, mask, resets = flags(steps)
    zc, zh = zs or (None, None)
    seg = _Segment(carry0, xs, mask, resets, zc, zh)
    carry, ys, _ = _forward(cfg, params, seg, lengths, reset_carry, h_mask, save=False)
    return ys, carry


def _fwd(cfg, params, carry0, xs, steps, reset_carry, h_mask=None, zs=None):
    lengths, mask, resets = flags(steps)
    zc, zh = zs or (None, None)
    seg = _Segment(carry0, xs, mask, resets, zc, zh)
    k, T, B = cfg.checkpoint_every, xs.shape[0], xs.shape[1]
    if k is None or k >= T:
        carry, ys, saved = _forward(cfg, params, seg, lengths, reset_carry, h_mask)
        return (ys, carry), _Saved(params, seg, lengths, reset_carry, h_mask, saved)
    n = -(-T // k)
    if lengths is None and n * k != T:
        lengths = jnp.full((B,), T, jnp.int32)  # mask the padding steps
    chunks = _Segment(None, *(chunked(pad_time(a, n * k), n, k) for a in seg[1:]))

    def chunk(carry, inp):
        j, part = inp
        new, ys, _ = _forward(cfg, params, part._replace(carry0=carry), lengths, reset_carry, h_mask, j * k, False)
        return new, (ys, carry)

    carry, (ys_c, starts) = jax.lax.scan(chunk, carry0, (jnp.arange(n, dtype=jnp.int32), chunks))
    ys = ys_c.reshape((n * k,) + ys_c.shape[2:])[:T]
    return (ys, carry), _Checkpoints(params, starts, chunks, lengths, reset_carry, h_mask)


def _bwd(cfg, res, cotangents):
    dys, dcarry = cotangents
    acc = cfg.acc_dtype
    dcarry = tuple(d.astype(acc) for d in dcarry)
    params = res.params
    if isinstance(res, _Saved):
        xs = res.seg.xs
        if xs.shape[0] == 0:
            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, acc), params)
            dinit = jax.tree_util.tree_map(jnp.zeros_like, dcarry)
            return cast_like(zeros, params), dcarry, jnp.zeros(xs.shape, xs.dtype), None, dinit, None, None
        dcarry0, dinit, grads, dxs = _backward(cfg, params, res.seg, res.saved, dys, dcarry, res.lengths, res.h_mask)
        return cast_like(grads, params), dcarry0, dxs.astype(xs.dtype), None, dinit, None, None

    n, k = res.chunks.xs.shape[:2]
    T = dys.shape[0]
    dys_c = chunked(pad_time(dys, n * k), n, k)
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)

    def chunk(carry, inp):
        dcarry, dinit, grads = carry
        j, start, part, dy = inp
        part = part._replace(carry0=start)
        _, _, saved = _forward(cfg, params, part, res.lengths, res.init, res.h_mask, j * k)
        dstart, di, g, dx = _backward(cfg, params, part, saved, dy, dcarry, res.lengths, res.h_mask, j * k)
        return (dstart, add(dinit, di), add(grads, g)), dx

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, acc), params)
    zero_init = jax.tree_util.tree_map(jnp.zeros_like, dcarry)
    ins = (jnp.arange(n, dtype=jnp.int32), res.starts, res.chunks, dys_c)
    (dcarry0, dinit, grads), dxs_c = jax.lax.scan(chunk, (dcarry, zero_init, zeros), ins, reverse=True)
    dxs = dxs_c.reshape((n * k,) + dxs_c.shape[2:])[:T]
    return cast_like(grads, params), dcarry0, dxs.astype(res.chunks.xs.dtype), None, dinit, None, None


fused_variant.defvjp(_fwd, _bwd)
