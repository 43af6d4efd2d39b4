"""jaxlstm under jax.sharding on 4 simulated host devices (conftest asks for them):
batch-sharded data parallelism equals one device, keeps outputs batch-sharded and puts
no collective inside the time loop; sharding the gate axis (model parallelism) gives
the unsharded numbers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlstm
import jaxlstm.linen as jl
from helpers import assert_trees_close

B, T, D, H = 8, 9, 5, 16
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py asks for 4 simulated CPU devices)")
    return Mesh(np.array(jax.devices()[:4]), ("data",))


def _data(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    xs = jax.random.normal(k[0], (B, T, D))
    lengths = jax.random.randint(k[1], (B,), 0, T + 1).astype(jnp.int32)
    resets = jax.random.bernoulli(k[2], 0.2, (B, T))
    return xs, lengths, resets


def _put(tree, mesh, spec):
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec)), tree)


def _loop_bodies(hlo: str) -> dict[str, str]:
    """The text of every computation a ``while`` runs as its body (the time loops)."""
    blocks, name, lines = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            name, lines = m.group(1), []
        elif line.startswith("}") and name is not None:
            blocks[name] = "\n".join(lines)
            name = None
        elif name is not None:
            lines.append(line)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    return {b: blocks[b] for b in bodies if b in blocks}


def _entry_points():
    params = jaxlstm.init_lstm(jax.random.key(1), D, H, proj_size=8)  # w_hr's gradient too (stacks: plain)
    stack = jaxlstm.init_lstm_stack(jax.random.key(2), D, H, 2, bidirectional=True)
    gru = jaxlstm.init_gru(jax.random.key(3), D, H)
    rnn = jaxlstm.init_rnn(jax.random.key(4), D, H)
    variant = jaxlstm.init_lstm(jax.random.key(6), D, H, peephole=True, layer_norm=True, num_heads=2)
    model = jl.LSTM(H, num_layers=2, bidirectional=True)
    variables = jl.stack_variables(stack)
    return {
        "lstm": (params, lambda p, x, n, r: jaxlstm.lstm(p, x, seq_lengths=n, resets=r)[0]),
        "lstm_stack": (stack, lambda p, x, n, r: jaxlstm.lstm_stack(p, x, seq_lengths=n, resets=r)[0]),
        "gru": (gru, lambda p, x, n, r: jaxlstm.gru(p, x, seq_lengths=n, resets=r)[0]),
        "rnn": (rnn, lambda p, x, n, r: jaxlstm.rnn(p, x, seq_lengths=n, resets=r)[0]),
        "variant": (variant, lambda p, x, n, r: jaxlstm.lstm(p, x, seq_lengths=n, resets=r, reverse=True)[0]),
        "linen": (variables, lambda v, x, n, r: model.apply(v, x, seq_lengths=n, resets=r)[0]),
    }


@pytest.mark.parametrize("name", ["lstm", "lstm_stack", "gru", "rnn", "variant", "linen"])
def test_data_parallel_forward_and_gradients_equal_one_device(mesh, name):
    params, fn = _entry_points()[name]
    xs, lengths, resets = _data()

    def loss(p, x, n, r):
        ys = fn(p, x, n, r)
        return (jnp.sin(ys) * ys).sum(), ys

    grad = jax.value_and_grad(loss, has_aux=True)
    (want_loss, want_ys), want_g = jax.jit(grad)(params, xs, lengths, resets)

    batch = NamedSharding(mesh, P("data"))
    args = (_put(params, mesh, P()), *_put((xs, lengths, resets), mesh, P("data")))
    step = jax.jit(grad)
    with jax.set_mesh(mesh):
        (got_loss, got_ys), got_g = step(*args)
        forward = jax.jit(fn).lower(*args).compile().as_text()
        train = step.lower(*args).compile().as_text()
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(got_ys, want_ys, atol=1e-5)
    assert_trees_close(got_g, want_g, rtol=1e-5)
    assert got_ys.sharding.is_equivalent_to(batch, got_ys.ndim), got_ys.sharding
    assert all(g.sharding.is_fully_replicated for g in jax.tree.leaves(got_g))  # replicated params

    assert not any(c in forward for c in COLLECTIVES), "a batch-sharded forward pass needs no communication"
    bodies = _loop_bodies(train)
    assert bodies, "no while loop found in the compiled HLO"
    in_loops = {c for text in bodies.values() for c in re.findall("|".join(COLLECTIVES), text)}
    # The fused backward passes contract the weight gradients once, after the loop
    # (plain autodiff would sum them step by step and all-reduce each step's share).
    assert not in_loops, in_loops
    # the only communication: all-reduces of the weight gradients (and the loss) after the loops
    assert set(re.findall("|".join(COLLECTIVES), train)) == {"all-reduce"}

    if name == "lstm":  # without jax.set_mesh: the same numbers (the weight gradients gather the batch)
        (loss_no_mesh, _), g_no_mesh = step(*args)
        np.testing.assert_allclose(loss_no_mesh, want_loss, rtol=1e-5)
        assert_trees_close(g_no_mesh, want_g, rtol=1e-5)


def test_nnx_module_under_data_parallel_jit(mesh):
    from flax import nnx

    import jaxlstm.nnx as jn

    xs, lengths, _ = _data(1)
    m = jn.LSTM(D, H, num_layers=2, rngs=nnx.Rngs(0))
    want = m(xs, seq_lengths=lengths)[0]
    graphdef, state = nnx.split(m)
    state = _put(state, mesh, P())

    @jax.jit
    def forward(state, x, n):
        return nnx.merge(graphdef, state)(x, seq_lengths=n)[0]

    args = (state, *_put((xs, lengths), mesh, P("data")))
    np.testing.assert_allclose(forward(*args), want, atol=1e-5)  # without a mesh: the native code runs replicated
    with jax.set_mesh(mesh):  # with one: the XLA path, which XLA partitions
        got = forward(*args)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), got.ndim)


@pytest.mark.parametrize("backward", ["fused", "autodiff"])
def test_model_parallel_gate_axis_equals_unsharded(backward):
    """The gate axis (4H) of w_ih, w_hh and b over a 'model' axis: XLA inserts the
    collectives each step needs; the numbers are the unsharded ones."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    mesh = Mesh(np.array(jax.devices()[:4]), ("model",))
    params = jaxlstm.init_lstm(jax.random.key(5), D, H)
    xs, lengths, _ = _data(2)

    def loss(p, x):
        ys, s = jaxlstm.lstm(p, x, seq_lengths=lengths, backward=backward)
        return (jnp.sin(ys) * ys).sum() + (s.c**2).sum(), ys

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (want, want_ys), want_g = grad(params, xs)
    specs = jaxlstm.LSTMParams(P(None, "model"), P(None, "model"), P("model"), None)
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    assert sharded.w_hh.sharding.spec == P(None, "model")
    with jax.set_mesh(mesh):
        (got, got_ys), got_g = grad(sharded, jax.device_put(xs, NamedSharding(mesh, P())))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_ys, want_ys, atol=1e-5)
    assert_trees_close(got_g, want_g, rtol=1e-5)


def test_variant_backward_under_a_mesh_equals_autodiff(mesh):
    """Under jax.set_mesh the variants' backward pass keeps per-row parameter
    cotangents (no sum over the batch inside the loop): the same gradients as
    autodiff, with projection, recurrent dropout, zoneout and checkpointing."""
    p = jaxlstm.init_lstm(jax.random.key(7), D, H, peephole=True, layer_norm=True, num_heads=2, proj_size=8)
    p = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(8), a.shape), p)
    xs, lengths, resets = _data(3)
    kw = dict(seq_lengths=lengths, resets=resets, recurrent_dropout=0.2, zoneout_c=0.3, zoneout_h=0.2)
    kw["key"] = jax.random.key(9)

    def loss(p, x, backward, **extra):
        ys, s = jaxlstm.lstm(p, x, backward=backward, **kw, **extra)
        return (jnp.sin(ys) * ys).sum() + (s.c**2).sum()

    want = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(p, xs, "autodiff")
    args = (_put(p, mesh, P()), _put(xs, mesh, P("data")))
    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(lambda p, x: loss(p, x, "fused", checkpoint_every=4), argnums=(0, 1)))(*args)
    assert_trees_close(got, want, rtol=1e-4)
