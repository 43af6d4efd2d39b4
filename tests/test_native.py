"""The native CPU code (jaxlstm/_native.py, jaxlstm/csrc/) against the
NumPy reference loop and the pure-XLA path: values, gradients, masks, resets, reversal,
layouts, vmap, and the threads' split of the hidden units."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxlstm
from helpers import assert_trees_close, cell_case, random_step_flags
from jaxlstm import _native, tuning
from jaxlstm._engine import Steps
from reference import as_dict, gru_ref, lstm_ref, rnn_ref

pytestmark = pytest.mark.skipif(not _native.available(), reason=str(_native.load_error()))


def test_built_where_ci_runs():
    """CI builds the package with a C++ compiler: the native code must be there, not silently skipped."""
    if os.environ.get("CI") != "true":
        pytest.skip("only asserted in CI")
    assert _native.available(), _native.load_error()


def _case(seed, B, D, H, T, flags=False):
    k = jax.random.split(jax.random.key(seed), 6)
    params = jaxlstm.init_lstm(k[0], D, H)
    params = params._replace(b=jax.random.normal(k[1], (4 * H,)) * 0.5)
    xs = jax.random.normal(k[2], (B, T, D))
    state = jaxlstm.LSTMState(jax.random.normal(k[3], (B, H)) * 0.5, jax.random.normal(k[4], (B, H)) * 0.5)
    kw = random_step_flags(seed, B, T) if flags else {}
    return params, xs, state, kw


def _uses_kernel(f, *args) -> bool:
    return f"jaxlstm_{_native.level()}_forward" in str(jax.make_jaxpr(f)(*args))


def _loss(p, xs, s, r=None, **kw):
    ys, final = jaxlstm.lstm(p, xs, s, reset_state=r, **kw)
    w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)  # uneven weights: nothing cancels
    return (w * ys).sum() + (final.h**2).sum() + jnp.sin(final.c).sum()


# Shapes around the native code's tiles: B past a 12-row tile, H not a multiple of the vector
# width (the last thread's units are padded), T=1.
SHAPES = [(3, 5, 7, 6), (13, 6, 33, 4), (2, 4, 40, 1), (17, 9, 24, 5)]


@pytest.mark.parametrize("B,D,H,T", SHAPES)
@pytest.mark.parametrize("flags,reverse", [(False, False), (True, False), (True, True)])
def test_values_match_the_numpy_loop(B, D, H, T, flags, reverse):
    params, xs, state, kw = _case(B * 7 + T, B, D, H, T, flags)
    assert _uses_kernel(lambda x: jaxlstm.lstm(params, x, state, reverse=reverse, **kw), xs)
    ys, final = jaxlstm.lstm(params, xs, state, reverse=reverse, **kw)
    p = {k: None if v is None else np.asarray(v, np.float64) for k, v in params._asdict().items()}
    np_kw = {k: np.asarray(v) for k, v in kw.items()}
    np_kw = dict(lengths=np_kw.get("seq_lengths"), mask=np_kw.get("mask"), resets=np_kw.get("resets"))
    h0, c0 = np.asarray(state.h, np.float64), np.asarray(state.c, np.float64)
    ys_ref, h_ref, c_ref = lstm_ref(np, p, np.asarray(xs, np.float64), h0, c0, reverse=reverse, **np_kw)
    np.testing.assert_allclose(ys, ys_ref, atol=2e-6)
    np.testing.assert_allclose(final.h, h_ref, atol=2e-6)
    np.testing.assert_allclose(final.c, c_ref, atol=2e-6)


@pytest.mark.parametrize("B,D,H,T", SHAPES[:2])
@pytest.mark.parametrize("flags,reverse", [(False, False), (True, True)])
def test_gradients_match_the_xla_path_and_autodiff(B, D, H, T, flags, reverse):
    """Every input's gradient (params, inputs, initial and reset state) against autodiff of
    the pure-XLA scan; with resets a non-zero reset state, so its cotangent is exercised."""
    params, xs, state, kw = _case(B + 3 * T, B, D, H, T, flags)
    r = jaxlstm.LSTMState(jnp.full((B, H), 0.3), jnp.linspace(-0.5, 0.5, B * H).reshape(B, H))
    args = (params, xs, state, r)
    assert _uses_kernel(lambda *a: _loss(*a, reverse=reverse, **kw), *args)
    v, g = jax.value_and_grad(_loss, argnums=(0, 1, 2, 3))(*args, reverse=reverse, **kw)
    with tuning.forced("feature"):
        v_ad, g_ad = jax.value_and_grad(_loss, argnums=(0, 1, 2, 3))(*args, reverse=reverse, backward="autodiff", **kw)
    np.testing.assert_allclose(v, v_ad, rtol=1e-5)
    assert_trees_close(g, g_ad, rtol=1e-4)


def test_check_grads():
    params, xs, state, kw = _case(5, 3, 4, 20, 5, flags=True)
    f = lambda p, x, s: _loss(p, x, s, **kw)
    check_grads(f, (params, xs, state), order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("case", ["batch (2, 3)", "time-major", "unbatched"])
def test_layouts_batch_shapes_and_jit(case):
    """time_major, several and no leading batch dims, no bias, under jit: the XLA path's numbers."""
    params, xs, state, _ = _case(9, 6, 5, 20, 7)
    params = params._replace(b=None)
    x, s, tm = {
        "batch (2, 3)": (xs.reshape(2, 3, 7, 5), jax.tree.map(lambda a: a.reshape(2, 3, 20), state), False),
        "time-major": (jnp.swapaxes(xs, 0, 1), state, True),
        "unbatched": (xs[0], jax.tree.map(lambda a: a[0], state), False),
    }[case]
    run = jax.jit(lambda p, x, s: jaxlstm.lstm(p, x, s, time_major=tm))
    assert _uses_kernel(run, params, x, s)
    got, g = run(params, x, s), jax.grad(lambda p: run(p, x, s)[0].sum())(params)
    with tuning.forced("feature"):
        want = jaxlstm.lstm(params, x, s, time_major=tm)
        g_want = jax.grad(lambda p: jaxlstm.lstm(p, x, s, time_major=tm)[0].sum())(params)
    assert_trees_close(got, want, rtol=1e-5)
    assert_trees_close(g, g_want, rtol=1e-4)
    assert g.b is None


