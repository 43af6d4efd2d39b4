"""The recurrence engine: ``lax.scan`` over time, masking, reversal, layouts.

What lives here:

* :func:`apply_sequence`: the one place that handles ``time_major``, any number of
  leading batch dims, ``seq_lengths`` and ``reverse``. Every recurrent layer
  (LSTM, RNN, GRU) goes through it with its own ``core``.
* :func:`scan_masked`: ``lax.scan`` of a step function where steps past a
  sequence's length leave the carry unchanged and emit zeros. The final carry is
  therefore the state at the last valid step, without storing every carry.
* :func:`reverse_padded`: per-sequence reversal of the valid prefix, padding left
  in place. It is its own inverse (and its own transpose).
* :func:`lstm_cell` and :func:`lstm`, the LSTM on top of that engine.

Layout: the scan runs time-major with the batch dims flattened. The LSTM scans
are feature-major: each step sees ``x [D, B]`` and carries ``h [R, B]``,
``c [H, B]``, so the step computes ``z = [w_ih; w_hh]ᵀ·[x; h] + b`` as ``[4H, B]``:
its four gate blocks are contiguous rows, and XLA:CPU ran the ``[4H, H]·[H, B]``
dot 1.3–1.4x faster than ``[B, H]·[H, 4H]`` inside a while loop. The input
projection is computed inside the step together with the recurrent one: on
XLA:CPU this measured faster than hoisting it into one big GEMM before the scan
(``python -m benchmarks.layout``; results in ``benchmarks/results/cpu/SUMMARY.md``).
The training fast path (:mod:`jaxlstm.backward`) still does every
weight-gradient GEMM over all T·B rows.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from .gates import lstm_pointwise
from .params import LSTMParams, LSTMState

Array = jax.Array


# ----------------------------------------------------------------------------
# dtypes


def _widest_float(*dtypes):
    dtypes = [jnp.dtype(d) for d in dtypes if d is not None]
    return max(dtypes, key=lambda d: (d.itemsize, d == jnp.float32))


def accum_dtype(*dtypes):
    """float32, or float64 where an input is float64 (x64 mode)."""
    return jnp.dtype(jnp.float64) if any(jnp.dtype(d) == jnp.float64 for d in dtypes) else jnp.dtype(jnp.float32)


def matmul_dtype(compute_dtype, *dtypes):
    """The matmul operand dtype: ``compute_dtype`` if given, else the widest input dtype."""
    if compute_dtype is not None:
        return jnp.dtype(compute_dtype)
    return _widest_float(*dtypes)


def add_bias(z: Array, b: Array) -> Array:
    """``z [..., F] + b [F]`` with the broadcast spelled out (strict rank promotion)."""
    return z + b.astype(z.dtype).reshape((1,) * (z.ndim - 1) + b.shape)


def dot(a: Array, w: Array, mm_dtype, acc_dtype) -> Array:
    """``a @ w`` with operands in ``mm_dtype`` and accumulation in ``acc_dtype``."""
    return jnp.matmul(a.astype(mm_dtype), w.astype(mm_dtype), preferred_element_type=acc_dtype)


# ----------------------------------------------------------------------------
# the engine


def time_mask(t, lengths: Array, feature_major: bool = False) -> Array:
    """``[B, 1]`` (``[1, B]`` if ``feature_major``) boolean: is step ``t`` inside each sequence."""
    valid = t < lengths
    return valid[None, :] if feature_major else valid[:, None]


def scan_masked(step: Callable, carry0, xs, lengths: Optional[Array], *, unroll: int = 1, t_offset=0,
                feature_major: bool = False):
    """Scans ``step(carry, x) -> (carry, y, aux)`` over the leading axis of ``xs``.

    With ``lengths [B]``, steps with ``t_offset + t >= lengths`` keep the carry and
    emit ``y = 0``; ``aux`` (residuals for a backward pass) is returned unmasked.
    ``y`` and ``aux`` may be ``None``. Carries and ``y`` are ``[B, F]``, or
    ``[F, B]`` with ``feature_major``.

    Returns:
      ``(final_carry, ys, auxs)``.
    """
    if lengths is None:

        def body(carry, x):
            carry, y, aux = step(carry, x)
            return carry, (y, aux)

        carry, (ys, aux) = jax.lax.scan(body, carry0, xs, unroll=unroll)
        return carry, ys, aux

    T = jax.tree_util.tree_leaves(xs)[0].shape[0]

    def masked_body(carry, inp):
        t, x = inp
        new, y, aux = step(carry, x)
        valid = time_mask(t_offset + t, lengths, feature_major)
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(valid, n, o), new, carry)
        if y is not None:
            y = jnp.where(valid, y, jnp.zeros((), y.dtype))
        return new, (y, aux)

    carry, (ys, aux) = jax.lax.scan(masked_body, carry0, (jnp.arange(T, dtype=jnp.int32), xs), unroll=unroll)
    return carry, ys, aux


def _reverse_index(T: int, lengths: Array) -> Array:
    t = jnp.arange(T, dtype=lengths.dtype)[:, None]
    return jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)


def reverse_padded_plain(xs: Array, lengths: Array) -> Array:
    """Reverses each sequence's valid prefix: ``out[t, b] = xs[len_b - 1 - t, b]`` for
    ``t < len_b``; padded steps stay where they are. ``xs`` is ``[T, B, ...]``.

    Differentiable in both modes (its transpose is a scatter-add)."""
    idx = _reverse_index(xs.shape[0], lengths)
    return xs[idx, jnp.arange(xs.shape[1])[None, :]]


@jax.custom_vjp
def reverse_padded(xs: Array, lengths: Array) -> Array:
    """:func:`reverse_padded_plain` with a gather, not a scatter-add, as its VJP."""
    return reverse_padded_plain(xs, lengths)


def _reverse_padded_fwd(xs, lengths):
    return reverse_padded(xs, lengths), lengths


def _reverse_padded_bwd(lengths, g):
    # A permutation that is its own inverse is its own transpose.
    return reverse_padded(g, lengths), None


reverse_padded.defvjp(_reverse_padded_fwd, _reverse_padded_bwd)


def _flip_time(xs: Array, lengths: Optional[Array], forward_mode: bool) -> Array:
    if lengths is None:
        return jnp.flip(xs, axis=0)
    return reverse_padded_plain(xs, lengths) if forward_mode else reverse_padded(xs, lengths)


def _to_time_major(xs: Array, batch_shape: tuple, time_major: bool) -> Array:
    """``[..., T, F]`` (or ``[T, ..., F]``) -> ``[T, B, F]`` with the batch dims flattened."""
    x = xs if time_major else jnp.moveaxis(xs, -2, 0)
    return x.reshape((x.shape[0], _checks.batch_size(batch_shape), xs.shape[-1]))


def _from_time_major(ys_tm: Array, batch_shape: tuple, time_major: bool) -> Array:
    """Inverse of :func:`_to_time_major`."""
    ys = ys_tm.reshape((ys_tm.shape[0],) + tuple(batch_shape) + ys_tm.shape[2:])
    return ys if time_major else jnp.moveaxis(ys, 0, -2)


def _flat_lengths(seq_lengths: Optional[Array], batch_shape: tuple, T: int) -> Optional[Array]:
    """``seq_lengths [*batch_shape]`` -> int32 ``[B]`` clipped to ``[0, T]`` (or ``None``)."""
    if seq_lengths is None:
        return None
    B = _checks.batch_size(batch_shape)
    return jnp.clip(jnp.asarray(seq_lengths).reshape((B,)).astype(jnp.int32), 0, T)


def reverse_sequences(xs: Array, seq_lengths: Optional[Array], *, time_major: bool = False,
                      forward_mode: bool = True) -> Array:
    """Reverses each sequence's valid part in ``xs [..., T, F]`` (``[T, ..., F]`` if
    ``time_major``); padding stays in place. Its own inverse. ``forward_mode=False``
    allows a cheaper VJP at the price of ``jax.jvp`` support."""
    if seq_lengths is None:
        return jnp.flip(xs, axis=0 if time_major else -2)
    batch_shape = xs.shape[1:-1] if time_major else xs.shape[:-2]
    x = _to_time_major(xs, batch_shape, time_major)
    x = _flip_time(x, _flat_lengths(seq_lengths, batch_shape, x.shape[0]), forward_mode)
    return _from_time_major(x, batch_shape, time_major)


def swap_feature_axis(tree):
    """Batch-major <-> feature-major on the last two axes: ``[..., B, F] <-> [..., F, B]``."""
    return jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, -1, -2), tree)


def feature_major_core(core_fm: Callable) -> Callable:
    """Adapts ``core_fm(xs [T, D, B], carry [F, B], lengths)`` to the time-major
    ``core`` of :func:`apply_sequence`. The transposes are fused by XLA with the
    batch↔time-major ones around them."""
    flip = swap_feature_axis

    def core(xs_tm, carry, lengths):
        ys, carry = core_fm(flip(xs_tm), flip(carry), lengths)
        return flip(ys), flip(carry)

    return core


def apply_sequence(
    core: Callable,
    xs: Array,
    carry0,
    batch_shape: tuple,
    *,
    seq_lengths: Optional[Array],
    reverse: bool,
    time_major: bool,
    forward_mode: bool = True,
):
    """Runs ``core(xs_tm [T, B, D], carry [B, ...], lengths [B] | None) -> (ys_tm, carry)``
    on ``xs`` of any layout; ``carry0`` leaves are ``[*batch_shape, F]``.

    ``forward_mode=False`` lets reversal use a ``custom_vjp`` (cheaper VJP, no
    ``jax.jvp``); pass it only when ``core`` is itself reverse-mode only.

    Returns ``(ys, final_carry)`` in the layout of ``xs`` and ``carry0``.
    """
    xs_tm = _to_time_major(xs, batch_shape, time_major)
    B = xs_tm.shape[1]
    carry = jax.tree_util.tree_map(lambda a: a.reshape((B,) + a.shape[len(batch_shape):]), carry0)
    lengths = _flat_lengths(seq_lengths, batch_shape, xs_tm.shape[0])
    if reverse:
        xs_tm = _flip_time(xs_tm, lengths, forward_mode)
    ys_tm, carry = core(xs_tm, carry, lengths)
    if reverse:
        ys_tm = _flip_time(ys_tm, lengths, forward_mode)
    carry = jax.tree_util.tree_map(lambda a: a.reshape(tuple(batch_shape) + a.shape[1:]), carry)
    return _from_time_major(ys_tm, batch_shape, time_major), carry


# ----------------------------------------------------------------------------
# the LSTM


def lstm_step(params: LSTMParams, mm_dtype, acc_dtype, feature_major: bool = False):
    """The step ``(carry, x) -> (carry, h, (a, c))`` used by every LSTM path.

    ``carry = (h, c)`` in ``acc_dtype``; the activated gates ``a [B, 4H]`` and
    ``c`` are what the fused backward needs from each step. With
    ``feature_major`` every array is transposed: ``x [D, B]``, ``h [R, B]``,
    ``c [H, B]``, ``a [4H, B]``, and the two input dots are one,
    ``z = [w_ih; w_hh]ᵀ·[x; h] + b``: against two dots it measured 1.00–1.13x
    as fast in training and 0.93–1.13x in the forward (slower only at T=1024).
    """
    if feature_major:
        # Transposed here, outside the scan body: a transpose inside it is folded
        # into the dot as a transposed operand, which XLA:CPU runs ~3x slower.
        w_in = jnp.concatenate([params.w_ih, params.w_hh], axis=0).astype(mm_dtype).T
        w_hr = None if params.w_hr is None else params.w_hr.T
        b = params.b[:, None]
        pre = lambda x, h: dot(w_in, jnp.concatenate([x.astype(mm_dtype), h.astype(mm_dtype)], axis=0),
                               mm_dtype, acc_dtype) + b.astype(acc_dtype)
        proj = lambda m: dot(w_hr, m, mm_dtype, acc_dtype)
    else:
        pre = lambda x, h: add_bias(dot(x, params.w_ih, mm_dtype, acc_dtype) + dot(h, params.w_hh, mm_dtype, acc_dtype),
                                    params.b)
        proj = lambda m: dot(m, params.w_hr, mm_dtype, acc_dtype)
    axis = -2 if feature_major else -1

    def step(carry, x):
        h, c = carry
        m, c, a = lstm_pointwise(pre(x, h), c, axis)
        h = m if params.w_hr is None else proj(m)
        return (h, c), h, (a, c)

    return step


def _check_state(state, batch_shape, H, R, name="initial_state"):
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"{name} must be an LSTMState(h, c), got {type(state).__name__}")
    h, c = state
    _checks.state_array(f"{name}.h", h, tuple(batch_shape) + (R,))
    _checks.state_array(f"{name}.c", c, tuple(batch_shape) + (H,))


def lstm_cell(params: LSTMParams, state: LSTMState, x: Array, *, compute_dtype=None):
    """One LSTM step, for streaming and autoregressive generation.

    Args:
      params: ``LSTMParams``.
      state: ``LSTMState(h [..., R], c [..., H])``.
      x: input ``[..., D]`` with the same leading dims as the state.
      compute_dtype: optional matmul dtype (e.g. ``jnp.bfloat16``).

    Returns:
      ``(new_state, h)``: ``h`` in the dtype of ``x``; the new state's ``h`` too,
      its ``c`` in float32 (the cell state is accumulated in float32).
    """
    D, H, R = _checks.lstm_params(params)
    _checks.step_input("x", x, D)
    _check_state(state, x.shape[:-1], H, R, name="state")
    acc = accum_dtype(x.dtype, params.w_ih.dtype)
    mm = matmul_dtype(compute_dtype, x.dtype, params.w_ih.dtype, params.w_hh.dtype)
    step = lstm_step(params, mm, acc)
    (h, c), y, _ = step((state.h.astype(acc), state.c.astype(acc)), x)
    y = y.astype(x.dtype)
    return LSTMState(y, c), y


def lstm(
    params: LSTMParams,
    xs: Array,
    initial_state: Optional[LSTMState] = None,
    *,
    seq_lengths: Optional[Array] = None,
    reverse: bool = False,
    time_major: bool = False,
    unroll: int = 1,
    checkpoint_every: Optional[int] = None,
    compute_dtype=None,
    backward: str = "fused",
):
    """Runs an LSTM layer over a sequence.

    Per step (gate order i, f, g, o; ``g`` is the candidate C̃)::

        z = x(t) @ w_ih + h(t-1) @ w_hh + b
        i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)
        c(t) = f ∗ c(t-1) + i ∗ g
        h(t) = o ∗ tanh(c(t))            (then @ w_hr with a projection)

    Args:
      params: ``LSTMParams`` (``w_ih [D, 4H]``, ``w_hh [R, 4H]``, ``b [4H]``,
        ``w_hr [H, P]`` or ``None``).
      xs: ``[..., T, D]`` (any number of leading batch dims, including none), or
        ``[T, ..., D]`` with ``time_major=True``.
      initial_state: ``LSTMState(h [..., R], c [..., H])``; zeros if ``None``.
      seq_lengths: integer ``[...]`` (the batch shape). Outputs past a sequence's
        length are zero and the final state is taken at its last valid step.
        Concrete values are checked to lie in ``[0, T]``; traced values (under
        ``jit``) are clipped to that range.
      reverse: read each sequence from its last valid step back to the first.
        Outputs stay aligned with input positions; padding never enters.
      time_major: ``xs`` is ``[T, ..., D]`` (and so are the outputs).
      unroll: ``lax.scan`` unroll factor of the forward scan.
      checkpoint_every: with the fused backward, keep only the state every ``k``
        steps and recompute each chunk in the backward pass: the stored
        activations are O(T/k + k) instead of O(T).
      compute_dtype: matmul operand dtype, e.g. ``jnp.bfloat16``. Accumulation,
        gate maths, the cell state and the weight gradients stay in float32.
      backward: ``"fused"`` (default): a hand-written VJP for the whole sequence
        (:mod:`jaxlstm.backward`). ``"autodiff"``: plain JAX autodiff of the
        scan; use it for forward-mode AD (``jax.jvp``, ``jax.jacfwd``,
        ``jax.hessian``), which a ``custom_vjp`` does not support.

    Returns:
      ``(ys, final_state)``: ``ys [..., T, R]`` in the dtype of ``xs`` and
      ``LSTMState(h [..., R], c [..., H])`` (h in the dtype of ``xs``, c in
      float32).

    Example:
      >>> params = jaxlstm.init_lstm(jax.random.key(0), 8, 16)
      >>> ys, state = jaxlstm.lstm(params, jnp.ones((4, 10, 8)))
      >>> ys.shape, state.c.shape
      ((4, 10, 16), (4, 16))
    """
    D, H, R = _checks.lstm_params(params)
    batch_shape, T = _checks.sequence("xs", xs, D, time_major)
    seq_lengths = _checks.seq_lengths(seq_lengths, batch_shape, T)
    if backward not in ("fused", "autodiff"):
        raise ValueError(f"backward must be 'fused' or 'autodiff', got {backward!r}")
    unroll = _checks.positive_int("unroll", unroll)
    if checkpoint_every is not None:
        checkpoint_every = _checks.positive_int("checkpoint_every", checkpoint_every)
        if backward != "fused":
            raise ValueError("checkpoint_every requires backward='fused'")
    weights = [params.w_ih.dtype, params.w_hh.dtype] + ([] if params.w_hr is None else [params.w_hr.dtype])
    acc = accum_dtype(xs.dtype, *weights)
    mm = matmul_dtype(compute_dtype, xs.dtype, *weights)
    if initial_state is None:
        carry0 = (jnp.zeros(batch_shape + (R,), acc), jnp.zeros(batch_shape + (H,), acc))
    else:
        _check_state(initial_state, batch_shape, H, R)
        carry0 = (initial_state.h.astype(acc), initial_state.c.astype(acc))

    if backward == "fused":
        from .backward import FusedConfig, fused_lstm

        cfg = FusedConfig(unroll, checkpoint_every, mm.name, acc.name)

        def core(xs_tm, carry, lengths):
            return fused_lstm(cfg, params, carry, xs_tm, lengths)

    else:

        step = lstm_step(params, mm, acc, feature_major=True)

        def no_residuals(carry, x):
            carry, y, _ = step(carry, x)
            return carry, y, None

        @feature_major_core
        def core(xs, carry, lengths):
            carry, ys, _ = scan_masked(no_residuals, carry, xs, lengths, unroll=unroll, feature_major=True)
            return ys, carry

    ys, (h, c) = apply_sequence(
        core, xs, carry0, batch_shape, seq_lengths=seq_lengths, reverse=reverse, time_major=time_major,
        forward_mode=backward == "autodiff",
    )
    return ys.astype(xs.dtype), LSTMState(h.astype(xs.dtype), c)
