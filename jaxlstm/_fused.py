"""The fused backward pass: one ``custom_vjp`` over a whole sequence, for every cell of the XLA path.

``fused_sequence(cfg, cell, params, carry0, xs, steps, reset_carry, h_mask, zs)`` scans a cell's step
over a time-major sequence. Its VJP is a reverse ``lax.scan`` that carries the state's cotangent and
applies the cell's per-step VJP; after the loop the weight and input gradients (``dW_ih = Xᵀ·dG``,
``dW_hh = H_prevᵀ·dG``, ``db = ΣdG``, ``dX = dG·W_ihᵀ``) are each one GEMM over all T·B rows, where
autodiff of a scan leaves T small GEMMs in the loop. The LSTM (``jaxlstm._step.LSTM``), the GRU and
the Elman RNN (``jaxlstm._gru``) and the LSTM variants (``jaxlstm._variant``) are its cells, as the
native code runs every recurrence through one loop over its cell traits.

The engine knows no cell's maths. It does, for every cell:

* the layout: a feature-major cell (``[F, B]`` per step, the LSTM's) gets each segment transposed
  once, outside the scans, and its per-step cotangents written into ``[F, T, B]`` buffers whose
  ``[F, T*B]`` views feed the GEMMs without another transpose;
* lengths, masks and resets: a step that does not count passes the state's cotangent through and
  contributes nothing; at a reset the cotangent flows into the reset state (``reset_carry``);
* zoneout: ``new = k ∗ prev + (1 - k) ∗ candidate`` per state component, so the step's VJP sees the
  candidate's share and the rest goes straight to the previous state;
* the residuals: every step's (``Saved``), or with ``cfg.checkpoint_every = k`` only the state at each
  chunk start (``Checkpoints``), each chunk recomputed in the backward pass: stored activations
  O(T/k + k);
* the empty sequence (T = 0), dtypes and the cotangents of what is not differentiated.

A cell (``Cell``) is its step, the VJP of one step, the gradients after the loop, and how its state
after each step follows from the outputs and residuals. A ``custom_vjp`` has no forward-mode AD: the
sequence functions' ``backward="autodiff"`` is the path for ``jax.jvp``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._engine import (
    Steps,
    Zoneout,
    resets_at,
    route_state_cotangent,
    scan_masked,
    valid_steps,
    where_valid,
    without_residuals,
)
from ._engine import transpose_features as _t
from .gates import Activations


class FusedConfig(NamedTuple):
    """Static settings of ``fused_sequence`` (hashable: it is a ``nondiff_argnum``)."""

    mm_dtype: np.dtype
    acc_dtype: np.dtype
    unroll: int = 1
    checkpoint_every: int | None = None
    # 1: unrolling the reverse scan measured slower (python -m benchmarks.layout).
    backward_unroll: int = 1
    # The primal (no gradient) scan's step layout, "feature" or "batch" (jaxlstm.tuning), for a cell
    # that has both; the training forward pass runs in the cell's own layout, as the backward pass does.
    forward_layout: str = "feature"
    # Zoneout rates: with per-step masks (training) the masks decide, without them
    # (evaluation) each step mixes by the rates.
    zoneout: Zoneout | None = None
    # The nonlinearities (jaxlstm.gates.Activations), or None for σ and tanh.
    act: Activations | None = None


class Cell(NamedTuple):
    """What ``fused_sequence`` needs of a cell (hashable: a static argument). The state (carry) is a
    tuple, ``h`` first: ``(h, c)`` for the LSTM, ``(h,)`` for the GRU and the Elman RNN.

    * ``feature_major``: the layout of the training scans (``[F, B]`` per step, else ``[B, F]``);
    * ``step(params, mm, acc, feature_major, h_mask, zoneout, act)`` -> ``(carry, x) -> (carry, h,
      residuals)``; with ``zoneout`` the step reads ``(x, *zs)``, its keep masks;
    * ``keeps(zoneout, zs_t, acc)``: the zoneout weight of each state component (``jaxlstm._engine.keep_weight``),
      a tuple aligned with the carry;
    * ``vjp(params, cfg, h_mask, residuals_t, carry_prev, d_new, valid)`` -> ``(outs, d_prev, accum)``:
      the backward of one step, given the cotangent ``d_new`` of the state it made (before zoneout) and
      the rows that count (``valid``, or ``None``). ``outs``, a tuple of ``[B, F]`` (``[F, B]``)
      cotangents zero where a row does not count, are kept for ``grads``; ``accum`` (a pytree, or
      ``None``) is summed over the steps (the gradients of parameters read in the step's pointwise part);
    * ``grads(params, cfg, h_mask, xs, carry_prev, residuals, outs, accum)`` -> ``(grads, dxs)``: the
      parameters' gradients and the inputs' ``[T, B, D]`` from all steps (``outs`` stacked ``[T, B, F]``,
      or ``[F, T, B]`` when feature-major);
    * ``carry_after(zoneout)`` -> ``(ys, residuals) -> carries`` after each step, or ``None`` when they
      cannot be read off the outputs (the engine then saves the state entering each step).
    """

    feature_major: bool
    step: Callable
    keeps: Callable
    vjp: Callable
    grads: Callable
    carry_after: Callable


class Segment(NamedTuple):
    """A run of consecutive steps in the cell's layout: the state entering it ``carry0``, its inputs
    ``xs [T, ...]``, the state a reset restores (``init``), the per-step ``mask`` / ``resets``
    ``[T, B]`` (or ``None``), the recurrent dropout mask and the zoneout keep masks ``zs``."""

    carry0: Any
    xs: jax.Array
    init: Any
    mask: jax.Array | None = None
    resets: jax.Array | None = None
    h_mask: jax.Array | None = None
    zs: Any = None


class Saved(NamedTuple):
    """Residuals without checkpointing: every step's outputs and residuals, and, where the state
    after a step does not follow from them (masks, resets, some zoneout), the state entering each step."""

    params: Any
    segment: Segment
    lengths: jax.Array | None
    ys: jax.Array
    residuals: Any
    carry_in: Any


class Checkpoints(NamedTuple):
    """Residuals with checkpointing: the state at each of the ``n`` chunk starts and every per-step
    input in chunks ``[n, k, ...]`` (``chunks.carry0`` unused)."""

    params: Any
    starts: Any
    chunks: Segment
    lengths: jax.Array | None


def shift(first: jax.Array, seq: jax.Array) -> jax.Array:
    """``[first, seq[0], ..., seq[T-2]]``: the value entering each step."""
    return jnp.concatenate([first[None], seq[:-1]], axis=0)


def chunked(x, n, k) -> Any:  # [n * k, ...] -> [n, k, ...]; None stays None
    return None if x is None else x.reshape((n, k) + x.shape[1:])


def pad_time(x, total) -> Any:
    if x is None:
        return None
    pad = total - x.shape[0]
    return x if pad == 0 else jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)


def cast_like(tree, like):
    return jax.tree_util.tree_map(
        lambda g, p: None if p is None else g.astype(p.dtype), tree, like, is_leaf=lambda x: x is None
    )


def flags(steps: Steps | None):
    return (None, None, None) if steps is None else tuple(steps)


def _layout(cell: Cell):
    return _t if cell.feature_major else (lambda a: a)


def _inputs(cfg: FusedConfig, seg: Segment):
    """What the step reads: ``x``, or ``(x, *zs)`` with zoneout."""
    return seg.xs if cfg.zoneout is None else (seg.xs, *seg.zs)


def _forward(cfg: FusedConfig, cell: Cell, params, seg: Segment, lengths, t_offset=0, save: bool = True):
    """``(carry, ys, residuals)`` of one segment in the cell's layout; residuals ``(residuals,
    carry_in or None)``."""
    fm = cell.feature_major
    step = cell.step(params, cfg.mm_dtype, cfg.acc_dtype, fm, seg.h_mask, cfg.zoneout, cfg.act)
    steps = Steps(lengths, seg.mask, seg.resets)
    carry_in = steps.per_step or cell.carry_after(cfg.zoneout) is None
    carry, ys, aux = scan_masked(
        step if save else without_residuals(step),
        seg.carry0,
        _inputs(cfg, seg),
        steps,
        unroll=cfg.unroll,
        t_offset=t_offset,
        feature_major=fm,
        reset_to=seg.init,
        save_carry_in=save and carry_in,
    )
    if save and not carry_in:
        aux = (aux, None)
    return carry, ys, aux


def _backward(cfg: FusedConfig, cell: Cell, params, seg: Segment, saved: tuple, dys, dcarry, lengths, t_offset=0):
    """Backward pass over one segment, given its saved ``(ys, residuals, carry_in)`` and the
    cotangents ``dys`` and ``dcarry`` (in the cell's layout). Returns ``(dcarry0, dinit, grads, dxs
    [T, B, D])``: ``dinit`` is what flowed into the reset state (zeros without resets)."""
    acc, fm = cfg.acc_dtype, cell.feature_major
    ys, residuals, carry_in = saved
    T = seg.xs.shape[0]
    dinit = jax.tree_util.tree_map(jnp.zeros_like, dcarry)
    if T == 0:  # no step: the state's cotangent passes straight through
        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, acc), params)
        return dcarry, dinit, zeros, jnp.zeros(_layout(cell)(seg.xs).shape, acc)
    if carry_in is None:
        after = cell.carry_after(cfg.zoneout)(ys, residuals)
        prev = tuple(shift(c0, a.astype(acc)) for c0, a in zip(seg.carry0, after, strict=True))
    else:
        prev = tuple(c.astype(acc) for c in carry_in)
    zo = cfg.zoneout or Zoneout()
    h_mask = seg.h_mask

    def step_vjp(valid, zs, res_t, prev_t, d_tot):
        # Zoneout: new = k prev + (1 - k) candidate; the step's VJP sees the candidate's share.
        keeps = cell.keeps(zo, zs, acc)
        d_new = tuple(d if k is None else d * (1 - k) for d, k in zip(d_tot, keeps, strict=True))
        outs, d_prev, accum = cell.vjp(params, cfg, h_mask, res_t, prev_t, d_new, valid)
        d_prev = tuple(p if k is None else p + k * d for p, d, k in zip(d_prev, d_tot, keeps, strict=True))
        return outs, d_prev, accum

    def body(carry, inp):
        dcarry, dinit, accum, bufs = carry
        t, m, r, zs, dy, res_t, prev_t = inp
        valid = valid_steps(t_offset + t, lengths, fm, m)
        d_tot = (where_valid(valid, dy.astype(acc), 0) + dcarry[0],) + tuple(dcarry[1:])
        outs, d_prev, accum_t = step_vjp(valid, zs, res_t, prev_t, d_tot)
        dcarry, dinit = route_state_cotangent(valid, resets_at(valid, r, fm), d_prev, dcarry, dinit)
        accum = jax.tree_util.tree_map(lambda s, g: s + g.astype(acc), accum, accum_t)
        if not fm:
            return (dcarry, dinit, accum, bufs), outs
        # Written straight into [F, T, B] buffers, whose [F, T*B] views feed the GEMMs after the
        # loop without a transpose of the whole stack.
        bufs = tuple(
            jax.lax.dynamic_update_slice_in_dim(b, v[:, None].astype(b.dtype), t, axis=1)
            for b, v in zip(bufs, outs, strict=True)
        )
        return (dcarry, dinit, accum, bufs), None

    ts = jnp.arange(T, dtype=jnp.int32)  # the buffers need the step index even without lengths
    zs = seg.zs if cfg.zoneout is not None else None
    ins = (ts, seg.mask, seg.resets, zs, dys, residuals, prev)
    # The shapes of one step's outputs, for the buffers and the sums (traced, not run).
    first = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), ins[3:])
    lead = valid_steps(0, lengths, fm, None if seg.mask is None else seg.mask[0])
    valid0 = None if lead is None else jax.ShapeDtypeStruct(lead.shape, jnp.bool_)
    outs0, _, accum0 = jax.eval_shape(
        lambda v, zs, dy, res_t, prev_t: step_vjp(v, zs, res_t, prev_t, dcarry), valid0, *first
    )
    accum = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, acc), accum0)
    bufs = tuple(jnp.zeros((s.shape[0], T, s.shape[1]), acc) for s in outs0) if fm else ()
    (dcarry0, dinit, accum, bufs), outs = jax.lax.scan(
        body, (dcarry, dinit, accum, bufs), ins, reverse=True, unroll=cfg.backward_unroll
    )
    grads, dxs = cell.grads(params, cfg, h_mask, seg.xs, prev, residuals, bufs if fm else outs, accum)
    return dcarry0, dinit, grads, dxs


def fused_sequence(
    cfg: FusedConfig, cell: Cell, params, carry0: tuple, xs, steps: Steps | None, reset_carry, h_mask=None, zs=None
) -> tuple[jax.Array, tuple]:
    """Time-major core: ``xs [T, B, D]``, ``carry0`` (a tuple, ``h`` first: ``(h [B, R], c [B, H])``,
    ``(h [B, H],)``) in the accumulation dtype, ``steps`` time-major (``mask`` / ``resets``
    ``[T, B]``), ``reset_carry`` (like ``carry0``) the state that ``steps.resets`` restore,
    ``h_mask [B, R]`` (or ``None``) the recurrent dropout mask on ``h(t-1)``, ``zs`` the zoneout keep
    masks of training the step reads beside ``x`` (a tuple of boolean ``[T, B, F]`` or ``None`` s;
    ``None`` s in evaluation, where ``cfg.zoneout``'s rates mix). Returns ``(ys [T, B, R], carry)``.

    The layout changes to feature-major happen inside, per chunk when checkpointing, so that a
    checkpointed step keeps no O(T) transposed copies. Outside differentiation (this primal)
    ``cfg.forward_layout`` may pick batch-major steps for a feature-major cell."""
    return _fused(cfg, cell, params, carry0, xs, steps, reset_carry, h_mask, zs)  # pyright: ignore[reportReturnType]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(cfg: FusedConfig, cell: Cell, params, carry0, xs, steps: Steps | None, reset_carry, h_mask, zs):
    lengths, mask, resets = flags(steps)
    fm = cell.feature_major and cfg.forward_layout == "feature"
    lay = _t if fm else (lambda a: a)
    step = cell.step(params, cfg.mm_dtype, cfg.acc_dtype, fm, lay(h_mask), cfg.zoneout, cfg.act)
    seg = Segment(lay(carry0), lay(xs), lay(reset_carry), mask, resets, None, lay(zs))
    carry, ys, _ = scan_masked(
        without_residuals(step), seg.carry0, _inputs(cfg, seg), Steps(lengths, mask, resets),
        unroll=cfg.unroll, feature_major=fm, reset_to=seg.init,
    )  # fmt: skip
    return lay(ys), lay(carry)


def _fused_forward_pass(cfg: FusedConfig, cell: Cell, params, carry0, xs, steps, reset_carry, h_mask, zs):
    lengths, mask, resets = flags(steps)
    lay = _layout(cell)
    k = cfg.checkpoint_every
    T, B = xs.shape[:2]
    init, h_mask = lay(reset_carry), lay(h_mask)
    if k is None or k >= T:
        seg = Segment(lay(carry0), lay(xs), init, mask, resets, h_mask, lay(zs))
        carry, ys, (residuals, carry_in) = _forward(cfg, cell, params, seg, lengths)
        return (lay(ys), lay(carry)), Saved(params, seg, lengths, ys, residuals, carry_in)

    n = -(-T // k)
    if lengths is None and n * k != T:
        lengths = jnp.full((B,), T, jnp.int32)  # mask the padding steps
    part = lambda a: chunked(pad_time(a, n * k), n, k)
    chunks = Segment(None, part(xs), init, part(mask), part(resets), h_mask, jax.tree_util.tree_map(part, zs))

    def chunk(carry, inp):
        j, x, m, r, z = inp
        seg = Segment(carry, lay(x), init, m, r, h_mask, lay(z))
        new, ys, _ = _forward(cfg, cell, params, seg, lengths, t_offset=j * k, save=False)
        return new, (lay(ys), carry)

    ins = (jnp.arange(n, dtype=jnp.int32), chunks.xs, chunks.mask, chunks.resets, chunks.zs)
    carry, (ys_c, starts) = jax.lax.scan(chunk, lay(carry0), ins)
    ys = ys_c.reshape((n * k,) + ys_c.shape[2:])[:T]
    return (ys, lay(carry)), Checkpoints(params, starts, chunks, lengths)


def _fused_backward_pass(cfg: FusedConfig, cell: Cell, res, cotangents):
    dys, dcarry = cotangents
    acc = cfg.acc_dtype
    lay = _layout(cell)
    dcarry = lay(tuple(d.astype(acc) for d in dcarry))
    params = res.params
    add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
    if isinstance(res, Saved):
        saved = (res.ys, res.residuals, res.carry_in)
        dcarry0, dinit, grads, dxs = _backward(cfg, cell, params, res.segment, saved, lay(dys), dcarry, res.lengths)
        dxs = dxs.astype(res.segment.xs.dtype)
        return cast_like(grads, params), lay(dcarry0), dxs, None, lay(dinit), None, None

    chunks = res.chunks
    n, k = chunks.xs.shape[:2]
    T = dys.shape[0]
    dys_c = chunked(pad_time(dys, n * k), n, k)
    zero_grads = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, acc), params)

    def chunk(carry, inp):
        dcarry, dinit, grads = carry
        j, start, x, m, r, z, dy = inp
        seg = Segment(start, lay(x), chunks.init, m, r, chunks.h_mask, lay(z))
        _, ys, saved = _forward(cfg, cell, params, seg, res.lengths, t_offset=j * k)
        dstart, di, g, dx = _backward(cfg, cell, params, seg, (ys, *saved), lay(dy), dcarry, res.lengths, j * k)
        return (dstart, add(dinit, di), add(grads, g)), dx

    ins = (jnp.arange(n, dtype=jnp.int32), res.starts, chunks.xs, chunks.mask, chunks.resets, chunks.zs, dys_c)
    zero_init = jax.tree_util.tree_map(jnp.zeros_like, dcarry)
    (dcarry0, dinit, grads), dxs_c = jax.lax.scan(chunk, (dcarry, zero_init, zero_grads), ins, reverse=True)
    dxs = dxs_c.reshape((n * k,) + dxs_c.shape[2:])[:T]
    return cast_like(grads, params), lay(dcarry0), dxs.astype(chunks.xs.dtype), None, lay(dinit), None, None


_fused.defvjp(_fused_forward_pass, _fused_backward_pass)
