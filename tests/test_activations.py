"""Configurable activations (``gate_activation`` / ``activation``) on every XLA path, for the LSTM (plain,
projected and the variants), the GRU and the Elman RNN: values against the NumPy loop of the equations and
against flax's cells (``gate_fn`` / ``activation_fn``) and Keras' layers, gradients of the fused backward
against autodiff in float64, the path selector keeping them off the native code, and the checks."""

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
from helpers import assert_trees_close
from reference import as_dict, gru_ref, lstm_ref, lstm_variant_ref, rnn_ref

B, T, D, H = 3, 6, 4, 5
RNG = np.random.default_rng(7)
MASK = RNG.random((B, T)) < 0.7
RESETS = RNG.random((B, T)) < 0.3
LENGTHS = np.array([6, 3, 0])


# Smooth, so the float64 gradient checks are tight; defined once (a new lambda per call is a new program).
def soft_gate(z):
    return 0.5 * (1.0 + jax.nn.soft_sign(z))


def np_soft_gate(z):
    return 0.5 * (1.0 + z / (1.0 + np.abs(z)))


CASES = {
    "plain": {},
    "lengths_reverse": dict(seq_lengths=LENGTHS, reverse=True),
    "mask_resets": dict(mask=MASK, resets=RESETS),
}


def _xs(seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (B, T, D), dtype)


def _ref_flags(kw):
    return dict(lengths=kw.get("seq_lengths"), reverse=kw.get("reverse", False), mask=kw.get("mask"),
                resets=kw.get("resets"))  # fmt: skip


