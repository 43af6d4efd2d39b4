"""ConvLSTM: against the LSTM it reduces to (1x1 kernels on one pixel), against flax's ConvLSTMCell and
Keras' ConvLSTM1D/2D/3D with the same weights (values, both conversion directions), gradients by finite
differences in float64, the sequence semantics (chunks, steps, lengths, masks, resets, reverse, layouts),
the Flax modules, and the checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxlstm
import jaxlstm.linen as jl
import jaxlstm.nnx as jn
from jaxlstm import convert

B, T, C, H = 2, 4, 3, 4
RNG = np.random.default_rng(3)
MASK = RNG.random((B, T)) < 0.7
RESETS = RNG.random((B, T)) < 0.4
LENGTHS = np.array([4, 2])
KERNEL = {1: (3,), 2: (3, 3), 3: (2, 3, 3)}
SPATIAL = {1: (7,), 2: (6, 5), 3: (3, 4, 4)}


def _params(rank, seed=0, dtype=jnp.float32, **kw):
    p = jaxlstm.init_conv_lstm(jax.random.key(seed), C, H, KERNEL[rank], dtype=dtype, **kw)
    # a random bias: the init's is zeros with 1 on f
    return p._replace(
        b=None if p.b is None else p.b + 0.3 * jax.random.normal(jax.random.key(seed + 9), p.b.shape, dtype)
    )


def _xs(rank, seed=1, dtype=jnp.float32, batch=(B,)):
    return jax.random.normal(jax.random.key(seed), batch + (T,) + SPATIAL[rank] + (C,), dtype)


@pytest.mark.parametrize(
    "kw", [{}, dict(seq_lengths=LENGTHS, reverse=True), dict(mask=MASK, resets=RESETS, reverse=True)]
)
def test_one_by_one_kernel_on_one_pixel_is_the_lstm(kw):
    """With 1x1 kernels on a 1x1 map the convolutions are the LSTM's matmuls: the same numbers."""
    lp = jaxlstm.init_lstm(jax.random.key(0), C, H)
    lp = lp._replace(b=lp.b + 0.2)
    cp = jaxlstm.ConvLSTMParams(lp.w_ih[None, None], lp.w_hh[None, None], lp.b)
    xs = jax.random.normal(jax.random.key(1), (B, T, C))
    ys, st = jaxlstm.lstm(lp, xs, **kw)
    ys_c, st_c = jaxlstm.conv_lstm(cp, xs[:, :, None, None, :], **kw)
    np.testing.assert_allclose(ys_c[:, :, 0, 0], ys, atol=1e-6)
    np.testing.assert_allclose(st_c.h[:, 0, 0], st.h, atol=1e-6)
    np.testing.assert_allclose(st_c.c[:, 0, 0], st.c, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_flax_conv_lstm_cell_both_ways(rank):
    xs = np.asarray(_xs(rank))
    cell = nn.ConvLSTMCell(H, kernel_size=KERNEL[rank])
    rnn = nn.RNN(cell)
    with jax.numpy_rank_promotion("allow"):
        variables = rnn.init(jax.random.key(2), xs)
        variables = jax.tree.map(lambda a: a + 0.2 * np.random.default_rng(4).normal(size=a.shape), variables)
        want = rnn.apply(variables, xs)
        params = convert.from_flax(variables)
        assert isinstance(params, jaxlstm.ConvLSTMParams)
        np.testing.assert_allclose(jaxlstm.conv_lstm(params, xs)[0], want, atol=1e-5)
        # back: flax's cell with jaxlstm's weights
        mine = _params(rank)
        np.testing.assert_allclose(
            rnn.apply({"params": {"cell": convert.to_flax(mine)}}, xs), jaxlstm.conv_lstm(mine, xs)[0], atol=1e-5
        )


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize(
    "rank, conv_kw",
    [
        (1, dict(strides=2, padding="valid")),
        (2, dict(strides=1, padding="same", dilation=2)),
        (2, dict(strides=(2, 1), padding="valid")),
        (3, dict(padding="same")),
    ],
)
def test_keras_conv_lstm_both_ways(rank, conv_kw):
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on {keras.backend.backend()} here, this test needs KERAS_BACKEND=jax")
    xs = np.asarray(_xs(rank))
    keras_kw = {("dilation_rate" if k == "dilation" else k): v for k, v in conv_kw.items()}
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        layer = getattr(keras.layers, f"ConvLSTM{rank}D")(
            H, KERNEL[rank], return_sequences=True, return_state=True, **keras_kw
        )
        layer(xs)
        rng = np.random.default_rng(5)
        layer.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in layer.get_weights()])
        ys_k, h_k, c_k = (np.asarray(a) for a in layer(xs))
        params = convert.from_keras(layer)
        ys, st = jaxlstm.conv_lstm(params, xs, **conv_kw)
        np.testing.assert_allclose(ys, ys_k, atol=3e-5)
        np.testing.assert_allclose(st.h, h_k, atol=3e-5)
        np.testing.assert_allclose(st.c, c_k, atol=3e-5)
        # back: a fresh Keras layer with jaxlstm's weights
        mine = _params(rank)
        fresh = getattr(keras.layers, f"ConvLSTM{rank}D")(H, KERNEL[rank], return_sequences=True, **keras_kw)
        fresh(xs)
        fresh.set_weights(convert.to_keras(mine))
        np.testing.assert_allclose(np.asarray(fresh(xs)), jaxlstm.conv_lstm(mine, xs, **conv_kw)[0], atol=3e-5)


