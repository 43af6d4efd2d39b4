"""What training loops need from a recurrence: masks with holes and per-step resets,
against the reference loop (segments run on their own, masked steps removed),
values and gradients, on every path (fused, checkpointed, autodiff; both layouts)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from helpers import assert_trees_close, lstm_inputs
from jaxlstm import tuning
from reference import as_dict, gru_ref, lstm_ref, rnn_ref

B, T, D, H = 4, 7, 3, 4
RNG = np.random.default_rng(0)
MASK = RNG.random((B, T)) < 0.7
RESETS = RNG.random((B, T)) < 0.3
LENGTHS = np.array([7, 5, 0, 6])


def _ref(params, xs, state, reverse, mask, resets, lengths):
    x = np.asarray(xs, np.float64)
    h0, c0 = (np.asarray(a, np.float64) for a in state)
    return lstm_ref(np, as_dict(params), x, h0, c0, lengths, reverse, mask, resets)


CASES = [
    dict(mask=MASK),
    dict(resets=RESETS),
    dict(mask=MASK, resets=RESETS, lengths=LENGTHS),
    dict(mask=MASK, resets=RESETS, reverse=True),
    dict(resets=RESETS, lengths=LENGTHS, reverse=True),
]
PATHS = [
    dict(),
    dict(checkpoint_every=3),
    dict(backward="autodiff"),
    dict(layout="batch"),
    dict(layout="batch", backward="autodiff"),
]


# every case on the default (fused) path; every path on the two cases that combine the most
MASK_RUNS = [(c, 0) for c in range(len(CASES))] + [(c, p) for c in (2, 3) for p in range(1, len(PATHS))]


@pytest.mark.parametrize("case,path", MASK_RUNS)
def test_lstm_mask_and_resets_match_the_reference(case, path):
    kw = dict(CASES[case])
    lengths = kw.pop("lengths", None)
    reverse = kw.pop("reverse", False)
    opts = dict(PATHS[path])
    layout = opts.pop("layout", "feature")
    params, xs, state, _ = lstm_inputs(11, (B,), 2, with_state=True, T=T)
    args = dict(seq_lengths=None if lengths is None else jnp.asarray(lengths), reverse=reverse, **opts)
    args.update({k: jnp.asarray(v) for k, v in kw.items()})
    with tuning.forced(layout):
        ys, final = jaxlstm.lstm(params, xs, state, **args)
    ys_ref, h_ref, c_ref = _ref(params, xs, state, reverse, kw.get("mask"), kw.get("resets"), lengths)
    np.testing.assert_allclose(ys, ys_ref, atol=2e-5)
    np.testing.assert_allclose(final.h, h_ref, atol=2e-5)
    np.testing.assert_allclose(final.c, c_ref, atol=2e-5)

    # gradients against autodiff of the reference loop
    w = jnp.cos(jnp.arange(B * T * 2.0)).reshape(B, T, 2)

    def loss(p, x, s):
        with tuning.forced(layout):
            ys, f = jaxlstm.lstm(p, x, s, **args)
        return (w * ys).sum() + (f.h**2).sum() + jnp.sin(f.c).sum()

    def loss_ref(p, x, s):
        ys, h, c = lstm_ref(jnp, p._asdict(), x, s.h, s.c, lengths, reverse, kw.get("mask"), kw.get("resets"))
        return (w * ys).sum() + (h**2).sum() + jnp.sin(c).sum()

    got = jax.grad(loss, argnums=(0, 1, 2))(params, xs, state)
    want = jax.grad(loss_ref, argnums=(0, 1, 2))(params, xs, state)
    assert_trees_close(got, want, rtol=1e-4)


def test_resets_restore_reset_state_not_initial_state():
    """A rollout split into two calls equals one call: resets go to reset_state
    (zeros by default), not to the state carried in from the previous call."""
    params, xs, state, _ = lstm_inputs(12, (B,), with_state=True, T=T)
    resets = jnp.asarray(RESETS)
    whole, s = jaxlstm.lstm(params, xs, resets=resets)
    a, s1 = jaxlstm.lstm(params, xs[:, :3], resets=resets[:, :3])
    b, s2 = jaxlstm.lstm(params, xs[:, 3:], s1, resets=resets[:, 3:])
    np.testing.assert_allclose(jnp.concatenate([a, b], axis=1), whole, atol=1e-6)
    np.testing.assert_allclose(s2.c, s.c, atol=1e-6)
    # a learned reset state gets its gradient from every reset
    g = jax.grad(lambda r: jaxlstm.lstm(params, xs, resets=resets, reset_state=r)[0].sum())(state)
    g_ad = jax.grad(lambda r: jaxlstm.lstm(params, xs, resets=resets, reset_state=r, backward="autodiff")[0].sum())(
        state
    )
    assert_trees_close(g, g_ad, rtol=1e-5)
    assert float(jnp.abs(g.h).sum()) > 0


@pytest.mark.parametrize("kind", ["gru", "rnn"])
@pytest.mark.parametrize("reverse", [False, True])
def test_gru_and_rnn_mask_and_resets(kind, reverse):
    init, run, ref = {"gru": (jaxlstm.init_gru, jaxlstm.gru, gru_ref), "rnn": (jaxlstm.init_rnn, jaxlstm.rnn, rnn_ref)}[
        kind
    ]
    params = init(jax.random.key(3), D, H)
    params = params._replace(b=jax.random.normal(jax.random.key(4), params.b.shape))
    xs = jax.random.normal(jax.random.key(5), (B, T, D))
    h0 = jax.random.normal(jax.random.key(6), (B, H))
    kw = dict(mask=jnp.asarray(MASK), resets=jnp.asarray(RESETS), seq_lengths=jnp.asarray(LENGTHS), reverse=reverse)
    ys, h = run(params, xs, h0, **kw)
    ys_ref, h_ref = ref(
        np, as_dict(params), np.asarray(xs, np.float64), np.asarray(h0, np.float64), LENGTHS, reverse, MASK, RESETS
    )
    np.testing.assert_allclose(ys, ys_ref, atol=2e-5)
    np.testing.assert_allclose(h, h_ref, atol=2e-5)

    def loss(p, x, h, run_kw):
        ys, hT = run(p, x, h, **kw, **run_kw)
        return (jnp.sin(ys)).sum() + (hT**2).sum()

    def loss_ref(p, x, h):
        ys, hT = ref(jnp, p._asdict(), x, h, LENGTHS, reverse, MASK, RESETS)
        return (jnp.sin(ys)).sum() + (hT**2).sum()

    want = jax.grad(loss_ref, argnums=(0, 1, 2))(params, xs, h0)
    for run_kw in [{}, {"backward": "autodiff"}]:
        assert_trees_close(jax.grad(loss, argnums=(0, 1, 2))(params, xs, h0, run_kw), want, rtol=1e-4)


def test_bad_flags():
    params, xs, _, _ = lstm_inputs(13, (B,), T=T)
    with pytest.raises(TypeError, match="mask must be a boolean array, got dtype int32"):
        jaxlstm.lstm(params, xs, mask=jnp.ones((B, T), jnp.int32))
    with pytest.raises(ValueError, match=r"resets must have shape \(4, 7\)"):
        jaxlstm.lstm(params, xs, resets=jnp.ones((T, B), bool))
    with pytest.raises(ValueError, match=r"mask must have shape \(7, 4\) \(\[T, \.\.\.\] \(time_major\)"):
        jaxlstm.lstm(params, jnp.swapaxes(xs, 0, 1), mask=jnp.ones((B, T), bool), time_major=True)


def test_stack_and_modules_pass_mask_and_resets():
    """lstm_stack applies them in every layer (both directions); the linen and nnx
    modules pass them through."""
    import flax.linen  # noqa: F401
    from flax import nnx

    import jaxlstm.linen as jl
    import jaxlstm.nnx as jn

    params = jaxlstm.init_lstm_stack(jax.random.key(0), D, H, 2, bidirectional=True)
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    kw = dict(mask=jnp.asarray(MASK), resets=jnp.asarray(RESETS), seq_lengths=jnp.asarray(LENGTHS))
    ys, state = jaxlstm.lstm_stack(params, xs, **kw)
    # layer by layer, by hand
    x, hs = xs, []
    for layer in params:
        outs = [jaxlstm.lstm(p, x, reverse=d == 1, **kw) for d, p in enumerate(layer)]
        x = jnp.concatenate([o[0] for o in outs], axis=-1)
        hs += [o[1].h for o in outs]
    np.testing.assert_allclose(ys, x, atol=1e-6)
    np.testing.assert_allclose(state.h, jnp.stack(hs), atol=1e-6)

    model = jl.LSTM(H, num_layers=2, bidirectional=True)
    v = jl.stack_variables(params)
    np.testing.assert_allclose(model.apply(v, xs, **kw)[0], ys, atol=1e-6)
    m = jn.LSTM(D, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    jn.set_stack_params(m, params)
    np.testing.assert_allclose(m(xs, **kw)[0], ys, atol=1e-6)


def _dropout_reference(xp, params, xs, h0, c0, m_x, m_h, lengths, reverse):
    """The reference loop with x(t) * m_x and h(t-1) * m_h entering the gates."""
    from reference import lstm_step_ref

    ys, hs, cs = [], [], []
    for b in range(xs.shape[0]):
        L = xs.shape[1] if lengths is None else int(lengths[b])
        h, c, out = h0[b], c0[b], {}
        for t in range(L)[::-1] if reverse else range(L):
            h, c = lstm_step_ref(xp, params, h * m_h[b], c, xs[b, t] * m_x[b])
            out[t] = h
        ys.append(xp.stack([out.get(t, 0 * h0[b]) for t in range(xs.shape[1])]))
        hs.append(h)
        cs.append(c)
    return xp.stack(ys), xp.stack(hs), xp.stack(cs)


@pytest.mark.parametrize("path", range(len(PATHS)))
def test_input_and_recurrent_dropout_match_explicit_masks(path):
    opts = dict(PATHS[path])
    layout = opts.pop("layout", "feature")
    params, xs, state, _ = lstm_inputs(14, (B,), 2, with_state=True, T=T)
    key, p_in, p_rec = jax.random.key(9), 0.3, 0.4
    k_in, k_rec = jax.random.split(key)  # the documented recipe
    m_x = jax.random.bernoulli(k_in, 1 - p_in, (B, D)).astype(jnp.float32) / (1 - p_in)
    m_h = jax.random.bernoulli(k_rec, 1 - p_rec, (B, 2)).astype(jnp.float32) / (1 - p_rec)
    lengths = jnp.asarray(LENGTHS)
    kw = dict(input_dropout=p_in, recurrent_dropout=p_rec, key=key, seq_lengths=lengths, reverse=True, **opts)

    def loss(p, x, s):
        with tuning.forced(layout):
            ys, f = jaxlstm.lstm(p, x, s, **kw)
        return (jnp.cos(ys) * ys).sum() + (f.c**2).sum(), ys

    def loss_ref(p, x, s):
        ys, h, c = _dropout_reference(jnp, p._asdict(), x, s.h, s.c, m_x, m_h, LENGTHS, True)
        return (jnp.cos(ys) * ys).sum() + (c**2).sum(), ys

    (v, ys), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, state)
    (v_ref, ys_ref), g_ref = jax.value_and_grad(loss_ref, argnums=(0, 1, 2), has_aux=True)(params, xs, state)
    np.testing.assert_allclose(ys, ys_ref, atol=2e-5)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    assert_trees_close(g, g_ref, rtol=1e-4)


def test_dropout_arguments():
    params, xs, _, _ = lstm_inputs(15, (B,), T=T)
    np.testing.assert_array_equal(
        jaxlstm.lstm(params, xs, input_dropout=0.0, recurrent_dropout=0.0)[0], jaxlstm.lstm(params, xs)[0]
    )
    with pytest.raises(ValueError, match="need a PRNG key"):
        jaxlstm.lstm(params, xs, recurrent_dropout=0.5)
    with pytest.raises(ValueError, match=r"input_dropout must lie in \[0, 1\), got 1.0"):
        jaxlstm.lstm(params, xs, input_dropout=1.0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="recurrent_dropout must be a Python float"):
        jax.jit(lambda p: jaxlstm.lstm(params, xs, recurrent_dropout=p, key=jax.random.key(0)))(0.5)


def test_recurrent_dropout_in_stacks_and_modules():
    from flax import nnx

    import jaxlstm.linen as jl
    import jaxlstm.nnx as jn

    params = jaxlstm.init_lstm_stack(jax.random.key(0), D, H, 2, bidirectional=True)
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    key = jax.random.key(2)
    ys, _ = jaxlstm.lstm_stack(params, xs, recurrent_dropout=0.5, key=key)
    # layer by layer with the documented keys: one per layer-direction
    keys = jax.random.split(key, 4)
    x = xs
    for l, layer in enumerate(params):
        outs = [
            jaxlstm.lstm(p, x, reverse=d == 1, recurrent_dropout=0.5, key=keys[2 * l + d])[0]
            for d, p in enumerate(layer)
        ]
        x = jnp.concatenate(outs, axis=-1)
    np.testing.assert_allclose(ys, x, atol=1e-6)
    assert not np.allclose(ys, jaxlstm.lstm_stack(params, xs)[0])

    model = jl.LSTM(H, num_layers=2, recurrent_dropout=0.5)
    v = model.init(jax.random.key(0), xs, deterministic=True)
    a = model.apply(v, xs, deterministic=False, rngs={"dropout": jax.random.key(3)})[0]
    b = model.apply(v, xs, deterministic=False, rngs={"dropout": jax.random.key(4)})[0]
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(v, xs, deterministic=True)[0], jl.LSTM(H, num_layers=2).apply(v, xs)[0])
    m = jn.LSTM(D, H, recurrent_dropout=0.5, rngs=nnx.Rngs(0))
    m.train()
    assert not np.allclose(m(xs)[0], m(xs)[0])
    m.eval()
    np.testing.assert_array_equal(m(xs)[0], m(xs)[0])


@pytest.mark.parametrize("kind", ["gru", "rnn"])
def test_gru_and_rnn_dropout_match_explicit_masks(kind):
    """The same recipe as the LSTM's: x(t) * m_x and h(t-1) * m_h entering the
    recurrent dot (the GRU's z ∗ h(t-1) term reads the unmasked state)."""
    init, run = {"gru": (jaxlstm.init_gru, jaxlstm.gru), "rnn": (jaxlstm.init_rnn, jaxlstm.rnn)}[kind]
    params = init(jax.random.key(3), D, H)
    params = params._replace(b=jax.random.normal(jax.random.key(4), params.b.shape))
    xs = jax.random.normal(jax.random.key(5), (B, T, D))
    h0 = jax.random.normal(jax.random.key(6), (B, H))
    key, p_in, p_rec = jax.random.key(10), 0.25, 0.5
    k_in, k_rec = jax.random.split(key)
    m_x = jax.random.bernoulli(k_in, 1 - p_in, (B, D)).astype(jnp.float32) / (1 - p_in)
    m_h = jax.random.bernoulli(k_rec, 1 - p_rec, (B, H)).astype(jnp.float32) / (1 - p_rec)
    lengths = jnp.asarray(LENGTHS)

    def ref(p, x, h):  # the cell's equations with the masks, one sequence at a time
        def step(h, x):
            hm = h * m_h
            if kind == "rnn":
                return jnp.tanh(x * m_x @ p.w_ih + hm @ p.w_hh + p.b)
            gx, gh = (x * m_x) @ p.w_ih + p.b, hm @ p.w_hh
            r = jax.nn.sigmoid(gx[:, :H] + gh[:, :H])
            z = jax.nn.sigmoid(gx[:, H : 2 * H] + gh[:, H : 2 * H])
            n = jnp.tanh(gx[:, 2 * H :] + r * (gh[:, 2 * H :] + p.b_hn))
            return (1 - z) * n + z * h

        ys = []
        for t in range(T):
            new = step(h, x[:, t])
            valid = (t < lengths)[:, None]
            h = jnp.where(valid, new, h)
            ys.append(jnp.where(valid, new, 0.0))
        return jnp.stack(ys, axis=1), h

    def loss(p, x, h, **kw):
        ys, hT = run(p, x, h, seq_lengths=lengths, input_dropout=p_in, recurrent_dropout=p_rec, key=key, **kw)
        return (jnp.sin(ys)).sum() + (hT**2).sum(), ys

    def loss_ref(p, x, h):
        ys, hT = ref(p, x, h)
        return (jnp.sin(ys)).sum() + (hT**2).sum(), ys

    with jax.numpy_rank_promotion("allow"):  # the reference broadcasts biases as written
        (_, ys_ref), want = jax.value_and_grad(loss_ref, argnums=(0, 1, 2), has_aux=True)(params, xs, h0)
    for kw in [{}, {"backward": "autodiff"}]:
        (_, ys), got = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, h0, **kw)
        np.testing.assert_allclose(ys, ys_ref, atol=2e-5)
        assert_trees_close(got, want, rtol=1e-4)


