"""Both forward layouts against the reference, and the autotuner that picks one."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from helpers import assert_trees_close, lstm_inputs
from helpers import reference_outputs as _reference
from jaxlstm import tuning


@pytest.mark.parametrize("layout", tuning.CANDIDATES)
@pytest.mark.parametrize(
    "batch_shape,proj,lengths,reverse,time_major",
    [((3,), None, True, False, False), ((2, 2), 2, True, True, False), ((), None, False, True, True)],
)
def test_each_layout_matches_the_reference(layout, batch_shape, proj, lengths, reverse, time_major):
    params, xs, state, seq_lengths = lstm_inputs(7, batch_shape, proj, with_state=True, lengths=lengths)
    x_in = jnp.moveaxis(xs, -2, 0) if time_major else xs
    ys_ref, h_ref, c_ref = _reference(params, xs, state, seq_lengths, reverse)
    kw = dict(seq_lengths=seq_lengths, reverse=reverse, time_major=time_major)
    for backward in ("fused", "autodiff"):
        with tuning.forced(layout):
            run = jax.jit(jaxlstm.lstm, static_argnames=("reverse", "time_major", "backward"))
            ys, final = run(params, x_in, state, backward=backward, **kw)
        ys = jnp.moveaxis(ys, 0, -2) if time_major else ys
        np.testing.assert_allclose(ys, ys_ref, atol=2e-5)
        np.testing.assert_allclose(final.h, h_ref, atol=2e-5)
        np.testing.assert_allclose(final.c, c_ref, atol=2e-5)


@pytest.mark.parametrize("layout", tuning.CANDIDATES)
def test_each_layout_gives_the_same_gradients(layout):
    params, xs, state, lengths = lstm_inputs(8, (3,), 2, with_state=True, lengths=True)

    def loss(p, x, s, backward):
        ys, final = jaxlstm.lstm(p, x, s, seq_lengths=lengths, reverse=True, backward=backward)
        return (jnp.sin(ys)).sum() + (final.c**2).sum()

    with tuning.forced("feature"):
        want = jax.grad(loss, argnums=(0, 1, 2))(params, xs, state, "autodiff")
    with tuning.forced(layout):
        for backward in ("fused", "autodiff"):
            assert_trees_close(jax.grad(loss, argnums=(0, 1, 2))(params, xs, state, backward), want, rtol=1e-5)


@pytest.fixture
def autotune(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLSTM_AUTOTUNE", "1")
    monkeypatch.setenv("JAXLSTM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setattr(tuning, "BUSY", 1.0)  # pytest -n keeps the other core busy: tests/test_tuning.py's busy test
    return tmp_path


def test_autotuner_measures_once_then_reads_its_cache(autotune, monkeypatch):
    monkeypatch.setenv("JAXLSTM_NATIVE", "0")  # the forward layout is the pure-XLA path's choice
    params = jaxlstm.init_lstm(jax.random.key(0), 3, 4)
    xs = jnp.ones((2, 9, 3))
    calls = []
    measure = tuning._measure
    monkeypatch.setattr(tuning, "_measure", lambda *a: calls.append(a) or measure(*a))
    ys = jax.jit(lambda p, x: jaxlstm.lstm(p, x)[0])(params, xs)  # tuned while jit traces
    assert len(calls) == 1
    cache = json.loads((autotune / "tuning.json").read_text())
    (key, record), *rest = cache.items()
    assert not rest and record["choice"] in tuning.CANDIDATES and "B=2 D=3 H=4 R=4 T<=16" in key
    assert record["args"] == dict(kind="forward", B=2, D=3, H=4, R=4, T=9, mm="float32", acc="float32", unroll=1)
    assert record["rounds"] >= tuning.ROUNDS and record["ratio"] > 0
    assert record["load"] is None or 0 <= record["load"] <= 1  # None: too short a timing to tell
    # the same shape again, in a new process (memory cleared): the disk cache answers
    monkeypatch.setattr(tuning, "_memory", {})
    jaxlstm.lstm(params, xs * 2)
    assert len(calls) == 1
    with tuning.forced("feature"):
        np.testing.assert_allclose(ys, jaxlstm.lstm(params, xs)[0], atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru"])  # the Elman RNN shares the GRU's code path
def test_native_path_is_measured_once_on_training_steps(autotune, monkeypatch, cell):
    from jaxlstm import _native

    if not _native.available():
        pytest.skip(str(_native.load_error()))
    init, run = {
        "lstm": (jaxlstm.init_lstm, jaxlstm.lstm),
        "gru": (jaxlstm.init_gru, jaxlstm.gru),
    }[cell]
    params = init(jax.random.key(0), 3, 4)
    xs = jnp.ones((2, 9, 3))
    calls = []
    probe = _native._train_probe
    monkeypatch.setattr(_native, "_train_probe", lambda *a: calls.append(a[0]) or probe(*a))
    ys = jax.jit(lambda p, x: run(p, x)[0])(params, xs)
    assert sorted(calls) == ["native", "xla"]
    cache = json.loads((autotune / "tuning.json").read_text())
    (key, record), *rest = [kv for kv in cache.items() if f"|{cell}-native {_native.build_id()}|" in kv[0]]
    choice = record["choice"]
    assert not rest and choice in ("native", "xla") and "B=2 D=3 H=4 T<=16" in key
    monkeypatch.setattr(tuning, "_memory", {})
    assert tuning.native_path(2, 3, 4, 9, cell=cell) == (choice == "native")  # from the disk cache
    assert len(calls) == 2
    with tuning.forced("xla"):
        np.testing.assert_allclose(ys, run(params, xs)[0], atol=1e-6)
    monkeypatch.setenv("JAXLSTM_AUTOTUNE", "0")
    assert tuning.native_path(7, 3, 4, 9, cell=cell)  # off: the default, the native code


def test_autotuner_off_or_failing_gives_the_default(autotune, monkeypatch):
    def fail(*a):
        raise RuntimeError("no timing here")

    monkeypatch.setattr(tuning, "_measure", fail)
    assert tuning.forward_layout(2, 3, 4, 4, 9, jnp.float32, jnp.float32) == tuning.DEFAULT
    assert not (autotune / "tuning.json").exists()  # a failure is not remembered on disk
    monkeypatch.setenv("JAXLSTM_AUTOTUNE", "0")
    monkeypatch.setattr(tuning, "_memory", {})
    assert tuning.forward_layout(5, 3, 4, 4, 9, jnp.float32, jnp.float32) == tuning.DEFAULT
    with tuning.forced("batch"):
        assert tuning.forward_layout(5, 3, 4, 4, 9, jnp.float32, jnp.float32) == "batch"
    with pytest.raises(ValueError, match="layout must be one of"):
        with tuning.forced("diagonal"):
            pass


def _scan_unrolls(jaxpr) -> set:
    """The ``unroll`` of every scan in a jaxpr, sub-jaxprs (custom VJPs, pjit) included."""
    out = set()
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            out.add(e.params["unroll"])
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                j = getattr(sub, "jaxpr", sub)
                if hasattr(j, "eqns"):
                    out |= _scan_unrolls(j)
    return out


def test_default_unroll_per_backend(monkeypatch):
    """unroll=None (the default): 1 on this CPU; 16 where JAX's default backend is a GPU,
    through lstm, gru, rnn, lstm_stack and the Flax modules; an explicit unroll wins."""
    import flax.linen as nn
    from flax import nnx

    import jaxlstm.linen
    import jaxlstm.nnx

    xs = jnp.ones((2, 5, 3))
    p = jaxlstm.init_lstm(jax.random.key(0), 3, 8)
    linen = jaxlstm.linen.LSTM(features=8)
    variables = linen.init(jax.random.key(0), xs)
    module = jaxlstm.nnx.LSTM(3, 8, rngs=nnx.Rngs(0))

    def calls():  # fresh functions: JAX's trace cache would replay an earlier trace
        return {
            "lstm": lambda x: jaxlstm.lstm(p, x),
            "gru": lambda x: jaxlstm.gru(jaxlstm.init_gru(jax.random.key(0), 3, 8), x),
            "rnn": lambda x: jaxlstm.rnn(jaxlstm.init_rnn(jax.random.key(0), 3, 8), x),
            "stack": lambda x: jaxlstm.lstm_stack(jaxlstm.init_lstm_stack(jax.random.key(0), 3, 8, num_layers=2), x),
            "linen": lambda x: linen.apply(variables, x),
            "nnx": lambda x: module(x),
        }

    assert isinstance(linen, nn.Module)
    unrolls = lambda f: _scan_unrolls(jax.make_jaxpr(f)(xs).jaxpr)
    with tuning.forced("xla"):  # the scans, not the native code
        assert tuning.default_unroll() == 1
        for name, f in calls().items():
            assert unrolls(f) == {1}, name
        monkeypatch.setattr(tuning, "_backend", lambda: "gpu")
        assert tuning.default_unroll() == tuning.GPU_UNROLL == 16
        for name, f in calls().items():
            assert unrolls(f) == {16}, name
        assert unrolls(lambda x: jaxlstm.lstm(p, x, unroll=2)) == {2}
    with pytest.raises(ValueError, match="unroll must be a positive int"):
        jaxlstm.lstm(p, xs, unroll=0)


_WRITER = """
import sys, time
from jaxlstm import tuning
worker, start = int(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # every writer starts at once
for i in range(60):
    tuning._write_disk(f"writer {worker} key {i}", dict(choice="native"))
"""


def test_processes_tuning_at_once_keep_every_key(tmp_path):
    """Four processes write 60 choices each into one cache file at the same time: the file
    lock serialises the read-merge-replace, so that none overwrites another's new keys."""
    env = dict(os.environ, JAXLSTM_CACHE_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
    start = str(time.time() + 8.0)  # after every interpreter has imported jaxlstm
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(w), start], env=env) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    data = json.loads((tmp_path / "tuning.json").read_text())
    assert set(data) == {f"writer {w} key {i}" for w in range(4) for i in range(60)}


