"""The pure per-step VJP against jax.vjp of the step, and the fused backward pass's
corner cases: x64 check_grads, size-1 dims, unrolled scans, empty sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxlstm
from helpers import assert_trees_close, lstm_inputs
from jaxlstm._engine import Steps
from jaxlstm._fused import FusedConfig, fused_sequence
from jaxlstm._step import LSTM, lstm_step, lstm_step_vjp


@pytest.mark.parametrize("proj", [None, 2])
def test_step_vjp_matches_jax_vjp(proj):
    """Weight, input and state gradients of one step, assembled from dz as the fused
    backward pass does, equal jax.vjp of the feature-major step (in float64)."""
    with jax.enable_x64(True):
        D, H, B = 3, 4, 5
        k = jax.random.split(jax.random.key(0), 6)
        p = jaxlstm.init_lstm(k[0], D, H, proj_size=proj, dtype=jnp.float64)
        p = p._replace(b=jax.random.normal(k[1], p.b.shape, jnp.float64))
        R = proj or H
        x, h0, c0 = (jax.random.normal(kk, (n, B), jnp.float64) for kk, n in zip(k[2:5], (D, R, H), strict=True))
        dh, dc = (
            jax.random.normal(k[5], (R, B), jnp.float64),
            jnp.cos(jnp.arange(H * B, dtype=jnp.float64)).reshape(H, B),
        )

        def f(params, h, c, x):
            (h1, c1), _, _ = lstm_step(params, jnp.float64, jnp.float64, feature_major=True)((h, c), x)
            return h1, c1

        want = jax.vjp(f, p, h0, c0, x)[1]((dh, dc))
        _, _, (a, c1) = lstm_step(p, jnp.float64, jnp.float64, feature_major=True)((h0, c0), x)
        g = lstm_step_vjp(p.w_hh, p.w_hr, a, c1, c0, dh, dc, jnp.float64, jnp.float64)
        m = a[3 * H :] * jnp.tanh(c1)
        grads = jaxlstm.LSTMParams(x @ g.dz.T, h0 @ g.dz.T, g.dz.sum(1), None if proj is None else m @ dh.T)
        got = (grads, g.dh_prev, g.dc_prev, p.w_ih @ g.dz)
        assert_trees_close(got, want, rtol=1e-12)


def _loss(p, x, s, lengths, **kw):
    ys, final = jaxlstm.lstm(p, x, s, seq_lengths=lengths, **kw)
    w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
    return (w * ys).sum() + (final.h**2).sum() + jnp.sin(final.c).sum()


@pytest.mark.parametrize("kw", [{}, {"reverse": True, "checkpoint_every": 2}])
def test_check_grads_x64_tight(kw):
    """Finite differences in float64 at a tight tolerance (float32 needs ~5e-2)."""
    with jax.enable_x64(True):
        params, xs, state, lengths = lstm_inputs(23, (3,), 2, with_state=True, lengths=True, T=5)
        cast = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)
        params, xs, state = cast(params), cast(xs), cast(state)
        f = lambda p, x, s: _loss(p, x, s, lengths, **kw)
        check_grads(f, (params, xs, state), order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


@pytest.mark.parametrize(
    "batch_shape,D,H,T",
    [((1,), 1, 1, 1), ((), 2, 1, 3), ((1, 1), 1, 3, 2)],
)
def test_size_one_dims(batch_shape, D, H, T):
    k = jax.random.split(jax.random.key(1), 2)
    p = jaxlstm.init_lstm(k[0], D, H)
    xs = jax.random.normal(k[1], batch_shape + (T, D))
    s = jaxlstm.zero_state(batch_shape, H)
    got = jax.grad(_loss, argnums=(0, 1))(p, xs, s, None)
    want = jax.grad(_loss, argnums=(0, 1))(p, xs, s, None, backward="autodiff")
    assert_trees_close(got, want, rtol=1e-5)


def test_unrolled_scans_equal_plain():
    """Forward unroll (public) and backward unroll (FusedConfig) change nothing but speed."""
    params, xs, state, lengths = lstm_inputs(3, (3,), 2, with_state=True, lengths=True, T=7)
    v0, g0 = jax.value_and_grad(_loss, argnums=(0, 1, 2))(params, xs, state, lengths)
    v, g = jax.value_and_grad(_loss, argnums=(0, 1, 2))(params, xs, state, lengths, unroll=3)
    np.testing.assert_allclose(v, v0, rtol=1e-6)
    assert_trees_close(g, g0, rtol=1e-6)

    xs_tm = jnp.swapaxes(xs, 0, 1)
    carry0 = (state.h, state.c)
    f32 = np.dtype(np.float32)
    lengths = lengths.astype(jnp.int32)

    def core_loss(p, x, c, cfg):
        ys, (h, c) = fused_sequence(cfg, LSTM, p, c, x, Steps(lengths), jax.tree.map(jnp.zeros_like, c))
        return (jnp.sin(ys)).sum() + (h * c[:, :2]).sum()

    plain = jax.grad(core_loss, argnums=(0, 1, 2))(params, xs_tm, carry0, FusedConfig(f32, f32))
    unrolled = jax.grad(core_loss, argnums=(0, 1, 2))(params, xs_tm, carry0, FusedConfig(f32, f32, 2, None, 4))
    assert_trees_close(unrolled, plain, rtol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"checkpoint_every": 2}, {"reverse": True}, {"backward": "autodiff"}])
def test_empty_sequence_gradients(kw):
    """T=0: the final state is the initial state, so its gradient passes straight
    through; weights and inputs get zeros."""
    params, _, state, _ = lstm_inputs(4, (2,), with_state=True)
    xs = jnp.zeros((2, 0, 3))

    def loss(p, x, s):
        ys, final = jaxlstm.lstm(p, x, s, **kw)
        return ys.sum() + (final.h * jnp.arange(1.0, 5.0)[None]).sum() + (final.c**2).sum()

    gp, gx, gs = jax.grad(loss, argnums=(0, 1, 2))(params, xs, state)
    assert_trees_close(gp, jax.tree.map(jnp.zeros_like, params))
    assert gx.shape == xs.shape
    np.testing.assert_allclose(gs.h, jnp.broadcast_to(jnp.arange(1.0, 5.0), (2, 4)))
    np.testing.assert_allclose(gs.c, 2 * state.c, rtol=1e-6)


def test_empty_sequence_gradients_through_a_stack():
    params = jaxlstm.init_lstm_stack(jax.random.key(0), 3, 4, num_layers=2, bidirectional=True)
    g = jax.grad(lambda p: jaxlstm.lstm_stack(p, jnp.zeros((2, 0, 3)))[1].h.sum())(params)
    assert_trees_close(g, jax.tree.map(jnp.zeros_like, params))
