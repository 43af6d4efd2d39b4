"""Layers on layers: multi-layer, bidirectional, projected LSTMs with dropout.

``init_lstm_stack`` returns ``params[layer][direction]``: a tuple (one entry per
layer) of tuples (``(forward,)`` or ``(forward, backward)``) of ``LSTMParams``.
Layer ``l + 1`` reads layer ``l``'s outputs, the two directions concatenated on
features (forward first), as PyTorch's ``nn.LSTM`` does. Every layer calls the
core ``jaxlstm.lstm``, so it gets the fused backward; nothing is re-derived.

States are stacked ``[num_layers * num_directions, ..., features]`` with index
``layer * num_directions + direction``: PyTorch's ``h_n``/``c_n`` order.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from . import _checks, _hints
from ._engine import reverse_sequences
from ._hints import hints
from .params import LSTMParams, LSTMState, init_lstm, stack_layout
from .recurrence import lstm

__all__ = ["DIRECTIONS", "StackParams", "init_lstm_stack", "lstm_stack"]

StackParams = tuple[tuple[LSTMParams, ...], ...]


def init_lstm_stack(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    *,
    bidirectional: bool = False,
    proj_size: int | None = None,
    forget_bias: float = 1.0,
    bias: bool = True,
    peephole: bool = False,
    layer_norm: bool = False,
    num_heads: int = 1,
    dtype=jnp.float32,
) -> StackParams:
    """Initialise a stack; layer ``l > 0`` has input size ``num_directions * R``.
    ``peephole``, ``layer_norm`` and ``num_heads`` as in ``jaxlstm.init_lstm``, in every layer.

    Examples:
      >>> import jax, jaxlstm
      >>> params = jaxlstm.init_lstm_stack(jax.random.key(0), 8, 16, num_layers=2, bidirectional=True)
      >>> params[1][0].w_ih.shape        # reads both directions of layer 0
      (32, 64)
    """
    num_layers = _checks.positive_int("num_layers", num_layers)
    _checks.positive_int("input_size", input_size)
    _checks.positive_int("hidden_size", hidden_size)
    layout = stack_layout(input_size, hidden_size, num_layers, bidirectional, proj_size)
    keys = jax.random.split(key, len(layout))
    flat = [
        init_lstm(
            k,
            d_in,
            hidden_size,
            proj_size=proj_size,
            forget_bias=forget_bias,
            bias=bias,
            peephole=peephole,
            layer_norm=layer_norm,
            num_heads=num_heads,
            dtype=dtype,
        )
        for k, (_, _, d_in) in zip(keys, layout, strict=True)
    ]
    return group_layers(flat, 2 if bidirectional else 1)


DIRECTIONS = ("forward", "reverse")
"""Names of a bidirectional layer's two directions (``params[l][0]``, ``params[l][1]``)."""


def layer_key(layer: int) -> str:
    """Name of layer ``l`` in the Flax modules' parameter trees: ``layer_0``, ..."""
    return f"layer_{layer}"


def group_layers(flat, num_directions: int) -> StackParams:
    """``[p(0,0), p(0,1), p(1,0), ...]`` -> ``((p(0,0), p(0,1)), (p(1,0), ...), ...)``."""
    return tuple(tuple(flat[i : i + num_directions]) for i in range(0, len(flat), num_directions))


def check_stack(params) -> tuple[int, int, int, int, int]:
    """Validates a stack; returns ``(num_layers, num_directions, D, H, R)``."""
    if not isinstance(params, (tuple, list)) or not params or not all(isinstance(l, (tuple, list)) for l in params):
        hint = ""
        if isinstance(params, LSTMParams):
            hint = " (one layer's LSTMParams: use jaxlstm.lstm, or wrap it as ((params,),))"
        elif isinstance(params, dict):
            hint = " (a dict: take them out of Flax variables with jaxlstm.linen.stack_params)"
        raise TypeError(
            "params must be a non-empty tuple of layers, each a tuple of LSTMParams (see init_lstm_stack), "
            f"got {type(params).__name__}{hint}"
        )
    dirs = len(params[0])
    if dirs not in (1, 2):
        raise ValueError(f"params[0] must hold 1 or 2 directions, got {dirs}")
    D, H, R = _checks.lstm_params(params[0][0], "params[0][0]")
    for l, layer in enumerate(params):
        if len(layer) != dirs:
            raise ValueError(f"params[{l}] must hold {dirs} directions (like params[0]), got {len(layer)}")
        for d, p in enumerate(layer):
            d_in = D if l == 0 else dirs * R
            name = f"params[{l}][{d}]"
            Dl, Hl, Rl = _checks.lstm_params(p, name)
            if (Dl, Hl, Rl) != (d_in, H, R):
                raise ValueError(
                    f"{name} must have input size {d_in}, hidden size {H} and output size {R} "
                    f"(w_ih [{d_in}, {4 * H}], w_hh [{R}, {4 * H}]), "
                    f"got w_ih {tuple(p.w_ih.shape)}, w_hh {tuple(p.w_hh.shape)}"
                )
    return len(params), dirs, D, H, R