def test_forced_retraces_what_jit_already_traced():
    """A function jax.jit traced on the native code runs the XLA path inside forced("xla") (and the
    kernel again after): the forced path is part of jit's cache key, so the call inside forced traces
    the function again instead of running the native program from jit's fast path. (Counted by the
    function's traces, not by jit's private `_cache_size()`: that read 0 in two full runs of the
    suite (never alone; not explained), while the traces and programs were right.)"""
    from jaxlstm import _native

    if not (_native.available() and tuning.KEYED):
        pytest.skip("needs the native code, and JAX's keyed configuration state")
    params = jaxlstm.init_lstm(jax.random.key(0), 3, 8)
    xs = jax.random.normal(jax.random.key(1), (2, 4, 3))
    traces = []

    def run(x):
        traces.append(x.shape)
        return jaxlstm.lstm(params, x)[0]

    f = jax.jit(run)
    on_kernel = lambda: f"jaxlstm_{_native.level()}_forward" in f.lower(xs).as_text()
    ys = f(xs)
    f(xs)
    assert len(traces) == 1 and on_kernel()
    with tuning.forced("xla"):
        ys_xla = f(xs)
        assert len(traces) == 2, "a call inside forced('xla') ran the program jit had cached for the native code"
        assert not on_kernel()
        with tuning.forced("native"):
            assert on_kernel()
    assert on_kernel()
    np.testing.assert_allclose(ys, ys_xla, rtol=1e-5, atol=1e-6)


