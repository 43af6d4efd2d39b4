"""The LSTM layer: ``lstm`` over a sequence and ``lstm_cell`` for one step.

Both are thin: arguments are validated (``jaxlstm._checks``), the step comes
from ``jaxlstm._step``, the scan, layouts, masking and reversal from
``jaxlstm._engine``, and the default path is the fused custom VJP: on CPU the
native code of ``jaxlstm._native`` where it applies, else the pure-XLA one
of ``jaxlstm._fused`` (chosen per machine and shape by ``jaxlstm.tuning``).
Inputs and outputs keep the caller's layout.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks, _hints, _path, tuning
from ._fused import FusedConfig, fused_sequence
from ._hints import hints
from ._native import native_lstm
from ._step import LSTM, lstm_scan_core, lstm_step, zoneout_rates
from ._variant import VARIANT, variant_scan_core, variant_step
from .params import LSTMParams, LSTMState

__all__ = ["lstm", "lstm_cell"]

Array = jax.Array


def lstm_cell(
    params: LSTMParams,
    state: LSTMState,
    x: Array,
    *,
    compute_dtype=None,
    zoneout_c: float = 0.0,
    zoneout_h: float = 0.0,
    gate_activation: Callable = jax.nn.sigmoid,
    activation: Callable = jnp.tanh,
) -> tuple[LSTMState, Array]:
    """One LSTM step, for streaming and autoregressive generation.

    Args:
      params: ``LSTMParams``.
      state: ``LSTMState(h [..., R], c [..., H])``.
      x: input ``[..., D]`` with the same leading dims as the state.
      compute_dtype: optional matmul dtype (e.g. ``jnp.bfloat16``).
      zoneout_c, zoneout_h: the zoneout rates a model was trained with: the step
        mixes by them as ``lstm`` does with ``deterministic=True`` (evaluation),
        so stepping a sequence gives its outputs.
      gate_activation, activation: the nonlinearities, as ``lstm`` takes them.

    Returns:
      ``(new_state, h)``: ``h`` in the dtype of ``x``; the new state's ``h`` too,
      its ``c`` in float32 (the cell state is accumulated in float32).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> params = jaxlstm.init_lstm(jax.random.key(0), 8, 16)
      >>> state = jaxlstm.zero_state(4, 16)
      >>> state, h = jaxlstm.lstm_cell(params, state, jnp.ones((4, 8)))
      >>> h.shape
      (4, 16)
    """
    x = check_cell(params, state, x)
    mm, acc = _path.dtypes("lstm", params, x.dtype, compute_dtype)
    zoneout = zoneout_rates(zoneout_c, zoneout_h)
    act = _checks.activations(gate_activation, activation)
    if params.is_variant:
        step = variant_step(params, mm, acc, False, None, zoneout, act)
    else:
        step = lstm_step(params, mm, acc, False, None, zoneout, act)
    lead = x.shape[:-1]
    flat = lambda a: a.reshape((-1, a.shape[-1]))  # the variant step is [B, F]
    inputs = flat(x) if zoneout is None else (flat(x), None, None)  # no masks: the rates mix
    (h, c), y, _ = step((flat(state.h.astype(acc)), flat(state.c.astype(acc))), inputs)
    c, y = c.reshape(lead + c.shape[-1:]), y.reshape(lead + y.shape[-1:])
    y = y.astype(x.dtype)
    return LSTMState(y, c), y


def check_cell(params: LSTMParams, state: LSTMState, x) -> Array:
    """Validates a one-step call (``lstm_cell``, ``jaxlstm.step``); returns ``x`` as a float array."""
    D, H, R = _checks.lstm_params(params)
    if not isinstance(state, LSTMState):
        _checks.lstm_state("state", state, (), H, R)  # raises the TypeError
    x = _checks.as_float_array("x", x)
    _checks.step_input("x", x, D, batch_shape=np.shape(state.h)[:-1])
    _checks.lstm_state("state", state, x.shape[:-1], H, R)
    return x


@hints(_hints.SEQUENCE)
def lstm(
    params: LSTMParams,
    xs: Array,
    initial_state: LSTMState | None = None,
    *,
    seq_lengths: Array | None = None,
    mask: Array | None = None,
    resets: Array | None = None,
    reset_state: LSTMState | None = None,
    input_dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    zoneout_c: float = 0.0,
    zoneout_h: float = 0.0,
    key: Array | None = None,
    deterministic: bool = False,
    reverse: bool = False,
    time_major: bool = False,
    unroll: int | None = None,
    checkpoint_every: int | None = None,
    compute_dtype=None,
    backward: str = "fused",
    gate_activation: Callable = jax.nn.sigmoid,
    activation: Callable = jnp.tanh,
) -> tuple[Array, LSTMState]:
    """Runs an LSTM layer over a sequence.

    Inputs are batch-major, ``[..., T, D]`` (PyTorch's ``batch_first=True``); PyTorch's
    default ``[T, B, D]`` needs ``time_major=True``, or it is read as ``[B, T, D]``.

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
      mask: boolean ``[..., T]`` (``[T, ...]`` with ``time_major``): a step where it
        is false leaves the state unchanged and outputs zeros, as if it were
        removed from the sequence (holes and left padding allowed;
        ``seq_lengths`` is the right-padded special case; both may be given).
      resets: boolean ``[..., T]`` (``[T, ...]`` with ``time_major``): where true,
        step t starts a new segment (an episode boundary): the state entering it
        is ``reset_state``. Equals running each segment on its own from
        ``reset_state`` (the first from ``initial_state``, unless a reset opens it). With ``reverse`` each
        segment is read backwards, from its last step. Resets of steps that do not
        count (masked or past the length) are ignored.
      reset_state: ``LSTMState`` like ``initial_state``: what ``resets`` restore;
        zeros if ``None``. Not ``initial_state``, so that a rollout split into
        calls (``initial_state`` = the previous call's final state) still resets
        to the start of an episode, as haiku's ``ResetCore`` does.
      input_dropout: drop probability on the inputs ``x(t)``, one mask per
        sequence for all its steps (keras' ``dropout``).
      recurrent_dropout: drop probability on ``h(t-1)`` where it enters the
        recurrent dot, one mask per sequence for all its steps (variational
        dropout, Gal & Ghahramani 2016; keras' ``recurrent_dropout``). Both are
        inverted dropout (kept units scaled by ``1 / (1 - p)``), so evaluation is
        the call with both at 0; with either > 0, ``key`` draws the masks:
        ``k_in, k_rec = jax.random.split(key)``, ``bernoulli(k_in, 1 - p, [..., D])``
        and ``bernoulli(k_rec, 1 - p, [..., R])``.
      zoneout_c, zoneout_h: zoneout rates of the cell state and of ``h``
        (Krueger et al. 2017): in training each unit keeps its previous value
        at each step with this probability, ``c(t) = k ∗ c(t-1) + (1 - k) ∗ c̃(t)``
        with ``k ~ bernoulli(zoneout_c)`` per step and unit (and so ``h``, whose
        zoned value is also the output); in evaluation ``k`` is the rate itself
        (the expectation). The masks: ``k_c, k_h =
        jax.random.split(jax.random.fold_in(key, 1))``, ``bernoulli(k_c,
        zoneout_c, (T, *batch, H))`` time-major and aligned with the input
        positions (with ``reverse`` too), and ``bernoulli(k_h, zoneout_h, (T,
        *batch, R))``.
      key: PRNG key, required in training when a dropout or zoneout rate is > 0.
      deterministic: evaluation: no dropout, zoneout by its expectation, no key
        needed (``flax.linen.Dropout``'s flag; the modules set it from
        ``deterministic`` / ``.eval()``).
      reverse: read each sequence from its last valid step back to the first.
        Outputs stay aligned with input positions; padding never enters.
      time_major: ``xs`` is ``[T, ..., D]`` (and so are the outputs).
      unroll: ``lax.scan`` unroll factor of the forward scan; ``None``:
        ``jaxlstm.tuning.default_unroll`` (16 on GPUs, 1 elsewhere).
      checkpoint_every: with the fused backward pass, keep only the state every
        ``k`` steps and recompute each chunk in the backward pass: the stored
        activations are O(T/k + k) instead of O(T).
      compute_dtype: matmul operand dtype, e.g. ``jnp.bfloat16``. Accumulation,
        gate maths, the cell state and the weight gradients stay in float32.
      backward: how gradients are computed. ``"fused"`` (default): a
        hand-written backward pass for the whole sequence
        (``jaxlstm._fused``). ``"autodiff"``: plain JAX autodiff of the
        scan; use it for forward-mode AD (``jax.jvp``, ``jax.jacfwd``,
        ``jax.hessian``), which a ``custom_vjp`` does not support.

    ``reverse``, ``time_major``, ``unroll``, ``checkpoint_every``,
    ``compute_dtype``, ``backward`` and the activations choose the program: under ``jax.jit`` pass
    them as static arguments (``jax.jit(jaxlstm.lstm, static_argnames=...)``) or
    close over them.

    Returns:
      ``(ys, final_state)``: ``ys [..., T, R]`` in the dtype of ``xs`` and
      ``LSTMState(h [..., R], c [..., H])`` (h in the dtype of ``xs``, c in
      float32).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> params = jaxlstm.init_lstm(jax.random.key(0), 8, 16)
      >>> ys, state = jaxlstm.lstm(params, jnp.ones((4, 10, 8)))
      >>> ys.shape, state.c.shape
      ((4, 10, 16), (4, 16))
    """
    call = _path.prepare(
        "lstm", params, xs, initial_state, seq_lengths=seq_lengths, mask=mask, resets=resets,
        reset_state=reset_state, input_dropout=input_dropout, recurrent_dropout=recurrent_dropout,
        zoneout_c=zoneout_c, zoneout_h=zoneout_h, key=key, deterministic=deterministic, reverse=reverse,
        time_major=time_major, unroll=unroll, checkpoint_every=checkpoint_every, compute_dtype=compute_dtype,
        backward=backward, gate_activation=gate_activation, activation=activation,
    )  # fmt: skip
    path = _path.select(call)
    mm, acc, unroll, zoneout, per_step, act = call.mm, call.acc, call.unroll, call.zoneout, call.per_step, call.act
    core: Callable
    if path == _path.NATIVE:

        def native_core(inputs, carries, steps, batch_major=False):
            # bf16 inputs and outputs as they are, any other dtype float32; bf16 GEMM operands where mm is
            # bf16 (the precision contract)
            return native_lstm(batch_major, params, carries[0], inputs, steps, carries[1], bf16=mm == jnp.bfloat16)

        core = native_core
    elif path in (_path.FUSED, _path.VARIANT):
        if path == _path.VARIANT:  # peepholes, layer norm and heads: jaxlstm._variant (batch-major steps)
            cell, cfg = VARIANT, FusedConfig(mm, acc, unroll, checkpoint_every, zoneout=zoneout, act=act)
        else:
            layout = tuning.forward_layout(call.batch, call.D, call.H, call.R, call.T, mm, acc, unroll)
            cell = LSTM
            cfg = FusedConfig(mm, acc, unroll, checkpoint_every, forward_layout=layout, zoneout=zoneout, act=act)

        def fused_core(inputs, carries, steps):
            xs_tm, zs = (inputs, None) if per_step is None else (inputs[0], inputs[1:])
            return fused_sequence(cfg, cell, params, carries[0], xs_tm, steps, carries[1], carries[2], zs)

        core = fused_core
    elif params.is_variant:
        core = variant_scan_core(params, mm, acc, unroll=unroll, zoneout=zoneout, act=act)
    else:
        layout = tuning.forward_layout(call.batch, call.D, call.H, call.R, call.T, mm, acc, unroll)
        core = lstm_scan_core(
            params, mm, acc, feature_major=layout == "feature", unroll=unroll, zoneout=zoneout, act=act
        )

    ys, (h, c) = _path.run(call, path, core)
    return ys.astype(call.dtype), LSTMState(h.astype(call.dtype), c)
