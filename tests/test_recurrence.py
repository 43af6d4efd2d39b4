"""lstm / lstm_cell against the NumPy reference, plus transformations and invariances."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlstm
from helpers import H, T
from helpers import lstm_inputs as _inputs
from helpers import reference_outputs as _reference


def _assert_close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("proj,lengths,reverse", list(itertools.product([None, 2], [False, True], [False, True])))
def test_matches_reference(proj, lengths, reverse):
    params, xs, state, seq_lengths = _inputs(0, (5,), proj, with_state=True, lengths=lengths)
    ys, final = jaxlstm.lstm(params, xs, state, seq_lengths=seq_lengths, reverse=reverse)
    ys_ref, h_ref, c_ref = _reference(params, xs, state, seq_lengths, reverse)
    _assert_close(ys, ys_ref)
    _assert_close(final.h, h_ref)
    _assert_close(final.c, c_ref)


@pytest.mark.parametrize("batch_shape,time_major", [((), False), ((2, 3), False), ((2, 3), True), ((4,), True)])
def test_layouts_match_reference(batch_shape, time_major):
    params, xs, state, seq_lengths = _inputs(1, batch_shape, with_state=True, lengths=bool(batch_shape))
    x_in = jnp.moveaxis(xs, -2, 0) if time_major else xs
    ys, final = jaxlstm.lstm(params, x_in, state, seq_lengths=seq_lengths, time_major=time_major, reverse=True)
    if time_major:
        ys = jnp.moveaxis(ys, 0, -2)
    ys_ref, h_ref, c_ref = _reference(params, xs, state, seq_lengths, True)
    assert ys.shape == xs.shape[:-1] + (H,)
    _assert_close(ys, ys_ref)
    _assert_close(final.h, h_ref)
    _assert_close(final.c, c_ref)


def test_gate_order_matters():
    """Swapping two gate blocks must change the output: the reference pins i, f, g, o."""
    params, xs, _, _ = _inputs(2, (2,))
    perm = np.r_[H : 2 * H, 0:H, 2 * H : 4 * H]  # swap i and f
    swapped = params._replace(w_ih=params.w_ih[:, perm], w_hh=params.w_hh[:, perm], b=params.b[perm])
    ys_ref, _, _ = _reference(params, xs, None, None, False)
    ys_bad, _ = jaxlstm.lstm(swapped, xs)
    assert np.abs(np.asarray(ys_bad) - ys_ref).max() > 1e-2


def test_cell_matches_one_step_of_lstm():
    params, xs, state, _ = _inputs(3, (2,), proj=2, with_state=True)
    new_state, h = jaxlstm.lstm_cell(params, state, xs[:, 0])
    ys, final = jaxlstm.lstm(params, xs[:, :1], state)
    _assert_close(h, ys[:, 0], 1e-6)
    _assert_close(new_state.c, final.c, 1e-6)
    # Streaming: a Python loop of cells equals the whole sequence.
    s = state
    for t in range(T):
        s, h = jaxlstm.lstm_cell(params, s, xs[:, t])
    ys, final = jaxlstm.lstm(params, xs, state)
    _assert_close(s.h, final.h, 1e-5)
    _assert_close(s.c, final.c, 1e-5)


@pytest.mark.parametrize("backward", ["fused", "autodiff"])
def test_chunks_equal_whole(backward):
    params, xs, state, _ = _inputs(4, (3,), with_state=True, T=8)
    ys, final = jaxlstm.lstm(params, xs, state, backward=backward)
    ys1, s1 = jaxlstm.lstm(params, xs[:, :3], state, backward=backward)
    ys2, s2 = jaxlstm.lstm(params, xs[:, 3:], s1, backward=backward)
    _assert_close(jnp.concatenate([ys1, ys2], axis=1), ys, 1e-6)
    _assert_close(s2.h, final.h, 1e-6)
    _assert_close(s2.c, final.c, 1e-6)


def test_zero_length_sequences():
    params, xs, state, _ = _inputs(5, (2,), with_state=True)
    ys, final = jaxlstm.lstm(params, xs, state, seq_lengths=jnp.zeros((2,), jnp.int32))
    assert not np.any(np.asarray(ys))
    _assert_close(final.h, state.h, 0)
    _assert_close(final.c, state.c, 0)
    # An empty time axis is valid too.
    ys, final = jaxlstm.lstm(params, xs[:, :0], state)
    assert ys.shape == (2, 0, H)
    _assert_close(final.h, state.h, 0)


def test_jit_vmap_and_no_recompile():
    params, xs, state, seq_lengths = _inputs(6, (4,), with_state=True, lengths=True)
    traces = []

    @jax.jit
    def f(params, xs, state, seq_lengths):
        traces.append(1)
        return jaxlstm.lstm(params, xs, state, seq_lengths=seq_lengths)

    ys, final = f(params, xs, state, seq_lengths)
    ys_eager, final_eager = jaxlstm.lstm(params, xs, state, seq_lengths=seq_lengths)
    _assert_close(ys, ys_eager, 1e-6)
    _assert_close(final.c, final_eager.c, 1e-6)
    f(jax.tree.map(lambda a: a * 0.5, params), xs + 1.0, state, seq_lengths[::-1])
    assert len(traces) == 1

    # vmap over a batch axis equals the batched call.
    ys_v, final_v = jax.vmap(lambda x, s, l: jaxlstm.lstm(params, x, s, seq_lengths=l))(xs, state, seq_lengths)
    _assert_close(ys_v, ys, 1e-6)
    _assert_close(final_v.h, final.h, 1e-6)


def test_traced_lengths_are_clipped_under_jit():
    params, xs, _, _ = _inputs(7, (2,))
    f = jax.jit(lambda l: jaxlstm.lstm(params, xs, seq_lengths=l)[0])
    _assert_close(f(jnp.array([T + 5, -1], jnp.int32)), f(jnp.array([T, 0], jnp.int32)), 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_preserved(dtype):
    params, xs, state, _ = _inputs(8, (2,), with_state=True)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    xs = xs.astype(dtype)
    state = jaxlstm.LSTMState(state.h.astype(dtype), state.c.astype(dtype))
    ys, final = jaxlstm.lstm(params, xs, state)
    assert ys.dtype == dtype and final.h.dtype == dtype
    assert final.c.dtype == jnp.float32  # the cell state is accumulated in float32
    ys_ref, _, _ = _reference(params, xs, state, None, False)
    _assert_close(ys, ys_ref, 2e-5 if dtype == jnp.float32 else 5e-2)


def test_compute_dtype_bfloat16_is_close_and_keeps_float32():
    params, xs, _, _ = _inputs(9, (2,))
    ys, final = jaxlstm.lstm(params, xs, compute_dtype=jnp.bfloat16)
    assert ys.dtype == jnp.float32
    ys_ref, _, _ = _reference(params, xs, None, None, False)
    _assert_close(ys, ys_ref, 3e-2)


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 3),
    T_=st.integers(0, 5),
    proj=st.sampled_from([None, 2]),
    reverse=st.booleans(),
    data=st.data(),
)
def test_property_random_shapes(B, T_, proj, reverse, data):
    lengths = data.draw(st.lists(st.integers(0, T_), min_size=B, max_size=B))
    params, xs, state, _ = _inputs(10, (B,), proj, with_state=True, T=T_)
    seq_lengths = jnp.asarray(lengths, jnp.int32)
    ys, final = jaxlstm.lstm(params, xs, state, seq_lengths=seq_lengths, reverse=reverse)
    ys_ref, h_ref, c_ref = _reference(params, xs, state, seq_lengths, reverse)
    _assert_close(ys, ys_ref)
    _assert_close(final.h, h_ref)
    _assert_close(final.c, c_ref)