def test_pick_times_until_the_decision_is_clear(monkeypatch):
    """A candidate 2x faster wins after the first rounds; a tie keeps the default; a narrow lead
    (3.5 %: between half the margin and the margin) runs up to MAX_ROUNDS and keeps the default.
    On a clock the probes advance (deterministic: the suite's machine is busy)."""
    clock = [0.0]
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])

    def probe(seconds):
        return lambda: clock.__setitem__(0, clock[0] + seconds)

    fast = tuning.decide({"feature": probe(4.0), "batch": probe(2.0)}, "feature")
    assert fast["choice"] == "batch" and fast["clear"] and fast["rounds"] == tuning.ROUNDS and fast["ratio"] == 0.5
    tie = tuning.decide({"feature": probe(2.0), "batch": probe(2.0)}, "feature")
    assert tie["choice"] == "feature" and tie["clear"] and tie["rounds"] == tuning.ROUNDS
    narrow = tuning.decide({"feature": probe(1.0), "batch": probe(0.965)}, "feature")
    assert narrow["choice"] == "feature" and not narrow["clear"] and narrow["rounds"] == tuning.MAX_ROUNDS


def test_a_choice_timed_on_a_busy_machine_is_not_kept(autotune, monkeypatch):
    """Other processes busy: the choice holds for this process, a warning says so, and nothing
    is written, even for a clear answer; on an idle machine it is kept, with the load."""
    monkeypatch.setattr(tuning, "BUSY", 0.25)
    decision = dict(choice="batch", ratio=0.97, rounds=27, clear=False, load=0.6, when="now")
    monkeypatch.setattr(tuning, "_measure", lambda *a: dict(decision))
    with pytest.warns(RuntimeWarning, match="60 % of the CPUs busy"):
        assert tuning.forward_layout(2, 3, 4, 4, 9, jnp.float32, jnp.float32) == "batch"
    assert not (autotune / "tuning.json").exists()
    assert tuning.forward_layout(2, 3, 4, 4, 9, jnp.float32, jnp.float32) == "batch"  # this process: in memory
    decision.update(ratio=0.5, clear=True)
    with pytest.warns(RuntimeWarning, match="holds for this process only"):
        assert tuning.forward_layout(3, 3, 4, 4, 9, jnp.float32, jnp.float32) == "batch"
    assert not (autotune / "tuning.json").exists()
    decision.update(load=0.1)
    assert tuning.forward_layout(5, 3, 4, 4, 9, jnp.float32, jnp.float32) == "batch"
    (record,) = json.loads((autotune / "tuning.json").read_text()).values()
    assert record["load"] == 0.1 and record["ratio"] == 0.5


