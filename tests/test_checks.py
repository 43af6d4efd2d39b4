"""Every bad input gets a clear error at trace time, naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm

D, H = 3, 4


@pytest.fixture
def params():
    return jaxlstm.init_lstm(jax.random.key(0), D, H)


@pytest.fixture
def xs():
    return jnp.ones((2, 5, D))


def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)
    # ... and the same error at trace time under jit.
    with pytest.raises(exc, match=match):
        jax.jit(lambda: fn(*args, **kw))()


def test_wrong_rank(params):
    _raises(ValueError, r"xs must have rank >= 2.*got shape \(3,\)", jaxlstm.lstm, params, jnp.ones((D,)))


def test_wrong_feature_size(params):
    _raises(ValueError, r"xs must have 3 features.*got shape \(2, 5, 7\)", jaxlstm.lstm, params, jnp.ones((2, 5, 7)))


def test_non_float_inputs(params):
    _raises(TypeError, r"xs must have a floating dtype.*int32", jaxlstm.lstm, params, jnp.ones((2, 5, D), jnp.int32))


def test_mismatched_initial_state(params, xs):
    bad_h = jaxlstm.LSTMState(jnp.zeros((2, H + 1)), jnp.zeros((2, H)))
    _raises(ValueError, r"initial_state.h must have shape \(2, 4\), got \(2, 5\)", jaxlstm.lstm, params, xs, bad_h)
    bad_c = jaxlstm.LSTMState(jnp.zeros((2, H)), jnp.zeros((3, H)))
    _raises(ValueError, r"initial_state.c must have shape \(2, 4\), got \(3, 4\)", jaxlstm.lstm, params, xs, bad_c)
    _raises(TypeError, r"initial_state must be an LSTMState", jaxlstm.lstm, params, xs, jnp.zeros((2, H)))


def test_seq_lengths_wrong_shape(params, xs):
    _raises(
        ValueError,
        r"seq_lengths must have shape \(2,\).*got \(3,\)",
        jaxlstm.lstm,
        params,
        xs,
        seq_lengths=jnp.array([1, 2, 3]),
    )


def test_seq_lengths_wrong_dtype(params, xs):
    _raises(
        TypeError,
        r"seq_lengths must have an integer dtype, got float32",
        jaxlstm.lstm,
        params,
        xs,
        seq_lengths=jnp.array([1.0, 2.0]),
    )


def test_seq_lengths_out_of_range_when_concrete(params, xs):
    with pytest.raises(ValueError, match=r"seq_lengths must lie in \[0, 5\].*\[1, 6\]"):
        jaxlstm.lstm(params, xs, seq_lengths=np.array([1, 6]))
    with pytest.raises(ValueError, match=r"seq_lengths must lie in \[0, 5\].*\[-1, 2\]"):
        jaxlstm.lstm(params, xs, seq_lengths=jnp.array([-1, 2]))


def test_params_disagree(params, xs):
    _raises(ValueError, r"params.w_hh must have 16 columns", jaxlstm.lstm, params._replace(w_hh=jnp.ones((H, 8))), xs)
    _raises(
        ValueError, r"params.b must have shape \(16,\), got \(8,\)", jaxlstm.lstm, params._replace(b=jnp.ones(8)), xs
    )
    _raises(ValueError, r"params.w_hh must have 4 rows", jaxlstm.lstm, params._replace(w_hh=jnp.ones((3, 16))), xs)
    _raises(
        ValueError,
        r"params.w_ih must have a multiple of 4 columns",
        jaxlstm.lstm,
        params._replace(w_ih=jnp.ones((D, 10))),
        xs,
    )
    proj = jaxlstm.init_lstm(jax.random.key(1), D, H, proj_size=2)
    _raises(ValueError, r"params.w_hr must have 2 columns", jaxlstm.lstm, proj._replace(w_hr=jnp.ones((H, 3))), xs)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_non_positive_hidden_size(bad):
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int"):
        jaxlstm.init_lstm(jax.random.key(0), D, bad)
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int"):
        jaxlstm.zero_state((2,), bad)


def test_other_options(params, xs):
    with pytest.raises(ValueError, match=r"proj_size must be smaller than hidden_size=4"):
        jaxlstm.init_lstm(jax.random.key(0), D, H, proj_size=4)
    with pytest.raises(ValueError, match=r"backward must be one of \('fused', 'autodiff'\)"):
        jaxlstm.lstm(params, xs, backward="xla")
    with pytest.raises(ValueError, match=r"checkpoint_every must be a positive int"):
        jaxlstm.lstm(params, xs, checkpoint_every=0)
    with pytest.raises(ValueError, match=r"unroll must be a positive int"):
        jaxlstm.lstm(params, xs, unroll=0)


def test_cell_checks(params):
    state = jaxlstm.zero_state((2,), H)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 3\]"):
        jaxlstm.lstm_cell(params, state, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"state.h must have shape \(3, 4\)"):
        jaxlstm.lstm_cell(params, state, jnp.ones((3, D)))
