"""linen and nnx modules against the functional core and flax's own cells."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlstm
import jaxlstm.linen as jl
import jaxlstm.nnx as jn
from jaxlstm import convert
from jaxlstm.stack import group_layers, layer_name

D, H, B, T = 3, 4, 3, 6
XS = jax.random.normal(jax.random.key(1), (B, T, D))
LENGTHS = jnp.array([6, 2, 0], jnp.int32)


def _linen_stack_params(variables, num_layers, bidirectional):
    p = variables["params"]
    dirs = 2 if bidirectional else 1
    flat = [convert.from_flax({k[len(layer_name(l, d)) + 1:]: v for k, v in p.items() if k.startswith(layer_name(l, d) + "_")})
            for l in range(num_layers) for d in range(dirs)]
    return group_layers(flat, dirs)


@pytest.mark.parametrize("num_layers,bidirectional,proj", [(1, False, None), (2, True, 2)])
def test_linen_and_nnx_equal_lstm_stack(num_layers, bidirectional, proj):
    model = jl.LSTM(H, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj)
    variables = model.init(jax.random.key(0), XS)
    ys, state = model.apply(variables, XS, seq_lengths=LENGTHS)
    params = _linen_stack_params(variables, num_layers, bidirectional)
    ys_ref, state_ref = jaxlstm.lstm_stack(params, XS, seq_lengths=LENGTHS)
    np.testing.assert_allclose(ys, ys_ref, atol=1e-6)
    np.testing.assert_allclose(state.c, state_ref.c, atol=1e-6)

    m = jn.LSTM(D, H, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj, rngs=nnx.Rngs(0))
    ys_n, state_n = m(XS, seq_lengths=LENGTHS)
    ys_nref, state_nref = jaxlstm.lstm_stack(m.params(), XS, seq_lengths=LENGTHS)
    np.testing.assert_allclose(ys_n, ys_nref, atol=1e-6)
    np.testing.assert_allclose(state_n.h, state_nref.h, atol=1e-6)
    # linen and nnx hold the same parameter structure: load one into the other
    for l, layer in enumerate(params):
        for d, p in enumerate(layer):
            for name, v in p._asdict().items():
                if v is not None:
                    getattr(m, f"{layer_name(l, d)}_{name}")[...] = v
    np.testing.assert_allclose(m(XS, seq_lengths=LENGTHS)[0], ys, atol=1e-6)


def test_cell_plugs_into_flax_rnn_and_matches_optimized_cell():
    ours = nn.RNN(jl.LSTMCell(H))
    v = ours.init(jax.random.key(0), XS)
    ys = ours.apply(v, XS, seq_lengths=LENGTHS)
    ys_ref, _ = jaxlstm.lstm(convert.from_flax(v), XS, seq_lengths=LENGTHS)
    # nn.RNN leaves padded outputs as they are; compare the valid part
    mask = (jnp.arange(T)[None, :] < LENGTHS[:, None])[..., None]
    np.testing.assert_allclose(jnp.where(mask, ys, 0.0), ys_ref, atol=1e-6)

    flax_rnn = nn.RNN(nn.OptimizedLSTMCell(H))
    fv = flax_rnn.init(jax.random.key(2), XS)
    y_flax = flax_rnn.apply(fv, XS)
    y_ours = ours.apply({"params": {"cell": {k: v for k, v in convert.from_flax(fv)._asdict().items() if v is not None}}}, XS)
    np.testing.assert_allclose(y_ours, y_flax, atol=1e-6)
    y_fn, _ = jaxlstm.lstm(convert.from_flax(fv), XS)
    np.testing.assert_allclose(y_fn, y_flax, atol=1e-6)
    # and back: to_flax reproduces flax's own params
    back = convert.to_flax(convert.from_flax(fv))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(fv["params"]["cell"])):
        np.testing.assert_array_equal(a, b)

    # Bidirectional with our cell
    bi = nn.Bidirectional(nn.RNN(jl.LSTMCell(H)), nn.RNN(jl.LSTMCell(H)))
    bv = bi.init(jax.random.key(3), XS)
    assert bi.apply(bv, XS, seq_lengths=LENGTHS).shape == (B, T, 2 * H)


# optax's own code is not clean under strict dtype promotion.
standard_promotion = pytest.mark.usefixtures("standard_promotion")


@standard_promotion
def test_linen_training_reduces_loss_and_dropout():
    model = jl.LSTM(H, num_layers=2, dropout=0.5)
    variables = model.init(jax.random.key(0), XS)
    target = jnp.broadcast_to(jnp.array([0.5, -0.5, 0.3, -0.3]), (B, T, H))
    opt = optax.adam(3e-2)
    params = variables["params"]
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        loss, g = jax.value_and_grad(
            lambda p: jnp.mean((model.apply({"params": p}, XS, deterministic=False, rngs={"dropout": key})[0] - target) ** 2)
        )(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(15):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    det1 = model.apply({"params": params}, XS)[0]
    det2 = model.apply({"params": params}, XS, deterministic=True)[0]
    np.testing.assert_array_equal(det1, det2)
    drop = model.apply({"params": params}, XS, deterministic=False, rngs={"dropout": jax.random.key(0)})[0]
    assert not np.allclose(drop, det1)


@standard_promotion
def test_nnx_training_reduces_loss():
    model = jn.LSTM(D, H, num_layers=2, dropout=0.3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    target = jnp.broadcast_to(jnp.array([0.5, -0.5, 0.3, -0.3]), (B, T, H))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(XS, deterministic=False)[0] - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses
    np.testing.assert_array_equal(model(XS)[0], model(XS, deterministic=True)[0])


@pytest.mark.parametrize("dtype,param_dtype", [(jnp.bfloat16, jnp.float32), (None, jnp.bfloat16)])
def test_dtypes_respected(dtype, param_dtype):
    model = jl.LSTM(H, dtype=dtype, param_dtype=param_dtype)
    v = model.init(jax.random.key(0), XS)
    assert all(a.dtype == param_dtype for a in jax.tree.leaves(v))
    x = XS if dtype is not None else XS.astype(param_dtype)
    ys, _ = model.apply(v, x)
    assert ys.dtype == (dtype or param_dtype)
    m = jn.LSTM(D, H, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    assert all(a.dtype == param_dtype for a in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert m(x)[0].dtype == (dtype or param_dtype)


def test_custom_initialisers_and_nnx_cell():
    model = jl.LSTM(H, bias_init=nn.initializers.constant(0.5), kernel_init=nn.initializers.zeros)
    v = model.init(jax.random.key(0), XS)["params"]
    np.testing.assert_array_equal(v["l0_fwd_b"], 0.5)
    np.testing.assert_array_equal(v["l0_fwd_w_ih"], 0.0)
    np.testing.assert_array_equal(jl.LSTM(H, forget_bias=2.0).init(jax.random.key(0), XS)["params"]["l0_fwd_b"][H:2 * H], 2.0)
    cell = jn.LSTMCell(D, H, rngs=nnx.Rngs(0))
    carry = cell.initialize_carry((B, D))
    for t in range(T):
        carry, y = cell(carry, XS[:, t])
    params = jaxlstm.LSTMParams(cell.w_ih[...], cell.w_hh[...], cell.b[...])
    np.testing.assert_allclose(y, jaxlstm.lstm(params, XS)[0][:, -1], atol=1e-6)


def test_from_flax_errors():
    with pytest.raises(ValueError, match=r"missing \['if', 'ig', 'io', 'hi'"):
        convert.from_flax({"params": {"ii": {"kernel": jnp.zeros((2, 2))}}})
    with pytest.raises(ValueError, match="no projection"):
        convert.to_flax(jaxlstm.init_lstm(jax.random.key(0), 3, 4, proj_size=2))