def test_vmap_and_stacks():
    """vmap of the custom call runs it per element; a bidirectional stack (whose directions
    run under vmap) and the linen module take the native code too."""
    params, xs, state, _ = _case(4, 4, 6, 16, 5)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
    f = lambda p, x: jaxlstm.lstm(p, x)[0]
    got = jax.vmap(f, in_axes=(0, None))(stacked, xs)
    np.testing.assert_allclose(got[0], f(params, xs), atol=1e-6)
    np.testing.assert_allclose(got[1], f(jax.tree.map(lambda a: 0.5 * a, params), xs), atol=1e-6)
    sp = jaxlstm.init_lstm_stack(jax.random.key(1), 6, 16, num_layers=2, bidirectional=True)
    assert _uses_kernel(lambda x: jaxlstm.lstm_stack(sp, x)[0], xs)
    ys = jaxlstm.lstm_stack(sp, xs)[0]
    with tuning.forced("feature"):
        np.testing.assert_allclose(ys, jaxlstm.lstm_stack(sp, xs)[0], atol=1e-5)


@pytest.mark.parametrize("case", ["input dropout", "bfloat16 inputs"])
def test_input_dropout_and_bfloat16_inputs(case):
    """Input dropout is applied before the native code, and bfloat16 inputs with float32 params
    run on it in float32 (as the XLA path's dots do): both give the XLA path's numbers."""
    params, xs, state, _ = _case(6, 3, 5, 16, 6)
    key = jax.random.key(2)
    if case == "input dropout":
        f = lambda p, x: jaxlstm.lstm(p, x, state, input_dropout=0.3, key=key)[0]
    else:
        f = lambda p, x: jaxlstm.lstm(p, x.astype(jnp.bfloat16), state)[0].astype(jnp.float32)
    assert _uses_kernel(f, params, xs)
    loss = lambda p, x: jnp.sin(f(p, x)).sum()
    got, g = f(params, xs), jax.grad(loss, argnums=(0, 1))(params, xs)
    with tuning.forced("xla"):
        want, g_want = f(params, xs), jax.grad(loss, argnums=(0, 1))(params, xs)
    tol = 1e-5 if case == "input dropout" else 1e-2  # bfloat16 outputs round the same float32 numbers
    assert_trees_close(got, want, rtol=tol)
    assert_trees_close(g, g_want, rtol=10 * tol)


