"""The native code's GRU and Elman RNN (jaxlstm/_native.py ``native_cell``, the
``Gru`` / ``Elman`` cells of jaxlstm/csrc/lstm_cpu.cc) against the NumPy reference loops
and the pure-XLA path: values, every gradient, masks, resets, reversal, layouts, vmap,
and where it does not apply. The threads' split of the units: tests/test_native.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxlstm
from helpers import assert_trees_close, random_step_flags
from jaxlstm import _native, tuning
from jaxlstm._engine import Steps
from reference import as_dict, gru_ref, rnn_ref

pytestmark = pytest.mark.skipif(not _native.available(), reason=str(_native.load_error()))

CELLS = {
    "gru": (jaxlstm.init_gru, jaxlstm.gru, gru_ref),
    "rnn": (jaxlstm.init_rnn, jaxlstm.rnn, rnn_ref),
}


def _case(kind, seed, B, D, H, T, flags=False):
    init = CELLS[kind][0]
    k = jax.random.split(jax.random.key(seed), 5)
    params = init(k[0], D, H)
    # non-zero biases (b_hn included), so that every bias term is exercised
    params = params._replace(b=jax.random.normal(k[1], params.b.shape) * 0.5)
    if kind == "gru":
        params = params._replace(b_hn=jax.random.normal(k[4], (H,)) * 0.5)
    xs = jax.random.normal(k[2], (B, T, D))
    h0 = jax.random.normal(k[3], (B, H)) * 0.5
    kw = random_step_flags(seed, B, T) if flags else {}
    return params, xs, h0, kw


def _uses_kernel(f, *args) -> bool:
    return f"jaxlstm_{_native.level()}_forward" in str(jax.make_jaxpr(f)(*args))


def _assert_kernel_equals_xla_path(f, *args, jit=False):
    """``f(*args)`` (an array) and the gradient of ``Σ sin f`` w.r.t. every argument run on the
    kernel (asserted; under ``jit`` if asked) and give the pure-XLA path's numbers."""
    grad = jax.grad(lambda *a: jnp.sin(f(*a)).sum(), argnums=tuple(range(len(args))))
    assert _uses_kernel(f, *args)
    got = (jax.jit(f)(*args), jax.jit(grad)(*args)) if jit else (f(*args), grad(*args))
    with tuning.forced("xla"):  # eager: traced afresh under the forced path
        assert not _uses_kernel(lambda *a: f(*a), *args)  # a fresh function: JAX's trace cache cannot replay
        want = f(*args), grad(*args)
    assert_trees_close(got[0], want[0], rtol=1e-5)
    assert_trees_close(got[1], want[1], rtol=1e-4)


def _loss(kind, p, xs, h0, r=None, **kw):
    ys, h = CELLS[kind][1](p, xs, h0, reset_state=r, **kw)
    w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)  # uneven weights: nothing cancels
    return (w * ys).sum() + jnp.sin(h).sum()


