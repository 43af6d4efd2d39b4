"""The native code at every ISA level this machine runs (jaxlstm/_native.py: one library
per level, setup.py), each forced with ``JAXLSTM_NATIVE_ISA``: every cell's values against the
NumPy loops and every gradient against autodiff of the XLA scan, with lengths, holes, resets,
reversal, both layouts and the shapes around each level's register tiles; 3 threads in a fresh
process. The whole kernel suite (tests/test_native.py, tests/test_native_cells.py) runs at the
level the machine chooses. Also: how a level is chosen, and a default build on an emulated older
CPU (qemu-user)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from helpers import assert_trees_close, cell_case
from jaxlstm import _native
from reference import as_dict, gru_ref, lstm_ref, rnn_ref

RUNNABLE = [lv for lv in _native.levels_built() if lv in _native.levels_supported()]
pytestmark = pytest.mark.skipif(not RUNNABLE, reason=str(_native.load_error()))

CELLS = {
    "lstm": (jaxlstm.init_lstm, jaxlstm.lstm, lstm_ref),
    "gru": (jaxlstm.init_gru, jaxlstm.gru, gru_ref),
    "rnn": (jaxlstm.init_rnn, jaxlstm.rnn, rnn_ref),
}
# Around the tiles of every level (4, 6 and 12 rows; vectors of 4, 8 and 16 floats): B past a
# tile and a vector, H not a multiple of any vector width, T=1 (the one-step GEMM on the weights in
# place: several rows, and one row).
SHAPES = [(13, 6, 33, 4), (7, 5, 20, 1), (2, 3, 40, 5), (1, 3, 40, 1)]


def test_the_best_level_the_cpu_runs_is_chosen(monkeypatch):
    monkeypatch.delenv(_native.ISA_VARIABLE, raising=False)
    assert _native.level() == RUNNABLE[-1]
    info = jaxlstm.native_info()
    assert info.available and info.isa == RUNNABLE[-1] and info.isa_forced is None
    assert set(RUNNABLE) <= set(info.isa_supported) and set(RUNNABLE) <= set(info.isa_built)
    assert info.threads is not None and info.threads >= 1
    assert info.build_id.startswith(info.isa + "-")
    assert f"ISA level in use: {info.isa}" in str(info)


def test_importing_jaxlstm_starts_no_backend():
    """Loading is lazy: after ``import jaxlstm`` a user can still configure JAX's devices (a
    module-level jnp array in the loader once started the backend at import)."""
    code = (
        "import jax, jaxlstm; jax.config.update('jax_num_cpu_devices', 3); "
        "print(len(jax.devices()), jaxlstm.native_info().available)"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["3", "True"]


def test_forcing_a_level(monkeypatch):
    monkeypatch.setenv(_native.ISA_VARIABLE, RUNNABLE[0])
    info = jaxlstm.native_info()
    assert info.isa == RUNNABLE[0] and info.isa_forced == RUNNABLE[0]
    monkeypatch.setenv(_native.ISA_VARIABLE, "avx1024")
    match = "JAXLSTM_NATIVE_ISA must be one of avx, avx2, avx512, avx512_bf16, generic; got 'avx1024'"
    with pytest.raises(ValueError, match=match):
        jaxlstm.lstm(jaxlstm.init_lstm(jax.random.key(0), 2, 4), jnp.zeros((1, 3, 2)))
    assert "avx1024" in (jaxlstm.native_info().error or "")
    for lv in [lv for lv in _native.LEVELS if lv not in RUNNABLE]:  # never loaded: the XLA path runs, and says why
        monkeypatch.setenv(_native.ISA_VARIABLE, lv)
        info = jaxlstm.native_info()
        why = "this CPU cannot run that level" if lv in _native.levels_built() else "that level is not built"
        assert not info.available and info.isa is None and why in (info.error or ""), info
        jaxpr = jax.make_jaxpr(partial(jaxlstm.lstm, jaxlstm.init_lstm(jax.random.key(0), 2, 4)))
        assert "jaxlstm_" not in str(jaxpr(jnp.zeros((1, 3, 2))))


_AUTODIFF = {}


def _loss(run, options, p, x, s, r, **kw):
    ys, final = run(p, x, s, reset_state=r, **options, **kw)
    w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)  # uneven weights: nothing cancels
    return (w * ys).sum() + sum(jnp.sin(a).sum() for a in jax.tree.leaves(final))


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("isa", RUNNABLE[:-1])  # the best one: the whole kernel suite runs at it
def test_every_level_matches_the_references(isa, kind, monkeypatch):
    """Values against the NumPy loop (float64), every gradient (the reset state's too, non-zero)
    against autodiff of the XLA scan; batch-major, reversed, time-major in turn."""
    monkeypatch.setenv(_native.ISA_VARIABLE, isa)
    init, run, ref = CELLS[kind]
    for i, (B, D, H, T) in enumerate(SHAPES):
        params, xs, x, state, flags, options = cell_case(init, kind, i, B, D, H, T)
        f = jax.jit(partial(run, **options))
        assert f"jaxlstm_{isa}_forward" in str(jax.make_jaxpr(f)(params, x, state))
        ys, final = f(params, x, state)

        flags = {k: np.asarray(v) for k, v in flags.items()}
        starts = [np.asarray(a, np.float64) for a in jax.tree.leaves(state)]
        want = ref(np, as_dict(params), np.asarray(xs, np.float64), *starts, reverse=options["reverse"],
                   lengths=flags["seq_lengths"], mask=flags["mask"], resets=flags["resets"])  # fmt: skip
        got = (jnp.swapaxes(ys, 0, 1) if i == 2 else ys, *jax.tree.leaves(final))
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-6)

        reset = jax.tree.map(lambda a: jnp.linspace(-0.4, 0.3, a.size).reshape(a.shape), state)
        args = (params, x, state, reset)
        v, g = jax.jit(jax.value_and_grad(partial(_loss, run, options), argnums=(0, 1, 2, 3)))(*args)
        if (kind, i) not in _AUTODIFF:  # the same for every level: computed once per process
            autodiff = partial(_loss, run, options, backward="autodiff")
            _AUTODIFF[kind, i] = jax.value_and_grad(autodiff, argnums=(0, 1, 2, 3))(*args)
        v_ad, g_ad = _AUTODIFF[kind, i]
        np.testing.assert_allclose(v, v_ad, rtol=1e-5)
        assert_trees_close(g, g_ad, rtol=1e-4)


def test_every_level_with_three_threads():
    """Forced to 3 threads (capped at the machine's CPUs: 2 on a 2-core machine), uneven splits
    of H in multiples of each level's vector width, in a fresh process: the XLA path's numbers,
    values and gradients, every cell, every level (three shapes at the best one)."""
    code = textwrap.dedent(
        f"""
        import itertools, os
        import jax, jax.numpy as jnp, numpy as np, jaxlstm
        from jaxlstm import tuning
        cells = [(jaxlstm.init_lstm, jaxlstm.lstm), (jaxlstm.init_gru, jaxlstm.gru), (jaxlstm.init_rnn, jaxlstm.rnn)]
        shapes = [(5, 3, 40, 6), (13, 4, 72, 3), (2, 3, 100, 4)]
        cases = dict()  # the XLA path's numbers: computed once, compared at every level
        for (init, run), (B, D, H, T) in itertools.product(cells, shapes):
            p = init(jax.random.key(H), D, H)
            xs = jax.random.normal(jax.random.key(1), (B, T, D))
            lengths = jnp.arange(B, dtype=jnp.int32) % (T + 1)
            f = lambda p, x, run=run, lengths=lengths: run(p, x, seq_lengths=lengths)
            loss = lambda p, x, f=f: sum(jnp.sin(a).sum() for a in jax.tree.leaves(f(p, x)))
            with tuning.forced("xla"):
                want = f(p, xs), jax.grad(loss, argnums=(0, 1))(p, xs)
            cases[run, B] = f, loss, p, xs, want
        for isa in {RUNNABLE!r}:
            os.environ["JAXLSTM_NATIVE_ISA"] = isa
            here = shapes if isa == {RUNNABLE[-1]!r} else shapes[1:2]
            for (_, run), (B, D, H, T) in itertools.product(cells, here):
                f, loss, p, xs, want = cases[run, B]
                # a fresh function: make_jaxpr would replay f's trace from another level
                assert f"jaxlstm_{{isa}}_forward" in str(jax.make_jaxpr(lambda p, x: f(p, x))(p, xs))
                got = f(p, xs), jax.grad(loss, argnums=(0, 1))(p, xs)  # eager: traced afresh
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        print("ok")
        """
    )
    env = dict(os.environ, JAXLSTM_NATIVE_THREADS="3", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# An older CPU, emulated: qemu-user runs this very Python and jaxlib under a CPU model that
# lacks AVX-512 (Haswell: AVX2 + FMA) or AVX2 too (Sandy Bridge: AVX), and jaxlstm must load a
# level that model runs, and give the host's numbers. .ci/run installs qemu-user.
_EMULATED = {"Haswell": "avx2", "SandyBridge": "avx"}
_TINY = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, jaxlstm
    rng = np.random.RandomState(0)
    p = jaxlstm.LSTMParams(*(jnp.asarray(rng.randn(*s) * 0.3, jnp.float32) for s in [(3, 80), (20, 80), (80,)]))
    xs = jnp.asarray(rng.randn(2, 5, 3), jnp.float32)
    loss = lambda p: jnp.sin(jaxlstm.lstm(p, xs)[0]).sum()
    f = jax.jit(lambda p: (jaxlstm.lstm(p, xs)[0], jax.grad(loss)(p).w_hh))  # one compile: emulation is slow
    info = jaxlstm.native_info()
    print("isa", info.isa, "uses", f"jaxlstm_{info.isa}_forward" in str(jax.make_jaxpr(f)(p)))
    print(json.dumps([np.asarray(a).ravel().tolist() for a in f(p)]))
    """
)


@pytest.mark.parametrize("model", _EMULATED)
def test_a_default_build_runs_on_an_older_cpu(model):
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or _native.levels_built()[:1] != ("avx",):
        if os.environ.get("CI") == "true" and _native.levels_built()[:1] == ("avx",):
            pytest.fail("CI must run this check: .ci/run installs qemu-user")
        pytest.skip("needs qemu-user (apt-get install qemu-user) and the x86-64 levels built")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXLSTM_AUTOTUNE="0")
    env.pop(_native.ISA_VARIABLE, None)
    host = subprocess.run([sys.executable, "-c", _TINY], env=env, capture_output=True, text=True, timeout=300)
    assert host.returncode == 0, host.stderr[-3000:]
    cmd = [qemu, "-cpu", model, sys.executable, "-c", _TINY]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-3000:]}"  # a SIGILL is exit -4 / 132
    assert f"isa {_EMULATED[model]} uses True" in out.stdout, out.stdout
    for a, b in zip(*(json.loads(o.stdout.splitlines()[-1]) for o in (out, host)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the host's level sums in another order
