"""lstm_stack against a plain loop over layers/directions of the core lstm, and PyTorch parity."""

import glob
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from make_torch_golden import CONFIGS, loss_weights, torch_lstm_run

import jaxlstm
from jaxlstm import convert

GOLDEN = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "golden", "lstm_*.npz")))
try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


def _loop_reference(params, xs, state, seq_lengths):
    """Layer by layer, direction by direction, with the core single-layer lstm."""
    dirs = len(params[0])
    hs, cs = [], []
    for l, layer in enumerate(params):
        outs = []
        for d, p in enumerate(layer):
            i = l * dirs + d
            s0 = None if state is None else jaxlstm.LSTMState(state.h[i], state.c[i])
            ys, s = jaxlstm.lstm(p, xs, s0, seq_lengths=seq_lengths, reverse=bool(d), backward="autodiff")
            outs.append(ys)
            hs.append(s.h)
            cs.append(s.c)
        xs = jnp.concatenate(outs, axis=-1)
    return xs, jnp.stack(hs), jnp.stack(cs)


@pytest.mark.parametrize("num_layers,bidirectional,proj", [(2, True, None), (3, False, 2)])
def test_stack_matches_layer_loop(num_layers, bidirectional, proj):
    k = jax.random.split(jax.random.key(0), 4)
    params = jaxlstm.init_lstm_stack(k[0], 3, 4, num_layers, bidirectional=bidirectional, proj_size=proj)
    xs = jax.random.normal(k[1], (3, 6, 3))
    n = num_layers * (2 if bidirectional else 1)
    R = proj or 4
    state = jaxlstm.LSTMState(jax.random.normal(k[2], (n, 3, R)), jax.random.normal(k[3], (n, 3, 4)))
    lengths = jnp.array([6, 0, 3], jnp.int32)
    ys, final = jaxlstm.lstm_stack(params, xs, state, seq_lengths=lengths)
    ys_ref, h_ref, c_ref = _loop_reference(params, xs, state, lengths)
    assert ys.shape == (3, 6, (2 if bidirectional else 1) * R) and final.h.shape == (n, 3, R)
    np.testing.assert_allclose(ys, ys_ref, atol=1e-6)
    np.testing.assert_allclose(final.h, h_ref, atol=1e-6)
    np.testing.assert_allclose(final.c, c_ref, atol=1e-6)
    # gradients of the fused path equal autodiff of the loop
    loss = lambda p: (jaxlstm.lstm_stack(p, xs, state, seq_lengths=lengths)[0] ** 2).sum()
    loss_ref = lambda p: (_loop_reference(p, xs, state, lengths)[0] ** 2).sum()
    chex.assert_trees_all_close(jax.grad(loss)(params), jax.grad(loss_ref)(params), atol=2e-5, rtol=1e-5)


def test_dropout_between_layers_only():
    params = jaxlstm.init_lstm_stack(jax.random.key(0), 3, 4, 2)
    xs = jnp.ones((2, 5, 3))
    y0, _ = jaxlstm.lstm_stack(params, xs)
    y1, _ = jaxlstm.lstm_stack(params, xs, dropout=0.5, key=jax.random.key(1))
    y2, _ = jaxlstm.lstm_stack(params, xs, dropout=0.5, key=jax.random.key(2))
    assert not np.allclose(y0, y1) and not np.allclose(y1, y2)
    # A single layer has no "between": dropout changes nothing.
    one = params[:1]
    np.testing.assert_array_equal(
        jaxlstm.lstm_stack(one, xs)[0], jaxlstm.lstm_stack(one, xs, dropout=0.5, key=jax.random.key(1))[0]
    )
    with pytest.raises(ValueError, match="recurrent_dropout / zoneout > 0 need a PRNG key"):
        jaxlstm.lstm_stack(params, xs, dropout=0.1)