# Shapes around the native code's tiles: B past a 12-row tile, H not a multiple of the vector
# width (the last thread's units are padded), T=1. (Threads: tests/test_native.py.)
SHAPES = [(3, 5, 7, 6), (13, 6, 33, 4), (2, 4, 40, 1)]


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("B,D,H,T", SHAPES)
@pytest.mark.parametrize("flags,reverse", [(True, False), (True, True)])  # no flags: the tests below
def test_values_match_the_numpy_loop(kind, B, D, H, T, flags, reverse):
    params, xs, h0, kw = _case(kind, B * 7 + T, B, D, H, T, flags)
    run = CELLS[kind][1]
    assert _uses_kernel(lambda x: run(params, x, h0, reverse=reverse, **kw), xs)
    ys, h = run(params, xs, h0, reverse=reverse, **kw)
    np_kw = {k: np.asarray(v) for k, v in kw.items()}
    np_kw = dict(lengths=np_kw.get("seq_lengths"), mask=np_kw.get("mask"), resets=np_kw.get("resets"))
    x64 = np.asarray(xs, np.float64)
    ys_ref, h_ref = CELLS[kind][2](np, as_dict(params), x64, np.asarray(h0, np.float64), reverse=reverse, **np_kw)
    np.testing.assert_allclose(ys, ys_ref, atol=2e-6)
    np.testing.assert_allclose(h, h_ref, atol=2e-6)


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("B,D,H,T", SHAPES[:2])
@pytest.mark.parametrize("flags,reverse", [(False, False), (True, True)])
def test_gradients_match_autodiff(kind, B, D, H, T, flags, reverse):
    """Every input's gradient (params, inputs, initial and reset state) against autodiff of
    the pure-XLA scan; with resets a non-zero reset state, so its cotangent is exercised."""
    params, xs, h0, kw = _case(kind, B + 3 * T, B, D, H, T, flags)
    r = jnp.linspace(-0.5, 0.5, B * H).reshape(B, H)
    args = (params, xs, h0, r)
    loss = lambda *a, **k: _loss(kind, *a, reverse=reverse, **kw, **k)
    assert _uses_kernel(loss, *args)
    v, g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args)
    v_ad, g_ad = jax.value_and_grad(lambda *a: loss(*a, backward="autodiff"), argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(v, v_ad, rtol=1e-5)
    assert_trees_close(g, g_ad, rtol=1e-4)


@pytest.mark.parametrize("kind", CELLS)
def test_check_grads(kind):
    params, xs, h0, kw = _case(kind, 5, 3, 4, 20, 5, flags=True)
    f = lambda p, x, h: _loss(kind, p, x, h, **kw)
    check_grads(f, (params, xs, h0), order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("case", ["batch (2, 3)", "time-major", "unbatched"])
def test_layouts_batch_shapes_and_jit(kind, case):
    """time_major, several and no leading batch dims, under jit: the XLA path's numbers."""
    params, xs, h0, _ = _case(kind, 9, 6, 5, 20, 7)
    x, h, tm = {
        "batch (2, 3)": (xs.reshape(2, 3, 7, 5), h0.reshape(2, 3, 20), False),
        "time-major": (jnp.swapaxes(xs, 0, 1), h0, True),
        "unbatched": (xs[0], h0[0], False),
    }[case]
    _assert_kernel_equals_xla_path(lambda p, x, h: CELLS[kind][1](p, x, h, time_major=tm)[0], params, x, h, jit=True)


@pytest.mark.parametrize("kind", CELLS)
def test_vmap_and_input_dropout(kind):
    """vmap of the custom call runs it per element; input dropout is applied before it."""
    params, xs, h0, _ = _case(kind, 4, 4, 6, 16, 5)
    run = CELLS[kind][1]
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
    f = lambda p, x: run(p, x)[0]
    got = jax.vmap(f, in_axes=(0, None))(stacked, xs)
    np.testing.assert_allclose(got[0], f(params, xs), atol=1e-6)
    np.testing.assert_allclose(got[1], f(jax.tree.map(lambda a: 0.5 * a, params), xs), atol=1e-6)
    key = jax.random.key(2)
    _assert_kernel_equals_xla_path(lambda p, x: run(p, x, h0, input_dropout=0.3, key=key)[0], params, xs)


@pytest.mark.parametrize("kind", CELLS)
def test_where_the_kernel_does_not_apply_the_xla_path_runs(kind):
    params, xs, _, _ = _case(kind, 2, 2, 3, 16, 4)
    run = CELLS[kind][1]
    assert _uses_kernel(lambda x: run(params, x), xs)
    # bfloat16 GEMMs run on it too (tests/test_bf16.py)
    assert _uses_kernel(lambda x: run(params, x, compute_dtype=jnp.bfloat16), xs)
    assert _uses_kernel(lambda x: run(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), x), xs)
    key = jax.random.key(1)
    others = [
        lambda x: run(params, x, recurrent_dropout=0.2, key=key),
        lambda x: run(params, x, zoneout_h=0.1, deterministic=True),
        lambda x: run(params, x, compute_dtype=jnp.float16),  # neither float32 nor bfloat16
        lambda x: run(params, x, backward="autodiff"),
        lambda x: run(params, x[:, :0]),  # no step
    ]
    for f in others:
        assert not _uses_kernel(f, xs)
    with tuning.forced("xla"):
        assert not _uses_kernel(lambda x: run(params, x), xs)
    os.environ["JAXLSTM_NATIVE"] = "0"
    try:
        assert not _uses_kernel(lambda x: run(params, x), xs)
    finally:
        del os.environ["JAXLSTM_NATIVE"]


@pytest.mark.parametrize("kind", CELLS)
def test_kernel_core_direct_with_flags(kind):
    """native_cell's own contract (time-major, Steps) against the XLA fused core, values and
    gradients (the reset state's included)."""
    from jaxlstm._fused import FusedConfig, fused_sequence
    from jaxlstm._gru import ELMAN, GRU

    T, B, D, H = 6, 5, 3, 17
    params, _, h0, _ = _case(kind, 3, B, D, H, T)
    xs = jax.random.normal(jax.random.key(7), (T, B, D))
    rng = np.random.RandomState(0)
    steps = Steps(
        jnp.asarray([6, 0, 3, 5, 6], jnp.int32), jnp.asarray(rng.rand(T, B) > 0.3), jnp.asarray(rng.rand(T, B) > 0.6)
    )
    reset = jnp.full((B, H), 0.2)
    cfg = FusedConfig(jnp.dtype(jnp.float32), jnp.dtype(jnp.float32))
    cell = GRU if kind == "gru" else ELMAN
    runs = {
        "native": lambda p, h, x, r: _native.native_cell(kind, False, p, h, x, steps, r),
        "xla": lambda p, h, x, r: (lambda ys, hs: (ys, hs[0]))(*fused_sequence(cfg, cell, p, (h,), x, steps, (r,))),
    }
    out = {}
    for name, f in runs.items():
        loss = lambda *a, f=f: jnp.sin(f(*a)[0]).sum() + jnp.cos(f(*a)[1]).sum()
        out[name] = (f(params, h0, xs, reset), jax.grad(loss, argnums=(0, 1, 2, 3))(params, h0, xs, reset))
    assert_trees_close(out["native"], out["xla"], rtol=1e-4)