def _zoneout_reference(xp, params, xs, h0, c0, kc, kh, lengths, reverse):
    """The reference loop where each step keeps ``kc [T, B, H]`` of ``c(t-1)`` and
    ``kh [T, B, R]`` of ``h(t-1)`` (0/1 masks in training, the rates in evaluation),
    indexed by input position."""
    from reference import lstm_step_ref

    ys, hs, cs = [], [], []
    for b in range(xs.shape[0]):
        L = xs.shape[1] if lengths is None else int(lengths[b])
        h, c, out = h0[b], c0[b], {}
        for t in range(L)[::-1] if reverse else range(L):
            h_new, c_new = lstm_step_ref(xp, params, h, c, xs[b, t])
            h = kh[t, b] * h + (1 - kh[t, b]) * h_new
            c = kc[t, b] * c + (1 - kc[t, b]) * c_new
            out[t] = h
        ys.append(xp.stack([out.get(t, 0 * h0[b]) for t in range(xs.shape[1])]))
        hs.append(h)
        cs.append(c)
    return xp.stack(ys), xp.stack(hs), xp.stack(cs)


ZONEOUT_PATHS = PATHS + [
    dict(checkpoint_every=3, layout="batch"),
    dict(proj=True),
    dict(proj=True, backward="autodiff"),
]


