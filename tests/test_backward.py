"""The fused custom VJP against autodiff of the plain-jnp reference loop, and check_grads."""

import contextlib
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxlstm
from helpers import T, assert_trees_close
from helpers import lstm_inputs as _inputs
from jaxlstm import tuning
from reference import lstm_ref


def _loss_from_outputs(ys, h, c):
    # Weights the outputs unevenly so that a misplaced gradient cannot cancel out.
    w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
    return (w * ys).sum() + (h**2).sum() + (jnp.sin(c)).sum()


def _ref_loss(params, xs, state, seq_lengths, reverse):
    batch_shape = xs.shape[:-2]
    B = int(np.prod(batch_shape))
    p = {k: v for k, v in params._asdict().items()}
    R, H = params.w_hh.shape[0], params.w_ih.shape[1] // 4
    L = None if seq_lengths is None else np.asarray(seq_lengths).reshape(B)
    ys, h, c = lstm_ref(
        jnp, p, xs.reshape((B,) + xs.shape[-2:]), state.h.reshape(B, R), state.c.reshape(B, H), L, reverse
    )
    return _loss_from_outputs(ys.reshape(xs.shape[:-1] + (R,)), h.reshape(state.h.shape), c.reshape(state.c.shape))


def _loss(params, xs, state, seq_lengths, reverse, time_major=False, **kw):
    x_in = jnp.moveaxis(xs, -2, 0) if time_major else xs
    ys, final = jaxlstm.lstm(params, x_in, state, seq_lengths=seq_lengths, reverse=reverse, time_major=time_major, **kw)
    if time_major:
        ys = jnp.moveaxis(ys, 0, -2)
    return _loss_from_outputs(ys, final.h, final.c)


def _assert_grads_close(g, g_ref, rtol=1e-5):
    assert_trees_close(g, g_ref, rtol=rtol * 10)


GRID = list(itertools.product([None, 2], [False, True], [False, True]))
# Without a projection jaxlstm.lstm runs the native code where it is built
# (tests/test_native.py): "xla" forces the pure-XLA fused path.
PATHS = [(*case, "default") for case in GRID] + [(None, lengths, reverse, "xla") for _, lengths, reverse in GRID[:4]]


@pytest.mark.parametrize("proj,lengths,reverse,path", PATHS)
def test_fused_vjp_matches_reference_autodiff(proj, lengths, reverse, path):
    params, xs, state, seq_lengths = _inputs(20, (4,), proj, with_state=True, lengths=lengths)
    with tuning.forced("feature") if path == "xla" else contextlib.nullcontext():
        g = jax.grad(_loss, argnums=(0, 1, 2))(params, xs, state, seq_lengths, reverse)
    g_ref = jax.grad(_ref_loss, argnums=(0, 1, 2))(params, xs, state, seq_lengths, reverse)
    _assert_grads_close(g, g_ref)


@pytest.mark.parametrize("batch_shape,time_major", [((2, 2), False), ((3,), True), ((), False)])
def test_fused_vjp_layouts(batch_shape, time_major):
    params, xs, state, seq_lengths = _inputs(21, batch_shape, 2, with_state=True, lengths=bool(batch_shape))
    g = jax.grad(_loss, argnums=(0, 1, 2))(params, xs, state, seq_lengths, True, time_major)
    g_ref = jax.grad(_ref_loss, argnums=(0, 1, 2))(params, xs, state, seq_lengths, True)
    _assert_grads_close(g, g_ref)


@pytest.mark.parametrize("proj,lengths,reverse", [(2, True, True), (None, False, False)])
def test_autodiff_path_matches_reference(proj, lengths, reverse):
    """backward="autodiff" runs its own (feature-major) scan: values and gradients against the reference."""
    params, xs, state, seq_lengths = _inputs(26, (3,), proj, with_state=True, lengths=lengths)
    v, g = jax.value_and_grad(_loss, argnums=(0, 1, 2))(params, xs, state, seq_lengths, reverse, backward="autodiff")
    v_ref, g_ref = jax.value_and_grad(_ref_loss, argnums=(0, 1, 2))(params, xs, state, seq_lengths, reverse)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    _assert_grads_close(g, g_ref)