def _randomized(p, seed=3):
    """Every field random: peephole and layer-norm params are 0 / 1 at init."""
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [a + 0.3 * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backward", ["fused", "autodiff"])
@pytest.mark.parametrize("proj", [None, 3])
def test_lstm_matches_numpy_loop(case, backward, proj):
    kw = CASES[case]
    params = jaxlstm.init_lstm(jax.random.key(0), D, H, proj_size=proj)
    xs = _xs()
    ys, state = jaxlstm.lstm(params, xs, backward=backward, gate_activation=jax.nn.hard_sigmoid,
                             activation=jax.nn.relu, **kw)  # fmt: skip
    R = proj or H
    hard_sigmoid = lambda z: np.clip(z / 6 + 0.5, 0, 1)
    relu = lambda z: np.maximum(z, 0)
    want = lstm_ref(np, as_dict(params), np.asarray(xs, np.float64), np.zeros((B, R)), np.zeros((B, H)),
                    gate_fn=hard_sigmoid, act_fn=relu, **_ref_flags(kw))  # fmt: skip
    np.testing.assert_allclose(ys, want[0], atol=1e-5)
    np.testing.assert_allclose(state.h, want[1], atol=1e-5)
    np.testing.assert_allclose(state.c, want[2], atol=1e-5)
    # and the activations matter: σ and tanh give other numbers
    assert not np.allclose(jaxlstm.lstm(params, xs, **kw)[0], ys, atol=1e-3)


@pytest.mark.parametrize("kind", ["gru", "rnn"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backward", ["fused", "autodiff"])
def test_gru_rnn_match_numpy_loop(kind, case, backward):
    kw = CASES[case]
    params = getattr(jaxlstm, f"init_{kind}")(jax.random.key(0), D, H)
    xs = _xs()
    acts = dict(activation=jnp.sin) if kind == "rnn" else dict(gate_activation=soft_gate, activation=jnp.sin)
    ys, h = getattr(jaxlstm, kind)(params, xs, backward=backward, **acts, **kw)
    x64, h0 = np.asarray(xs, np.float64), np.zeros((B, H))
    if kind == "rnn":
        want = rnn_ref(np, as_dict(params), x64, h0, act_fn=np.sin, **_ref_flags(kw))
    else:
        want = gru_ref(np, as_dict(params), x64, h0, gate_fn=np_soft_gate, act_fn=np.sin, **_ref_flags(kw))
    np.testing.assert_allclose(ys, want[0], atol=1e-5)
    np.testing.assert_allclose(h, want[1], atol=1e-5)


@pytest.mark.parametrize("kind", ["peephole", "all_proj"])
def test_variants_match_numpy_loop(kind):
    variants = dict(peephole=True) if kind == "peephole" else dict(peephole=True, layer_norm=True, proj_size=3)
    params = _randomized(jaxlstm.init_lstm(jax.random.key(0), D, H, **variants))
    xs, kw = _xs(), CASES["mask_resets"]
    ys, state = jaxlstm.lstm(params, xs, gate_activation=soft_gate, activation=jnp.sin, **kw)
    d = as_dict(params)
    d["w_hh_dense"] = d["w_hh"]
    R = params.w_hh.shape[0]
    want = lstm_variant_ref(np, d, np.asarray(xs, np.float64), np.zeros((B, R)), np.zeros((B, H)),
                            gate_fn=np_soft_gate, act_fn=np.sin, **_ref_flags(kw))  # fmt: skip
    np.testing.assert_allclose(ys, want[0], atol=1e-5)
    np.testing.assert_allclose(state.c, want[2], atol=1e-5)


LSTM_GRAD_CASES = {
    "plain": {},
    "proj_reverse_lengths": dict(proj_size=3, seq_lengths=LENGTHS, reverse=True),
    "mask_resets_checkpoint": dict(mask=MASK, resets=RESETS, checkpoint_every=4),
    "zoneout_dropout": dict(zoneout_c=0.3, zoneout_h=0.2, recurrent_dropout=0.25, key=jax.random.key(5)),
    "variant": dict(peephole=True, layer_norm=True),
}


@pytest.mark.parametrize("case", list(LSTM_GRAD_CASES))
def test_lstm_fused_gradients(case):
    """The fused backward with other activations, against autodiff and by finite differences (float64)."""
    kw = dict(LSTM_GRAD_CASES[case])
    init_kw = {k: kw.pop(k) for k in ("proj_size", "peephole", "layer_norm") if k in kw}
    with jax.enable_x64(True):
        params = _randomized(jaxlstm.init_lstm(jax.random.key(0), D, H, dtype=jnp.float64, **init_kw))
        xs = _xs(dtype=jnp.float64)
        acts = dict(gate_activation=soft_gate, activation=jnp.sin)

        def loss(p, x, backward):
            extra = {k: v for k, v in kw.items() if backward == "fused" or k != "checkpoint_every"}
            ys, st = jaxlstm.lstm(p, x, backward=backward, **acts, **extra)
            return (ys**2).sum() + (st.c * jnp.cos(st.c)).sum()

        assert jaxlstm.path_of("lstm", params, xs, **acts, **kw) in ("xla-fused", "xla-fused-variant")
        want = jax.grad(loss, argnums=(0, 1))(params, xs, "autodiff")
        got = jax.grad(loss, argnums=(0, 1))(params, xs, "fused")
        assert_trees_close(got, want, rtol=1e-10, floor=1e-12)
        fused = lambda p, x: loss(p, x, "fused")
        check_grads(fused, (params, xs), order=1, modes=["rev"], atol=1e-5, rtol=1e-5, eps=1e-6)


@pytest.mark.parametrize("kind", ["gru", "rnn"])
@pytest.mark.parametrize("case", ["plain", "mask_resets", "zoneout"])
def test_gru_rnn_fused_gradients(kind, case):
    kw = {"plain": {}, "mask_resets": CASES["mask_resets"],
          "zoneout": dict(zoneout_h=0.3, recurrent_dropout=0.2, key=jax.random.key(2))}[case]  # fmt: skip
    acts = dict(activation=jnp.sin) if kind == "rnn" else dict(gate_activation=soft_gate, activation=jnp.sin)
    with jax.enable_x64(True):
        params = getattr(jaxlstm, f"init_{kind}")(jax.random.key(0), D, H, dtype=jnp.float64)
        params = _randomized(params)
        xs = _xs(dtype=jnp.float64)
        fn = getattr(jaxlstm, kind)

        def loss(p, x, backward):
            ys, h = fn(p, x, backward=backward, **acts, **kw)
            return (ys**2).sum() + jnp.sin(h).sum()

        want = jax.grad(loss, argnums=(0, 1))(params, xs, "autodiff")
        got = jax.grad(loss, argnums=(0, 1))(params, xs, "fused")
        assert_trees_close(got, want, rtol=1e-10, floor=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_path_keeps_other_activations_off_the_native_code(kind):
    params = getattr(jaxlstm, f"init_{kind}")(jax.random.key(0), D, H)
    xs = _xs()
    other = dict(activation=jax.nn.relu)
    assert jaxlstm.path_of(kind, params, xs, **other) == "xla-fused"
    assert jaxlstm.path_of(kind, params, xs, backward="autodiff", **other) == "xla-autodiff"
    # the defaults, passed by name, are the defaults: the same path as a call without them
    same = dict(activation=jnp.tanh) if kind == "rnn" else dict(gate_activation=jax.nn.sigmoid, activation=jnp.tanh)
    assert jaxlstm.path_of(kind, params, xs, **same) == jaxlstm.path_of(kind, params, xs)


def test_flax_cells_with_the_same_activations():
    """flax.linen's LSTMCell / GRUCell / SimpleCell with gate_fn / activation_fn, the same weights."""
    xs = np.asarray(_xs())
    gate, act = jax.nn.hard_sigmoid, jax.nn.gelu
    with jax.numpy_rank_promotion("allow"):
        cell = nn.LSTMCell(H, gate_fn=gate, activation_fn=act)
        variables = nn.RNN(cell).init(jax.random.key(1), xs)
        want = nn.RNN(cell).apply(variables, xs)
        params = jaxlstm.convert.from_flax(variables)
        np.testing.assert_allclose(jaxlstm.lstm(params, xs, gate_activation=gate, activation=act)[0], want, atol=1e-5)

        gcell = nn.GRUCell(H, gate_fn=gate, activation_fn=act)
        gv = nn.RNN(gcell).init(jax.random.key(2), xs)
        want = nn.RNN(gcell).apply(gv, xs)
        p = gv["params"]["cell"]
        cat = lambda names, leaf: jnp.concatenate([p[n][leaf] for n in names], axis=-1)
        gp = jaxlstm.GRUParams(cat(["ir", "iz", "in"], "kernel"), cat(["hr", "hz", "hn"], "kernel"),
                               cat(["ir", "iz", "in"], "bias"), p["hn"]["bias"])  # fmt: skip
        np.testing.assert_allclose(jaxlstm.gru(gp, xs, gate_activation=gate, activation=act)[0], want, atol=1e-5)

        scell = nn.SimpleCell(H, activation_fn=act)
        sv = nn.RNN(scell).init(jax.random.key(3), xs)
        want = nn.RNN(scell).apply(sv, xs)
        p = sv["params"]["cell"]
        rp = jaxlstm.RNNParams(p["i"]["kernel"], p["h"]["kernel"], p["i"]["bias"])
        np.testing.assert_allclose(jaxlstm.rnn(rp, xs, activation=act)[0], want, atol=1e-5)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "SimpleRNN"])
def test_keras_layers_with_other_activations(kind):
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip(f"Keras runs on {keras.backend.backend()} here, this test needs KERAS_BACKEND=jax")
    xs = np.asarray(_xs())
    kw = dict(activation="relu")
    if kind != "SimpleRNN":
        kw["recurrent_activation"] = "hard_sigmoid"
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        layer = getattr(keras.layers, kind)(H, return_sequences=True, **kw)
        layer(xs)
        rng = np.random.default_rng(4)
        layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])
        want = np.asarray(layer(xs))
        acts = jaxlstm.convert.keras_kwargs(layer)
        assert acts.pop("reset_after", True) is True  # a GRU's, Keras' default
        assert acts["activation"] is jax.nn.relu
        if kind == "SimpleRNN":
            w = layer.get_weights()
            got = jaxlstm.rnn(jaxlstm.RNNParams(*(jnp.asarray(a) for a in w)), xs, **acts)[0]
        else:
            assert acts["gate_activation"] is jax.nn.hard_sigmoid
            fn = jaxlstm.lstm if kind == "LSTM" else jaxlstm.gru
            got = fn(jaxlstm.convert.from_keras(layer), xs, **acts)[0]
    np.testing.assert_allclose(got, want, atol=2e-5)
    layer2 = getattr(keras.layers, kind)(H, activation="mish")
    with pytest.raises(ValueError, match="activation is 'mish', which has no JAX counterpart"):
        jaxlstm.convert.keras_kwargs(layer2)