# training on every path, evaluation (the rates mix) on the fused, checkpointed and autodiff ones
ZONEOUT_RUNS = [(p, False) for p in range(len(ZONEOUT_PATHS))] + [(p, True) for p in (0, 1, 2, 6)]


@pytest.mark.parametrize("path,deterministic", ZONEOUT_RUNS)
def test_zoneout_matches_explicit_masks(path, deterministic):
    opts = dict(ZONEOUT_PATHS[path])
    layout = opts.pop("layout", "feature")
    proj = 2 if opts.pop("proj", False) else None
    params, xs, state, _ = lstm_inputs(16, (B,), proj, with_state=True, T=T)
    R = proj or H
    key, p_c, p_h = jax.random.key(5), 0.3, 0.6
    if deterministic:
        kc, kh = jnp.full((T, B, H), p_c), jnp.full((T, B, R), p_h)
    else:
        k_c, k_h = jax.random.split(jax.random.fold_in(key, 1))  # the documented recipe
        kc = jax.random.bernoulli(k_c, p_c, (T, B, H)).astype(jnp.float32)
        kh = jax.random.bernoulli(k_h, p_h, (T, B, R)).astype(jnp.float32)
    lengths = jnp.asarray(LENGTHS)
    kw = dict(zoneout_c=p_c, zoneout_h=p_h, key=None if deterministic else key, deterministic=deterministic)
    kw.update(seq_lengths=lengths, reverse=path % 2 == 1, **opts)

    def loss(p, x, s):
        with tuning.forced(layout):
            ys, f = jaxlstm.lstm(p, x, s, **kw)
        return (jnp.cos(ys) * ys).sum() + (f.c**2).sum() + (f.h**3).sum(), ys

    def loss_ref(p, x, s):
        ys, h, c = _zoneout_reference(jnp, p._asdict(), x, s.h, s.c, kc, kh, LENGTHS, kw["reverse"])
        return (jnp.cos(ys) * ys).sum() + (c**2).sum() + (h**3).sum(), ys

    (v, ys), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, state)
    (v_ref, ys_ref), g_ref = jax.value_and_grad(loss_ref, argnums=(0, 1, 2), has_aux=True)(params, xs, state)
    np.testing.assert_allclose(ys, ys_ref, atol=2e-5)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    assert_trees_close(g, g_ref, rtol=1e-4)