@hints(_hints.STACK)
def lstm_stack(
    params: StackParams,
    xs: jax.Array,
    initial_state: LSTMState | None = None,
    *,
    seq_lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    resets: jax.Array | None = None,
    reset_state: LSTMState | None = None,
    dropout: float = 0.0,
    recurrent_dropout: float = 0.0,
    zoneout_c: float = 0.0,
    zoneout_h: float = 0.0,
    key: jax.Array | None = None,
    deterministic: bool = False,
    time_major: bool = False,
    unroll: int | None = None,
    checkpoint_every: int | None = None,
    compute_dtype=None,
    backward: str = "fused",
    fuse_directions: bool = True,
    gate_activation: Callable = jax.nn.sigmoid,
    activation: Callable = jnp.tanh,
):
    """Runs a multi-layer, optionally bidirectional LSTM.

    Args:
      params: from ``init_lstm_stack`` (``params[layer][direction]``).
      xs: ``[..., T, D]`` (or ``[T, ..., D]`` with ``time_major``).
      initial_state: ``LSTMState(h [L*dirs, ..., R], c [L*dirs, ..., H])``; zeros if ``None``.
      seq_lengths: integer ``[...]``; the reverse direction reads each sequence's
        valid part backwards, as PyTorch's packed sequences do.
      mask, resets: boolean ``[..., T]``, applied in every layer as in
        ``jaxlstm.lstm`` (the reverse direction reads each segment backwards).
      reset_state: ``LSTMState`` shaped like ``initial_state``: what ``resets``
        restore in each layer-direction; zeros if ``None``.
      dropout: drop probability on the outputs of every layer but the last.
      recurrent_dropout: variational dropout on ``h(t-1)`` inside every
        layer-direction (``jaxlstm.lstm``), each with its own mask.
      zoneout_c, zoneout_h: zoneout of ``c`` and ``h`` inside every
        layer-direction (``jaxlstm.lstm``), each with its own masks.
      key: PRNG key, required in training when a dropout or zoneout rate is > 0.
        With ``recurrent_dropout`` or zoneout, layer-direction ``i`` (``layer *
        dirs + direction``) draws its masks from ``jax.random.split(key, L *
        dirs)[i]`` and the between-layer dropout from ``jax.random.fold_in(key,
        L * dirs)``.
      deterministic: evaluation: no dropout, zoneout by its expectation, no key needed.
      time_major, unroll, checkpoint_every, compute_dtype, backward: passed to
        every layer's ``jaxlstm.lstm``.
      gate_activation, activation: the nonlinearities, passed to every layer's ``jaxlstm.lstm``.
      fuse_directions: run the two directions of a bidirectional layer as one
        scan, ``vmap`` ped over a direction axis (batched matmuls), instead of two
        calls. Same numbers; on by default, as it paid where it was measured
        (``python -m benchmarks.stack``; ``False`` runs two calls). With ``mask``
        ``resets``, ``recurrent_dropout`` or zoneout masks the two directions
        run as two calls.

    Returns:
      ``(ys [..., T, dirs*R], LSTMState(h [L*dirs, ..., R], c [L*dirs, ..., H]))``.
    """
    L, dirs, D, H, R = check_stack(params)
    xs = _checks.as_float_array("xs", xs)
    batch_shape, T = _checks.sequence("xs", xs, D, time_major)
    # Checked here too: the fused-directions path reverses by seq_lengths before any lstm call.
    seq_lengths = _checks.seq_lengths(seq_lengths, batch_shape, T)
    dropout = _checks.rate("dropout", dropout)
    recurrent_dropout = _checks.rate("recurrent_dropout", recurrent_dropout)
    zoneout = (_checks.rate("zoneout_c", zoneout_c), _checks.rate("zoneout_h", zoneout_h))
    if _checks.static_bool("deterministic", deterministic):
        dropout = recurrent_dropout = 0.0
    # masks drawn inside each layer-direction (training only)
    inner_masks = not deterministic and (recurrent_dropout > 0.0 or zoneout != (0.0, 0.0))
    if (dropout > 0.0 or inner_masks) and key is None:
        raise ValueError(
            "dropout / recurrent_dropout / zoneout > 0 need a PRNG key in training: pass key=jax.random.key(...), "
            "or deterministic=True for evaluation"
        )
    # one key per layer-direction for the recurrent masks, one per layer for the outputs
    rec_keys = None
    if inner_masks and key is not None:
        rec_keys, key = jax.random.split(key, L * dirs), jax.random.fold_in(key, L * dirs)
    if initial_state is not None:
        _checks.lstm_state("initial_state", initial_state, (L * dirs,) + batch_shape, H, R)
    if reset_state is not None:
        _checks.lstm_state("reset_state", reset_state, (L * dirs,) + batch_shape, H, R)
    _checks.static_bool("fuse_directions", fuse_directions)
    mask = _checks.step_flags("mask", mask, batch_shape, T, time_major)
    resets = _checks.step_flags("resets", resets, batch_shape, T, time_major)
    fuse_directions = fuse_directions and mask is None and resets is None and not inner_masks
    layer_state = lambda s, i: None if s is None else LSTMState(s.h[i], s.c[i])

    def run(p, x, s0, reverse, i=None):
        return lstm(
            p,
            x,
            s0,
            seq_lengths=seq_lengths,
            mask=mask,
            resets=resets,
            reset_state=None if i is None else layer_state(reset_state, i),
            recurrent_dropout=recurrent_dropout,
            zoneout_c=zoneout[0],
            zoneout_h=zoneout[1],
            key=None if rec_keys is None or i is None else rec_keys[i],
            deterministic=deterministic,
            reverse=reverse,
            time_major=time_major,
            unroll=unroll,
            checkpoint_every=checkpoint_every,
            compute_dtype=compute_dtype,
            backward=backward,
            gate_activation=gate_activation,
            activation=activation,
        )

    hs, cs = [], []
    for l, layer in enumerate(params):
        s0 = None
        if initial_state is not None:
            s0 = LSTMState(initial_state.h[l * dirs : (l + 1) * dirs], initial_state.c[l * dirs : (l + 1) * dirs])
        if dirs == 2 and fuse_directions:
            outs, s = _both_directions(run, layer, xs, s0, seq_lengths, time_major, supports_jvp=backward == "autodiff")
        else:
            outs, states = [], []
            for d, p in enumerate(layer):
                ys, st = run(p, xs, layer_state(s0, d), d == 1, l * dirs + d)
                outs.append(ys)
                states.append(st)
            s = LSTMState(jnp.stack([st.h for st in states]), jnp.stack([st.c for st in states]))
        hs.append(s.h)
        cs.append(s.c)
        xs = outs[0] if dirs == 1 else jnp.concatenate(outs, axis=-1)
        if dropout > 0.0 and l < L - 1:
            assert key is not None
            key, sub = jax.random.split(key)
            keep = jax.random.bernoulli(sub, 1.0 - dropout, xs.shape)
            xs = jnp.where(keep, xs / jnp.asarray(1.0 - dropout, xs.dtype), jnp.zeros((), xs.dtype))
    return xs, LSTMState(jnp.concatenate(hs), jnp.concatenate(cs))


