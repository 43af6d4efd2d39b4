"""``jaxlstm.step``, the streaming step: the cell's numbers (checked against the NumPy loop through the
sequence call), the native one-step call where it applies, a stream of steps equal to the whole
sequence, stacks, gradients, and the errors of what cannot stream."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from helpers import assert_trees_close, reference_outputs
from jaxlstm import _native

B, T, D, H = 3, 9, 5, 7
INIT = {"lstm": jaxlstm.init_lstm, "gru": jaxlstm.init_gru, "rnn": jaxlstm.init_rnn}
SEQ = {"lstm": jaxlstm.lstm, "gru": jaxlstm.gru, "rnn": jaxlstm.rnn}
CELL = {"lstm": jaxlstm.lstm_cell, "gru": jaxlstm.gru_cell, "rnn": jaxlstm.rnn_cell}


def _zero(kind, lead):
    return jaxlstm.zero_state(lead, H) if kind == "lstm" else jnp.zeros(lead + (H,))


def _stream(kind, params, xs, state):
    step = jax.jit(jaxlstm.step)
    ys = []
    for t in range(xs.shape[-2]):
        state, y = step(params, state, xs[..., t, :])
        ys.append(y)
    return jnp.stack(ys, axis=-2), state


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_a_stream_of_steps_is_the_sequence_call(kind):
    params = INIT[kind](jax.random.key(0), D, H)
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    ys, final = _stream(kind, params, xs, _zero(kind, (B,)))
    want_ys, want_final = SEQ[kind](params, xs)
    np.testing.assert_allclose(ys, want_ys, atol=2e-5)
    assert_trees_close(final, want_final, rtol=2e-5)
    # in chunks, carrying the state: the sequence call on the halves, then steps
    mid = T // 2
    _, s = SEQ[kind](params, xs[:, :mid])
    ys2, _ = _stream(kind, params, xs[:, mid:], s)
    np.testing.assert_allclose(ys2, want_ys[:, mid:], atol=2e-5)


def test_the_lstm_step_against_the_numpy_loop():
    params = jaxlstm.init_lstm(jax.random.key(2), D, H)
    xs = jax.random.normal(jax.random.key(3), (B, T, D))
    ys, (h, c) = _stream("lstm", params, xs, jaxlstm.zero_state(B, H))
    ref_ys, ref_h, ref_c = reference_outputs(params, xs, None, None, False)
    np.testing.assert_allclose(ys, ref_ys, atol=2e-5)
    np.testing.assert_allclose(h, ref_h, atol=2e-5)
    np.testing.assert_allclose(c, ref_c, atol=2e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("rows,hidden", [(1, 40), (5, 40), (2, 64)])
def test_the_native_step_at_its_gemm_edges(kind, rows, hidden):
    """One row (the row-streaming loop) and several (the register tile on the weights in place, then
    the columns past the last whole tile): the cell's numbers."""
    params = INIT[kind](jax.random.key(1), D, hidden)
    state = jax.tree.map(
        lambda a: a + 0.2, jaxlstm.zero_state(rows, hidden) if kind == "lstm" else jnp.zeros((rows, hidden))
    )
    x = jax.random.normal(jax.random.key(2), (rows, D))
    assert_trees_close(jax.jit(jaxlstm.step)(params, state, x), CELL[kind](params, state, x), rtol=2e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_the_step_runs_native_where_it_applies(kind):
    if not _native.available():
        pytest.skip(str(_native.load_error()))
    params = INIT[kind](jax.random.key(0), D, H)
    state, x = _zero(kind, (B,)), jnp.ones((B, D))
    jaxpr = str(jax.make_jaxpr(jaxlstm.step)(params, state, x))
    assert "jaxlstm_" in jaxpr  # the FFI call
    # and what the native code cannot run stays on the cell: a projection
    if kind == "lstm":
        proj = jaxlstm.init_lstm(jax.random.key(0), D, H, proj_size=3)
        s = jaxlstm.zero_state(B, H, proj_size=3)
        assert "jaxlstm_" not in str(jax.make_jaxpr(jaxlstm.step)(proj, s, x))
        assert_trees_close(jaxlstm.step(proj, s, x), jaxlstm.lstm_cell(proj, s, x), rtol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("lead", [(), (2, 3)])
def test_batch_shapes_and_gradients_match_the_cell(kind, lead):
    params = INIT[kind](jax.random.key(4), D, H)
    state = jax.tree.map(lambda a: a + 0.1, _zero(kind, lead))
    x = jax.random.normal(jax.random.key(5), lead + (D,))
    assert_trees_close(jaxlstm.step(params, state, x), CELL[kind](params, state, x), rtol=2e-6)
    loss = lambda f: lambda p, s, x: jnp.sum(f(p, s, x)[1] ** 2)
    got = jax.grad(loss(jaxlstm.step), argnums=(0, 1, 2))(params, state, x)
    want = jax.grad(loss(CELL[kind]), argnums=(0, 1, 2))(params, state, x)
    assert_trees_close(got, want, rtol=2e-5)


def test_bfloat16_operands():
    params = jaxlstm.init_lstm(jax.random.key(6), D, H)
    state, x = jaxlstm.zero_state(B, H), jax.random.normal(jax.random.key(7), (B, D))
    got = jaxlstm.step(params, state, x, compute_dtype=jnp.bfloat16)
    want = jaxlstm.lstm_cell(params, state, x, compute_dtype=jnp.bfloat16)
    assert_trees_close(got, want, rtol=2e-2)


def test_a_stack_streams_layer_by_layer():
    params = jaxlstm.init_lstm_stack(jax.random.key(8), D, H, num_layers=2)
    xs = jax.random.normal(jax.random.key(9), (B, T, D))
    want_ys, want_state = jaxlstm.lstm_stack(params, xs)
    state = jaxlstm.LSTMState(jnp.zeros((2, B, H)), jnp.zeros((2, B, H)))
    ys = []
    for t in range(T):
        state, y = jaxlstm.step(params, state, xs[:, t])
        ys.append(y)
    np.testing.assert_allclose(jnp.stack(ys, 1), want_ys, atol=2e-5)
    assert_trees_close(state, want_state, rtol=2e-5)


def test_what_cannot_stream_says_why():
    bi = jaxlstm.init_lstm_stack(jax.random.key(0), D, H, num_layers=1, bidirectional=True)
    state = jaxlstm.LSTMState(jnp.zeros((2, B, H)), jnp.zeros((2, B, H)))
    with pytest.raises(ValueError, match="bidirectional"):
        jaxlstm.step(bi, state, jnp.ones((B, D)))
    uni = jaxlstm.init_lstm_stack(jax.random.key(0), D, H, num_layers=2)
    with pytest.raises(ValueError, match="state.h must hold the stack's 2 layers first"):
        jaxlstm.step(uni, jaxlstm.zero_state(B, H), jnp.ones((B, D)))
    with pytest.raises(ValueError, match="state.c must hold the stack's 2 layers first"):
        jaxlstm.step(uni, jaxlstm.LSTMState(jnp.zeros((2, B, H)), jnp.zeros((1, B, H))), jnp.ones((B, D)))
    with pytest.raises(TypeError, match="LSTMState"):
        jaxlstm.step(uni, (jnp.zeros((2, B, H)),), jnp.ones((B, D)))
    with pytest.raises(ValueError, match="input size"):
        jaxlstm.step(jaxlstm.init_gru(jax.random.key(0), D, H), jnp.zeros((B, H)), jnp.ones((B, D + 1)))