def test_cells_step_stack_and_modules_agree_with_the_sequence():
    acts = dict(gate_activation=soft_gate, activation=jnp.sin)
    xs = _xs()
    params = jaxlstm.init_lstm(jax.random.key(0), D, H)
    ys, final = jaxlstm.lstm(params, xs, **acts)
    state = jaxlstm.zero_state(B, H)
    state2 = state
    for t in range(T):
        state, y = jaxlstm.lstm_cell(params, state, xs[:, t], **acts)
        state2, y2 = jaxlstm.step(params, state2, xs[:, t], **acts)
        np.testing.assert_allclose(y, ys[:, t], atol=1e-6)
        np.testing.assert_allclose(y2, ys[:, t], atol=1e-6)
    for kind in ("gru", "rnn"):
        p = getattr(jaxlstm, f"init_{kind}")(jax.random.key(0), D, H)
        a = dict(activation=jnp.sin) if kind == "rnn" else acts
        ys_k, _ = getattr(jaxlstm, kind)(p, xs, **a)
        h = jnp.zeros((B, H))
        for t in range(T):
            h, y = jaxlstm.step(p, h, xs[:, t], **a)
            _, y_cell = getattr(jaxlstm, f"{kind}_cell")(p, h * 0 + (ys_k[:, t - 1] if t else 0), xs[:, t], **a)
            np.testing.assert_allclose(y, ys_k[:, t], atol=1e-6)
            np.testing.assert_allclose(y_cell, ys_k[:, t], atol=1e-6)

    # a stack is its layers, each with the activations
    sp = jaxlstm.init_lstm_stack(jax.random.key(1), D, H, num_layers=2, bidirectional=True)
    ys_s, _ = jaxlstm.lstm_stack(sp, xs, **acts)
    layer = lambda p, x: jnp.concatenate(
        [jaxlstm.lstm(p[0], x, **acts)[0], jaxlstm.lstm(p[1], x, reverse=True, **acts)[0]], -1
    )
    l1 = layer(sp[1], layer(sp[0], xs))
    np.testing.assert_allclose(ys_s, l1, atol=1e-5)

    # the modules hand them on: linen and nnx, the cell and the stack
    model = jl.LSTM(H, num_layers=2, bidirectional=True, **acts)
    np.testing.assert_allclose(model.apply({"params": jl.stack_variables(sp)["params"]}, xs)[0], ys_s, atol=1e-6)
    cell = jl.LSTMCell(H, **acts)
    cell_vars = {"params": {k: v for k, v in params._asdict().items() if v is not None}}
    carry = (jnp.zeros((B, H)), jnp.zeros((B, H)))
    np.testing.assert_allclose(cell.apply(cell_vars, carry, xs[:, 0])[1], ys[:, 0], atol=1e-6)
    nmodel = jn.LSTM(D, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0), **acts)
    jn.set_stack_params(nmodel, sp)
    np.testing.assert_allclose(nmodel(xs)[0], ys_s, atol=1e-6)
    ncell = jn.LSTMCell(D, H, rngs=nnx.Rngs(0), **acts)
    ncell.w_ih.value, ncell.w_hh.value, ncell.b.value = params.w_ih, params.w_hh, params.b
    np.testing.assert_allclose(ncell(carry, xs[:, 0])[1], ys[:, 0], atol=1e-6)