def _both_directions(run, layer, xs, s0, seq_lengths, time_major, supports_jvp):
    """Both directions in one scan: the backward direction reads the per-sequence
    reversed input forwards, and ``vmap`` stacks the two along a direction axis."""
    p2 = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), layer[0], layer[1])
    rev = lambda a: reverse_sequences(a, seq_lengths, time_major=time_major, supports_jvp=supports_jvp)
    x2 = jnp.stack([xs, rev(xs)])
    if s0 is None:
        ys2, s = jax.vmap(lambda p, x: run(p, x, None, False))(p2, x2)
    else:
        ys2, s = jax.vmap(lambda p, x, st: run(p, x, st, False))(p2, x2, s0)
    return [ys2[0], rev(ys2[1])], s


def draws_masks(module) -> bool:
    """Whether a linen/nnx ``LSTM`` draws random masks in training (a dropout or
    zoneout rate is > 0), so needs its ``'dropout'`` RNG stream and a train/eval flag."""
    return max(module.dropout, module.recurrent_dropout, module.zoneout_c, module.zoneout_h) > 0.0


def module_call(module, params: StackParams, xs, initial_state, seq_lengths, mask, resets, reset_state, key):
    """The call the linen and nnx ``LSTM`` modules share: their attributes (``dtype``,
    ``dropout``, ``recurrent_dropout``, ``zoneout_c``, ``zoneout_h``, ``time_major``,
    ``unroll``, ``checkpoint_every``, ``backward``, ``gate_activation``, ``activation``) to ``lstm_stack``.
    ``key=None`` means deterministic (evaluation)."""
    return lstm_stack(
        params,
        xs if module.dtype is None else xs.astype(module.dtype),
        initial_state,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        reset_state=reset_state,
        dropout=module.dropout,
        recurrent_dropout=module.recurrent_dropout,
        zoneout_c=module.zoneout_c,
        zoneout_h=module.zoneout_h,
        key=key,
        deterministic=key is None,
        time_major=module.time_major,
        unroll=module.unroll,
        checkpoint_every=module.checkpoint_every,
        compute_dtype=module.dtype,
        backward=module.backward,
        gate_activation=module.gate_activation,
        activation=module.activation,
    )
