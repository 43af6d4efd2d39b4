"""The training fast path of the single-state cells, the GRU and the Elman RNN: a
``custom_vjp`` over a whole sequence, as ``jaxlstm._fused`` is for the LSTM
(batch-major ``[B, F]`` steps). A ``Cell`` gives the step, its per-step VJP
and what its recurrent-kernel gradient reads; ``fused_cell`` is the rest.

With ``gx = x @ w_ih + b``, ``gh = h @ w_hh`` (gate order r, z, n) the step is::

    r = σ(gx_r + gh_r),  z = σ(gx_z + gh_z),  hn = gh_n + b_hn
    n = tanh(gx_n + r ∗ hn),  h(t) = (1 - z) ∗ n + z ∗ h(t-1)

The forward pass saves ``(r, z, n, hn)`` per step. The backward pass (``gru_step_vjp``
per step, in a reverse ``lax.scan`` carrying ``dh``)::

    dn' = dh ∗ (1 - z) ∗ (1 - n²)                     = d gx_n
    dr' = dn' ∗ hn ∗ r(1 - r)                          = d gx_r = d gh_r
    dz' = dh ∗ (h(t-1) - n) ∗ z(1 - z)                 = d gx_z = d gh_z
    d gh_n = dn' ∗ r,   dh(t-1) = dh ∗ z + [dr', dz', dn' ∗ r] @ w_hhᵀ

and after the loop ``dW_ih = Xᵀ·dGX``, ``db = ΣdGX``, ``dX = dGX·W_ihᵀ``,
``dW_hh = H_prevᵀ·dGH``, ``db_hn = ΣdGH_n`` are each one GEMM (or sum) over all T·B
rows. Steps past a sequence's length pass ``dh`` through and contribute nothing.

The Elman step ``h(t) = tanh(x·W_ih + b + h(t-1)·W_hh)`` saves ``h(t)`` (before
zoneout); its VJP is ``dpre = dh ∗ (1 - h²)``, ``dh(t-1) = dpre·W_hhᵀ``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._engine import (
    Steps,
    add_bias,
    contract_rows,
    dot,
    resets_at,
    route_state_cotangent,
    rows_dot_t,
    scan_masked,
    valid_steps,
    where_valid,
)
from ._fused import FusedConfig, cast_like, shift
from ._step import keep_weight, zoneout_mix
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
    (``b_hn`` plain bias there). It has no fused backward (the sequences differentiate it by autodiff,
    ``"xla-autodiff"``), so its residuals are ``None``."""
    H = params.w_hh.shape[0]

    def step(h, x):
        if zoneout is not None:
            x, zh = x
        gx = add_bias(dot(x, params.w_ih, mm_dtype, acc_dtype), params.b)
        h_in = h if h_mask is None else h * h_mask
        xr, xz, xn = jnp.split(gx, 3, axis=-1)
        if not reset_after:
            gate, cell = (jax.nn.sigmoid, jnp.tanh) if act is None else act
            hr, hz = jnp.split(dot(h_in, params.w_hh[:, : 2 * H], mm_dtype, acc_dtype), 2, axis=-1)
            r, z = gate(xr + hr), gate(xz + hz)
            n = cell(xn + add_bias(dot(r * h_in, params.w_hh[:, 2 * H :], mm_dtype, acc_dtype), params.b_hn))
            res = None
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


def gru_step_vjp(w_hh, r, z, n, hn, h_prev, dh, mm_dtype, acc_dtype, h_mask=None, derivs=None) -> GRUStepGrads:
    """Backward of one step, given its saved ``(r, z, n, hn)``, the state entering it,
    the cotangent ``dh`` of its output and the recurrent dropout mask (or ``None``);
    ``derivs``: the saved ``(r', z', n')`` of other activations than σ and tanh."""
    d_r, d_z, d_n = (r * (1 - r), z * (1 - z), 1 - n * n) if derivs is None else derivs
    dn = dh * (1 - z) * d_n
    dr = dn * hn * d_r
    dz = dh * (h_prev - n) * d_z
    dgh = jnp.concatenate([dr, dz, dn * r], axis=-1)
    dh_rec = dot(dgh, w_hh.T, mm_dtype, acc_dtype)
    dh_prev = dh * z + (dh_rec if h_mask is None else dh_rec * h_mask)
    return GRUStepGrads(jnp.concatenate([dr, dz, dn], axis=-1), dh_prev)


def _gru_vjp(params, res, h_prev, dh, mm, acc, h_mask):
    r, z, n, hn = res[:4]
    g = gru_step_vjp(params.w_hh, r, z, n, hn, h_prev, dh, mm, acc, h_mask, res[4] if len(res) > 4 else None)
    return g.dgx, g.dh_prev


def _gru_finish(params, dgx, res):
    """``dgh`` (the cotangent of ``h·W_hh``: the n block scaled by r) and ``db_hn``."""
    r = res[0]
    H = r.shape[-1]
    dgh = jnp.concatenate([dgx[..., : 2 * H], dgx[..., 2 * H :] * r], axis=-1)
    return dgh, (dgh[..., 2 * H :].sum(axis=(0, 1)),)


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


def _elman_vjp(params, res, h_prev, dh, mm, acc, h_mask):
    dpre = dh * (1 - res[0] * res[0] if len(res) == 1 else res[1])
    dh_rec = dot(dpre, params.w_hh.T, mm, acc)
    return dpre, dh_rec if h_mask is None else dh_rec * h_mask


