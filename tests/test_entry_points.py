"""Every entry point as a new user meets it: clear errors, no silent garbage, one set
of conventions (the table in the README), layers without bias end to end."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlstm
import jaxlstm.linen as jl
import jaxlstm.nnx as jn
from helpers import assert_trees_close
from jaxlstm import convert

D, H, B, T = 3, 4, 2, 5
KEY = jax.random.key(0)
PARAMS = jaxlstm.init_lstm(KEY, D, H)
XS = jax.random.normal(jax.random.key(1), (B, T, D))


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.bool_])
def test_integer_compute_dtype_is_rejected(dtype):
    match = "compute_dtype must be a floating dtype"
    with pytest.raises(TypeError, match=match):
        jaxlstm.lstm(PARAMS, XS, compute_dtype=dtype)
    with pytest.raises(TypeError, match=match):
        jaxlstm.lstm_cell(PARAMS, jaxlstm.zero_state(B, H), XS[:, 0], compute_dtype=dtype)
    with pytest.raises(TypeError, match=match):
        jaxlstm.gru(jaxlstm.init_gru(KEY, D, H), XS, compute_dtype=dtype)
    with pytest.raises(TypeError, match=match):
        jaxlstm.lstm_stack(jaxlstm.init_lstm_stack(KEY, D, H), XS, compute_dtype=dtype)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"w_ih": 1}, r"params must be LSTMParams .*a dict; convert flax variables with jaxlstm.convert.from_flax"),
        (nn.RNN(nn.OptimizedLSTMCell(H)).init(KEY, XS), r"convert.from_flax"),
        (XS, r"an array of shape \(2, 5, 3\); the order is lstm\(params, xs\)"),
        (jaxlstm.init_lstm_stack(KEY, D, H), r"stack params .*jaxlstm.lstm_stack"),
        (jaxlstm.init_gru(KEY, D, H), r"GRUParams \(use jaxlstm.gru"),
    ],
)
def test_params_of_the_wrong_kind(bad, match):
    with pytest.raises(TypeError, match=match):
        jaxlstm.lstm(bad, XS)


def test_swapped_arguments_and_wrong_cells():
    with pytest.raises(TypeError, match=r"params must be LSTMParams .*the order is lstm\(params, xs\)"):
        jaxlstm.lstm(XS, PARAMS)
    with pytest.raises(TypeError, match=r"params must be GRUParams .*LSTMParams \(use jaxlstm.lstm"):
        jaxlstm.gru(PARAMS, XS)
    with pytest.raises(TypeError, match=r"params must be a non-empty tuple of layers.*one layer's LSTMParams"):
        jaxlstm.lstm_stack(PARAMS, XS)


def test_plain_tuple_state_is_rejected_with_a_hint():
    h = c = jnp.zeros((B, H))
    with pytest.raises(TypeError, match=r"initial_state must be an LSTMState\(h, c\) \(wrap a pair"):
        jaxlstm.lstm(PARAMS, XS, (h, c))
    with pytest.raises(TypeError, match=r"state must be an LSTMState"):
        jaxlstm.lstm_cell(PARAMS, (h, c), XS[:, 0])
    stack = jaxlstm.init_lstm_stack(KEY, D, H)
    with pytest.raises(TypeError, match=r"initial_state must be an LSTMState"):
        jaxlstm.lstm_stack(stack, XS, (h[None], c[None]))


def test_float64_numpy_input_does_not_warn():
    """x64 off: float64 NumPy arrays are taken as float32 once, with no warning
    from inside jaxlstm (pytest turns warnings into errors; checked here too)."""
    xs = np.random.default_rng(0).standard_normal((B, T, D))
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), PARAMS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys, _ = jaxlstm.lstm(PARAMS, xs)
        jaxlstm.lstm(p64, xs)
        jax.grad(lambda p: jaxlstm.lstm(p, xs)[0].sum())(PARAMS)
        jaxlstm.lstm_cell(PARAMS, jaxlstm.zero_state(B, H), xs[:, 0])
        jaxlstm.gru(jaxlstm.init_gru(KEY, D, H), xs)
        jaxlstm.lstm_stack(jaxlstm.init_lstm_stack(KEY, D, H), xs)
    assert ys.dtype == jnp.float32
    np.testing.assert_allclose(ys, jaxlstm.lstm(PARAMS, jnp.asarray(xs, jnp.float32))[0], rtol=1e-6)


def test_non_bool_flags_and_mixed_dtypes():
    with pytest.raises(TypeError, match=r"reverse must be a bool, got 'yes'"):
        jaxlstm.lstm(PARAMS, XS, reverse="yes")
    with pytest.raises(TypeError, match=r"time_major must be a bool"):
        jaxlstm.rnn(jaxlstm.init_rnn(KEY, D, H), XS, time_major=1)
    mixed = PARAMS._replace(w_ih=PARAMS.w_ih.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match=r"params must have one dtype throughout .*w_ih bfloat16, w_hh float32"):
        jaxlstm.lstm(mixed, XS)


def test_cell_given_a_sequence_blames_x():
    with pytest.raises(ValueError, match=r"x must have rank 2, shape \(2, 3\) .*one step, not a sequence"):
        jaxlstm.lstm_cell(PARAMS, jaxlstm.zero_state(B, H), XS)
    with pytest.raises(ValueError, match=r"x must have rank 2"):
        jaxlstm.gru_cell(jaxlstm.init_gru(KEY, D, H), jnp.zeros((B, H)), XS)


def test_jit_of_the_public_functions():
    lengths = [5, 3]
    want, _ = jaxlstm.lstm(PARAMS, XS, seq_lengths=jnp.array(lengths), reverse=True)
    # a traced flag gets a TypeError that says what to do
    with pytest.raises(TypeError, match=r"reverse must be a Python bool, got a traced value.*static_argnames"):
        jax.jit(jaxlstm.lstm)(PARAMS, XS, reverse=True)
    # ... which works, with seq_lengths as a list too
    fast = jax.jit(jaxlstm.lstm, static_argnames=("reverse",))
    got, _ = fast(PARAMS, XS, seq_lengths=lengths, reverse=True)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    got2, _ = jax.jit(jaxlstm.lstm)(PARAMS, XS, seq_lengths=lengths)
    np.testing.assert_allclose(got2, jaxlstm.lstm(PARAMS, XS, seq_lengths=jnp.array(lengths))[0], rtol=1e-6)


def test_from_cudnn_under_jit_and_grad():
    w = convert.to_cudnn(jaxlstm.init_lstm_stack(KEY, D, H, 2, bidirectional=True))
    eager = convert.from_cudnn(w, D, H, 2, True)
    jitted = jax.jit(lambda w: convert.from_cudnn(w, D, H, 2, True))(w)
    chex.assert_trees_all_equal(jitted, eager)
    g = jax.grad(lambda w: jaxlstm.lstm_stack(convert.from_cudnn(w, D, H, 2, True), XS)[0].sum())(w)
    assert g.shape == w.shape and bool(jnp.any(g != 0))


def test_to_torch_keeps_dtype_and_bias_free_layers():
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), jaxlstm.init_lstm_stack(KEY, D, H))
    sd = convert.to_torch(p16, as_numpy=True)
    assert {v.dtype for v in sd.values()} == {np.dtype(jnp.bfloat16)}
    nobias = jaxlstm.init_lstm_stack(KEY, D, H, 2, bidirectional=True, bias=False)
    sd = convert.to_torch(nobias, as_numpy=True)
    assert not any(k.startswith("bias") for k in sd)
    back = convert.from_torch(sd)
    chex.assert_trees_all_equal(back, nobias)
    assert back[1][1].b is None


def test_to_torch_loads_into_torch_modules():
    torch = pytest.importorskip("torch")
    nobias = jaxlstm.init_lstm_stack(KEY, D, H, 2, bidirectional=True, bias=False)
    m = torch.nn.LSTM(D, H, num_layers=2, bidirectional=True, bias=False, batch_first=True)
    m.load_state_dict(convert.to_torch(nobias))
    with torch.no_grad():
        y = m(torch.from_numpy(np.array(XS)))[0].numpy()
    np.testing.assert_allclose(y, jaxlstm.lstm_stack(nobias, XS)[0], atol=1e-5)
    m16 = torch.nn.LSTM(D, H, batch_first=True).to(torch.bfloat16)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), jaxlstm.init_lstm_stack(KEY, D, H))
    m16.load_state_dict(convert.to_torch(p16))
    assert m16.weight_ih_l0.dtype == torch.bfloat16


def test_bias_free_layers_end_to_end():
    """b=None is the same LSTM as a zero bias, with no bias gradient; the Flax
    modules take use_bias=False."""
    nob = jaxlstm.init_lstm(KEY, D, H, proj_size=2, bias=False)
    zero = nob._replace(b=jnp.zeros((4 * H,)))
    lengths = jnp.array([5, 2])
    for kw in ({}, {"checkpoint_every": 2, "reverse": True}, {"backward": "autodiff"}):
        loss = lambda p, kw=kw: (jaxlstm.lstm(p, XS, seq_lengths=lengths, **kw)[0] ** 2).sum()
        g, g0 = jax.grad(loss)(nob), jax.grad(loss)(zero)
        assert g.b is None
        assert_trees_close(g._replace(b=g0.b), g0, rtol=1e-6)
    np.testing.assert_allclose(
        jaxlstm.lstm_cell(nob, jaxlstm.zero_state(B, H, proj_size=2), XS[:, 0])[1],
        jaxlstm.lstm_cell(zero, jaxlstm.zero_state(B, H, proj_size=2), XS[:, 0])[1],
    )

    v = jl.LSTM(H, num_layers=2, use_bias=False).init(KEY, XS)
    assert "b" not in v["params"]["layer_1"]["forward"]
    assert jl.stack_params(v)[1][0].b is None
    cell_v = nn.RNN(jl.LSTMCell(H, use_bias=False)).init(KEY, XS)
    assert set(cell_v["params"]["cell"]) == {"w_ih", "w_hh"}
    m = jn.LSTM(D, H, use_bias=False, rngs=nnx.Rngs(0))
    assert jn.stack_params(m)[0][0].b is None
    assert jn.LSTMCell(D, H, use_bias=False, rngs=nnx.Rngs(0)).lstm_params().b is None


def test_from_flax_as_variables_for_the_linen_cell():
    flax_rnn = nn.RNN(nn.OptimizedLSTMCell(H))
    fv = flax_rnn.init(KEY, XS)
    ours = nn.RNN(jl.LSTMCell(H))
    np.testing.assert_allclose(
        ours.apply(convert.from_flax(fv, as_variables=True), XS), flax_rnn.apply(fv, XS), atol=1e-6
    )


# The README's conventions table, as code: (entry point, call, what it returns).
def _conventions():
    p, s = PARAMS, jaxlstm.zero_state(B, H)
    gru_p, rnn_p = jaxlstm.init_gru(KEY, D, H), jaxlstm.init_rnn(KEY, D, H)
    stack = jaxlstm.init_lstm_stack(KEY, D, H, 2)
    h0 = jnp.zeros((B, H))
    cell_state = lambda out: (out[0], out[1])
    return {
        "lstm -> (ys [B,T,R], LSTMState)": (lambda: jaxlstm.lstm(p, XS, s), ((B, T, H), jaxlstm.LSTMState)),
        "lstm_cell -> (LSTMState, h)": (
            lambda: cell_state(jaxlstm.lstm_cell(p, s, XS[:, 0])),
            (jaxlstm.LSTMState, (B, H)),
        ),
        "lstm_stack -> (ys, LSTMState [L*dirs, ...])": (
            lambda: jaxlstm.lstm_stack(stack, XS, None),
            ((B, T, H), jaxlstm.LSTMState),
        ),
        "gru -> (ys, h)": (lambda: jaxlstm.gru(gru_p, XS, h0), ((B, T, H), (B, H))),
        "gru_cell -> (h, h)": (lambda: jaxlstm.gru_cell(gru_p, h0, XS[:, 0]), ((B, H), (B, H))),
        "rnn -> (ys, h)": (lambda: jaxlstm.rnn(rnn_p, XS, h0), ((B, T, H), (B, H))),
        "rnn_cell -> (h, h)": (lambda: jaxlstm.rnn_cell(rnn_p, h0, XS[:, 0]), ((B, H), (B, H))),
    }


@pytest.mark.parametrize("name", list(_conventions()))
def test_conventions_table(name):
    """Sequences return (outputs, final state) as PyTorch's nn.LSTM; one-step cells
    return (new state, output) as a lax.scan body and flax's cells do."""
    call, expected = _conventions()[name]
    out = call()
    assert isinstance(out, tuple) and len(out) == 2
    for got, want in zip(out, expected, strict=True):
        if isinstance(want, type):
            assert isinstance(got, want), (name, type(got))
        else:
            assert got.shape == want, (name, got.shape)
    # a cell steps a lax.scan as it is
    if "cell" in name:
        fn = {"lstm_cell": jaxlstm.lstm_cell, "gru_cell": jaxlstm.gru_cell, "rnn_cell": jaxlstm.rnn_cell}
        cell = name.split(" ")[0]
        p = {"lstm_cell": PARAMS, "gru_cell": jaxlstm.init_gru(KEY, D, H), "rnn_cell": jaxlstm.init_rnn(KEY, D, H)}
        init = jaxlstm.zero_state(B, H) if cell == "lstm_cell" else jnp.zeros((B, H))
        _, ys = jax.lax.scan(lambda st, x: fn[cell](p[cell], st, x), init, jnp.swapaxes(XS, 0, 1))
        seq = {"lstm_cell": jaxlstm.lstm, "gru_cell": jaxlstm.gru, "rnn_cell": jaxlstm.rnn}[cell]
        np.testing.assert_allclose(jnp.swapaxes(ys, 0, 1), seq(p[cell], XS)[0], atol=1e-6)