def test_where_the_kernel_does_not_apply_the_xla_path_runs():
    params, xs, state, _ = _case(2, 2, 3, 16, 4)
    assert _uses_kernel(lambda x: jaxlstm.lstm(params, x), xs)
    assert _uses_kernel(lambda x: jaxlstm.lstm(params, x, compute_dtype=jnp.bfloat16), xs)  # tests/test_bf16.py
    proj = jaxlstm.init_lstm(jax.random.key(0), 3, 16, proj_size=8)
    key = jax.random.key(1)
    others = [
        lambda x: jaxlstm.lstm(proj, x),  # projection
        lambda x: jaxlstm.lstm(params, x, recurrent_dropout=0.2, key=key),
        lambda x: jaxlstm.lstm(params, x, zoneout_c=0.1, deterministic=True),
        lambda x: jaxlstm.lstm(params, x, checkpoint_every=2),
        lambda x: jaxlstm.lstm(params, x, compute_dtype=jnp.float16),  # neither float32 nor bfloat16
        lambda x: jaxlstm.lstm(params, x, backward="autodiff"),
        lambda x: jaxlstm.lstm(params, x[:, :0]),  # no step
    ]
    for f in others:
        assert not _uses_kernel(f, xs)
    with tuning.forced("batch"):
        assert not _uses_kernel(lambda x: jaxlstm.lstm(params, x), xs)
    os.environ["JAXLSTM_NATIVE"] = "0"
    try:
        assert not _uses_kernel(lambda x: jaxlstm.lstm(params, x), xs)
    finally:
        del os.environ["JAXLSTM_NATIVE"]


def test_kernel_core_direct_with_flags():
    """native_lstm's own contract (time-major, Steps) against the XLA fused core."""
    from jaxlstm._fused import FusedConfig, fused_sequence
    from jaxlstm._step import LSTM

    T, B, D, H = 6, 5, 3, 17
    k = jax.random.split(jax.random.key(3), 4)
    params = jaxlstm.init_lstm(k[0], D, H)
    xs = jax.random.normal(k[1], (T, B, D))
    carry = (jax.random.normal(k[2], (B, H)), jax.random.normal(k[3], (B, H)))
    rng = np.random.RandomState(0)
    steps = Steps(
        jnp.asarray([6, 0, 3, 5, 6], jnp.int32), jnp.asarray(rng.rand(T, B) > 0.3), jnp.asarray(rng.rand(T, B) > 0.6)
    )
    reset = (jnp.full((B, H), 0.1), jnp.full((B, H), -0.3))
    cfg = FusedConfig(jnp.dtype(jnp.float32), jnp.dtype(jnp.float32))
    got = _native.native_lstm(False, params, carry, xs, steps, reset)
    want = fused_sequence(cfg, LSTM, params, carry, xs, steps, reset)
    assert_trees_close(got, want, rtol=1e-5)


# Three threads, and every ISA level: tests/test_native_levels.py.


