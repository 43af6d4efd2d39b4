"""Second-order derivatives where the native code runs the first-order pass
(jaxlstm/_native.py: the native code's forward and backward calls carry JVP rules through the XLA
scan): grad of grad (Hessian-vector products), ``jax.jvp`` of ``jax.grad`` and ``jax.hessian``,
against the pure-XLA path, and ``check_grads(order=2)``; for the LSTM, the GRU and the Elman RNN.
The XLA path's own second order in float64: test_backward.py's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxlstm
from helpers import assert_trees_close, random_step_flags
from jaxlstm import _native, tuning

pytestmark = pytest.mark.skipif(not _native.available(), reason=str(_native.load_error()))

CELLS = {
    "lstm": (jaxlstm.init_lstm, jaxlstm.lstm),
    "gru": (jaxlstm.init_gru, jaxlstm.gru),
    "rnn": (jaxlstm.init_rnn, jaxlstm.rnn),
}


def _case(kind, B=3, D=4, H=10, T=5, seed=0):
    init, run = CELLS[kind]
    k = jax.random.split(jax.random.key(seed), 4)
    params = init(k[0], D, H)
    params = params._replace(b=jax.random.normal(k[1], params.b.shape) * 0.3)
    xs = jax.random.normal(k[2], (B, T, D))
    h0 = jax.random.normal(k[3], (B, H)) * 0.3
    state = jaxlstm.LSTMState(h0, -h0) if kind == "lstm" else h0
    reset = jax.tree.map(lambda a: jnp.full_like(a, 0.2), state)
    flags = random_step_flags(seed + 1, B, T)

    def loss(p, x, s, r, reverse=False):
        ys, final = run(p, x, s, reset_state=r, reverse=reverse, **flags)
        w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)  # uneven weights: nothing cancels
        return jnp.sum(w * jnp.tanh(ys)) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(final))

    return params, xs, state, reset, loss


def _direction(tree):
    return jax.tree.map(lambda a: jnp.cos(1.0 + jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), tree)


def _on_kernel(f, *args) -> bool:
    text = str(jax.make_jaxpr(f)(*args))
    return f"jaxlstm_{_native.level()}_forward" in text and f"jaxlstm_{_native.level()}_backward" in text


@pytest.mark.parametrize("kind,reverse", [("lstm", True), ("gru", False), ("rnn", True)])
def test_grad_of_grad_and_jvp_of_grad_match_the_xla_path(kind, reverse):
    """Hessian-vector products two ways (reverse over reverse, forward over reverse) with
    respect to every input (params, inputs, initial and reset state), lengths, holes, resets."""
    params, xs, state, reset, loss = _case(kind)
    args = (params, xs, state, reset)
    v = _direction(args)
    argnums = (0, 1, 2, 3)
    leaves_v = jax.tree.leaves(v)

    def hvp_rev(*a):
        g = lambda *a: jax.grad(loss, argnums=argnums)(*a, reverse=reverse)
        along_v = lambda *a: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(g(*a)), leaves_v, strict=True))
        return jax.grad(along_v, argnums=argnums)(*a)

    def hvp_fwd(*a):
        return jax.jvp(lambda *a: jax.grad(loss, argnums=argnums)(*a, reverse=reverse), a, v)[1]

    both = lambda *a: (hvp_rev(*a), hvp_fwd(*a))
    assert _on_kernel(both, *args)
    got = jax.jit(both)(*args)
    with tuning.forced("xla"):
        jaxpr = str(jax.make_jaxpr(lambda *a: both(*a))(*args))  # a fresh function: traced afresh
        assert "jaxlstm_" not in jaxpr
        want = jax.jit(lambda *a: both(*a))(*args)
    assert_trees_close(got, want, rtol=1e-4)
    assert_trees_close(got[0], got[1], rtol=1e-4)  # the Hessian is symmetric: both ways agree


def test_hessian_matches_the_xla_path():
    """jax.hessian (forward over reverse) of the LSTM with respect to its bias (the GRU and
    the Elman RNN: forward over reverse in the test above)."""
    params, xs, state, reset, loss = _case("lstm", B=2, H=4, T=3)
    f = lambda b: loss(params._replace(b=b), xs, state, reset)
    hess = jax.hessian(f)(params.b)
    with tuning.forced("xla"):
        want = jax.hessian(lambda b: f(b))(params.b)
    assert hess.shape == (params.b.size, params.b.size)
    np.testing.assert_allclose(hess, hess.T, atol=1e-5)
    assert_trees_close(hess, want, rtol=1e-4)


@pytest.mark.parametrize("kind", CELLS)
def test_check_grads_order_two(kind):
    """Numerical second derivatives (float32: loose tolerances, as the first-order check's)."""
    params, xs, state, reset, loss = _case(kind, B=2, H=4, T=3)
    f = lambda p, x: loss(p, x, state, reset)
    assert _on_kernel(jax.grad(f, argnums=(0, 1)), params, xs)
    check_grads(f, (params, xs), order=2, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("kind", CELLS)
def test_the_rules_reference_in_float64(kind):
    """The second-order rules differentiate _native._xla_reference (the native code's contract on the
    XLA scan, plain autodiff): in float64, check_grads of order 2 holds tightly."""
    with jax.enable_x64(True):
        params, xs, state, reset, _ = _case(kind, B=2, H=3, T=3)
        f64 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)
        params, xs, state, reset = f64((params, xs, state, reset))
        h0, c0 = (state.h, state.c) if kind == "lstm" else (state, None)
        hr, cr = (reset.h, reset.c) if kind == "lstm" else (reset, None)
        steps = jaxlstm._engine.Steps(None, None, jnp.asarray([[False, True], [True, False], [False, False]]))

        def f(p, x, h0):
            ys, h, c = _native._xla_reference(kind, True, False, p, h0, c0, x, steps, hr, cr)
            w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
            return jnp.sum(jnp.tanh(ys) * w) + jnp.sum(jnp.sin(h))

        check_grads(f, (params, xs, h0), order=2, modes=["rev"], atol=1e-6, rtol=1e-6)
