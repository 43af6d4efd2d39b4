"""bfloat16: the precision contract (docs/precision.md) on every path, and the compiled
native code's bf16 GEMMs (jaxlstm/csrc/bf16.h, the ``avx512_bf16`` level) against a float64 NumPy
loop whose matmul operands are rounded to bf16, the XLA path and autodiff; a level without
bf16 GEMMs runs the float32 ones on the same data; training converges as in float32."""

from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxlstm
from helpers import assert_trees_close, cell_case
from jaxlstm import _native, tuning
from reference import as_dict, gru_ref, lstm_ref, rnn_ref

CELLS = {
    "lstm": (jaxlstm.init_lstm, jaxlstm.lstm, lstm_ref),
    "gru": (jaxlstm.init_gru, jaxlstm.gru, gru_ref),
    "rnn": (jaxlstm.init_rnn, jaxlstm.rnn, rnn_ref),
}
RUNNABLE = [lv for lv in _native.levels_built() if lv in _native.levels_supported()]
BF16_LEVEL = "avx512_bf16" in RUNNABLE
needs_bf16_level = pytest.mark.skipif(not BF16_LEVEL, reason="needs a CPU with AVX512_BF16 and that level built")
BF16 = jnp.bfloat16
# B past a register tile, odd D and H (a pair padded with zero), T=1; batch-major, reversed, time-major;
# and one step with whole column tiles and a rest (H=70: a one-step call's GEMM rounds the weights in place).
SHAPES = [(13, 5, 33, 4), (7, 3, 20, 1), (2, 6, 17, 5), (13, 9, 70, 1)]


def _round(a):
    """float64 values rounded to bfloat16 (to nearest even), as the native code and XLA round operands."""
    return np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64)


def _case(kind, i, B, D, H, T):
    init, run, ref = CELLS[kind]
    params, xs, x, state, flags, options = cell_case(init, kind, i, B, D, H, T)
    return run, ref, params, xs, x, state, flags, dict(options, compute_dtype=BF16)