class Cell(NamedTuple):
    """A single-state cell for ``fused_cell`` (hashable: a static argument).

    * ``step(params, mm, acc, h_mask, zoneout, act)`` -> ``(h, x) -> (h, h, residuals)``;
    * ``vjp(params, residuals, h_prev, dh, mm, acc, h_mask)`` -> ``(dgx, dh_prev)``:
      ``dgx`` the cotangent of the input projection ``x·W_ih + b`` ``[B, G*H]``;
    * ``finish(params, dgx, residuals)`` -> ``(dgh, extra)`` over all steps:
      the cotangent of ``h·W_hh`` and the gradients of the params after ``b``."""

    step: Callable
    vjp: Callable
    finish: Callable


GRU = Cell(gru_step, _gru_vjp, _gru_finish)
ELMAN = Cell(elman_step, _elman_vjp, lambda params, dgx, res: (dgx, ()))


class SavedCell(NamedTuple):
    params: Any  # GRUParams / RNNParams
    h0: jax.Array
    xs: jax.Array  # [T, B, D]
    steps: Steps | None
    ys: jax.Array  # [T, B, H]
    residuals: tuple  # the step's, each [T, B, ...]
    h_in: jax.Array | None  # the state entering each step, with a mask or resets
    h_mask: jax.Array | None  # recurrent dropout, [B, H]
    zh: jax.Array | None  # zoneout keep masks, [T, B, H]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def fused_cell(cfg: FusedConfig, cell: Cell, params, h0, xs, steps: Steps | None, h_reset, h_mask=None, zh=None):
    """Time-major core: ``xs [T, B, D]``, ``h0 [B, H]`` in the accumulation dtype,
    ``steps`` time-major, ``h_reset`` the state ``steps.resets`` restore, ``h_mask``
    the recurrent dropout mask ``[B, H]`` or ``None``, ``zh [T, B, H]`` the zoneout
    keep masks of training or ``None`` (then ``cfg.zoneout.h`` mixes). Returns
    ``(ys [T, B, H], h)``."""
    step = cell.step(params, cfg.mm_dtype, cfg.acc_dtype, h_mask, cfg.zoneout, cfg.act)
    without = lambda h, x: step(h, x)[:2] + (None,)
    inputs = xs if cfg.zoneout is None else (xs, zh)
    h, ys, _ = scan_masked(without, h0, inputs, steps, unroll=cfg.unroll, reset_to=h_reset)
    return ys, h


def _forward_pass(cfg, cell, params, h0, xs, steps, h_reset, h_mask=None, zh=None):
    step = cell.step(params, cfg.mm_dtype, cfg.acc_dtype, h_mask, cfg.zoneout, cfg.act)
    per_step = steps is not None and steps.per_step
    inputs = xs if cfg.zoneout is None else (xs, zh)
    h, ys, aux = scan_masked(step, h0, inputs, steps, unroll=cfg.unroll, save_carry_in=per_step, reset_to=h_reset)
    residuals, h_in = aux if per_step else (aux, None)
    return (ys, h), SavedCell(params, h0, xs, steps, ys, residuals, h_in, h_mask, zh)


def _backward_pass(cfg, cell: Cell, res: SavedCell, cotangents):
    dys, dh = cotangents
    mm, acc = cfg.mm_dtype, cfg.acc_dtype
    params, xs = res.params, res.xs
    T, B, D = xs.shape
    if T == 0:  # no step: the state's cotangent passes straight through
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, acc), params)
        dxs = jnp.zeros(xs.shape, xs.dtype)
        return cast_like(zeros, params), dh.astype(acc), dxs, None, jnp.zeros_like(dh), None, None
    h_prev = shift(res.h0, res.ys.astype(acc)) if res.h_in is None else res.h_in
    steps = res.steps or Steps()
    rate = 0.0 if cfg.zoneout is None else cfg.zoneout.h

    def body(carry, inp):
        dh, dinit = carry
        t, m, rs, zh, dy, step_res, hp = inp
        valid = valid_steps(t, steps.lengths, mask_t=m)
        dh_tot = where_valid(valid, dy.astype(acc), 0) + dh
        # Zoneout: h = k h(t-1) + (1 - k) h̃; the step's VJP sees h̃'s share.
        k = keep_weight(zh, rate, acc)
        dgx, dh_prev = cell.vjp(params, step_res, hp, dh_tot if k is None else dh_tot * (1 - k), mm, acc, res.h_mask)
        dh_prev = dh_prev if k is None else dh_prev + k * dh_tot
        dh, dinit = route_state_cotangent(valid, resets_at(valid, rs), dh_prev, dh, dinit)
        return (dh, dinit), where_valid(valid, dgx, 0)

    ts = jnp.arange(T, dtype=jnp.int32)
    dh = dh.astype(acc)
    ins = (ts, steps.mask, steps.resets, res.zh, dys, res.residuals, h_prev)
    (dh0, dinit), dgx = jax.lax.scan(body, (dh, jnp.zeros_like(dh)), ins, reverse=True)
    dgh, extra = cell.finish(params, dgx, res.residuals)

    # One GEMM each over all T*B rows (engine.contract_rows / rows_dot_t).
    h_rec = h_prev if res.h_mask is None else h_prev * res.h_mask[None]  # what h @ w_hh read
    grads = type(params)(
        contract_rows(xs, dgx, mm, acc), contract_rows(h_rec, dgh, mm, acc), dgx.sum(axis=(0, 1)), *extra
    )
    dxs = rows_dot_t(dgx, params.w_ih, mm, acc)
    return cast_like(grads, params), dh0, dxs.astype(xs.dtype), None, dinit, None, None


fused_cell.defvjp(_forward_pass, _backward_pass)