@pytest.mark.parametrize(
    "k,proj,lengths,reverse,time_major",
    [
        (2, None, True, False, False),
        (4, 2, False, False, False),
        (T, None, False, False, False),
        (100, None, True, False, False),
        (3, 2, True, True, True),
    ],
)
def test_checkpointed_equals_plain(k, proj, lengths, reverse, time_major):
    params, xs, state, seq_lengths = _inputs(22, (3,), proj, with_state=True, lengths=lengths)
    (v, g) = jax.value_and_grad(_loss, argnums=(0, 1, 2))(
        params, xs, state, seq_lengths, reverse, time_major, checkpoint_every=k
    )
    with tuning.forced("feature"):  # the same (pure-XLA) path without checkpointing, not the native code
        (v0, g0) = jax.value_and_grad(_loss, argnums=(0, 1, 2))(params, xs, state, seq_lengths, reverse, time_major)
    np.testing.assert_allclose(v, v0, rtol=1e-6)
    _assert_grads_close(g, g0, rtol=1e-6)


@pytest.mark.parametrize("backward", ["fused", "autodiff"])
def test_check_grads(backward):
    params, xs, state, seq_lengths = _inputs(23, (2,), 2, with_state=True, lengths=True, T=4)
    f = lambda p, x, s: _loss(p, x, s, seq_lengths, True, backward=backward)
    modes = ["rev"] if backward == "fused" else ["fwd", "rev"]
    check_grads(f, (params, xs, state), order=1, modes=modes, atol=5e-2, rtol=5e-2, eps=1e-2)


def test_forward_mode_needs_autodiff():
    params, xs, _, _ = _inputs(24, (2,))
    f = lambda x, backward: jaxlstm.lstm(params, x, backward=backward)[0]
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: f(x, "fused"), (xs,), (jnp.ones_like(xs),))
    _, tangent = jax.jvp(lambda x: f(x, "autodiff"), (xs,), (jnp.ones_like(xs),))
    _, vjp = jax.vjp(lambda x: f(x, "fused"), xs)
    # <J·1, 1> == <1, Jᵀ·1>
    np.testing.assert_allclose(tangent.sum(), vjp(jnp.ones_like(tangent))[0].sum(), rtol=1e-5)


def test_compute_dtype_bfloat16_gradients():
    params, xs, state, seq_lengths = _inputs(25, (4,), with_state=True, lengths=True)
    g = jax.grad(_loss)(params, xs, state, seq_lengths, False, compute_dtype=jnp.bfloat16)
    g0 = jax.grad(_loss)(params, xs, state, seq_lengths, False)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    chex.assert_trees_all_equal_structs(g, g0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert rel < 3e-2, rel


def test_bfloat16_params_get_bfloat16_gradients():
    params, xs, _, _ = _inputs(26, (2,))
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    g, gx = jax.grad(lambda p, x: jaxlstm.lstm(p, x)[0].astype(jnp.float32).sum(), argnums=(0, 1))(
        params, xs.astype(jnp.bfloat16)
    )
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(g)) and gx.dtype == jnp.bfloat16
    # ... and their values follow the float32 gradients (bf16 rounding of inputs, weights and outputs)
    g32, gx32 = jax.grad(lambda p, x: jaxlstm.lstm(p, x)[0].sum(), argnums=(0, 1))(
        jax.tree.map(lambda a: a.astype(jnp.float32), params), xs.astype(jnp.bfloat16).astype(jnp.float32)
    )
    chex.assert_trees_all_equal_structs((g, gx), (g32, gx32))
    for a, b in zip(jax.tree.leaves((g, gx)), jax.tree.leaves((g32, gx32)), strict=True):
        a = a.astype(jnp.float32)
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 5e-2