def _loss(run, options, p, x, s, r, **kw):
    ys, final = run(p, x, s, reset_state=r, **options, **kw)
    w = jnp.cos(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
    return (w * ys).sum() + sum(jnp.sin(a).sum() for a in jax.tree.leaves(final))


@needs_bf16_level
@pytest.mark.parametrize("kind", CELLS)
def test_the_bf16_kernel_rounds_as_the_contract_says(kind, monkeypatch):
    """Values: the float64 loop with bf16-rounded matmul operands, to float32 summation error;
    the unrounded loop is 10x further off (the check sees the rounding). Gradients: the XLA
    path's bf16 (the same contract, summed in another order) and autodiff of the bf16 scan."""
    monkeypatch.setenv(_native.ISA_VARIABLE, "avx512_bf16")
    assert _native.bf16_dot()
    for i, shape in enumerate(SHAPES):
        run, ref, params, xs, x, state, flags, options = _case(kind, i, *shape)
        f = jax.jit(partial(run, **options))
        assert "jaxlstm_avx512_bf16_forward" in str(jax.make_jaxpr(f)(params, x, state))
        ys, final = f(params, x, state)
        got = (jnp.swapaxes(ys, 0, 1) if i == 2 else ys, *jax.tree.leaves(final))
        flags = {k: np.asarray(v) for k, v in flags.items()}
        starts = [np.asarray(a, np.float64) for a in jax.tree.leaves(state)]
        kw = dict(reverse=options["reverse"], lengths=flags["seq_lengths"], mask=flags["mask"], resets=flags["resets"])
        xs64 = np.asarray(xs, np.float64)
        rounded = ref(np, as_dict(params), xs64, *starts, operand=_round, **kw)
        exact = ref(np, as_dict(params), xs64, *starts, **kw)
        for a, want, unrounded in zip(got, rounded, exact, strict=True):
            err = np.abs(np.asarray(a) - want).max()
            assert err < 1e-4, err
            if shape[-1] > 1:  # T=1 from h0: still rounded, but too few steps to be sure of 10x
                assert np.abs(unrounded - want).max() > 10 * max(err, 1e-5)

        reset = jax.tree.map(lambda a: jnp.linspace(-0.4, 0.3, a.size).reshape(a.shape), state)
        args = (params, x, state, reset)
        grad = lambda run=run, options=options, **kw: jax.jit(
            jax.value_and_grad(partial(_loss, run, options, **kw), argnums=(0, 1, 2, 3))
        )
        v, g = grad()(*args)
        with tuning.forced("xla"):
            v_xla, g_xla = grad()(*args)
        np.testing.assert_allclose(v, v_xla, rtol=1e-5)
        assert_trees_close(g, g_xla, rtol=2e-3, floor=1e-2)
        # autodiff rounds the weight gradients' GEMM outputs to bf16 (JAX's dot transpose): looser
        v_ad, g_ad = grad(backward="autodiff")(*args)
        np.testing.assert_allclose(v, v_ad, rtol=1e-4)
        assert_trees_close(g, g_ad, rtol=2e-2, floor=1e-1)


@pytest.mark.skipif("avx512" not in RUNNABLE, reason="needs an AVX-512 CPU")
@pytest.mark.parametrize("kind", CELLS)
def test_a_level_without_bf16_gemms_runs_them_in_float32(kind, monkeypatch):
    """At ``avx512`` a bf16 call runs on the native code's float32 GEMMs: the unrounded loop's numbers."""
    monkeypatch.setenv(_native.ISA_VARIABLE, "avx512")
    assert not _native.bf16_dot() and not jaxlstm.native_info().bf16_dot
    run, ref, params, xs, x, state, flags, options = _case(kind, 0, *SHAPES[0])
    f = jax.jit(partial(run, **options))
    assert "jaxlstm_avx512_forward" in str(jax.make_jaxpr(f)(params, x, state))
    ys, final = f(params, x, state)
    flags = {k: np.asarray(v) for k, v in flags.items()}
    starts = [np.asarray(a, np.float64) for a in jax.tree.leaves(state)]
    want = ref(np, as_dict(params), np.asarray(xs, np.float64), *starts, lengths=flags["seq_lengths"],
               mask=flags["mask"], resets=flags["resets"])  # fmt: skip
    for a, b in zip((ys, *jax.tree.leaves(final)), want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.skipif(not RUNNABLE, reason="no native level runs here")
@pytest.mark.parametrize("level", RUNNABLE)
@pytest.mark.parametrize("kind", CELLS)
def test_bf16_inputs_and_outputs_cross_the_native_call_as_they_are(kind, level, monkeypatch):
    """bf16 inputs go into the forward call unconverted and it writes bf16 outputs (no float32 copy
    of the sequence on either side): the numbers of the same values given as float32, rounded once
    at the end, at every level (those without bf16 GEMMs widen x(t) a step at a time); odd D,
    holes, reversed, time-major. Gradients: dxs in bf16, near the float32 inputs' (the outputs'
    cotangent is bf16 now)."""
    monkeypatch.setenv(_native.ISA_VARIABLE, level)
    for i, shape in enumerate(SHAPES):
        run, _, params, _, x, state, _, options = _case(kind, i, *shape)
        xb = x.astype(BF16)
        f = jax.jit(partial(run, **options))
        call = [ln for ln in f.lower(params, xb, state).as_text().splitlines() if f"{level}_forward" in ln]
        assert len(call) == 1 and "bf16>" in call[0].split("->")[0].split(":")[-1], call
        (ys, final), (ys32, final32) = f(params, xb, state), f(params, xb.astype(jnp.float32), state)
        assert ys.dtype == BF16 and ys32.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(ys), np.asarray(ys32.astype(BF16)))
        for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(final32), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(a.dtype)))
        wide = lambda *a, run=run, **k: jax.tree.map(lambda v: v.astype(jnp.float32), run(*a, **k))
        loss = partial(_loss, wide, options, s=state, r=state)
        g = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xb)
        g32 = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xb.astype(jnp.float32))
        assert g[1].dtype == BF16
        assert_trees_close(g, g32, rtol=2e-2, floor=1e-1)


