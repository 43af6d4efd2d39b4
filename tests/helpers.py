"""Test helpers shared by the test modules: inputs and tree comparisons."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxlstm
from reference import as_dict, lstm_ref

D, H, T = 3, 4, 6


def lstm_inputs(seed, batch_shape, proj=None, with_state=False, lengths=False, T=T):
    k = jax.random.split(jax.random.key(seed), 5)
    params = jaxlstm.init_lstm(k[0], D, H, proj_size=proj)
    # Non-trivial biases so that a wrong gate order changes the numbers.
    params = params._replace(b=jax.random.normal(k[1], params.b.shape))
    xs = jax.random.normal(k[2], batch_shape + (T, D))
    R = proj or H
    state = None
    if with_state:
        state = jaxlstm.LSTMState(
            jax.random.normal(k[3], batch_shape + (R,)), jax.random.normal(k[4], batch_shape + (H,))
        )
    seq_lengths = None
    if lengths:
        B = int(np.prod(batch_shape))
        seq_lengths = jnp.asarray((np.arange(B) * 5 + T) % (T + 1), jnp.int32).reshape(batch_shape)  # includes 0 and T
    return params, xs, state, seq_lengths


def random_step_flags(seed, B, T) -> dict:
    """``seq_lengths``, a ``mask`` with holes and ``resets`` for ``[B, T]`` batch-major inputs."""
    rng = np.random.RandomState(seed)
    return dict(
        seq_lengths=jnp.asarray(rng.randint(0, T + 1, B), jnp.int32),
        mask=jnp.asarray(rng.rand(B, T) > 0.25),
        resets=jnp.asarray(rng.rand(B, T) > 0.7),
    )


def assert_trees_close(got, want, rtol=1e-5, floor=1e-3):
    """Same tree structure (``None`` leaves included), and every leaf within
    ``rtol`` of the largest magnitude of its reference leaf (at least ``floor``)."""
    chex.assert_trees_all_equal_structs(got, want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (jax.tree_util.keystr(path), a.shape, b.shape)
        scale = max(np.abs(b).max(initial=0.0), floor)
        err = np.abs(a - b).max(initial=0.0)
        assert err <= rtol * scale, (jax.tree_util.keystr(path), err, scale)


def reference_outputs(params, xs, state, seq_lengths, reverse):
    """The NumPy reference loop on ``lstm_inputs``-style arguments: ``(ys, h, c)``."""
    batch_shape = xs.shape[:-2]
    B = int(np.prod(batch_shape))
    R, Hh = params.w_hh.shape[0], params.w_ih.shape[1] // 4
    x = np.asarray(xs, np.float64).reshape((B,) + xs.shape[-2:])
    h0 = np.zeros((B, R)) if state is None else np.asarray(state.h, np.float64).reshape(B, R)
    c0 = np.zeros((B, Hh)) if state is None else np.asarray(state.c, np.float64).reshape(B, Hh)
    L = None if seq_lengths is None else np.asarray(seq_lengths).reshape(B)
    ys, h, c = lstm_ref(np, as_dict(params), x, h0, c0, L, reverse)
    return ys.reshape(xs.shape[:-1] + (R,)), h.reshape(batch_shape + (R,)), c.reshape(batch_shape + (Hh,))


def cell_case(init, kind, i, B, D, H, T):
    """A cell's case ``i`` (tests/test_native_levels.py, tests/test_bf16.py): params with a random
    bias (the GRU's b_hn a ramp), inputs ``[B, T, D]``, a random start state, random step flags,
    and the call's layout: batch-major, reversed (``i == 1``), time-major (``i == 2``: inputs and
    flags transposed). Returns ``params, xs, x, state, flags, options`` (``xs`` batch-major, ``x``
    as called)."""
    k = jax.random.split(jax.random.key(i), 4)
    params = init(k[0], D, H)
    params = params._replace(b=jax.random.normal(k[1], params.b.shape) * 0.5)
    if kind == "gru":
        params = params._replace(b_hn=jnp.linspace(-0.5, 0.5, H))
    xs = jax.random.normal(k[2], (B, T, D))
    h0 = jax.random.normal(k[3], (B, H)) * 0.5
    state = jaxlstm.LSTMState(h0, -h0) if kind == "lstm" else h0
    flags = random_step_flags(i, B, T)  # [B, T]
    x, options = xs, dict(flags, reverse=i == 1)
    if i == 2:  # time-major: [T, B, ...] inputs and flags
        x, options = jnp.swapaxes(xs, 0, 1), dict(options, time_major=True)
        options.update((key, v.T) for key, v in flags.items() if v.ndim == 2)
    return params, xs, x, state, flags, options