@pytest.mark.parametrize("kw", [dict(strides=2, padding="valid"), dict(mask=MASK, resets=RESETS, reverse=True)])
def test_gradients_by_finite_differences(kw):
    with jax.enable_x64(True):
        params = _params(2, dtype=jnp.float64)
        xs = _xs(2, dtype=jnp.float64)
        s0 = jax.tree.map(lambda a: 0.5 * jnp.ones_like(a), jaxlstm.conv_zero_state(params, xs[:, 0], **{
            k: v for k, v in kw.items() if k in ("strides", "padding")}, dtype=jnp.float64))  # fmt: skip

        def loss(p, x, s):
            ys, st = jaxlstm.conv_lstm(p, x, s, gate_activation=jax.nn.sigmoid, **kw)
            return (ys**2).sum() + jnp.sin(st.c).sum()

        check_grads(loss, (params, xs, s0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


@pytest.mark.parametrize(
    "rank, kernel, kw",
    [
        (2, (3, 3), dict(mask=MASK, resets=RESETS, reverse=True)),
        (2, (2, 4), dict(seq_lengths=LENGTHS, strides=2, padding="valid")),
        (1, (3,), dict(dilation=2)),
        (3, (2, 3, 3), {}),
    ],
)
def test_fused_backward_equals_autodiff(rank, kernel, kw):
    """The fused backward (the recurrent kernel's gradient after the scan, the transposed convolution
    written out) against JAX's autodiff of the scan, float64: params, inputs, initial and reset state."""
    with jax.enable_x64(True):
        params = jaxlstm.init_conv_lstm(jax.random.key(0), C, H, kernel, dtype=jnp.float64)
        params = params._replace(b=params.b + 0.2)
        xs = _xs(rank, dtype=jnp.float64)
        geometry = {k: v for k, v in kw.items() if k in ("strides", "padding", "dilation")}
        s0 = jaxlstm.conv_zero_state(params, xs[:, 0], dtype=jnp.float64, **geometry)
        s0 = jax.tree.map(lambda a: a + 0.3, s0)
        sr = jax.tree.map(lambda a: a - 0.2, s0)

        def loss(p, x, s, r, backward):
            ys, st = jaxlstm.conv_lstm(p, x, s, reset_state=r, backward=backward, **kw)
            return (ys**2).sum() + jnp.sin(st.c).sum() + (st.h**3).sum()

        got = jax.grad(loss, argnums=(0, 1, 2, 3))(params, xs, s0, sr, "fused")
        want = jax.grad(loss, argnums=(0, 1, 2, 3))(params, xs, s0, sr, "autodiff")
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_sequence_semantics():
    params, xs = _params(2), _xs(2)
    ys, st = jaxlstm.conv_lstm(params, xs)
    # chunks, carrying the state, equal the whole
    y1, s1 = jaxlstm.conv_lstm(params, xs[:, :2])
    y2, s2 = jaxlstm.conv_lstm(params, xs[:, 2:], s1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), ys, atol=1e-6)
    np.testing.assert_allclose(s2.c, st.c, atol=1e-6)
    # the cell, a step at a time (the zero state from a frame, or from its shape)
    s = jaxlstm.conv_zero_state(params, xs[:, 0])
    assert jax.tree.map(jnp.shape, s) == jax.tree.map(jnp.shape, jaxlstm.conv_zero_state(params, xs[:, 0].shape))
    for t in range(T):
        s, h = jaxlstm.conv_lstm_cell(params, s, xs[:, t])
        np.testing.assert_allclose(h, ys[:, t], atol=1e-6)
    # time-major, no batch dims, two batch dims
    ys_tm, _ = jaxlstm.conv_lstm(params, jnp.moveaxis(xs, 1, 0), time_major=True)
    np.testing.assert_allclose(jnp.moveaxis(ys_tm, 0, 1), ys, atol=1e-6)
    np.testing.assert_allclose(jaxlstm.conv_lstm(params, xs[0])[0], ys[0], atol=1e-6)
    x4 = _xs(2, batch=(2, 3))
    np.testing.assert_allclose(
        jaxlstm.conv_lstm(params, x4)[0][1, 2], jaxlstm.conv_lstm(params, x4[1, 2])[0], atol=1e-6
    )
    # lengths: zeros past the end, the final state at the last valid step; reverse reads the valid part back
    ys_l, st_l = jaxlstm.conv_lstm(params, xs, seq_lengths=LENGTHS)
    np.testing.assert_allclose(ys_l[1, 2:], 0)
    np.testing.assert_allclose(st_l.h[1], jaxlstm.conv_lstm(params, xs[1, :2])[1].h, atol=1e-6)
    ys_r, _ = jaxlstm.conv_lstm(params, xs, seq_lengths=LENGTHS, reverse=True)
    np.testing.assert_allclose(ys_r[1, :2], jaxlstm.conv_lstm(params, xs[1, 1::-1])[0][::-1], atol=1e-6)
    # a masked step is removed; a reset restarts from reset_state
    mask = np.ones((B, T), bool)
    mask[0, 1] = False
    ys_m, _ = jaxlstm.conv_lstm(params, xs, mask=mask)
    np.testing.assert_allclose(ys_m[0, 1], 0)
    np.testing.assert_allclose(ys_m[0, 2:], jaxlstm.conv_lstm(params, xs[0, jnp.array([0, 2, 3])])[0][1:], atol=1e-6)
    resets = np.zeros((B, T), bool)
    resets[:, 2] = True
    ys_s, _ = jaxlstm.conv_lstm(params, xs, resets=resets)
    np.testing.assert_allclose(ys_s[:, 2:], jaxlstm.conv_lstm(params, xs[:, 2:])[0], atol=1e-6)
    # other activations reach the cell
    ys_a, _ = jaxlstm.conv_lstm(params, xs, activation=jax.nn.relu)
    s = jaxlstm.conv_zero_state(params, xs[:, 0])
    for t in range(T):
        s, h = jaxlstm.conv_lstm_cell(params, s, xs[:, t], activation=jax.nn.relu)
    np.testing.assert_allclose(h, ys_a[:, -1], atol=1e-6)
    assert not np.allclose(ys_a, ys, atol=1e-3)


def test_modules_match_the_function():
    xs = _xs(2)
    model = jl.ConvLSTM(H, kernel_size=(3, 3), strides=2, padding="valid")
    variables = model.init(jax.random.key(0), xs)
    assert {k: v.shape for k, v in variables["params"].items()} == {
        "w_ih": (3, 3, C, 4 * H), "w_hh": (3, 3, H, 4 * H), "b": (4 * H,)}  # fmt: skip
    ys, st = model.apply(variables, xs, seq_lengths=LENGTHS)
    p = jaxlstm.ConvLSTMParams(**variables["params"])
    want = jaxlstm.conv_lstm(p, xs, strides=2, padding="valid", seq_lengths=LENGTHS)
    np.testing.assert_allclose(ys, want[0], atol=1e-6)
    np.testing.assert_allclose(st.c, want[1].c, atol=1e-6)
    # backward="autodiff" reaches the function: forward-mode AD through the module
    jvp_model = jl.ConvLSTM(H, kernel_size=(3, 3), strides=2, padding="valid", backward="autodiff")
    _, tangent = jax.jvp(lambda x: jvp_model.apply(variables, x)[0], (xs,), (jnp.ones_like(xs),))
    assert tangent.shape == ys.shape
    nmodel = jn.ConvLSTM(C, H, (3, 3), strides=2, padding="valid", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        nmodel(xs, reverse=True)[0],
        jaxlstm.conv_lstm(nmodel.conv_params(), xs, strides=2, padding="valid", reverse=True)[0],
        atol=1e-6,
    )
    # a module's gradient flows (training a ConvLSTM in nnx)
    grads = nnx.grad(lambda m: (m(xs)[0] ** 2).sum())(nmodel)
    assert float(jnp.abs(grads.w_hh[...]).sum()) > 0


def test_bad_arguments_are_named():
    params, xs = _params(2), _xs(2)
    with pytest.raises(TypeError, match="kernel_size must be a tuple of 1 to 3 ints"):
        jaxlstm.init_conv_lstm(jax.random.key(0), C, H, 3)
    with pytest.raises(ValueError, match=r"xs must be \[..., T, \*spatial \(2 dims\), 3\]"):
        jaxlstm.conv_lstm(params, xs[..., :2])
    with pytest.raises(ValueError, match="padding must be one of"):
        jaxlstm.conv_lstm(params, xs, padding="full")
    with pytest.raises(ValueError, match="strides must be an int or a tuple of 2 ints"):
        jaxlstm.conv_lstm(params, xs, strides=(1, 1, 1))
    with pytest.raises(ValueError, match="leaves no output"):
        jaxlstm.conv_lstm(params, xs[:, :, :2, :2], padding="valid")
    with pytest.raises(ValueError, match=r"initial_state.h must have shape \(2, 6, 5, 4\)"):
        jaxlstm.conv_lstm(params, xs, jaxlstm.LSTMState(jnp.zeros((B, 5, 5, H)), jnp.zeros((B, 6, 5, H))))
    with pytest.raises(TypeError, match="params must be ConvLSTMParams"):
        jaxlstm.conv_lstm(jaxlstm.init_lstm(jax.random.key(0), C, H), xs)


def test_bfloat16_and_export():
    """bf16 GEMM operands (and bf16 inputs) stay close to float32, values and gradients; a function using
    conv_lstm exports with jax.export and runs after a serialize / deserialize round trip."""
    from jax import export

    params, xs = _params(2), _xs(2)
    y32 = jaxlstm.conv_lstm(params, xs)[0]
    y16 = jaxlstm.conv_lstm(params, xs, compute_dtype=jnp.bfloat16)[0]
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, y32, atol=2e-2)
    yb, st = jaxlstm.conv_lstm(params, xs.astype(jnp.bfloat16))
    assert yb.dtype == jnp.bfloat16 and st.c.dtype == jnp.float32
    grad = lambda **kw: jax.grad(lambda p: (jaxlstm.conv_lstm(p, xs, **kw)[0] ** 2).sum())(params)
    for g16, g32 in zip(jax.tree.leaves(grad(compute_dtype=jnp.bfloat16)), jax.tree.leaves(grad()), strict=True):
        np.testing.assert_allclose(g16, g32, atol=3e-2 * float(jnp.abs(g32).max()))
    exported = export.export(jax.jit(lambda p, x: jaxlstm.conv_lstm(p, x)[0]))(params, xs)
    np.testing.assert_allclose(export.deserialize(exported.serialize()).call(params, xs), y32, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 2])