def test_stack_bad_inputs():
    params = jaxlstm.init_lstm_stack(jax.random.key(0), 3, 4, 2, bidirectional=True)
    xs = jnp.ones((2, 5, 3))
    bad = (params[0], (params[1][0]._replace(w_ih=jnp.ones((4, 16))), params[1][1]))
    with pytest.raises(ValueError, match=r"params\[1\]\[0\] must have input size 8"):
        jaxlstm.lstm_stack(bad, xs)
    with pytest.raises(ValueError, match=r"params\[1\] must hold 2 directions"):
        jaxlstm.lstm_stack((params[0], params[1][:1]), xs)
    for fuse in (False, True):
        with pytest.raises(ValueError, match=r"seq_lengths must have shape \(2,\)"):
            jaxlstm.lstm_stack(params, xs, seq_lengths=jnp.array([1, 2, 3]), fuse_directions=fuse)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\)"):
        jaxlstm.lstm_stack(params, xs, dropout=1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"initial_state.h must have shape \(4, 2, 4\)"):
        jaxlstm.lstm_stack(params, xs, jaxlstm.LSTMState(jnp.zeros((2, 2, 4)), jnp.zeros((4, 2, 4))))


def _run_golden(z, sd_params):
    xs = jnp.asarray(z["x"])
    lengths = jnp.asarray(z["lengths"]) if "lengths" in z else None
    state = jaxlstm.LSTMState(jnp.asarray(z["h0"]), jnp.asarray(z["c0"])) if "h0" in z else None
    ys, final = jaxlstm.lstm_stack(
        sd_params, xs, None if state is None else jaxlstm.LSTMState(state.h, state.c), seq_lengths=lengths
    )
    wo, wh, wc = loss_weights(ys.shape, final.h.shape, final.c.shape)

    def loss(p, x):
        ys, s = jaxlstm.lstm_stack(p, x, state, seq_lengths=lengths)
        return (ys * wo).sum() + (s.h * wh).sum() + (s.c * wc).sum()

    gp, gx = jax.grad(loss, argnums=(0, 1))(sd_params, xs)
    return ys, final, gp, gx


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: os.path.basename(p))
def test_torch_golden_parity(path):
    z = dict(np.load(path))
    sd = {k[3:]: v for k, v in z.items() if k.startswith("sd.")}
    params = convert.from_torch(sd)
    ys, final, gp, gx = _run_golden(z, params)
    np.testing.assert_allclose(ys, z["out"], atol=1e-5)
    np.testing.assert_allclose(final.h, z["h_n"], atol=1e-5)
    np.testing.assert_allclose(final.c, z["c_n"], atol=1e-5)
    np.testing.assert_allclose(gx, z["dx"], atol=1e-5)
    # Gradients exported under PyTorch's names match torch's own parameter gradients.
    named = convert.to_torch(gp, as_numpy=True)
    for k, v in named.items():
        if not k.startswith("bias_hh"):  # to_torch puts the whole bias gradient on bias_ih
            np.testing.assert_allclose(v, z["grad." + k], atol=1e-5, err_msg=k)
    # Round trip through the PyTorch layout is exact.
    back = convert.from_torch(convert.to_torch(params, as_numpy=True))
    chex.assert_trees_all_equal(back, params)


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed (the golden files cover parity)")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_live_round_trip(name):
    import torch

    cfg = CONFIGS[name]
    m = torch.nn.LSTM(
        4,
        6,
        num_layers=cfg["num_layers"],
        bidirectional=cfg["bidirectional"],
        proj_size=cfg["proj_size"],
        batch_first=True,
    )
    params = convert.from_torch(m)
    # perturb in JAX, export, load into a fresh module, compare live
    params = jax.tree.map(lambda a: a * 1.1, params)
    fresh = torch.nn.LSTM(
        4,
        6,
        num_layers=cfg["num_layers"],
        bidirectional=cfg["bidirectional"],
        proj_size=cfg["proj_size"],
        batch_first=True,
    )
    fresh.load_state_dict(convert.to_torch(params))
    x = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    sd = {k: v.detach().numpy() for k, v in fresh.state_dict().items()}
    out, h_n, c_n, dx, _ = torch_lstm_run(sd, x, cfg["lengths"], None, None, cfg)
    lengths = None if cfg["lengths"] is None else jnp.asarray(cfg["lengths"], jnp.int32)
    ys, final = jaxlstm.lstm_stack(params, jnp.asarray(x), seq_lengths=lengths)
    np.testing.assert_allclose(ys, out, atol=1e-5)
    np.testing.assert_allclose(final.h, h_n, atol=1e-5)
    np.testing.assert_allclose(final.c, c_n, atol=1e-5)