def test_zoneout_in_stacks_and_modules_eager_and_jit():
    from flax import nnx

    import jaxlstm.linen as jl
    import jaxlstm.nnx as jn

    params = jaxlstm.init_lstm_stack(jax.random.key(0), D, H, 2, bidirectional=True)
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    key, zo = jax.random.key(2), dict(zoneout_c=0.2, zoneout_h=0.4)
    lengths = jnp.asarray(LENGTHS)

    def layer_by_layer(deterministic):
        keys = jax.random.split(key, 4)  # the documented keys: one per layer-direction
        x = xs
        for l, layer in enumerate(params):
            outs = [
                jaxlstm.lstm(
                    p,
                    x,
                    reverse=d == 1,
                    seq_lengths=lengths,
                    key=None if deterministic else keys[2 * l + d],
                    deterministic=deterministic,
                    **zo,
                )[0]
                for d, p in enumerate(layer)
            ]
            x = jnp.concatenate(outs, axis=-1)
        return x

    train = jaxlstm.lstm_stack(params, xs, seq_lengths=lengths, key=key, **zo)[0]
    np.testing.assert_allclose(train, layer_by_layer(False), atol=1e-6)
    jitted = jax.jit(lambda p, x, k: jaxlstm.lstm_stack(p, x, seq_lengths=lengths, key=k, **zo)[0])
    np.testing.assert_allclose(jitted(params, xs, key), train, atol=1e-6)
    # evaluation: the directions run as one vmapped scan (fuse_directions, the default)
    ev = jaxlstm.lstm_stack(params, xs, seq_lengths=lengths, deterministic=True, **zo)[0]
    np.testing.assert_allclose(ev, layer_by_layer(True), atol=1e-6)
    assert not np.allclose(ev, jaxlstm.lstm_stack(params, xs, seq_lengths=lengths)[0])

    model = jl.LSTM(H, num_layers=2, bidirectional=True, **zo)
    v = jl.stack_variables(params)
    a = model.apply(v, xs, seq_lengths=lengths, deterministic=False, rngs={"dropout": jax.random.key(3)})[0]
    b = model.apply(v, xs, seq_lengths=lengths, deterministic=False, rngs={"dropout": jax.random.key(4)})[0]
    assert not np.allclose(a, b)
    np.testing.assert_allclose(model.apply(v, xs, seq_lengths=lengths, deterministic=True)[0], ev, atol=1e-6)
    m = jn.LSTM(D, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0), **zo)
    jn.set_stack_params(m, params)
    m.train()
    assert not np.allclose(m(xs, seq_lengths=lengths)[0], m(xs, seq_lengths=lengths)[0])
    m.eval()
    np.testing.assert_allclose(m(xs, seq_lengths=lengths)[0], ev, atol=1e-6)


