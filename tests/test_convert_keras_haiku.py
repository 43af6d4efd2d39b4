"""Keras 3 and Haiku weights, both directions, against the real libraries (skipped cleanly without them):
the same inputs through the peer's layer and through jaxlstm give the same outputs and final states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from jaxlstm import convert

B, T, D, H = 3, 6, 4, 5
# Keras' Variable.__array__ predates NumPy 2's copy keyword (Keras' own warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(autouse=True)
def _peer_promotion():
    """Keras and Haiku are not strict-promotion clean (this suite's default): JAX's defaults here."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def _keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on {keras.backend.backend()} here, these tests need KERAS_BACKEND=jax")
    return keras


def _randomize(layer, seed):
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])


@pytest.mark.parametrize("use_bias", [True, False])
def test_keras_lstm_both_ways(use_bias):
    keras = _keras()
    xs = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
    layer = keras.layers.LSTM(H, return_sequences=True, return_state=True, use_bias=use_bias)
    layer(xs)
    _randomize(layer, 1)
    ys_k, h_k, c_k = (np.asarray(a) for a in layer(xs))
    params = convert.from_keras(layer)
    assert (params.b is None) == (not use_bias)
    ys, state = jaxlstm.lstm(params, jnp.asarray(xs))
    np.testing.assert_allclose(ys, ys_k, atol=2e-5)
    np.testing.assert_allclose(state.h, h_k, atol=2e-5)
    np.testing.assert_allclose(state.c, c_k, atol=2e-5)
    # back: a fresh Keras layer with jaxlstm's weights computes jaxlstm's outputs
    params2 = jaxlstm.init_lstm(jax.random.key(3), D, H, bias=use_bias)
    fresh = keras.layers.LSTM(H, return_sequences=True, use_bias=use_bias)
    fresh(xs)
    fresh.set_weights(convert.to_keras(params2))
    np.testing.assert_allclose(np.asarray(fresh(xs)), jaxlstm.lstm(params2, jnp.asarray(xs))[0], atol=2e-5)


def test_keras_gru_both_ways():
    keras = _keras()
    xs = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
    layer = keras.layers.GRU(H, return_sequences=True, return_state=True)  # reset_after=True
    layer(xs)
    _randomize(layer, 2)
    ys_k, h_k = (np.asarray(a) for a in layer(xs))
    params = convert.from_keras(layer.get_weights())  # the bare list converts too
    assert isinstance(params, jaxlstm.GRUParams)
    ys, h = jaxlstm.gru(params, jnp.asarray(xs))
    np.testing.assert_allclose(ys, ys_k, atol=2e-5)
    np.testing.assert_allclose(h, h_k, atol=2e-5)
    p2 = jaxlstm.init_gru(jax.random.key(4), D, H)
    p2 = p2._replace(b=jnp.linspace(-1, 1, 3 * H), b_hn=jnp.linspace(0.5, -0.5, H))  # biases that matter
    fresh = keras.layers.GRU(H, return_sequences=True)
    fresh(xs)
    fresh.set_weights(convert.to_keras(p2))
    np.testing.assert_allclose(np.asarray(fresh(xs)), jaxlstm.gru(p2, jnp.asarray(xs))[0], atol=2e-5)
    assert jax.tree.all(jax.tree.map(np.allclose, convert.from_keras(convert.to_keras(p2)), p2))


def test_keras_what_does_not_convert_says_why():
    _keras()
    with pytest.raises(ValueError, match=rf"GRU bias must have shape \(2, {3 * H}\)"):
        convert.from_keras([np.zeros((D, 3 * H)), np.zeros((H, 3 * H)), np.zeros((3, 3 * H))])
    with pytest.raises(ValueError, match="no projection"):
        convert.to_keras(jaxlstm.init_lstm(jax.random.key(0), D, H, proj_size=2))
    with pytest.raises(TypeError, match="keras.layers.LSTM"):
        convert.from_keras("lstm")
    with pytest.raises(ValueError, match=rf"LSTM bias must have shape \({4 * H},\)"):
        convert.from_keras([np.zeros((D, 4 * H)), np.zeros((H, 4 * H)), np.zeros(3 * H)])


def _haiku_run(core_name, xs, params=None, name=None):
    """``hk.dynamic_unroll`` of ``hk.LSTM`` / ``hk.GRU`` (``core_name``) over batch-major ``xs``: ``(params,
    (outputs, final state))``, with random params where none are given (nonzero biases too)."""
    hk = pytest.importorskip("haiku")

    def f(x):
        core = getattr(hk, core_name)(H, name=name)
        return hk.dynamic_unroll(core, x, core.initial_state(x.shape[0]), time_major=False)

    t = hk.transform(f)
    if params is None:
        leaves, tree = jax.tree.flatten(t.init(jax.random.key(8), xs))
        keys = jax.random.split(jax.random.key(9), len(leaves))
        params = jax.tree.unflatten(
            tree, [a + 0.4 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves, strict=True)]
        )
    return params, t.apply(params, None, xs)