def test_from_torch_errors():
    z = dict(np.load(GOLDEN[0]))
    sd = {k[3:]: v for k, v in z.items() if k.startswith("sd.")}
    missing = {k: v for k, v in sd.items() if k != "weight_hh_l0"}
    with pytest.raises(ValueError, match="missing weight_hh_l0"):
        convert.from_torch(missing)
    with pytest.raises(ValueError, match="unexpected key 'foo'"):
        convert.from_torch({**sd, "foo": np.zeros(3)})
    with pytest.raises(TypeError, match="expected an nn.LSTM or its state_dict"):
        convert.from_torch(42)


@pytest.mark.parametrize("time_major", [False, True])
def test_fused_directions_equal_separate_calls(time_major):
    k = jax.random.split(jax.random.key(5), 3)
    params = jaxlstm.init_lstm_stack(k[0], 3, 4, 2, bidirectional=True, proj_size=2)
    xs = jax.random.normal(k[1], (5, 3, 3) if time_major else (3, 5, 3))
    state = jaxlstm.LSTMState(jax.random.normal(k[2], (4, 3, 2)), jax.random.normal(k[2], (4, 3, 4)))
    lengths = jnp.array([5, 1, 3], jnp.int32)
    run = lambda p, fuse: jaxlstm.lstm_stack(
        p, xs, state, seq_lengths=lengths, time_major=time_major, fuse_directions=fuse
    )
    (y1, s1), (y2, s2) = run(params, True), run(params, False)
    np.testing.assert_allclose(y1, y2, atol=1e-6)
    np.testing.assert_allclose(s1.h, s2.h, atol=1e-6)
    g1 = jax.grad(lambda p: (run(p, True)[0] ** 2).sum())(params)
    g2 = jax.grad(lambda p: (run(p, False)[0] ** 2).sum())(params)
    chex.assert_trees_all_close(g1, g2, atol=1e-5)


@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, True)])
def test_cudnn_flat_weights_match_jax_experimental_rnn_reference(num_layers, bidirectional):
    """jax.experimental.rnn's cuDNN path has no CPU lowering; its lstm_ref runs everywhere
    and fixes the weight layout the GPU benchmark uses."""
    from jax.experimental import rnn as jrnn

    D_, H_, B_, T_ = 3, 4, 2, 5
    k = jax.random.split(jax.random.key(0), 3)
    w = jrnn.init_lstm_weight(k[0], D_, H_, num_layers, bidirectional)
    xs = jax.random.normal(k[1], (B_, T_, D_))
    n = num_layers * (2 if bidirectional else 1)
    h0 = jax.random.normal(k[2], (n, B_, H_))
    lengths = jnp.full((B_,), T_, jnp.int32)
    y_ref, h_ref, c_ref = jrnn.lstm_ref(
        xs,
        h0,
        h0,
        *jrnn.unpack_lstm_weights(w, D_, H_, num_layers, bidirectional),
        lengths,
        D_,
        H_,
        num_layers,
        0.0,
        bidirectional,
    )
    params = convert.from_cudnn(w, D_, H_, num_layers, bidirectional)
    ys, s = jaxlstm.lstm_stack(params, xs, jaxlstm.LSTMState(h0, h0))
    np.testing.assert_allclose(ys, y_ref, atol=1e-5)
    np.testing.assert_allclose(s.h, h_ref, atol=1e-5)
    np.testing.assert_allclose(s.c, c_ref, atol=1e-5)
    back = convert.from_cudnn(convert.to_cudnn(params), D_, H_, num_layers, bidirectional)
    chex.assert_trees_all_close(back, params, atol=1e-6)
    with pytest.raises(ValueError, match="weights must have shape"):
        convert.from_cudnn(w[:-1], D_, H_, num_layers, bidirectional)


def test_stack_forward_mode_with_autodiff_backward():
    params = jaxlstm.init_lstm_stack(jax.random.key(0), 3, 4, 1, bidirectional=True)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
    lengths = jnp.array([5, 2], jnp.int32)
    f = lambda x: jaxlstm.lstm_stack(params, x, seq_lengths=lengths, backward="autodiff")[0]
    _, tangent = jax.jvp(f, (xs,), (jnp.ones_like(xs),))
    _, vjp = jax.vjp(f, xs)
    np.testing.assert_allclose(tangent.sum(), vjp(jnp.ones_like(tangent))[0].sum(), rtol=1e-5)
