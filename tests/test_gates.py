"""The fused step equals the composition of the textbook per-gate functions."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import jaxlstm
from jaxlstm import gates


def test_fused_step_equals_per_gate_functions():
    k = jax.random.split(jax.random.key(0), 5)
    D, H, B = 3, 4, 2
    p = jaxlstm.init_lstm(k[0], D, H)._replace(b=jax.random.normal(k[1], (4 * H,)))
    x, h, c = jax.random.normal(k[2], (B, D)), jax.random.normal(k[3], (B, H)), jax.random.normal(k[4], (B, H))
    # The textbook gate kernel W_* acts on [h, x]: rows of w_hh, then rows of w_ih.
    W = lambda j: jnp.concatenate([p.w_hh[:, j * H : (j + 1) * H], p.w_ih[:, j * H : (j + 1) * H]], axis=0)
    bb = lambda j: p.b[j * H : (j + 1) * H]
    i = gates.input_gate(W(0), bb(0), h, x)
    f = gates.forget_gate(W(1), bb(1), h, x)
    g = gates.candidate(W(2), bb(2), h, x)
    o = gates.output_gate(W(3), bb(3), h, x)
    c_new = gates.cell_update(f, c, i, g)
    h_new = gates.hidden_output(o, c_new)

    z = x @ p.w_ih + h @ p.w_hh + p.b[None]
    m, c_fused, gs = gates.lstm_pointwise(z, c)
    np.testing.assert_allclose(m, h_new, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c_fused, c_new, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(tuple(gates.split_gates(gs)), (i, f, g, o), rtol=1e-6, atol=1e-6)
    # and lstm_cell is the same step
    state, y = jaxlstm.lstm_cell(p, jaxlstm.LSTMState(h, c), x)
    np.testing.assert_allclose(y, h_new, rtol=1e-6, atol=1e-6)


def test_activation_and_its_derivative():
    z = jnp.linspace(-6.0, 6.0, 4 * 5).reshape(1, 20)
    a = gates.activate_gates(z)
    zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
    expected = jnp.concatenate([jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)], axis=-1)
    np.testing.assert_allclose(a, expected, atol=1e-6)
    _, tangent = jax.jvp(gates.activate_gates, (z,), (jnp.ones_like(z),))
    np.testing.assert_allclose(gates.activation_derivative(a), tangent, atol=1e-6)


def test_feature_major_step_is_the_transposed_step():
    """The scans' feature-major step (gate axis -2) is the batch-major step transposed."""
    from jaxlstm._step import lstm_step

    k = jax.random.split(jax.random.key(1), 5)
    D, H, P, B = 3, 4, 2, 5
    for p in (jaxlstm.init_lstm(k[0], D, H), jaxlstm.init_lstm(k[0], D, H, proj_size=P)):
        p = p._replace(b=jax.random.normal(k[1], (4 * H,)))
        R = p.w_hh.shape[0]
        x, h, c = jax.random.normal(k[2], (B, D)), jax.random.normal(k[3], (B, R)), jax.random.normal(k[4], (B, H))
        want = lstm_step(p, jnp.float32, jnp.float32)((h, c), x)
        got = lstm_step(p, jnp.float32, jnp.float32, feature_major=True)((h.T, c.T), x.T)
        chex.assert_trees_all_close(jax.tree.map(jnp.transpose, got), want, rtol=1e-6, atol=1e-6)
    z = jax.random.normal(k[0], (4 * H, B))
    np.testing.assert_allclose(gates.activate_gates(z, axis=-2).T, gates.activate_gates(z.T), atol=1e-7)
    a = gates.activate_gates(z, axis=0)
    np.testing.assert_allclose(gates.activation_derivative(a, axis=0).T, gates.activation_derivative(a.T), atol=1e-7)


def test_init_lstm_conventions():
    p = jaxlstm.init_lstm(jax.random.key(0), 5, 6, forget_bias=1.0)
    assert p.w_ih.shape == (5, 24) and p.w_hh.shape == (6, 24) and p.b.shape == (24,) and p.w_hr is None
    np.testing.assert_array_equal(p.b[6:12], 1.0)
    np.testing.assert_array_equal(p.b[:6], 0.0)
    # Each recurrent gate block is orthogonal.
    for j in range(4):
        blk = np.asarray(p.w_hh[:, j * 6 : (j + 1) * 6])
        np.testing.assert_allclose(blk.T @ blk, np.eye(6), atol=1e-5)
    q = jaxlstm.init_lstm(jax.random.key(0), 5, 6, proj_size=2, dtype=jnp.bfloat16)
    assert q.w_hh.shape == (2, 24) and q.w_hr.shape == (6, 2) and q.w_ih.dtype == jnp.bfloat16
    s = jaxlstm.zero_state((3, 2), 6, proj_size=2)
    assert s.h.shape == (3, 2, 2) and s.c.shape == (3, 2, 6)
