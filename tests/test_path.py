"""The one path selector (``jaxlstm.path_of``, ``jaxlstm._path.select``): the path it names is the one a
call runs, and calls outside the native code's reach go to the XLA path."""

import jax
import jax.numpy as jnp
import pytest

import jaxlstm
from jaxlstm import _native, tuning
from jaxlstm._path import AUTODIFF, FUSED, NATIVE, PATHS, VARIANT


def _ops(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_the_named_path_is_the_one_that_runs(kind):
    init = {"lstm": jaxlstm.init_lstm, "gru": jaxlstm.init_gru, "rnn": jaxlstm.init_rnn}[kind]
    run = {"lstm": jaxlstm.lstm, "gru": jaxlstm.gru, "rnn": jaxlstm.rnn}[kind]
    params, xs = init(jax.random.key(0), 3, 5), jnp.ones((2, 7, 3))
    grad = lambda p, x, **kw: jax.grad(lambda p: run(p, x, **kw)[0].sum())(p)
    for forced, want in (("native", NATIVE), ("xla", FUSED)):
        with tuning.forced(forced):
            path = jaxlstm.path_of(kind, params, xs)
            jaxpr = _ops(grad, params, xs)
        if want == NATIVE and not _native.available():
            want = FUSED
        assert path == want
        assert ("jaxlstm_" in jaxpr) == (path == NATIVE), jaxpr[:400]  # the FFI call's target
    assert jaxlstm.path_of(kind, params, xs, backward="autodiff") == AUTODIFF
    # what the native code cannot run goes to XLA: recurrent dropout in training
    kw = dict(recurrent_dropout=0.5, key=jax.random.key(1))
    with tuning.forced("native"):
        assert jaxlstm.path_of(kind, params, xs, **kw) == FUSED
        assert "jaxlstm_" not in _ops(lambda p, x: grad(p, x, **kw), params, xs)


def test_variants_and_projections():
    xs = jnp.ones((2, 7, 3))
    with tuning.forced("native"):
        assert jaxlstm.path_of("lstm", jaxlstm.init_lstm(jax.random.key(0), 3, 5, peephole=True), xs) == VARIANT
        proj = jaxlstm.init_lstm(jax.random.key(0), 3, 5, proj_size=2)
        assert jaxlstm.path_of("lstm", proj, xs) == FUSED
    assert set(jaxlstm.PATHS) == set(PATHS) == {NATIVE, FUSED, VARIANT, AUTODIFF}


def test_path_of_validates_as_the_call_does():
    params = jaxlstm.init_lstm(jax.random.key(0), 3, 5)
    with pytest.raises(ValueError, match="kind must be one of"):
        jaxlstm.path_of("transformer", params, jnp.ones((2, 7, 3)))
    with pytest.raises(ValueError, match="must have 3 features"):
        jaxlstm.path_of("lstm", params, jnp.ones((2, 7, 4)))
    with pytest.raises(TypeError, match="GRUParams"):
        jaxlstm.path_of("gru", params, jnp.ones((2, 7, 3)))