def test_haiku_lstm_both_ways():
    xs = jax.random.normal(jax.random.key(0), (B, T, D))
    hparams, (ys_h, state_h) = _haiku_run("LSTM", xs)
    params = convert.from_haiku(hparams)
    ys, state = jaxlstm.lstm(params, xs)
    np.testing.assert_allclose(ys, ys_h, atol=2e-5)
    np.testing.assert_allclose(state.h, state_h.hidden, atol=2e-5)
    np.testing.assert_allclose(state.c, state_h.cell, atol=2e-5)
    # back, into a module named otherwise
    p2 = jaxlstm.init_lstm(jax.random.key(6), D, H)
    _, (ys2, _) = _haiku_run("LSTM", xs, convert.to_haiku(p2, name="enc/linear"), name="enc")
    np.testing.assert_allclose(ys2, jaxlstm.lstm(p2, xs)[0], atol=2e-5)
    assert jax.tree.all(jax.tree.map(np.allclose, convert.from_haiku(convert.to_haiku(p2)), p2))


def test_keras_gru_reset_before_both_ways():
    """reset_after=False: the reset gate before the recurrent matmul; jaxlstm.gru(..., reset_after=False)."""
    keras = _keras()
    xs = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
    layer = keras.layers.GRU(H, return_sequences=True, return_state=True, reset_after=False)
    layer(xs)
    _randomize(layer, 7)
    ys_k, h_k = (np.asarray(a) for a in layer(xs))
    params = convert.from_keras(layer)
    kwargs = convert.keras_kwargs(layer)
    assert kwargs["reset_after"] is False
    ys, h = jaxlstm.gru(params, jnp.asarray(xs), **kwargs)
    np.testing.assert_allclose(ys, ys_k, atol=2e-5)
    np.testing.assert_allclose(h, h_k, atol=2e-5)
    assert not np.allclose(jaxlstm.gru(params, jnp.asarray(xs))[0], ys_k, atol=1e-3)  # the other form differs
    p2 = jaxlstm.init_gru(jax.random.key(4), D, H)
    p2 = p2._replace(b=jnp.linspace(-1, 1, 3 * H), b_hn=jnp.linspace(0.5, -0.5, H))
    fresh = keras.layers.GRU(H, return_sequences=True, reset_after=False)
    fresh(xs)
    fresh.set_weights(convert.to_keras(p2, reset_after=False))
    np.testing.assert_allclose(np.asarray(fresh(xs)), jaxlstm.gru(p2, jnp.asarray(xs), reset_after=False)[0], atol=2e-5)


def test_haiku_gru_both_ways():
    """hk.GRU: reset-before, with the update gate the other way round (h = (1 - z) h + z a)."""
    xs = jax.random.normal(jax.random.key(0), (B, T, D))
    hparams, (ys_h, h_h) = _haiku_run("GRU", xs)
    params = convert.from_haiku(hparams)
    assert isinstance(params, jaxlstm.GRUParams)
    ys, h = jaxlstm.gru(params, xs, reset_after=False)
    np.testing.assert_allclose(ys, ys_h, atol=2e-5)
    np.testing.assert_allclose(h, h_h, atol=2e-5)
    p2 = jaxlstm.init_gru(jax.random.key(6), D, H)
    p2 = p2._replace(b=jnp.linspace(-1, 1, 3 * H), b_hn=jnp.linspace(0.5, -0.5, H))
    _, (ys2, _) = _haiku_run("GRU", xs, convert.to_haiku(p2, name="enc"), name="enc")
    np.testing.assert_allclose(ys2, jaxlstm.gru(p2, xs, reset_after=False)[0], atol=2e-5)
    back = convert.from_haiku(convert.to_haiku(p2))
    np.testing.assert_allclose(jaxlstm.gru(back, xs, reset_after=False)[0], ys2, atol=2e-5)


def test_haiku_what_does_not_convert_says_why():
    with pytest.raises(ValueError, match=r"hk.GRU's params must be w_i \[D, 3H\]"):
        convert.from_haiku({"gru": {"w_i": np.zeros((D, 3 * H)), "w_h": np.zeros((H, 2 * H)), "b": np.zeros(3 * H)}})
    with pytest.raises(ValueError, match=r"w \[D \+ H, 4H\]"):
        convert.from_haiku({"lstm/linear": {"w": np.zeros(4 * H), "b": np.zeros(4 * H)}})
    with pytest.raises(ValueError, match="pass name="):
        convert.from_haiku({"a/lstm/linear": {"w": 0, "b": 0}, "b/lstm/linear": {"w": 0, "b": 0}})


def test_to_keras_reset_after_must_be_a_bool():
    params = jaxlstm.init_gru(jax.random.key(0), 3, 4)
    with pytest.raises(TypeError, match=r"reset_after must be a bool, got str 'no'"):
        convert.to_keras(params, reset_after="no")
