"""Elman RNN and GRU against NumPy loop references, autodiff of the references, and PyTorch."""

import glob
import itertools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxlstm
from jaxlstm import convert
from reference import as_dict, gru_ref, rnn_ref

_FLAGS = np.random.default_rng(11)
MASK_RB = _FLAGS.random((3, 5)) < 0.7
RESETS_RB = _FLAGS.random((3, 5)) < 0.3

D, H, B, T = 3, 4, 3, 5
GOLDEN = sorted(
    glob.glob(os.path.join(os.path.dirname(__file__), "golden", "gru_*.npz"))
    + glob.glob(os.path.join(os.path.dirname(__file__), "golden", "rnn_*.npz"))
)
KINDS = {
    "rnn": (jaxlstm.init_rnn, jaxlstm.rnn, jaxlstm.rnn_cell, rnn_ref),
    "gru": (jaxlstm.init_gru, jaxlstm.gru, jaxlstm.gru_cell, gru_ref),
}


def _inputs(kind, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    params = KINDS[kind][0](k[0], D, H)
    params = params._replace(b=jax.random.normal(k[1], params.b.shape))
    if kind == "gru":
        params = params._replace(b_hn=jax.random.normal(k[4], (H,)))
    xs = jax.random.normal(k[2], (B, T, D))
    h0 = jax.random.normal(k[3], (B, H))
    return params, xs, h0, jnp.array([5, 0, 2], jnp.int32)


@pytest.mark.parametrize("kind,lengths,reverse", list(itertools.product(["rnn", "gru"], [False, True], [False, True])))
def test_matches_reference(kind, lengths, reverse):
    params, xs, h0, L = _inputs(kind)
    L = L if lengths else None
    _, run, _, ref = KINDS[kind]
    ys, h = run(params, xs, h0, seq_lengths=L, reverse=reverse)
    ys_ref, h_ref = ref(
        np,
        as_dict(params),
        np.asarray(xs, np.float64),
        np.asarray(h0, np.float64),
        None if L is None else np.asarray(L),
        reverse,
    )
    np.testing.assert_allclose(ys, ys_ref, atol=2e-5)
    np.testing.assert_allclose(h, h_ref, atol=2e-5)

    # gradients against autodiff of the reference
    def loss(p, x, h0_):
        ys, h = run(p, x, h0_, seq_lengths=L, reverse=reverse)
        return (jnp.cos(ys) * ys).sum() + (h**2).sum()

    def loss_ref(p, x, h0_):
        ys, h = ref(jnp, p._asdict(), x, h0_, None if L is None else np.asarray(L), reverse)
        return (jnp.cos(ys) * ys).sum() + (h**2).sum()

    g = jax.grad(loss, argnums=(0, 1, 2))(params, xs, h0)
    g_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(params, xs, h0)
    chex.assert_trees_all_close(g, g_ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["rnn", "gru"])
def test_cell_layouts_and_checks(kind):
    params, xs, h0, L = _inputs(kind, 1)
    _, run, cell, _ = KINDS[kind]
    h = h0
    for t in range(T):
        h, y = cell(params, h, xs[:, t])
    np.testing.assert_allclose(h, run(params, xs, h0)[1], atol=1e-6)
    # time-major and extra batch dims agree with the batch-major call
    ys_tm, _ = run(params, jnp.swapaxes(xs, 0, 1), h0, seq_lengths=L, time_major=True)
    np.testing.assert_allclose(jnp.swapaxes(ys_tm, 0, 1), run(params, xs, h0, seq_lengths=L)[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 3\]"):
        cell(params, h0, xs[:, 0, :2])
    with pytest.raises(ValueError, match=r"initial_state must have shape \(3, 4\)"):
        run(params, xs, h0[:2])
    with pytest.raises(ValueError, match=r"xs must have 3 features"):
        run(params, xs[..., :2])
    with pytest.raises(TypeError, match=r"seq_lengths must have an integer dtype"):
        run(params, xs, seq_lengths=jnp.ones((B,)))
    with pytest.raises(ValueError, match=r"params.b must have shape"):
        run(params._replace(b=jnp.ones(7)), xs)


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: os.path.basename(p))
def test_torch_golden(path):
    z = dict(np.load(path))
    sd = {k[3:]: v for k, v in z.items() if k.startswith("sd.")}
    params = convert.from_torch(sd)
    kind = os.path.basename(path).split("_")[0]
    run = KINDS[kind][1]
    L = jnp.asarray(z["lengths"]) if "lengths" in z else None
    xs, h0 = jnp.asarray(z["x"]), jnp.asarray(z["h0"])[0]
    ys, h = run(params[0][0], xs, h0, seq_lengths=L)
    np.testing.assert_allclose(ys, z["out"], atol=1e-5)
    np.testing.assert_allclose(h, z["h_n"][0], atol=1e-5)
    gx = jax.grad(lambda x: (run(params[0][0], x, h0, seq_lengths=L)[0] * z["w_out"]).sum())(xs)
    np.testing.assert_allclose(gx, z["dx"], atol=1e-5)
    # the exported state_dict has PyTorch's shapes and reproduces the params
    back = convert.from_torch(convert.to_torch(params, as_numpy=True))
    chex.assert_trees_all_close(back, params, atol=1e-7)


def test_gru_step_vjp_matches_jax_vjp():
    """The fused GRU backward pass's per-step VJP against jax.vjp of its step (x64)."""
    from jaxlstm._gru import gru_step, gru_step_vjp

    with jax.enable_x64(True):
        params, xs, h0, _ = _inputs("gru", seed=3)
        params, x, h0 = jax.tree.map(lambda a: a.astype(jnp.float64), (params, xs[:, 0], h0))
        f64 = jnp.float64
        dh = jnp.cos(jnp.arange(B * H, dtype=f64)).reshape(B, H)
        want = jax.vjp(lambda p, h, x: gru_step(p, f64, f64)(h, x)[0], params, h0, x)[1](dh)
        _, _, (r, z, n, hn) = gru_step(params, f64, f64)(h0, x)
        g = gru_step_vjp(params.w_hh, r, z, n, hn, h0, dh, f64, f64)
        dgh = jnp.concatenate([g.dgx[:, : 2 * H], g.dgx[:, 2 * H :] * r], axis=-1)
        grads = jaxlstm.GRUParams(x.T @ g.dgx, h0.T @ dgh, g.dgx.sum(0), dgh[:, 2 * H :].sum(0))
        chex.assert_trees_all_close((grads, g.dh_prev, g.dgx @ params.w_ih.T), want, rtol=1e-12, atol=1e-12)


def test_elman_step_vjp_matches_jax_vjp():
    """The fused Elman backward pass's per-step VJP (through its Cell) against jax.vjp (x64)."""
    from jaxlstm._fused import FusedConfig
    from jaxlstm._gru import ELMAN

    with jax.enable_x64(True):
        params, xs, h0, _ = _inputs("rnn", seed=3)
        params, x, h0 = jax.tree.map(lambda a: a.astype(jnp.float64), (params, xs[:, 0], h0))
        f64 = jnp.float64
        dh = jnp.cos(jnp.arange(B * H, dtype=f64)).reshape(B, H)
        want = jax.vjp(lambda p, h, x: ELMAN.step(p, f64, f64, False)((h,), x)[0][0], params, h0, x)[1](dh)
        _, _, res = ELMAN.step(params, f64, f64, False)((h0,), x)
        (dpre,), (dh_prev,), _ = ELMAN.vjp(params, FusedConfig(f64, f64), None, res, (h0,), (dh,), None)
        grads = jaxlstm.RNNParams(x.T @ dpre, h0.T @ dpre, dpre.sum(0))
        chex.assert_trees_all_close((grads, dh_prev, dpre @ params.w_ih.T), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["gru", "rnn"])
@pytest.mark.parametrize(
    "batch_shape,time_major,T_", [((2, 2), False, 5), ((3,), True, 4), ((), False, 6), ((2,), False, 0)]
)
def test_fused_equals_autodiff(kind, batch_shape, time_major, T_):
    k = jax.random.split(jax.random.key(5), 3)
    if kind == "gru":
        params, run = jaxlstm.init_gru(k[0], D, H)._replace(b_hn=jnp.linspace(-1.0, 1.0, H)), jaxlstm.gru
    else:
        params, run = jaxlstm.init_rnn(k[0], D, H)._replace(b=jnp.linspace(-1.0, 1.0, H)), jaxlstm.rnn
    xs = jax.random.normal(k[1], (T_,) + batch_shape + (D,) if time_major else batch_shape + (T_, D))
    h0 = jax.random.normal(k[2], batch_shape + (H,))
    lengths = None if not batch_shape else jnp.arange(int(np.prod(batch_shape))).reshape(batch_shape) % (T_ + 1)

    def loss(p, x, h, backward):
        ys, hT = run(p, x, h, seq_lengths=lengths, reverse=True, time_major=time_major, backward=backward)
        return (jnp.sin(ys)).sum() + (hT**2).sum()

    got = jax.grad(loss, argnums=(0, 1, 2))(params, xs, h0, "fused")
    want = jax.grad(loss, argnums=(0, 1, 2))(params, xs, h0, "autodiff")
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_gru_check_grads_x64_and_bfloat16():

    with jax.enable_x64(True):
        for kind, run in (("gru", jaxlstm.gru), ("rnn", jaxlstm.rnn)):
            params, xs, h0, L = _inputs(kind, seed=4)
            params, xs, h0 = jax.tree.map(lambda a: a.astype(jnp.float64), (params, xs, h0))
            f = lambda p, x, h, run=run, L=L: (run(p, x, h, seq_lengths=L)[0] ** 2).sum()
            check_grads(f, (params, xs, h0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)
    params, xs, h0, _ = _inputs("gru", seed=4)
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    g = jax.grad(lambda p: jaxlstm.gru(p, xs.astype(jnp.bfloat16))[0].astype(jnp.float32).sum())(p16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(g))


@pytest.mark.parametrize(
    "kw", [{}, dict(seq_lengths=np.array([5, 2, 0]), reverse=True), dict(mask=MASK_RB, resets=RESETS_RB)]
)
def test_reset_before_gru_matches_numpy_and_finite_differences(kw):
    """reset_after=False (Keras' reset_after=False, hk.GRU): values against the NumPy loop, the path it
    takes (the fused backward pass, its own cell), its step, and gradients by finite differences."""
    B, T, D, H = 3, 5, 4, 6
    params = jaxlstm.init_gru(jax.random.key(0), D, H)
    params = params._replace(b=params.b + 0.3, b_hn=jnp.linspace(-0.5, 0.5, H))
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    h0 = jax.random.normal(jax.random.key(2), (B, H))
    ys, h = jaxlstm.gru(params, xs, h0, reset_after=False, **kw)
    flags = dict(lengths=kw.get("seq_lengths"), reverse=kw.get("reverse", False), mask=kw.get("mask"),
                 resets=kw.get("resets"))  # fmt: skip
    want = gru_ref(np, as_dict(params), np.asarray(xs, np.float64), np.asarray(h0, np.float64), reset_after=False,
                   **flags)  # fmt: skip
    np.testing.assert_allclose(ys, want[0], atol=1e-5)
    np.testing.assert_allclose(h, want[1], atol=1e-5)
    assert jaxlstm.path_of("gru", params, xs, reset_after=False) == "xla-fused"
    if not kw:
        hs = h0
        for t in range(T):
            hs, y = jaxlstm.step(params, hs, xs[:, t], reset_after=False)
            np.testing.assert_allclose(y, ys[:, t], atol=1e-6)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        loss = lambda p, x: (jaxlstm.gru(p, x, reset_after=False, **kw)[0] ** 2).sum()
        check_grads(loss, (p64, xs.astype(jnp.float64)), order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


@pytest.mark.parametrize(
    "kind,kw",
    list(
        itertools.product(
            ["rnn", "gru", "gru-reset-before"],
            [
                dict(checkpoint_every=2),
                dict(checkpoint_every=3, seq_lengths=jnp.array([5, 0, 2]), reverse=True),
                dict(checkpoint_every=2, mask=MASK_RB, resets=RESETS_RB, reset_state="random"),
                dict(checkpoint_every=4, zoneout_h=0.3, recurrent_dropout=0.25, key=jax.random.key(4)),
            ],
        )
    ),
)
def test_checkpointed_equals_autodiff(kind, kw):
    """checkpoint_every on the GRU (both forms) and the Elman RNN (the fused engine's chunks): values and
    gradients (params, inputs, initial and reset state) equal autodiff of the plain scan in float64; never
    native."""
    _fused_equals_autodiff(kind, kw)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(seq_lengths=jnp.array([5, 0, 2]), reverse=True),
        dict(mask=MASK_RB, resets=RESETS_RB, reset_state="random", zoneout_h=0.2, key=jax.random.key(2)),
        dict(recurrent_dropout=0.3, key=jax.random.key(3), gate_activation=jax.nn.hard_sigmoid),
        dict(activation=jax.nn.relu, seq_lengths=jnp.array([4, 5, 1])),
    ],
)
def test_reset_before_gru_fused_equals_autodiff(kw):
    """The reset-before GRU's own cell on the fused backward pass (GRU_RESET_BEFORE: r multiplies h before
    W_hn) against autodiff in float64: flags, reset state, zoneout, recurrent dropout, activations."""
    _fused_equals_autodiff("gru-reset-before", kw)


def _fused_equals_autodiff(kind, kw):
    with jax.enable_x64(True):
        params, xs, h0, _ = jax.tree.map(
            lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, _inputs(kind.split("-")[0])
        )
        kw = dict(kw)
        reset = jnp.cos(jnp.arange(B * H, dtype=jnp.float64)).reshape(B, H) if kw.pop("reset_state", None) else None
        if kind == "gru-reset-before":
            kind, kw["reset_after"] = "gru", False
        run = KINDS[kind][1]
        assert jaxlstm.path_of(kind, params, xs, h0, **kw) == "xla-fused"

        def loss(p, x, h, r, backward):
            opts = kw if backward == "fused" else {k: v for k, v in kw.items() if k != "checkpoint_every"}
            ys, hT = run(p, x, h, reset_state=r, backward=backward, **opts)
            return jnp.sum(jnp.sin(ys) * jnp.cos(ys)) + jnp.sum(jnp.cos(hT))

        args = (params, xs, h0, reset)
        got = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args, "fused")
        want = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*args, "autodiff")
        chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-12)


def test_checkpointing_needs_the_fused_backward():
    with pytest.raises(ValueError, match=r"checkpoint_every requires backward='fused'"):
        jaxlstm.rnn(*_inputs("rnn")[:3], backward="autodiff", checkpoint_every=2)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_checkpointing_keeps_fewer_residuals(kind):
    """What a checkpointed call keeps for its backward pass (the residuals jax.vjp closes over) is
    O(T/k + k) steps' worth, not O(T): less than a third at T=64, k=8, for every cell of the engine."""
    init, run = {"lstm": (jaxlstm.init_lstm, jaxlstm.lstm), **{k: v[:2] for k, v in KINDS.items()}}[kind]
    params, xs = init(jax.random.key(0), 3, 16), jnp.ones((2, 64, 3))

    def kept(k):  # recurrent dropout keeps both calls on the XLA path
        _, vjp = jax.vjp(
            lambda p, x: run(p, x, checkpoint_every=k, recurrent_dropout=0.1, key=jax.random.key(1))[0], params, xs
        )
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(vjp))

    assert kept(8) < kept(None) / 3