def test_other_load_reads_the_machine():
    load = tuning.other_load(0.05)
    assert load is None or 0.0 <= load <= 1.0
    if os.path.exists("/proc/stat"):
        assert load is not None


def test_the_command_line_shows_retunes_and_clears(autotune, monkeypatch, capsys):
    monkeypatch.setenv("JAXLSTM_NATIVE", "0")
    answers = iter(["batch", "feature"])
    monkeypatch.setattr(
        tuning,
        "_measure",
        lambda *a: dict(choice=next(answers), ratio=0.5, rounds=9, clear=True, load=0.0, when="then"),
    )
    assert tuning.forward_layout(2, 3, 4, 4, 9, jnp.float32, jnp.float32) == "batch"
    tuning.main(["show"])
    out = capsys.readouterr().out
    assert str(autotune / "tuning.json") in out and "'batch' (other/default time 0.500 over 9 rounds" in out
    tuning.main(["retune"])  # measures 'feature' now: replaced, and this process forgets 'batch'
    out = capsys.readouterr().out
    assert "'feature'" in out and "[was 'batch']" in out
    assert tuning.forward_layout(2, 3, 4, 4, 9, jnp.float32, jnp.float32) == "feature"
    tuning.main(["clear"])
    assert not (autotune / "tuning.json").exists() and "cleared" in capsys.readouterr().out
    run = subprocess.run([sys.executable, "-m", "jaxlstm.tuning", "show"], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)  # fmt: skip
    assert run.returncode == 0 and "(no choices)" in run.stdout, run.stderr[-2000:]


