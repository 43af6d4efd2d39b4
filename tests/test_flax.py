"""linen and nnx modules against the functional core and flax's own cells."""

import chex
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

D, H, B, T = 3, 4, 3, 6
XS = jax.random.normal(jax.random.key(1), (B, T, D))
LENGTHS = jnp.array([6, 2, 0], jnp.int32)


@pytest.mark.parametrize("num_layers,bidirectional,proj", [(1, False, None), (2, True, 2)])
def test_linen_and_nnx_equal_lstm_stack(num_layers, bidirectional, proj):
    model = jl.LSTM(H, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj)
    variables = model.init(jax.random.key(0), XS)
    ys, state = model.apply(variables, XS, seq_lengths=LENGTHS)
    params = jl.stack_params(variables)
    assert len(params) == num_layers and len(params[0]) == (2 if bidirectional else 1)
    chex.assert_trees_all_equal(jl.stack_variables(params), variables)
    ys_ref, state_ref = jaxlstm.lstm_stack(params, XS, seq_lengths=LENGTHS)
    np.testing.assert_allclose(ys, ys_ref, atol=1e-6)
    np.testing.assert_allclose(state.c, state_ref.c, atol=1e-6)

    m = jn.LSTM(D, H, num_layers=num_layers, bidirectional=bidirectional, proj_size=proj, rngs=nnx.Rngs(0))
    ys_n, state_n = m(XS, seq_lengths=LENGTHS)
    ys_nref, state_nref = jaxlstm.lstm_stack(jn.stack_params(m), XS, seq_lengths=LENGTHS)
    np.testing.assert_allclose(ys_n, ys_nref, atol=1e-6)
    np.testing.assert_allclose(state_n.h, state_nref.h, atol=1e-6)
    # linen and nnx hold the same parameter tree: load one into the other
    jn.set_stack_params(m, params)
    np.testing.assert_allclose(m(XS, seq_lengths=LENGTHS)[0], ys, atol=1e-6)
    assert nnx.to_pure_dict(nnx.state(m, nnx.Param)).keys() == variables["params"].keys()


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
    y_ours = ours.apply(
        {"params": {"cell": {k: v for k, v in convert.from_flax(fv)._asdict().items() if v is not None}}}, XS
    )
    np.testing.assert_allclose(y_ours, y_flax, atol=1e-6)
    y_fn, _ = jaxlstm.lstm(convert.from_flax(fv), XS)
    np.testing.assert_allclose(y_fn, y_flax, atol=1e-6)
    # and back: to_flax reproduces flax's own params
    back = convert.to_flax(convert.from_flax(fv))
    chex.assert_trees_all_equal(back, fv["params"]["cell"])

    # Bidirectional with our cell
    bi = nn.Bidirectional(nn.RNN(jl.LSTMCell(H)), nn.RNN(jl.LSTMCell(H)))
    bv = bi.init(jax.random.key(3), XS)
    assert bi.apply(bv, XS, seq_lengths=LENGTHS).shape == (B, T, 2 * H)


# optax's own code is not clean under strict dtype promotion.
standard_promotion = pytest.mark.usefixtures("standard_promotion")


@standard_promotion
def test_linen_training_reduces_loss_and_dropout():
    model = jl.LSTM(H, num_layers=2, dropout=0.5)
    variables = model.init(jax.random.key(0), XS, deterministic=True)
    target = jnp.broadcast_to(jnp.array([0.5, -0.5, 0.3, -0.3]), (B, T, H))
    opt = optax.adam(3e-2)
    params = variables["params"]
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        loss, g = jax.value_and_grad(
            lambda p: jnp.mean(
                (model.apply({"params": p}, XS, deterministic=False, rngs={"dropout": key})[0] - target) ** 2
            )
        )(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(15):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    det1 = jl.LSTM(H, num_layers=2, dropout=0.5, deterministic=True).apply({"params": params}, XS)[0]
    det2 = model.apply({"params": params}, XS, deterministic=True)[0]
    np.testing.assert_array_equal(det1, det2)
    drop = model.apply({"params": params}, XS, deterministic=False, rngs={"dropout": jax.random.key(0)})[0]
    assert not np.allclose(drop, det1)


@standard_promotion
def test_nnx_training_reduces_loss():
    model = jn.LSTM(D, H, num_layers=2, dropout=0.3, rngs=nnx.Rngs(0))
    model.train()
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
    target = jnp.broadcast_to(jnp.array([0.5, -0.5, 0.3, -0.3]), (B, T, H))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(XS)[0] - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    np.testing.assert_array_equal(model(XS)[0], model(XS)[0])


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
    np.testing.assert_array_equal(v["layer_0"]["forward"]["b"], 0.5)
    np.testing.assert_array_equal(v["layer_0"]["forward"]["w_ih"], 0.0)
    v2 = jl.LSTM(H, forget_bias=2.0).init(jax.random.key(0), XS)["params"]
    np.testing.assert_array_equal(v2["layer_0"]["forward"]["b"][H : 2 * H], 2.0)
    cell = jn.LSTMCell(D, H, rngs=nnx.Rngs(0))
    carry = cell.initialize_carry((B, D))
    for t in range(T):
        carry, y = cell(carry, XS[:, t])
    params = cell.lstm_params()
    np.testing.assert_allclose(y, jaxlstm.lstm(params, XS)[0][:, -1], atol=1e-6)


def test_from_flax_errors():
    with pytest.raises(ValueError, match=r"missing \['if', 'ig', 'io', 'hi'"):
        convert.from_flax({"params": {"ii": {"kernel": jnp.zeros((2, 2))}}})
    with pytest.raises(ValueError, match="no projection"):
        convert.to_flax(jaxlstm.init_lstm(jax.random.key(0), 3, 4, proj_size=2))


def test_dropout_follows_flax_conventions():
    """linen: like nn.Dropout, `deterministic` is an attribute or a call argument,
    exactly one of them; nnx: model.train() / model.eval() switch it."""
    model = jl.LSTM(H, num_layers=2, dropout=0.5)
    v = model.init(jax.random.key(0), XS, deterministic=True)
    with pytest.raises(ValueError, match="deterministic"):
        model.apply(v, XS)
    rng = {"dropout": jax.random.key(1)}
    train = jl.LSTM(H, num_layers=2, dropout=0.5, deterministic=False)
    assert not np.allclose(train.apply(v, XS, rngs=rng)[0], model.apply(v, XS, deterministic=True)[0])
    with pytest.raises(ValueError, match="deterministic"):  # as nn.Dropout: not both
        train.apply(v, XS, deterministic=True)
    # no dropout: nothing is required
    jl.LSTM(H).apply(jl.LSTM(H).init(jax.random.key(0), XS), XS)

    m = jn.LSTM(D, H, num_layers=2, dropout=0.5, rngs=nnx.Rngs(0))
    m.train()
    assert not np.allclose(m(XS)[0], m(XS)[0])
    m.eval()
    np.testing.assert_array_equal(m(XS)[0], m(XS)[0])
    assert not np.allclose(m(XS, deterministic=False)[0], m(XS)[0])


def test_zero_sizes_raise_value_errors():
    with pytest.raises(ValueError, match="features must be a positive int, got 0"):
        jl.LSTM(0).init(jax.random.key(0), XS)
    with pytest.raises(ValueError, match="features must be a positive int, got 0"):
        nn.RNN(jl.LSTMCell(0)).init(jax.random.key(0), XS)
    with pytest.raises(ValueError, match="hidden_features must be a positive int, got 0"):
        jn.LSTM(D, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        jn.LSTMCell(0, H, rngs=nnx.Rngs(0))