def test_the_thread_setting_is_checked_and_capped(monkeypatch):
    """JAXLSTM_NATIVE_THREADS: no positive integer is a ValueError naming it; a huge value is
    capped at the CPUs the process may use (here one, under taskset), so a call starts no
    pile of threads (it once started a thousand per call)."""
    params, xs, _, _ = _case(0, 2, 3, 16, 4)
    for bad in ("abc", "0", "-3", "2.5"):
        monkeypatch.setenv("JAXLSTM_NATIVE_THREADS", bad)
        with pytest.raises(ValueError, match=f"JAXLSTM_NATIVE_THREADS must be a positive integer.*got '{bad}'"):
            jaxlstm.lstm(params, xs)
    monkeypatch.delenv("JAXLSTM_NATIVE_THREADS")
    if shutil.which("taskset") is None or not sys.platform.startswith("linux"):
        pytest.skip("needs taskset (Linux)")
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, jaxlstm
        p = jaxlstm.init_lstm(jax.random.key(0), 64, 256)
        xs = jax.random.normal(jax.random.key(1), (32, 8, 64))
        jax.block_until_ready(jax.grad(lambda p: jnp.sum(jaxlstm.lstm(p, xs)[0]))(p))
        threads = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("Threads:"))
        print(jaxlstm.native_info().threads, threads)
        """
    )
    # 1000, not more: were the cap gone, the process would start a thousand threads (and fail the
    # assertion below) rather than exhaust the machine's for every other test running beside it
    env = dict(os.environ, JAXLSTM_NATIVE_THREADS="1000", JAX_PLATFORMS="cpu")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    team, threads = map(int, out.stdout.split())
    assert team == 1 and threads < 64, out.stdout


def test_export_runs_on_the_xla_path():
    """``jax.export`` refuses custom calls without a compatibility guarantee, and the native code's
    calls have none (their ABI is this build's, their names its ISA level's): exported under
    ``tuning.forced("xla")`` a model serializes, and its round trip gives the native code's numbers,
    values and (``vjp_order=1``) gradients. docs/export.md."""
    params, xs, _, _ = _case(4, 3, 5, 16, 6)
    f = lambda p, x: jnp.tanh(jaxlstm.lstm(p, x)[0]).sum()
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility guarantees"):
        jax.export.export(jax.jit(f))(params, xs)
    with tuning.forced("xla"):
        exported = jax.export.export(jax.jit(lambda p, x: f(p, x)))(params, xs)
        assert "jaxlstm_" not in exported.mlir_module()
    restored = jax.export.deserialize(exported.serialize(vjp_order=1))
    np.testing.assert_allclose(restored.call(params, xs), f(params, xs), rtol=1e-5)
    grads = jax.grad(restored.call, argnums=(0, 1))(params, xs)
    assert_trees_close(grads, jax.grad(f, argnums=(0, 1))(params, xs), rtol=1e-4)


_BUSY = """
import ctypes, os, subprocess, sys, time
import jax, jax.numpy as jnp, jaxlstm
from jaxlstm import _native
lib = _native._library(_native.level())
lib.JaxlstmOthersBusyCpus.restype = ctypes.c_double
p = jaxlstm.init_lstm(jax.random.key(0), 64, 128)
xs = jnp.ones((16, 64, 64))
f = jax.jit(lambda p, x: jaxlstm.lstm(p, x)[0])
f(p, xs).block_until_ready()
hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(os.cpu_count() - 1)]
try:
    time.sleep(0.3)
    for _ in range(4):  # windows of 60 ms between calls: the native code reads the load at most every 50 ms
        f(p, xs).block_until_ready()
        time.sleep(0.06)
    print(lib.JaxlstmLastThreads(), lib.JaxlstmOthersBusyCpus())
finally:
    for h in hogs:
        h.kill()
