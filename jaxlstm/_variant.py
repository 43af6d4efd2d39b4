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

``VARIANT`` is the variants' cell on the fused backward pass (``jaxlstm._fused``): the
forward pass saves ``a``, ``r`` and the state entering each step; the reverse scan takes
the VJP of the step's pointwise part (everything after the two projections: ``jax.vjp``
of ``pointwise``, elementwise and per-row reductions only), maps ``dr`` back through
``W_hhᵀ`` for ``dh(t-1)``, and after the loop ``dW_ih = Xᵀ·dA``, ``dX = dA·W_ihᵀ`` and
``dW_hh`` (per head) are each one GEMM over all T·B rows.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._engine import (
    add_bias,
    contract_rows,
    dot,
    keep_weight,
    mesh_active,
    operand,
    rows_dot_t,
    scan_masked,
    where_valid,
    without_residuals,
    zoneout_mix,
)
from ._fused import Cell
from ._step import lstm_keeps
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


def pointwise(a, r, c_prev, th: Theta, mm, acc, act: Activations | None = None):
    """Everything after the two projections: the candidate ``(h(t), c(t))`` (before zoneout) from ``a``,
    ``r`` and the cell state entering the step; ``act`` the nonlinearities (``None``: σ and tanh)."""
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
    return h, c


def variant_step(params: LSTMParams, mm, acc, feature_major: bool = False, h_mask=None, zoneout=None, act=None):
    """The batch-major step ``(carry, x) -> (carry, h, (a, r))`` (``feature_major`` must be false:
    the variants have one layout); with ``zoneout`` it reads ``(x, zc, zh)`` as
    ``jaxlstm._step.lstm_step`` does."""
    assert not feature_major, "the LSTM variants' steps are batch-major"
    th = theta_of(params)

    def step(carry, x):
        h, c = carry
        if zoneout is not None:
            x, zc, zh = x
        a = dot(x, params.w_ih, mm, acc)
        r = recurrent_dot(h if h_mask is None else h * h_mask, params.w_hh, mm, acc)
        h_new, c_new = pointwise(a, r, c, th, mm, acc, act)
        if zoneout is not None:
            h_new = zoneout_mix(keep_weight(zh, zoneout.h, acc), h, h_new)
            c_new = zoneout_mix(keep_weight(zc, zoneout.c, acc), c, c_new)
        return (h_new, c_new), h_new, (a, r)

    return step


def variant_scan_core(params: LSTMParams, mm, acc, *, unroll: int = 1, zoneout=None, act=None):
    """The plain (autodiff) scan of the variant step as an engine core (see
    ``jaxlstm._step.lstm_scan_core``)."""

    def core(xs, carries, steps):
        step = variant_step(params, mm, acc, False, carries[2], zoneout, act)
        carry, ys, _ = scan_masked(without_residuals(step), carries[0], xs, steps, unroll=unroll, reset_to=carries[1])
        return ys, carry

    return core


def _vjp(params: LSTMParams, cfg, h_mask, residuals, carry_prev, d_new, valid):
    """``jaxlstm._fused.Cell.vjp``: ``jax.vjp`` of ``pointwise`` (elementwise and per-row reductions
    only), ``dr`` mapped back through ``W_hhᵀ``; the outputs ``(da, dr)``, the pointwise parameters'
    gradients summed over the steps.

    Under a device mesh (``jaxlstm._engine.mesh_active``) those gradients are kept per batch row
    through the loop and summed over the batch after it: a sum over a sharded batch inside the loop
    would be an all-reduce per step (``w_hr``, a matrix, is summed per step as autodiff does). On one
    device the per-step sum measured faster (``benchmarks.variants``: 139 against 165 ms, all variants,
    base train)."""
    mm, acc = cfg.mm_dtype, cfg.acc_dtype
    a, r = residuals
    c_prev = carry_prev[1]
    th = theta_of(params)
    step = lambda a, r, cp, th: pointwise(a, r, cp, th, mm, acc, cfg.act)
    if mesh_active():  # one row at a time: per-row parameter cotangents, no sum over the batch
        B = a.shape[0]
        rows = lambda p, f: None if p is None else (p if f == "w_hr" else jnp.broadcast_to(p, (B,) + p.shape))
        th = Theta(*(rows(p, f) for p, f in zip(th, Theta._fields, strict=True)))
        step = jax.vmap(step, in_axes=(0, 0, 0, Theta(*(None if f == "w_hr" else 0 for f in Theta._fields))))
    _, vjp = jax.vjp(step, a, r, c_prev, th)
    # Rows of steps that do not count get a zero cotangent: no gradient from them.
    da, dr, dcp, dth = vjp(tuple(where_valid(valid, d, 0) for d in d_new))
    dh_rec = recurrent_dot_t(dr, params.w_hh, mm, acc)
    dhp = dh_rec if h_mask is None else dh_rec * h_mask
    return (da, dr), (dhp, dcp), dth


def _grads(params: LSTMParams, cfg, h_mask, xs, carry_prev, residuals, outs, dth):
    """``jaxlstm._fused.Cell.grads``: ``dW_ih = Xᵀ·dA``, ``dX = dA·W_ihᵀ`` and ``dW_hh`` (per head),
    each one GEMM over all T·B rows; the pointwise parameters' sums from the loop."""
    mm, acc = cfg.mm_dtype, cfg.acc_dtype
    da, dr = outs
    if mesh_active():
        dth = Theta(*(g if g is None or f == "w_hr" else g.sum(0) for g, f in zip(dth, Theta._fields, strict=True)))
    d_w_ih, dxs = contract_rows(xs, da, mm, acc), rows_dot_t(da, params.w_ih, mm, acc)
    h_in = carry_prev[0]
    h_rec = h_in if h_mask is None else h_in * h_mask[None]  # what the recurrent dot read
    d_w_hh = recurrent_kernel_grad(h_rec, dr, params.w_hh, mm, acc)
    return LSTMParams(d_w_ih, d_w_hh, dth.b, dth.w_hr, dth.peephole, dth.ln_gates, dth.ln_cell), dxs


def _carry_after(zoneout):
    """``None``: the state entering each step is saved (the pointwise VJP reads ``c(t-1)``, which the
    residuals ``(a, r)`` do not give)."""
    return None


# Peepholes, layer norm and heads on jaxlstm._fused's engine (batch-major steps).
VARIANT = Cell(False, variant_step, lstm_keeps, _vjp, _grads, _carry_after)