def test_bad_activations_are_named():
    params, xs = jaxlstm.init_lstm(jax.random.key(0), D, H), _xs()
    with pytest.raises(TypeError, match="gate_activation must be a JAX function.*'sigmoid'"):
        jaxlstm.lstm(params, xs, gate_activation="sigmoid")
    with pytest.raises(ValueError, match="activation must be elementwise.*shape \\(\\)"):
        jaxlstm.lstm(params, xs, activation=jnp.sum)
    with pytest.raises(TypeError, match="activation must be an elementwise JAX function of one array"):
        jaxlstm.gru(jaxlstm.init_gru(jax.random.key(0), D, H), xs, activation=lambda a, b: a)
    with pytest.raises(TypeError, match="gate_activation=.*flax's gate_fn"):
        jaxlstm.lstm(params, xs, gate_fn=jax.nn.sigmoid)
    with pytest.raises(TypeError, match="activation=jax.nn.relu"):
        jaxlstm.rnn(jaxlstm.init_rnn(jax.random.key(0), D, H), xs, nonlinearity="relu")


def test_gradients_match_flax_cells():
    """Gradients with other activations against flax's LSTMCell / GRUCell with the same gate_fn /
    activation_fn: jaxlstm's loss as a function of flax's variables (convert.from_flax / the GRU's
    concatenation, linear) and of the inputs has flax's gradients."""
    xs = _xs()
    gate, act = soft_gate, jnp.sin
    with jax.numpy_rank_promotion("allow"):
        rnn = nn.RNN(nn.LSTMCell(H, gate_fn=gate, activation_fn=act))
        v = rnn.init(jax.random.key(1), xs)
        want = jax.grad(lambda v, x: (rnn.apply(v, x) ** 2).sum(), argnums=(0, 1))(v, xs)
        ours = lambda v, x: (
            jaxlstm.lstm(jaxlstm.convert.from_flax(v), x, gate_activation=gate, activation=act)[0] ** 2
        ).sum()
        got = jax.grad(ours, argnums=(0, 1))(v, xs)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4)

        grnn = nn.RNN(nn.GRUCell(H, gate_fn=gate, activation_fn=act))
        gv = grnn.init(jax.random.key(2), xs)

        def gru_params(v):
            p = v["params"]["cell"]
            cat = lambda names, leaf: jnp.concatenate([p[n][leaf] for n in names], axis=-1)
            return jaxlstm.GRUParams(cat(["ir", "iz", "in"], "kernel"), cat(["hr", "hz", "hn"], "kernel"),
                                     cat(["ir", "iz", "in"], "bias"), p["hn"]["bias"])  # fmt: skip

        want = jax.grad(lambda v, x: (grnn.apply(v, x) ** 2).sum(), argnums=(0, 1))(gv, xs)
        ours = lambda v, x: (jaxlstm.gru(gru_params(v), x, gate_activation=gate, activation=act)[0] ** 2).sum()
        got = jax.grad(ours, argnums=(0, 1))(gv, xs)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4)