@pytest.mark.parametrize("path", ["native", "xla"])
@pytest.mark.parametrize("kind", CELLS)
def test_dtypes_of_the_contract(kind, path):
    """bf16 params and inputs: bf16 GEMMs, outputs and h in bf16, the LSTM's c in float32, gradients
    in the params' and inputs' dtypes; float32 params with bf16 inputs: float32 GEMMs unless
    ``compute_dtype`` says bf16. The same on the native code and on the XLA path."""
    init, run, _ = CELLS[kind]
    params32 = init(jax.random.key(0), 3, 8)
    params = jax.tree.map(lambda w: w.astype(BF16), params32)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3)).astype(BF16)
    with tuning.forced(path):
        ys, final = run(params, xs)
        assert ys.dtype == BF16
        h, c = (final.h, final.c) if kind == "lstm" else (final, None)
        assert h.dtype == BF16 and (c is None or c.dtype == jnp.float32)
        g = jax.grad(lambda p, x: jnp.sum(run(p, x)[0].astype(jnp.float32)), argnums=(0, 1))(params, xs)
        assert all(a.dtype == BF16 for a in jax.tree.leaves(g))
        # float32 params, bf16 inputs: the GEMMs in float32 (the wider dtype), outputs in bf16
        ys32 = run(params32, xs)[0]
        ys_bf = run(params32, xs, compute_dtype=BF16)[0]
        ys_ref = run(params32, xs.astype(jnp.float32))[0]
        assert ys32.dtype == ys_bf.dtype == BF16
        np.testing.assert_array_equal(np.asarray(ys32), np.asarray(ys_ref.astype(BF16)))
    if path == "native" and _native.enabled():
        hlo = jax.jit(lambda p, x: run(p, x, compute_dtype=BF16)).lower(params32, xs).as_text()
        assert f"jaxlstm_{_native.level()}_forward" in hlo and "bf16 = 1 : i32" in hlo


def test_compute_dtype_is_checked():
    params = jaxlstm.init_lstm(jax.random.key(0), 3, 4)
    with pytest.raises(TypeError, match="compute_dtype must be a floating dtype"):
        jaxlstm.lstm(params, jnp.zeros((1, 2, 3)), compute_dtype=jnp.int8)


@needs_bf16_level
def test_second_order_in_bf16(monkeypatch):
    """Differentiated twice, a bf16 native call takes the XLA scan's derivatives in bf16: as the
    XLA path's own (a Hessian-vector product)."""
    monkeypatch.setenv(_native.ISA_VARIABLE, "avx512_bf16")
    params = jaxlstm.init_lstm(jax.random.key(0), 3, 6)
    xs = jax.random.normal(jax.random.key(1), (2, 4, 3))
    loss = lambda p: jnp.sum(jnp.tanh(jaxlstm.lstm(p, xs, compute_dtype=BF16)[0]))
    hvp = lambda p: jax.jvp(jax.grad(loss), (p,), (jax.tree.map(jnp.ones_like, p),))[1]
    assert "jaxlstm_avx512_bf16_backward" in str(jax.make_jaxpr(jax.grad(loss))(params))
    got = hvp(params)
    with tuning.forced("xla"):
        want = hvp(params)
    assert_trees_close(got, want, rtol=2e-2, floor=1e-1)


def test_training_converges_in_bf16_as_in_float32(standard_promotion):
    """The long-memory task (examples/long_memory.py) at T=12: the LSTM trained with bf16 GEMMs
    solves it as the float32 one does, with a final loss of the same size."""
    from examples import long_memory

    results = {}
    for dtype in ("float32", "bfloat16"):
        args = long_memory.parse_args(
            ["--seq-lens", "12", "--steps", "150", "--hidden", "16", "--batch", "64", "--dtype", dtype]
        )
        results[dtype] = long_memory.train("lstm", 12, args, jax.random.key(0))
    f32, bf16 = results["float32"], results["bfloat16"]
    assert f32["solved"] and bf16["solved"], results
    assert abs(f32["metric"] - bf16["metric"]) <= 0.05, results
    assert bf16["final_loss"] < 3 * f32["final_loss"] + 0.05, results
