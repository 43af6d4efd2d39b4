"""LSTM variants (peepholes, layer norm, multi-head recurrence) against a NumPy loop of
the published equations (values) and against autodiff (gradients), on every path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxlstm
from helpers import assert_trees_close
from jaxlstm.params import block_diagonal
from reference import block_diagonal_ref, lstm_variant_ref

B, T, D, H = 3, 7, 4, 8
RNG = np.random.default_rng(1)
MASK = RNG.random((B, T)) < 0.7
RESETS = RNG.random((B, T)) < 0.3
LENGTHS = np.array([7, 4, 0])

VARIANTS = {
    "peephole": dict(peephole=True),
    "layer_norm": dict(layer_norm=True),
    "heads": dict(num_heads=2),
    "all": dict(peephole=True, layer_norm=True, num_heads=4),
    "all_proj": dict(peephole=True, layer_norm=True, num_heads=2, proj_size=4),
}


def _params(kind, seed=0, dtype=jnp.float32):
    """Variant params with every field random (peepholes and LN gains are 0 / 1 at init)."""
    p = jaxlstm.init_lstm(jax.random.key(seed), D, H, dtype=dtype, **VARIANTS[kind])
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(
        tree, [0.5 * jax.random.normal(k, a.shape, a.dtype) + a for k, a in zip(keys, leaves, strict=True)]
    )


def _ref_params(p):
    d = {k: (None if v is None else np.asarray(v, np.float64)) for k, v in p._asdict().items()}
    d["w_hh_dense"] = block_diagonal_ref(p.w_hh) if p.w_hh.ndim == 3 else d["w_hh"]
    return d


def _inputs(p, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    R = p.w_hh.shape[0] * p.w_hh.shape[1] if p.w_hh.ndim == 3 else p.w_hh.shape[0]
    xs = jax.random.normal(k[0], (B, T, D))
    state = jaxlstm.LSTMState(jax.random.normal(k[1], (B, R)), jax.random.normal(k[2], (B, H)))
    return xs, state


CASES = [
    dict(),
    dict(lengths=LENGTHS, reverse=True),
    dict(mask=MASK, resets=RESETS),
    dict(mask=MASK, resets=RESETS, lengths=LENGTHS, reverse=True),
]


# every variant on the hardest case (mask, resets, lengths, reverse); the combined variant on every case
VALUE_RUNS = [(k, 3) for k in VARIANTS] + [("all_proj", c) for c in (0, 1, 2)]


@pytest.mark.parametrize("kind,case", VALUE_RUNS)
def test_variants_match_the_published_equations(kind, case):
    kw = dict(CASES[case])
    lengths, reverse = kw.pop("lengths", None), kw.pop("reverse", False)
    p = _params(kind)
    xs, state = _inputs(p)
    args = dict(seq_lengths=None if lengths is None else jnp.asarray(lengths), reverse=reverse)
    args.update({k: jnp.asarray(v) for k, v in kw.items()})
    x64 = np.asarray(xs, np.float64)
    ys_ref, h_ref, c_ref = lstm_variant_ref(
        np,
        _ref_params(p),
        x64,
        np.asarray(state.h, np.float64),
        np.asarray(state.c, np.float64),
        lengths,
        reverse,
        kw.get("mask"),
        kw.get("resets"),
    )
    for backward in ("fused", "autodiff"):
        ys, final = jaxlstm.lstm(p, xs, state, backward=backward, **args)
        np.testing.assert_allclose(ys, ys_ref, atol=2e-5, err_msg=backward)
        np.testing.assert_allclose(final.h, h_ref, atol=2e-5)
        np.testing.assert_allclose(final.c, c_ref, atol=2e-5)


GRAD_PATHS = [
    dict(),
    dict(checkpoint_every=3),
    dict(seq_lengths=jnp.asarray(LENGTHS), reverse=True, checkpoint_every=4),
    dict(mask=jnp.asarray(MASK), resets=jnp.asarray(RESETS)),
    dict(recurrent_dropout=0.3, zoneout_c=0.2, zoneout_h=0.3, key=jax.random.key(7), seq_lengths=jnp.asarray(LENGTHS)),
    dict(zoneout_c=0.2, zoneout_h=0.3, deterministic=True, checkpoint_every=2),
]


GRAD_RUNS = [("peephole", 0), ("layer_norm", 0), ("heads", 2)] + [("all_proj", p) for p in range(len(GRAD_PATHS))]


@pytest.mark.parametrize("kind,path", GRAD_RUNS)
def test_fused_variant_gradients_equal_autodiff(kind, path):
    p = _params(kind, 1)
    xs, state = _inputs(p, 1)
    kw = GRAD_PATHS[path]

    def loss(p, x, s, backward):
        opts = kw if backward == "fused" else {k: v for k, v in kw.items() if k != "checkpoint_every"}
        ys, f = jaxlstm.lstm(p, x, s, backward=backward, **opts)
        return (jnp.sin(ys) * ys).sum() + (f.c**2).sum() + (f.h**3).sum()

    g = jax.grad(loss, argnums=(0, 1, 2))(p, xs, state, "fused")
    g_ref = jax.grad(loss, argnums=(0, 1, 2))(p, xs, state, "autodiff")
    assert_trees_close(g, g_ref, rtol=1e-4)


def test_fused_variant_check_grads_x64():
    with jax.enable_x64(True):
        p = jax.tree.map(lambda a: a.astype(jnp.float64), _params("all", 2))
        xs, state = _inputs(p, 2)
        xs, state = xs.astype(jnp.float64), jax.tree.map(lambda a: a.astype(jnp.float64), state)
        lengths = jnp.asarray(LENGTHS)

        def f(p, x, s):
            ys, fin = jaxlstm.lstm(p, x, s, seq_lengths=lengths, checkpoint_every=3)
            return ys, fin

        check_grads(f, (p, xs, state), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_multi_head_equals_the_dense_block_diagonal_lstm():
    p = _params("heads", 3)
    xs, state = _inputs(p, 3)
    dense = p._replace(w_hh=block_diagonal(p.w_hh))
    np.testing.assert_array_equal(block_diagonal(p.w_hh), block_diagonal_ref(p.w_hh).astype(np.float32))
    ys, fin = jaxlstm.lstm(p, xs, state)
    ys_d, fin_d = jaxlstm.lstm(dense, xs, state)  # the plain engine, a dense kernel
    np.testing.assert_allclose(ys, ys_d, atol=2e-6)
    np.testing.assert_allclose(fin.c, fin_d.c, atol=2e-6)
    # gradients: the multi-head ones are the dense ones on the blocks
    loss = lambda p: (jaxlstm.lstm(p, xs, state)[0] ** 2).sum()
    g, g_d = jax.grad(loss)(p), jax.grad(loss)(dense)
    on_blocks = block_diagonal_ref(np.ones(p.w_hh.shape)) > 0
    np.testing.assert_allclose(block_diagonal(g.w_hh), np.where(on_blocks, g_d.w_hh, 0.0), atol=1e-5)
    np.testing.assert_allclose(g.w_ih, g_d.w_ih, atol=1e-5)


@pytest.mark.parametrize("kind", ["all", "all_proj"])
def test_variant_cell_is_one_step_of_the_sequence(kind):
    p = _params(kind, 4)
    xs, state = _inputs(p, 4)
    ys, fin = jaxlstm.lstm(p, xs[:, :1], state)
    s1, y1 = jaxlstm.lstm_cell(p, state, xs[:, 0])
    np.testing.assert_allclose(y1, ys[:, 0], atol=1e-6)
    np.testing.assert_allclose(s1.c, fin.c, atol=1e-6)


def test_variants_in_stacks_modules_and_bf16():
    from flax import nnx

    import jaxlstm.linen as jl
    import jaxlstm.nnx as jn

    kw = dict(peephole=True, layer_norm=True, num_heads=2)
    params = jaxlstm.init_lstm_stack(jax.random.key(0), D, H, 2, bidirectional=True, **kw)
    assert params[1][1].w_hh.shape == (2, 4, 16) and params[0][0].ln_cell.shape == (2, H)
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    lengths = jnp.asarray(LENGTHS)
    ys, _ = jaxlstm.lstm_stack(params, xs, seq_lengths=lengths)
    x = xs
    for layer in params:
        x = jnp.concatenate(
            [jaxlstm.lstm(p, x, seq_lengths=lengths, reverse=d == 1)[0] for d, p in enumerate(layer)], -1
        )
    np.testing.assert_allclose(ys, x, atol=1e-5)

    model = jl.LSTM(H, num_layers=2, bidirectional=True, **kw)
    v = model.init(jax.random.key(0), xs)
    assert sorted(v["params"]["layer_0"]["forward"]) == ["b", "ln_cell", "ln_gates", "peephole", "w_hh", "w_ih"]
    np.testing.assert_allclose(model.apply(jl.stack_variables(params), xs, seq_lengths=lengths)[0], ys, atol=1e-6)
    m = jn.LSTM(D, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0), **kw)
    jn.set_stack_params(m, params)
    np.testing.assert_allclose(m(xs, seq_lengths=lengths)[0], ys, atol=1e-6)

    # bf16 matmul operands: close to float32, gradients finite
    p = _params("all", 5)
    ys32 = jaxlstm.lstm(p, xs)[0]
    ys16 = jaxlstm.lstm(p, xs, compute_dtype=jnp.bfloat16)[0]
    assert float(jnp.abs(ys16 - ys32).max()) < 0.05
    g = jax.grad(lambda p: jaxlstm.lstm(p, xs, compute_dtype=jnp.bfloat16)[0].sum())(p)
    assert all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(g))


def test_variant_params_are_checked():
    p = _params("all", 6)
    xs, _ = _inputs(p)
    with pytest.raises(ValueError, match=r"params.peephole must have shape \(3, 8\), got \(2, 8\)"):
        jaxlstm.lstm(p._replace(peephole=p.peephole[:2]), xs)
    with pytest.raises(ValueError, match="multi-head LSTM must have shape"):
        jaxlstm.lstm(p._replace(w_hh=jnp.zeros((3, 3, 10))), xs)
    with pytest.raises(TypeError, match="layer_norm must be a bool, got 'yes'"):
        jaxlstm.init_lstm(jax.random.key(0), D, H, layer_norm="yes")
    with pytest.raises(ValueError, match="num_heads must divide hidden_size=8"):
        jaxlstm.init_lstm(jax.random.key(0), D, H, num_heads=3)
    from jaxlstm import convert

    with pytest.raises(ValueError, match="is an LSTM variant"):
        convert.to_torch(((p,),))