"""


def test_a_busy_machine_gets_a_smaller_team():
    """With other processes busy on all CPUs but one, the native code's calls ask for one thread (a
    team thread sharing its CPU waits for its time slice at every barrier), and say how many
    CPUs the others kept busy."""
    if not os.path.exists("/proc/stat") or (os.cpu_count() or 1) < 2:
        pytest.skip("reads Linux's /proc/stat; needs 2 CPUs")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXLSTM_AUTOTUNE="0")
    env.pop("JAXLSTM_NATIVE_THREADS", None)
    out = subprocess.run([sys.executable, "-c", _BUSY], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    threads, busy = out.stdout.split()[-2:]
    assert int(threads) == 1 and float(busy) >= 0.7 * ((os.cpu_count() or 2) - 1), out.stdout


def test_the_earlier_variable_names_still_work(monkeypatch):
    """``JAXLSTM_KERNEL``, ``_ISA`` and ``_THREADS`` (the names before the glossary) are read where
    the ``JAXLSTM_NATIVE`` ones are unset, and errors name the variable as it was set; the new
    name wins where both are."""
    params, xs = jaxlstm.init_lstm(jax.random.key(0), 2, 4), jnp.zeros((1, 3, 2))
    for name in ("JAXLSTM_NATIVE", "JAXLSTM_NATIVE_ISA", "JAXLSTM_NATIVE_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAXLSTM_KERNEL", "0")
    assert not _native.enabled() and jaxlstm.path_of("lstm", params, xs) != "native"
    monkeypatch.setenv("JAXLSTM_NATIVE", "1")
    assert _native.enabled()
    monkeypatch.setenv("JAXLSTM_KERNEL_ISA", "avx1024")
    with pytest.raises(ValueError, match="JAXLSTM_KERNEL_ISA must be one of"):
        jaxlstm.lstm(params, xs)
    monkeypatch.setenv("JAXLSTM_NATIVE_ISA", jaxlstm.native_info().isa_supported[0])
    assert jaxlstm.native_info().isa == os.environ["JAXLSTM_NATIVE_ISA"]
    monkeypatch.delenv("JAXLSTM_KERNEL_ISA")
    monkeypatch.delenv("JAXLSTM_NATIVE_ISA")
    monkeypatch.setenv("JAXLSTM_KERNEL_THREADS", "x")
    with pytest.raises(ValueError, match="JAXLSTM_KERNEL_THREADS must be a positive integer"):
        jaxlstm.lstm(params, xs)
    monkeypatch.setenv("JAXLSTM_KERNEL_THREADS", "1")  # the C++ reads it too (csrc/team.h)
    assert jaxlstm.native_info().threads == 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    monkeypatch.setenv("JAXLSTM_NATIVE_THREADS", str(cpus))
    assert jaxlstm.native_info().threads == cpus


def test_the_earlier_spelling_of_the_forced_path_warns():
    params, xs = jaxlstm.init_lstm(jax.random.key(0), 2, 4), jnp.zeros((1, 3, 2))
    with pytest.warns(DeprecationWarning, match='forced\\("native"\\)'), tuning.forced("kernel"):
        assert jaxlstm.path_of("lstm", params, xs) == "native"
    assert tuning.kernel_path(1, 2, 4, 3) == tuning.native_path(1, 2, 4, 3)
    with tuning.forced("xla"):  # the alias follows the choice, not a constant
        assert not tuning.kernel_path(1, 2, 4, 3) and not tuning.native_path(1, 2, 4, 3)


_CELLS = {"lstm": (jaxlstm.init_lstm, jaxlstm.lstm), "gru": (jaxlstm.init_gru, jaxlstm.gru),
          "rnn": (jaxlstm.init_rnn, jaxlstm.rnn)}  # fmt: skip
_REFS = {"lstm": lstm_ref, "gru": gru_ref, "rnn": rnn_ref}


def _outputs_and_grads(run, params, x, state, opts):
    """A cell call's outputs and final state, and the gradients (params, inputs) of a loss of all of
    them (every output and every final state read, none sliced away)."""

    def loss(p, x):
        ys, final = run(p, x, state, **opts)
        return jnp.sin(ys.astype(jnp.float32)).sum() + sum(jnp.cos(a.astype(jnp.float32)).sum()
                                                            for a in jax.tree.leaves(final))  # fmt: skip

    return run(params, x, state, **opts), jax.grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.skipif(not _native.enabled() or (os.cpu_count() or 1) < 2, reason="needs the native code and 2 CPUs")
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_the_forward_pass_split_by_sequences(kind, monkeypatch):
    """Two threads and small weights: the forward pass splits the batch (13 sequences: 6 and 7), each
    thread running the whole recurrence of its own. Batch-major, reversed, time-major, with lengths,
    holes and resets; float32 and bf16 (inputs, outputs and GEMMs): the numbers of one thread, values
    and gradients (the saving forward pass split too), and the XLA path's within float32's error."""
    init, run = _CELLS[kind]
    for i in range(3):
        params, _, x, state, _, options = cell_case(init, kind, i, 13, 5, 40, 6)
        for dtype in (jnp.float32, jnp.bfloat16):
            opts = dict(options, compute_dtype=dtype)
            xd = x.astype(dtype)

            def both(opts=opts, p=params, x=xd, s=state):  # the thread count: read per call
                return _outputs_and_grads(run, p, x, s, opts)

            results = {}
            for threads in ("1", "2"):
                monkeypatch.setenv("JAXLSTM_NATIVE_THREADS", threads)
                results[threads] = both()
            # the same sums but for their order where a row lands in a smaller register tile (13 = 12 + 1
            # rows on one thread): float32's rounding, and a bf16 output's last bit
            tol = 1e-5 if dtype == jnp.float32 else 1e-2
            for a, b in zip(jax.tree.leaves(results["2"]), jax.tree.leaves(results["1"]), strict=True):
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
            if dtype == jnp.float32:
                with tuning.forced("xla"):
                    want = both()
                assert_trees_close(results["2"], want, rtol=1e-4)


_F32, _BF16 = (jnp.float32,), (jnp.bfloat16,)
# (B, D, H, T, cell_case's layout, the dtypes whose buffers alias there, the cells); x(t) is copied where a
# thread has more than 8 rows: B=20 on two threads (the batch split between them) or one
_PADDED = {
    "h(t-1) and the rings": (3, 5, 1024, 4, 0, _F32 + _BF16, ("lstm", "gru", "rnn")),
    "batch-major x": (20, 64, 24, 16, 1, _F32, ("lstm", "gru", "rnn")),
    "time-major x": (20, 1024, 8, 3, 2, _F32, ("lstm", "gru", "rnn")),
    "the LSTM's ring at H=256": (13, 6, 256, 3, 0, _F32, ("lstm",)),
    "transposed chunks": (2048, 3, 8, 2, 0, _F32 + _BF16, ("lstm", "gru", "rnn")),
    "bf16 x(t) pairs": (3, 2048, 8, 5, 2, _BF16, ("lstm", "gru", "rnn")),
    "bf16 h(t-1) pairs": (3, 4, 2048, 5, 0, _BF16, ("lstm", "gru")),
}


@pytest.mark.parametrize(
    "kind,B,D,H,T,case,dtypes",
    [pytest.param(k, *v[:6], id=f"{name}-{k}") for name, v in _PADDED.items() for k in v[6]],
)
def test_rows_4_kib_apart_are_read_with_a_padded_stride(kind, B, D, H, T, case, dtypes):
    """Where the GEMMs' rows would lie a multiple of 4 KiB apart (gemm.h: lead; one L1 set), the native
    code copies them into buffers a cache line wider: h(t-1) at H=1024, the backward pass's gate cotangent
    rings at G·H = 1024·k (bf16: pairs(G·H)), x(t) read in place with rows T·D (batch-major) or D
    (time-major) = 1024·k floats apart, a chunk of h_in and x transposed for the weight gradients with
    1024·k rows (B=2048: one step a chunk; bf16: 1024 pairs), and bf16's paired x(t) and h(t-1) at
    D, H = 2048 (1024 pairs a row). Values and gradients against the XLA path: float32 within its
    rounding, bf16 within bf16's (a row read at the wrong stride is off by O(1))."""
    init, run = _CELLS[kind]
    params, xs, x, state, flags, options = cell_case(init, kind, case, B, D, H, T)
    for dtype in dtypes:
        opts, xd = dict(options, compute_dtype=dtype), x.astype(dtype)
        with tuning.forced("native"):
            assert jaxlstm.path_of(kind, params, xd, state, **opts) == "native"
            got = _outputs_and_grads(run, params, xd, state, opts)
        with tuning.forced("xla"):
            want = _outputs_and_grads(run, params, xd, state, opts)
        if dtype == jnp.float32:
            assert_trees_close(got, want, rtol=1e-4)
            # the values against the float64 NumPy loop of the equations, too
            f = {k: np.asarray(v) for k, v in flags.items()}
            starts = [np.asarray(a, np.float64) for a in jax.tree.leaves(state)]
            ref = _REFS[kind](np, as_dict(params), np.asarray(xs, np.float64), *starts, reverse=options["reverse"],
                              lengths=f["seq_lengths"], mask=f["mask"], resets=f["resets"])  # fmt: skip
            ys, final = got[0]
            ys = jnp.swapaxes(ys, 0, 1) if options.get("time_major") else ys
            for a, b in zip((ys, *jax.tree.leaves(final)), ref, strict=True):
                np.testing.assert_allclose(np.asarray(a), b, atol=2e-5)
            continue
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(b) + 1e-3, (a.shape, np.abs(a - b).max())