def test_gradients_match_flax(rank):
    """Gradients against flax's ConvLSTMCell: jaxlstm's loss as a function of flax's variables (through
    convert.from_flax, linear) and of the inputs has the gradients flax's own loss has."""
    xs = _xs(rank)
    cell = nn.ConvLSTMCell(H, kernel_size=KERNEL[rank])
    rnn = nn.RNN(cell)
    with jax.numpy_rank_promotion("allow"):
        variables = rnn.init(jax.random.key(2), xs)
        variables = jax.tree.map(lambda a: a + 0.2 * np.random.default_rng(6).normal(size=a.shape), variables)
        flax_loss = lambda v, x: (rnn.apply(v, x) ** 2).sum()
        ours = lambda v, x: (jaxlstm.conv_lstm(convert.from_flax(v), x)[0] ** 2).sum()
        want = jax.grad(flax_loss, argnums=(0, 1))(variables, xs)
        got = jax.grad(ours, argnums=(0, 1))(variables, xs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=2e-4 * max(1.0, float(jnp.abs(w).max())))


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_input_gradients_match_keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on {keras.backend.backend()} here, this test needs KERAS_BACKEND=jax")
    xs = _xs(2)
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        layer = keras.layers.ConvLSTM2D(H, KERNEL[2], return_sequences=True, padding="same")
        layer(np.asarray(xs))
        rng = np.random.default_rng(5)
        layer.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in layer.get_weights()])
        params = convert.from_keras(layer)
        want = jax.grad(lambda x: (layer(x) ** 2).sum())(xs)
        got = jax.grad(lambda x: (jaxlstm.conv_lstm(params, x, **convert.keras_kwargs(layer))[0] ** 2).sum())(xs)
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(jnp.abs(want).max())))