def test_recheck_times_one_native_choice_again(autotune, monkeypatch):
    """``tuning.recheck``: the one shape's native-or-XLA choice timed again and replaced where it now
    measures otherwise (this process forgets the old one too); a busy machine's answer is not cached;
    off (autotuning off, or a forced path) it does nothing."""
    answers = iter(["native", "xla", "native"])
    loads = iter([0.0, 0.0, 0.9])
    monkeypatch.setitem(
        tuning._PROBES,
        tuning.NATIVE,
        (lambda *a: dict(choice=next(answers), ratio=0.9, rounds=9, clear=True, load=next(loads), when="now"),
         lambda: "build-1"),
    )  # fmt: skip
    monkeypatch.setattr(tuning, "BUSY", 0.25)
    assert tuning.native_path(4, 3, 8, 20, cell="gru")  # timed: the native code, cached
    line = tuning.recheck(4, 3, 8, 20, cell="gru")
    assert line is not None and "'xla'" in line and "[was 'native']" in line, line
    assert not tuning.native_path(4, 3, 8, 20, cell="gru")  # this process reads the new choice
    (key,) = json.loads((autotune / "tuning.json").read_text())
    assert "gru-native build-1|B=4 D=3 H=8 T<=32|float32" in key
    line = tuning.recheck(4, 3, 8, 20, cell="gru")  # busy now: not cached
    assert line is not None and "kept, the machine was busy" in line
    assert json.loads((autotune / "tuning.json").read_text())[key]["choice"] == "xla"
    with tuning.forced("xla"):
        assert tuning.recheck(4, 3, 8, 20, cell="gru") is None
    monkeypatch.setenv("JAXLSTM_AUTOTUNE", "0")
    assert tuning.recheck(4, 3, 8, 20, cell="gru") is None
    with pytest.raises(ValueError, match="cell must be one of 'lstm', 'gru', 'rnn', got 'lsmt'"):
        tuning.recheck(4, 3, 8, 20, cell="lsmt")
    with pytest.raises(ValueError, match="H must be a positive int, got 0"):
        tuning.recheck(4, 3, 0, 20, cell="gru")
    with pytest.raises(ValueError, match=r"probes must have the keys 'native' and 'xla', got \['kernel', 'xla'\]"):
        tuning.recheck(4, 3, 8, 20, probes={"kernel": lambda: None, "xla": lambda: None})


def test_the_main_job_rechecks_only_contradicted_native_rows():
    from benchmarks.regimes import IMPLS, contradicts_tuner

    ours, _, xla = IMPLS["gru"]
    times = lambda a, b: {ours: [a, a * 1.01, a * 0.99], xla: [b, b, b * 1.02], "flax-gru": [9.0]}
    assert contradicts_tuner("gru", "native", times(1.0, 0.9)) == pytest.approx(0.9)
    assert contradicts_tuner("gru", "native", times(1.0, 0.96)) is None  # within the tuner's margin
    assert contradicts_tuner("gru", "xla-fused", times(1.0, 0.5)) is None  # not the native code's row
    assert contradicts_tuner("gru", "native", {ours: [1.0]}) is None  # no XLA path beside it


def test_recheck_times_the_programs_it_is_given(autotune, monkeypatch):
    """With ``probes``, ``recheck`` times those (the main job's own two programs) by ``decide``'s rule."""
    monkeypatch.setitem(tuning._PROBES, tuning.NATIVE, (lambda *a: pytest.fail("the tuner's probe ran"), lambda: "b"))
    clock = [0.0]
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])
    tick = lambda s: lambda: clock.__setitem__(0, clock[0] + s)
    line = tuning.recheck(2, 3, 4, 5, cell="lstm", probes={"native": tick(2.0), "xla": tick(1.0)})
    assert line is not None and "'xla'" in line and "[was not cached]" in line, line
    assert not tuning.native_path(2, 3, 4, 5)


def test_missing_native_code_says_so_once(monkeypatch):
    import warnings

    from jaxlstm import _native

    params = jaxlstm.init_lstm(jax.random.key(0), 3, 4)
    monkeypatch.setattr(_native, "levels_built", lambda: ())
    _native._warn_not_built.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native CPU code is not built"):
            _native.applies(params, jnp.float32, jnp.float32, batch=1, steps=2, h_mask=None, zoneout=None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _native.applies(params, jnp.float32, jnp.float32, batch=1, steps=2, h_mask=None, zoneout=None)
    finally:  # the loader's caches saw "nothing built": forget that, or the native code stays off in this process
        monkeypatch.undo()
        _native._choose.cache_clear()
        _native._warn_not_built.cache_clear()
    assert _native.available() == bool(_native.levels_built() and _native.levels_supported())
