"""One LSTM step and its pure VJP: what the sequence paths scan.

``lstm_step`` builds the forward step ``(carry, x) -> (carry, h, (a, c))``,
batch-major (``[B, F]`` per step, the maths as written) or feature-major
(``[F, B]``, what the sequence scans use: the gate blocks are contiguous rows
and the step is one dot ``z = [w_ih; w_hh]ᵀ·[x; h] + b``; the choice and its
evidence: ``python -m benchmarks.layout``).

``lstm_step_vjp`` is the backward of one feature-major step, in terms of
what the forward saved (the activated gates ``a`` and the cell states): with
``m = o ∗ tanh(c)`` and ``h = m`` (or ``m @ w_hr`` with a projection)::

    dm  = dh                                  (w_hr · dh with a projection)
    dc  = dc + dm ∗ o ∗ (1 - tanh²c)
    dz  = [dc∗g, dc∗c(t-1), dc∗i, dm∗tanh(c)] ∗ [i(1-i), f(1-f), 1-g², o(1-o)]
    dh(t-1) = w_hh · dz,   dc(t-1) = dc ∗ f

The weight and input gradients of a step follow from ``dz`` (``dW_ih = x·dzᵀ``,
``dW_hh = h(t-1)·dzᵀ``, ``db = Σ dz``, ``dx = w_ih·dz``, ``dW_hr = m·dhᵀ``);
``jaxlstm._fused`` does them once for the whole sequence, as GEMMs.
``tests/test_step.py`` holds this VJP against ``jax.vjp`` of ``lstm_step``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import _checks, tuning
from ._engine import (
    Zoneout,
    add_bias,
    dot,
    dropout_masks,
    feature_major_core,
    keep_weight,
    mesh_active,
    operand,
    scan_masked,
    where_valid,
    without_residuals,
    zoneout_masks,
    zoneout_mix,
)
from ._engine import transpose_features as _t
from ._fused import Cell
from .gates import Activations, activate_gates, lstm_pointwise, split_gates, with_derivative
from .params import LSTMParams, init_lstm

# Feature-major: the gate axis is the row axis of ``[4H, B]``.
GATE_AXIS_FM = -2


def lstm_step(
    params: LSTMParams, mm_dtype, acc_dtype, feature_major: bool = False, h_mask=None, zoneout=None, act=None
):
    """The step ``(carry, x) -> (carry, h, (a, c))`` used by every LSTM path.

    ``carry = (h, c)`` in ``acc_dtype``; the activated gates ``a`` ``[B, 4H]``
    and ``c`` are what the fused backward needs from each step. With
    ``feature_major`` every array is transposed: ``x [D, B]``, ``h [R, B]``,
    ``c [H, B]``, ``a [4H, B]``. ``h_mask`` (like ``h``, or ``None``) multiplies
    ``h(t-1)`` where it enters the recurrent dot: variational recurrent dropout.

    ``zoneout`` (a ``Zoneout``, or ``None``): the step's input is then
    ``(x, zc, zh)``, the per-step keep masks (or ``None``), and the new state is
    ``c = k_c ∗ c(t-1) + (1 - k_c) ∗ c̃`` (and so ``h``) with ``k`` the mask, or
    the static rate where no mask is given (evaluation: the expectation). The
    residual ``c`` is then the candidate ``c̃``, which ``tanh`` reads.

    ``act`` (an ``Activations``, or ``None`` for σ and tanh): the nonlinearities. The
    residual ``a`` is then ``(a, a')``, the gates and their derivatives at ``z``, which
    the backward pass reads in place of ``σ' = a(1-a)``, ``tanh' = 1 - a²``.
    """
    if feature_major:
        # Transposed here, outside any scan body: a transpose inside it is folded
        # into the dot as a transposed operand, which XLA:CPU runs slower.
        w_in = jnp.concatenate([params.w_ih, params.w_hh], axis=0).astype(mm_dtype).T
        w_hr_t = None if params.w_hr is None else params.w_hr.T
        b = None if params.b is None else params.b[:, None].astype(acc_dtype)

        def pre(x, h):
            xh = jnp.concatenate([x.astype(mm_dtype), h.astype(mm_dtype)], axis=0)
            z = dot(w_in, xh, mm_dtype, acc_dtype)
            return z if b is None else z + b

        def proj(m):
            assert w_hr_t is not None
            return dot(w_hr_t, m, mm_dtype, acc_dtype)

    else:

        def pre(x, h):
            z = dot(x, params.w_ih, mm_dtype, acc_dtype) + dot(h, params.w_hh, mm_dtype, acc_dtype)
            return z if params.b is None else add_bias(z, params.b)

        def proj(m):
            assert params.w_hr is not None
            return dot(m, params.w_hr, mm_dtype, acc_dtype)

    axis = GATE_AXIS_FM if feature_major else -1

    def step(carry, x):
        h, c = carry
        if zoneout is not None:
            x, zc, zh = x
        z = pre(x, h if h_mask is None else h * h_mask)
        m, c_new, a = lstm_pointwise(z, c, axis, act)
        if act is not None:
            a = (a, gate_derivatives(z, axis, act))
        h_new = m if params.w_hr is None else proj(m)
        if zoneout is not None:
            h_new = zoneout_mix(keep_weight(zh, zoneout.h, acc_dtype), h, h_new)
            c, c_new = zoneout_mix(keep_weight(zc, zoneout.c, acc_dtype), c, c_new), c_new
        else:
            c = c_new
        return (h_new, c), h_new, (a, c_new)

    return step


def gate_derivatives(z: jax.Array, axis: int, act: Activations) -> jax.Array:
    """``[gate'(z_i), gate'(z_f), cell'(z_g), gate'(z_o)]``, the derivative of the activated gates."""
    return with_derivative(lambda v: activate_gates(v, axis, act), z)[1]


def zoneout_rates(zoneout_c: float = 0.0, zoneout_h: float = 0.0) -> Zoneout | None:
    """Validated rates as a ``Zoneout``, or ``None`` when both are 0."""
    zo = Zoneout(_checks.rate("zoneout_c", zoneout_c), _checks.rate("zoneout_h", zoneout_h))
    return None if zo == Zoneout() else zo


def regularisation(
    xs, batch_shape, T, H, R, acc, time_major, *, input_dropout, recurrent_dropout, zoneout, key, deterministic
):
    """The regularisers of a sequence call, checked and drawn: ``(xs, h_mask,
    per_step)`` with the input dropout applied to ``xs``, ``h_mask`` the recurrent
    dropout mask (or ``None``) and ``per_step`` the zoneout keep masks ``(zc, zh)``
    for ``jaxlstm._engine.apply_sequence`` (``(None, None)`` in evaluation,
    where the rates mix; ``None`` without zoneout). ``deterministic`` turns dropout off."""
    p_in = _checks.rate("input_dropout", input_dropout)
    p_rec = _checks.rate("recurrent_dropout", recurrent_dropout)
    if _checks.static_bool("deterministic", deterministic):
        p_in = p_rec = 0.0
    xs, h_mask = dropout_masks(xs, batch_shape, R, acc, p_in, p_rec, key, time_major)
    per_step = None
    if zoneout is not None:
        per_step = (None, None) if deterministic else zoneout_masks(T, batch_shape, H, R, zoneout, key)
    return xs, h_mask, per_step


class StepGrads(NamedTuple):
    """Cotangents of one feature-major step (see ``lstm_step_vjp``)."""

    dz: jax.Array  # pre-activations [4H, B]
    dh_prev: jax.Array  # h(t-1) [R, B]
    dc_prev: jax.Array  # c(t-1) [H, B]


def gate_grads(a, dc: jax.Array, c_prev: jax.Array, do: jax.Array) -> jax.Array:
    """``dz = [dc∗g, dc∗c(t-1), dc∗i, do] ∗ act'(a)`` ``[4H, B]``, feature-major.

    The gate blocks are contiguous rows, so one concatenate fuses into one loop;
    the derivatives are ``jaxlstm.gates.activation_derivative`` written per
    block, which XLA:CPU fused better than multiplying by it
    (``python -m benchmarks.layout``, backward rows). With other activations ``a``
    is ``(a, a')``, the derivatives saved by the step."""
    if isinstance(a, tuple):
        a, da = a
        i, f, g, _ = split_gates(a, GATE_AXIS_FM)
        return jnp.concatenate([dc * g, dc * c_prev, dc * i, do], axis=GATE_AXIS_FM) * da
    i, f, g, o = split_gates(a, GATE_AXIS_FM)
    return jnp.concatenate(
        [dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g), do * o * (1 - o)],
        axis=GATE_AXIS_FM,
    )


def lstm_step_vjp(
    w_hh: jax.Array,
    w_hr: jax.Array | None,
    a: jax.Array,
    c: jax.Array,
    c_prev: jax.Array,
    dh: jax.Array,
    dc: jax.Array,
    mm_dtype,
    acc_dtype,
    h_mask: jax.Array | None = None,
    act: Activations | None = None,
) -> StepGrads:
    """Backward of one feature-major step.

    Args:
      w_hh: ``[R, 4H]``; w_hr: ``[H, P]`` or ``None``.
      a: the step's activated gates ``[4H, B]``; c: its new cell ``[H, B]``;
        c_prev: ``c(t-1)`` ``[H, B]``.
      dh: cotangent of the step's output ``h`` ``[R, B]`` (from the loss and
        from step t+1); dc: cotangent of its new cell ``[H, B]``.
      h_mask: the recurrent dropout mask the step applied to ``h(t-1)``, or ``None``.
      act: the step's ``Activations`` (then ``a`` is ``(a, a')``), or ``None``.

    Returns:
      ``StepGrads(dz, dh_prev, dc_prev)``.
    """
    dm = dh if w_hr is None else dot(w_hr, dh, mm_dtype, acc_dtype)
    f, o = split_gates(a[0] if isinstance(a, tuple) else a, GATE_AXIS_FM)[1::2]
    if act is None:
        tc = jnp.tanh(c)
        dc = dc + dm * o * (1 - tc * tc)
    else:
        tc, dtc = with_derivative(act.cell, c)
        dc = dc + dm * o * dtc
    dz = gate_grads(a, dc, c_prev, dm * tc)
    dh_prev = dot(w_hh, dz, mm_dtype, acc_dtype)
    return StepGrads(dz, dh_prev if h_mask is None else dh_prev * h_mask, dc * f)


def lstm_keeps(zoneout: Zoneout, zs, acc_dtype):
    """The zoneout weights of ``(h, c)`` from the step's keep masks ``(zc, zh)`` (or the rates): the
    ``Cell.keeps`` of the LSTM and its variants."""
    zc, zh = (None, None) if zs is None else zs
    return keep_weight(zh, zoneout.h, acc_dtype), keep_weight(zc, zoneout.c, acc_dtype)


def _vjp(params: LSTMParams, cfg, h_mask, residuals, carry_prev, d_new, valid):
    """``jaxlstm._fused.Cell.vjp``: ``dz`` (and, with a projection, the cotangent of ``m @ w_hr``'s output)."""
    a, c = residuals
    dh, dc = d_new
    mm, acc = cfg.mm_dtype, cfg.acc_dtype
    g = lstm_step_vjp(params.w_hh, params.w_hr, a, c, carry_prev[1], dh, dc, mm, acc, h_mask, cfg.act)
    outs = (where_valid(valid, g.dz, 0),)
    if params.w_hr is not None:
        outs += (where_valid(valid, dh, 0),)
    return outs, (g.dh_prev, g.dc_prev), None


def _grads(params: LSTMParams, cfg, h_mask, xs, carry_prev, residuals, bufs, accum):
    """``jaxlstm._fused.Cell.grads``: one GEMM each over all T·B columns of the ``[F, T, B]`` buffers
    (on ``[F, T*B]`` views, or as einsums under a device mesh: ``jaxlstm._engine.mesh_active``)."""
    mm, acc = cfg.mm_dtype, cfg.acc_dtype
    acts, cs = residuals
    sharded = mesh_active()

    def contract(a, buf):  # a [T, F1, B], buf [F2, T, B] -> [F1, F2]
        a, buf = operand(a, mm, acc), operand(buf, mm, acc)
        if sharded:
            return jnp.einsum("tfb,gtb->fg", a, buf, preferred_element_type=acc)
        cols = jnp.swapaxes(a, 0, 1).reshape((a.shape[1], -1))
        return jnp.matmul(cols, buf.reshape((buf.shape[0], -1)).T, preferred_element_type=acc)

    d_w_hr = None
    if params.w_hr is not None:
        gates = acts[0] if isinstance(acts, tuple) else acts  # (a, a') with other activations
        m = split_gates(gates, GATE_AXIS_FM)[3] * (jnp.tanh if cfg.act is None else cfg.act.cell)(cs)
        d_w_hr = contract(m, bufs[1])
    d_b = None if params.b is None else bufs[0].sum(axis=(1, 2))
    h_prev = carry_prev[0]
    h_in = h_prev if h_mask is None else h_prev * h_mask[None]  # what the recurrent dot read
    grads = LSTMParams(contract(xs, bufs[0]), contract(h_in, bufs[0]), d_b, d_w_hr)
    w_ih, dz = operand(params.w_ih, mm, acc), operand(bufs[0], mm, acc)
    dxs = jnp.einsum("dg,gtb->dtb", w_ih, dz, preferred_element_type=acc)
    return grads, _t(jnp.swapaxes(dxs, 0, 1))


def _outputs_and_cells(ys, residuals):
    return ys, residuals[1]


def _carry_after(zoneout):
    """The state after each step is ``(h, c)`` from the outputs and the saved cells, but under zoneout
    (the saved c is the candidate)."""
    return _outputs_and_cells if zoneout is None else None


# The LSTM on jaxlstm._fused's engine: feature-major training scans (python -m benchmarks.layout).
LSTM = Cell(True, lstm_step, lstm_keeps, _vjp, _grads, _carry_after)


def lstm_scan_core(
    params: LSTMParams, mm_dtype, acc_dtype, *, feature_major: bool, unroll: int = 1, zoneout=None, act=None
):
    """The plain (autodiff) LSTM scan as an engine core:
    ``core(xs [T, B, D], (carry0, reset_carry, h_mask), steps) -> (ys [T, B, R], carry)``,
    with feature- or batch-major steps inside (``h_mask``: ``[B, R]`` or ``None``).
    With ``zoneout`` (``Zoneout``), ``xs`` is ``(xs, zc, zh)`` as the step reads it."""

    def core(xs, carries, steps):
        step = lstm_step(params, mm_dtype, acc_dtype, feature_major, carries[2], zoneout, act)
        carry, ys, _ = scan_masked(
            without_residuals(step), carries[0], xs, steps, unroll=unroll, feature_major=feature_major,
            reset_to=carries[1],
        )  # fmt: skip
        return ys, carry

    return feature_major_core(core) if feature_major else core


def _layout_probe(layout: str, B: int, D: int, H: int, R: int, T: int, mm, acc, unroll: int):
    """A compiled forward scan of ``layout`` on random inputs, as a no-argument callable."""
    params = init_lstm(jax.random.key(0), D, H, proj_size=None if R == H else R)
    run = lstm_scan_core(params, mm, acc, feature_major=layout == "feature", unroll=unroll)
    xs = jax.random.normal(jax.random.key(1), (T, B, D), jnp.float32).astype(mm)
    carry = (jnp.zeros((B, R), acc), jnp.zeros((B, H), acc))
    compiled = jax.jit(lambda x, c: run(x, (c, c, None), None)).lower(xs, carry).compile()
    return lambda: jax.block_until_ready(compiled(xs, carry))


def _time_layouts(B, D, H, R, T, mm, acc, unroll) -> dict:
    """``jaxlstm.tuning.forward_layout``'s timing: the candidate layouts' forward scans."""
    # Usually called while jax.jit traces the user's function: the probes run eagerly.
    with jax.ensure_compile_time_eval():
        steps = min(T, tuning.PROBE_STEPS)
        probes = {name: _layout_probe(name, B, D, H, R, steps, mm, acc, unroll) for name in tuning.CANDIDATES}
        return tuning.decide(probes, tuning.DEFAULT)


tuning.register("forward", _time_layouts)
