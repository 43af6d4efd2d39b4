"""The GRU and the Elman RNN as cells of the fused backward pass (``jaxlstm._fused``): their steps
(batch-major ``[B, F]``), per-step VJPs and gradients after the loop.

With ``gx = x @ w_ih + b``, ``gh = h @ w_hh`` (gate order r, z, n) the GRU step is::

    r = σ(gx_r + gh_r),  z = σ(gx_z + gh_z),  hn = gh_n + b_hn
    n = tanh(gx_n + r ∗ hn),  h(t) = (1 - z) ∗ n + z ∗ h(t-1)

The forward pass saves ``(r, z, n, hn)`` per step. The backward pass (``gru_step_vjp``
per step, in the engine's reverse scan carrying ``dh``)::

    dn' = dh ∗ (1 - z) ∗ (1 - n²)                     = d gx_n
    dr' = dn' ∗ hn ∗ r(1 - r)                          = d gx_r = d gh_r
    dz' = dh ∗ (h(t-1) - n) ∗ z(1 - z)                 = d gx_z = d gh_z
    d gh_n = dn' ∗ r,   dh(t-1) = dh ∗ z + [dr', dz', dn' ∗ r] @ w_hhᵀ

and after the loop ``dW_ih = Xᵀ·dGX``, ``db = ΣdGX``, ``dX = dGX·W_ihᵀ``,
``dW_hh = H_prevᵀ·dGH``, ``db_hn = ΣdGH_n`` are each one GEMM (or sum) over all T·B rows.

The Elman step ``h(t) = tanh(x·W_ih + b + h(t-1)·W_hh)`` saves ``h(t)`` (before
zoneout); its VJP is ``dpre = dh ∗ (1 - h²)``, ``dh(t-1) = dpre·W_hhᵀ``.

The reset-before GRU (``gru_step(..., reset_after=False)``, ``GRU_RESET_BEFORE``) saves ``(r, z, n)``;
its VJP is ``_gru_reset_before_vjp``'s.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._engine import add_bias, contract_rows, dot, keep_weight, rows_dot_t, where_valid, zoneout_mix
from ._fused import Cell
from .gates import with_derivative


def gru_step(params, mm_dtype, acc_dtype, h_mask=None, zoneout=None, act=None, reset_after: bool = True):
    """The step ``(h, x) -> (h, h, (r, z, n, hn))``, batch-major; ``h_mask`` (or
    ``None``) multiplies ``h(t-1)`` where it enters ``h @ w_hh`` (recurrent dropout).
    With ``zoneout`` (a ``Zoneout``; its ``h`` rate) the step reads ``(x, zh)`` and
    keeps ``h(t-1)`` where the mask ``zh`` is true (by the rate without a mask).
    With ``act`` (``Activations``: ``gate`` for σ, ``cell`` for tanh) the residuals
    gain ``(r', z', n')``, the derivatives the backward pass reads.

    ``reset_after=False``: the reset-before GRU (Keras' ``reset_after=False``, Haiku's ``hk.GRU``, the
    2014 paper's form), ``n = tanh(x @ W_in + b_n + (r ∗ h) @ W_hn + b_hn)`` with the same params
    (``b_hn`` plain bias there); its residuals are ``(r, z, n)`` (and ``(r', z', n')`` with ``act``),
    which ``GRU_RESET_BEFORE``'s VJP reads."""
    H = params.w_hh.shape[0]

    def step(h, x):
        if zoneout is not None:
            x, zh = x
        gx = add_bias(dot(x, params.w_ih, mm_dtype, acc_dtype), params.b)
        h_in = h if h_mask is None else h * h_mask
        xr, xz, xn = jnp.split(gx, 3, axis=-1)
        if not reset_after:
            hr, hz = jnp.split(dot(h_in, params.w_hh[:, : 2 * H], mm_dtype, acc_dtype), 2, axis=-1)
            q = lambda r: dot(r * h_in, params.w_hh[:, 2 * H :], mm_dtype, acc_dtype)  # (r ∗ h) @ W_hn
            if act is None:
                r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
                n = jnp.tanh(xn + add_bias(q(r), params.b_hn))
                res = (r, z, n)
            else:
                (r, dr), (z, dz) = with_derivative(act.gate, xr + hr), with_derivative(act.gate, xz + hz)
                n, dn = with_derivative(act.cell, xn + add_bias(q(r), params.b_hn))
                res = (r, z, n, (dr, dz, dn))
        else:
            hr, hz, hn = jnp.split(dot(h_in, params.w_hh, mm_dtype, acc_dtype), 3, axis=-1)
            hn = add_bias(hn, params.b_hn)
            if act is None:
                r = jax.nn.sigmoid(xr + hr)
                z = jax.nn.sigmoid(xz + hz)
                n = jnp.tanh(xn + r * hn)
                res = (r, z, n, hn)
            else:
                (r, dr), (z, dz) = with_derivative(act.gate, xr + hr), with_derivative(act.gate, xz + hz)
                n, dn = with_derivative(act.cell, xn + r * hn)
                res = (r, z, n, hn, (dr, dz, dn))
        h_new = (1 - z) * n + z * h
        if zoneout is not None:
            h_new = zoneout_mix(keep_weight(zh, zoneout.h, acc_dtype), h, h_new)
        return h_new, h_new, res

    return step


class GRUStepGrads(NamedTuple):
    dgx: jax.Array  # d(x @ w_ih + b)  [B, 3H]
    dh_prev: jax.Array  # [B, H]


def _gate_derivatives(r, z, n, derivs):
    """``(r', z', n')``: σ's and tanh's from the saved gates, or the saved ``derivs`` of other activations."""
    return (r * (1 - r), z * (1 - z), 1 - n * n) if derivs is None else derivs


def _blend_vjp(z, n, h_prev, dh, d_z, d_n):
    """Of ``h = (1 - z) ∗ n + z ∗ h(t-1)`` (both GRU forms): the cotangents of n's and z's
    pre-activations, and ``h(t-1)``'s share through z's blend, ``dh ∗ z``."""
    return dh * (1 - z) * d_n, dh * (h_prev - n) * d_z, dh * z


def gru_step_vjp(w_hh, r, z, n, hn, h_prev, dh, mm_dtype, acc_dtype, h_mask=None, derivs=None) -> GRUStepGrads:
    """Backward of one step, given its saved ``(r, z, n, hn)``, the state entering it,
    the cotangent ``dh`` of its output and the recurrent dropout mask (or ``None``);
    ``derivs``: the saved ``(r', z', n')`` of other activations than σ and tanh."""
    d_r, d_z, d_n = _gate_derivatives(r, z, n, derivs)
    dn, dz, dh_blend = _blend_vjp(z, n, h_prev, dh, d_z, d_n)
    dr = dn * hn * d_r
    dgh = jnp.concatenate([dr, dz, dn * r], axis=-1)
    dh_rec = dot(dgh, w_hh.T, mm_dtype, acc_dtype)
    dh_prev = dh_blend + (dh_rec if h_mask is None else dh_rec * h_mask)
    return GRUStepGrads(jnp.concatenate([dr, dz, dn], axis=-1), dh_prev)


def _h_keep(zoneout, zs, acc_dtype):
    """The zoneout weight of ``(h,)`` from the step's keep mask ``(zh,)`` (or the rate)."""
    return (keep_weight(None if zs is None else zs[0], zoneout.h, acc_dtype),)


def _gru_vjp(params, cfg, h_mask, res, carry_prev, d_new, valid):
    """``jaxlstm._fused.Cell.vjp``: ``dgx``, the cotangent of ``x @ w_ih + b`` ``[B, 3H]``."""
    r, z, n, hn = res[:4]
    derivs = res[4] if len(res) > 4 else None
    g = gru_step_vjp(params.w_hh, r, z, n, hn, carry_prev[0], d_new[0], cfg.mm_dtype, cfg.acc_dtype, h_mask, derivs)
    return (where_valid(valid, g.dgx, 0),), (g.dh_prev,), None


def _gru_finish(params, dgx, res):
    """``dgh`` (the cotangent of ``h·W_hh``: the n block scaled by r) and ``(db_hn,)``."""
    r = res[0]
    H = r.shape[-1]
    dgh = jnp.concatenate([dgx[..., : 2 * H], dgx[..., 2 * H :] * r], axis=-1)
    return dgh, (dgh[..., 2 * H :].sum(axis=(0, 1)),)


def _gru_reset_before_vjp(params, cfg, h_mask, res, carry_prev, d_new, valid):
    """``jaxlstm._fused.Cell.vjp`` of the reset-before GRU, from its saved ``(r, z, n)`` (and derivatives)::

        dn' = dh ∗ (1 - z) ∗ (1 - n²)             = d gx_n = d (q @ W_hn),  q = r ∗ h_in
        dq = dn' @ W_hnᵀ,   dr' = dq ∗ h_in ∗ r(1 - r),   dz' = dh ∗ (h(t-1) - n) ∗ z(1 - z)
        dh(t-1) = dh ∗ z + (dq ∗ r + [dr', dz'] @ W_rzᵀ) ∗ mask

    ``dgx = [dr', dz', dn']``, the cotangent of ``x @ w_ih + b``."""
    mm, acc = cfg.mm_dtype, cfg.acc_dtype
    r, z, n = res[:3]
    d_r, d_z, d_n = _gate_derivatives(r, z, n, res[3] if len(res) > 3 else None)
    H = r.shape[-1]
    h_prev, dh = carry_prev[0], d_new[0]
    h_in = h_prev if h_mask is None else h_prev * h_mask
    dn, dz, dh_blend = _blend_vjp(z, n, h_prev, dh, d_z, d_n)
    dq = dot(dn, params.w_hh[:, 2 * H :].T, mm, acc)
    drz = jnp.concatenate([dq * h_in * d_r, dz], axis=-1)
    dh_in = dq * r + dot(drz, params.w_hh[:, : 2 * H].T, mm, acc)
    dh_prev = dh_blend + (dh_in if h_mask is None else dh_in * h_mask)
    return (where_valid(valid, jnp.concatenate([drz, dn], axis=-1), 0),), (dh_prev,), None


def _gru_reset_before_grads(params, cfg, h_mask, xs, carry_prev, residuals, outs, accum):
    """``jaxlstm._fused.Cell.grads`` of the reset-before GRU: ``W_hh``'s r and z columns read ``h_in``,
    its n columns ``r ∗ h_in``; ``b_hn`` gets what the n slice of ``b`` gets."""
    mm, acc = cfg.mm_dtype, cfg.acc_dtype
    (dgx,) = outs
    r = residuals[0]
    H = r.shape[-1]
    h_in = carry_prev[0] if h_mask is None else carry_prev[0] * h_mask[None]
    d_w_hh = jnp.concatenate(
        [contract_rows(h_in, dgx[..., : 2 * H], mm, acc), contract_rows(r * h_in, dgx[..., 2 * H :], mm, acc)], axis=1
    )
    db = dgx.sum(axis=(0, 1))
    grads = type(params)(contract_rows(xs, dgx, mm, acc), d_w_hh, db, db[2 * H :])
    return grads, rows_dot_t(dgx, params.w_ih, mm, acc)


def elman_step(params, mm_dtype, acc_dtype, h_mask=None, zoneout=None, act=None):
    """The Elman step ``(h, x) -> (h, h, (h̃,))``, batch-major, with recurrent dropout
    and zoneout as ``gru_step``; ``act.cell`` in place of tanh (the residuals then
    ``(h̃, h̃')``)."""

    def step(h, x):
        if zoneout is not None:
            x, zh = x
        h_in = h if h_mask is None else h * h_mask
        pre = add_bias(dot(x, params.w_ih, mm_dtype, acc_dtype) + dot(h_in, params.w_hh, mm_dtype, acc_dtype), params.b)
        res = (jnp.tanh(pre),) if act is None else with_derivative(act.cell, pre)
        h_new = res[0]
        h_out = h_new if zoneout is None else zoneout_mix(keep_weight(zh, zoneout.h, acc_dtype), h, h_new)
        return h_out, h_out, res

    return step


def _elman_vjp(params, cfg, h_mask, res, carry_prev, d_new, valid):
    """``jaxlstm._fused.Cell.vjp``: ``dpre``, the cotangent of the pre-activation ``[B, H]``."""
    dh = d_new[0]
    dpre = dh * (1 - res[0] * res[0] if len(res) == 1 else res[1])
    dh_rec = dot(dpre, params.w_hh.T, cfg.mm_dtype, cfg.acc_dtype)
    return (where_valid(valid, dpre, 0),), (dh_rec if h_mask is None else dh_rec * h_mask,), None


def _grads(finish):
    """``jaxlstm._fused.Cell.grads`` of a single-state cell whose input projection's cotangent (one
    per step, ``dgx``) gives the recurrent one through ``finish(params, dgx, residuals) -> (dgh, extra)``
    (``extra``: the gradients of the params after ``b``)."""

    def grads(params, cfg, h_mask, xs, carry_prev, residuals, outs, accum):
        mm, acc = cfg.mm_dtype, cfg.acc_dtype
        (dgx,) = outs
        dgh, extra = finish(params, dgx, residuals)
        h_rec = carry_prev[0] if h_mask is None else carry_prev[0] * h_mask[None]  # what h @ w_hh read
        grads = type(params)(
            contract_rows(xs, dgx, mm, acc), contract_rows(h_rec, dgh, mm, acc), dgx.sum(axis=(0, 1)), *extra
        )
        return grads, rows_dot_t(dgx, params.w_ih, mm, acc)

    return grads


def _cell_step(make_step):
    """A single-state step ``(h, x) -> (h, h, residuals)`` as ``jaxlstm._fused.Cell.step``
    (``((h,), x) -> ((h,), h, residuals)``, batch-major only)."""

    def step(params, mm, acc, feature_major, h_mask=None, zoneout=None, act=None):
        inner = make_step(params, mm, acc, h_mask, zoneout, act)

        def carry_step(carry, x):
            h, y, res = inner(carry[0], x)
            return (h,), y, res

        return carry_step

    return step


def _outputs(ys, residuals):
    return (ys,)


def _carry_after(zoneout):
    """The state after each step is the output (after zoneout too)."""
    return _outputs


def _elman_finish(params, dgx, res):
    """The recurrent dot's cotangent is the pre-activation's; nothing after ``b``."""
    return dgx, ()


GRU = Cell(False, _cell_step(gru_step), _h_keep, _gru_vjp, _grads(_gru_finish), _carry_after)
GRU_RESET_BEFORE = Cell(
    False,
    _cell_step(partial(gru_step, reset_after=False)),
    _h_keep,
    _gru_reset_before_vjp,
    _gru_reset_before_grads,
    _carry_after,
)
ELMAN = Cell(False, _cell_step(elman_step), _h_keep, _elman_vjp, _grads(_elman_finish), _carry_after)