def test_zoneout_arguments():
    params, xs, _, _ = lstm_inputs(15, (B,), T=T)
    with pytest.raises(ValueError, match="zoneout_c / zoneout_h > 0 need a PRNG key in training"):
        jaxlstm.lstm(params, xs, zoneout_h=0.1)
    with pytest.raises(ValueError, match=r"zoneout_c must lie in \[0, 1\), got 1.5"):
        jaxlstm.lstm(params, xs, zoneout_c=1.5, key=jax.random.key(0))
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        jaxlstm.lstm(params, xs, zoneout_c=0.1, deterministic=1)
    # evaluation needs no key, and dropout is off in it
    np.testing.assert_array_equal(
        jaxlstm.lstm(params, xs, input_dropout=0.5, recurrent_dropout=0.5, deterministic=True)[0],
        jaxlstm.lstm(params, xs)[0],
    )


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("kind", ["gru", "rnn"])
def test_gru_and_rnn_zoneout_match_explicit_masks(kind, deterministic):
    """h(t) = k h(t-1) + (1 - k) h̃(t) per step and unit, k from the documented recipe
    (training) or the rate (evaluation); lengths and reverse on, fused and autodiff."""
    init, run = {"gru": (jaxlstm.init_gru, jaxlstm.gru), "rnn": (jaxlstm.init_rnn, jaxlstm.rnn)}[kind]
    params = init(jax.random.key(3), D, H)
    params = params._replace(b=jax.random.normal(jax.random.key(4), params.b.shape))
    xs = jax.random.normal(jax.random.key(5), (B, T, D))
    h0 = jax.random.normal(jax.random.key(6), (B, H))
    key, rate = jax.random.key(11), 0.4
    if deterministic:
        kh = jnp.full((T, B, H), rate)
    else:
        kh = jax.random.bernoulli(jax.random.split(jax.random.fold_in(key, 1))[1], rate, (T, B, H)).astype(jnp.float32)

    def cell(p, h, x):
        if kind == "rnn":
            return jnp.tanh(x @ p.w_ih + h @ p.w_hh + p.b)
        gx, gh = x @ p.w_ih + p.b, h @ p.w_hh
        r = jax.nn.sigmoid(gx[:H] + gh[:H])
        z = jax.nn.sigmoid(gx[H : 2 * H] + gh[H : 2 * H])
        n = jnp.tanh(gx[2 * H :] + r * (gh[2 * H :] + p.b_hn))
        return (1 - z) * n + z * h

    def ref(p, x, h0):
        ys, hs = [], []
        for b in range(B):
            h, out = h0[b], {}
            for t in range(int(LENGTHS[b]))[::-1]:
                h = kh[t, b] * h + (1 - kh[t, b]) * cell(p, h, x[b, t])
                out[t] = h
            ys.append(jnp.stack([out.get(t, 0 * h0[b]) for t in range(T)]))
            hs.append(h)
        return jnp.stack(ys), jnp.stack(hs)

    kw = dict(seq_lengths=jnp.asarray(LENGTHS), reverse=True, zoneout_h=rate, deterministic=deterministic)
    kw["key"] = None if deterministic else key

    def loss(f, p, x, h):
        ys, hT = f(p, x, h)
        return jnp.sin(ys).sum() + (hT**2).sum(), ys

    (_, ys_ref), want = jax.value_and_grad(partial(loss, ref), argnums=(0, 1, 2), has_aux=True)(params, xs, h0)
    for opts in [{}, {"backward": "autodiff"}]:
        f = partial(run, **kw, **opts)
        (_, ys), got = jax.value_and_grad(partial(loss, f), argnums=(0, 1, 2), has_aux=True)(params, xs, h0)
        np.testing.assert_allclose(ys, ys_ref, atol=2e-5)
        assert_trees_close(got, want, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lstm", "lstm_variant", "gru", "rnn"])
def test_cells_step_zoneout_models_as_evaluation_does(kind):
    """Streaming a zoneout-trained model with the cell gives the sequence call's
    evaluation outputs (deterministic=True: the rates mix)."""
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    if kind.startswith("lstm"):
        params = jaxlstm.init_lstm(jax.random.key(0), D, H, peephole=kind == "lstm_variant")
        zo = dict(zoneout_c=0.3, zoneout_h=0.2)
        want, _ = jaxlstm.lstm(params, xs, deterministic=True, **zo)
        state, ys = jaxlstm.zero_state(B, H), []
        for t in range(T):
            state, y = jaxlstm.lstm_cell(params, state, xs[:, t], **zo)
            ys.append(y)
    else:
        init, run, cell = {
            "gru": (jaxlstm.init_gru, jaxlstm.gru, jaxlstm.gru_cell),
            "rnn": (jaxlstm.init_rnn, jaxlstm.rnn, jaxlstm.rnn_cell),
        }[kind]
        params = init(jax.random.key(0), D, H)
        want, _ = run(params, xs, deterministic=True, zoneout_h=0.3)
        h, ys = jnp.zeros((B, H)), []
        for t in range(T):
            h, y = cell(params, h, xs[:, t], zoneout_h=0.3)
            ys.append(y)
    np.testing.assert_allclose(jnp.stack(ys, 1), want, atol=2e-6)
    assert not np.allclose(want, (jaxlstm.lstm if kind.startswith("lstm") else run)(params, xs)[0], atol=1e-3)
