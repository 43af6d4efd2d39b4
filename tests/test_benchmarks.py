"""The benchmark scripts run and write what they promise (no timing assertions)."""

import json
import os
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlstm
from benchmarks import _common as C
from benchmarks import memory, throughput


@pytest.mark.usefixtures("standard_promotion")
def test_throughput_quick_schema(tmp_path):
    throughput.main(
        [
            "--sweep",
            "--quick",
            "--impls",
            "jaxlstm",
            "jaxlstm-ckpt64",
            "flax-optimized",
            "flax-lstmcell",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert {"cpu", "cores", "jax", "flax", "peak_matmul_gflops"} <= set(data["machine"])
    recs = data["records"]
    impls = {r["impl"] for r in recs}
    assert {"jaxlstm", "flax-optimized", "flax-lstmcell", "jaxlstm-ckpt64"} <= impls
    assert all(r["impl"].split("-")[0] in ("jaxlstm", "flax", "torch", "jax") for r in recs)
    assert len({r["seq_len"] for r in recs}) >= 3 and {r["mode"] for r in recs} == {"forward", "train"}
    for r in recs:
        for k in (
            "impl",
            "mode",
            "batch",
            "seq_len",
            "input_size",
            "hidden_size",
            "dtype",
            "tokens_per_s",
            "compile_s",
            "tokens_per_s_q25",
            "tokens_per_s_q75",
            "ratio_vs_flax",
        ):
            assert k in r, k
        np.testing.assert_allclose(r["tokens_per_s"], r["batch"] * r["seq_len"] / r["median_s"], rtol=1e-9)
        if r["impl"] == "flax-optimized":
            assert r["ratio_vs_flax"] == 1.0
    assert os.path.getsize(tmp_path / "throughput.png") > 1000


@pytest.mark.usefixtures("standard_promotion")
def test_regimes_quick(tmp_path, capsys):
    """The main job's grid: every (regime, cell, mode) row, torch only when installed
    (timed in its own process), the bare dot, and ratios that follow from the per-round times
    (paired round by round); a line per row as it finishes, and a word on torch either way."""
    from benchmarks import regimes

    throughput.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert ("PyTorch is not installed" in printed) != C_torch()
    for g in regimes.QUICK:
        for c, peer in (("lstm", "flax-optimized"), ("gru", "flax-gru")):
            for m in ("forward", "train"):
                assert f"{g} {c} {m}: jaxlstm " in printed and f" ms, {peer} " in printed, printed
    data = json.loads((tmp_path / "regimes.json").read_text())
    assert data["machine"]["cpu_family"] is not None and data["machine"]["cores"] >= 1
    assert data["machine"]["native"]["isa"] == jaxlstm.native_info().isa  # the native code's ISA level, recorded
    assert all(r["path"] in jaxlstm.PATHS for r in regimes.rows(data))  # the path each jaxlstm row ran on
    rows = regimes.rows(data)
    assert {(r["regime"], r["cell"], r["mode"]) for r in rows} == {
        (g, c, m) for g in regimes.QUICK for c in ("lstm", "gru") for m in ("forward", "train")
    }
    recs = {(r["regime"], r["cell"], r["mode"], r["impl"]): r for r in data["records"]}
    for r in rows:
        ours = recs[(r["regime"], r["cell"], r["mode"], regimes.IMPLS[r["cell"]][0])]
        flax = recs[(r["regime"], r["cell"], r["mode"], regimes.IMPLS[r["cell"]][1])]
        assert len(flax["times_s"]) == len(ours["times_s"]) == ours["repeats"]  # one call of each per round
        paired = np.median(np.array(flax["times_s"]) / np.array(ours["times_s"]))
        np.testing.assert_allclose(r["vs_flax"], paired)
        if r["mode"] == "forward":
            dot = recs[(r["regime"], r["cell"], "forward", "bare-dot")]
            np.testing.assert_allclose(r["step_over_dot"], np.median(np.array(ours["times_s"]) / dot["times_s"]))
        assert (r["vs_torch"] is None) == (not C_torch())
    assert "| tiny (2, 4, 8, 16) | lstm | forward |" in regimes.table(data)
    # On a GPU the grid also times jax.experimental.rnn's cuDNN LSTM, in a column of its own.
    cudnn = [dict(r, impl="jax-cudnn", median_s=2 * r["median_s"], times_s=[2 * t for t in r["times_s"]])
             for r in data["records"] if r["impl"] == "jaxlstm"]  # fmt: skip
    on_gpu = dict(data, records=data["records"] + cudnn)
    assert "vs jax cuDNN" in regimes.table(on_gpu) and "vs jax cuDNN" not in regimes.table(data)
    assert [r["vs_cudnn"] for r in regimes.rows(on_gpu) if r["cell"] == "lstm"] == [2.0] * 4
    header, sep, first = regimes.table(on_gpu).splitlines()[:3]
    assert header.count("|") == sep.count("|") == first.count("|") == 13
    # the peak: probed after every regime, the best kept; no share of peak above 100 %
    m = data["machine"]
    assert len(m["peak_matmul_probes_gflops"]) == len(regimes.QUICK) + 1
    assert m["peak_matmul_gflops"] >= max(m["peak_matmul_probes_gflops"])
    assert all(0 < r["fraction_of_peak"] <= 1 for r in data["records"] if "fraction_of_peak" in r)
    assert m["other_load"] is None or 0 <= m["other_load"] <= 1
    from benchmarks import summary  # the committed SUMMARY.md files are generated from such a folder

    summary.main([str(tmp_path)])
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "## Regimes (`benchmarks.throughput`, the main job)" in text and "| tiny (2, 4, 8, 16) | lstm |" in text


def test_interleaved_rounds_vary_the_order_and_ratios_pair_rounds():
    """Each round calls the programs in a fresh order, so that no program always follows the same
    one (a rotation keeps every predecessor fixed); ratios are taken round by round, so that a
    machine slowing down for a while moves both sides of a ratio alike."""
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    times = C.time_interleaved(fns, 12, pause_s=0.0)
    rounds = [calls[3 + 3 * r : 6 + 3 * r] for r in range(12)]  # after the warm-up call of each
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds) and all(len(v) == 12 for v in times.values())
    follows = {(r[i - 1], r[i]) for r in rounds for i in (1, 2)}
    assert follows == {(p, n) for p in "abc" for n in "abc" if p != n}  # every program after every other
    # the machine 3x slower from round 3 on, except for `other`'s call in round 3 (the burst began
    # between the two): 1.2x in every round but that one; the ratio of the medians would read 0.4x
    ours, other = [0.010, 0.010, 0.030, 0.030, 0.030], [0.012, 0.012, 0.012, 0.036, 0.036]
    assert statistics.median(other) / statistics.median(ours) == pytest.approx(0.4)
    assert C.paired_ratio(other, ours) == pytest.approx(1.2)
    assert C.paired_ratio([2.0, 4.0], [1.0]) == pytest.approx(3.0)  # unequal lengths: the medians' ratio


def test_regimes_peak_is_the_best_probe_and_never_below_a_row(capsys):
    """A busy moment during the probes: a warning, and a row faster than every probe becomes
    the peak (said), so that no share of peak exceeds 100 %."""
    from benchmarks import regimes

    info = {}
    recs = [dict(regime="base", cell="gru", mode="forward", impl="jaxlstm-gru", gflops=g) for g in (50.0, 80.0)]
    assert regimes._peak(info, [100.0, 60.0], recs, "float32") == 100.0
    assert "peak probes ranged 60-100 GFLOP/s" in capsys.readouterr().out
    assert info["peak_matmul_probes_gflops"] == [100.0, 60.0] and info["peak_matmul_gflops"] == 100.0
    recs[1]["gflops"] = 120.0
    assert regimes._peak(info, [100.0, 95.0], recs, "bfloat16") == 120.0
    out = capsys.readouterr().out
    assert "base gru forward (jaxlstm-gru) ran at 120 GFLOP/s, above every peak probe (100)" in out
    assert info["peak_bf16_gflops"] == 120.0 and info["peak_bf16_from_row"] == "base gru forward"


def test_versus_torch_pairs_each_round(monkeypatch):
    """benchmarks.versus_torch: each round's PyTorch and jaxlstm processes paired, a row's ratio the
    median of its rounds' ratios with their spread (the processes stubbed: a real run needs torch)."""
    from benchmarks import versus_torch

    grid = {"tiny": (2, 4, 8, 16)}
    rounds = iter([1.0, 2.0, 4.0])  # torch's time scale per round: a machine whose speed drifts

    def worker(kind, spec):
        if kind == "torch":
            scale = next(rounds)
            recs = [dict(regime="tiny", cell=c, mode=m, median_s=scale * 0.01) for c in ("lstm", "gru")
                    for m in ("forward", "train")]  # fmt: skip
            return recs
        recs = [dict(regime="tiny", cell=c, mode=m, path="native", median_s=0.01 * (1 + (m == "train")))
                for c in ("lstm", "gru") for m in ("forward", "train")]  # fmt: skip
        return {"records": recs, "machine": {"cpu": "test", "cores": 2}}

    monkeypatch.setattr(versus_torch, "_worker", worker)
    result = versus_torch.run(grid, 3, 1, 0.1, "float32")
    fwd = next(r for r in result["rows"] if (r["cell"], r["mode"]) == ("lstm", "forward"))
    assert (fwd["vs_torch"], fwd["vs_torch_min"], fwd["vs_torch_max"]) == (2.0, 1.0, 4.0)
    train = next(r for r in result["rows"] if (r["cell"], r["mode"]) == ("gru", "train"))
    assert (train["vs_torch"], train["vs_torch_min"], train["vs_torch_max"]) == (1.0, 0.5, 2.0)
    assert len(result["rows"]) == 4 and len(result["sittings"]) == 3 and result["machine"]["dtype"] == "float32"
    assert "| tiny (2, 4, 8, 16) | lstm | forward | 20.00 | 10.00 | 2.00x [1.00–4.00] |" in versus_torch.table(result)


def test_isa_quick(tmp_path):
    """benchmarks.isa times the native code at every level this machine runs, each row at each level."""
    from benchmarks import isa
    from jaxlstm import _native

    if not _native.available():
        pytest.skip(str(_native.load_error()))
    isa.main(["--quick", "--regimes", "tiny", "--repeats", "2", "--pause", "0", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "isa.json").read_text())
    runnable = [lv for lv in _native.levels_built() if lv in _native.levels_supported()]
    assert data["levels"] == runnable and data["pause_s"] == 0
    rows = {(r["regime"], r["cell"], r["mode"], r["level"]) for r in data["records"]}
    assert rows == {("tiny", c, m, lv) for c in ("lstm", "gru") for m in ("forward", "train") for lv in runnable}
    assert all(r["median_s"] > 0 for r in data["records"])
    assert "| tiny | lstm | forward |" in isa.table(data)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes", "3x64"], "each shape is BxDxHxT, four positive integers"),
        (["--shapes", "3x64x0x5"], "got '3x64x0x5'"),
        (["--shapes", "3x64x128x5", "--regimes", "small"], "takes the place of the grid"),
        (["--pause", "-1"], "--pause must be a finite number of seconds >= 0; got -1.0"),
        (["--pause", "nan"], "--pause must be a finite number of seconds >= 0; got nan"),
        (["--regimes", "huge"], "--regimes: unknown ['huge']"),
    ],
)
def test_isa_rejects_bad_shapes_and_pauses(argv, message):
    """benchmarks.isa names the flag and the value it cannot use, before it builds or times anything."""
    from benchmarks import isa

    with pytest.raises(SystemExit, match=re.escape(message)):
        isa.main(argv)
    assert isa._shape("3x64x128x512") == (3, 64, 128, 512)


def C_torch():
    return C.torch_available()


@pytest.mark.usefixtures("standard_promotion")
def test_memory_quick(tmp_path):
    memory.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "memory.json").read_text())
    by = {(r["impl"], r["seq_len"]): r for r in data["records"]}
    # Checkpointing must store less than keeping every step's activations.
    assert by[("jaxlstm-ckpt8", 64)]["temp_bytes"] < by[("jaxlstm", 64)]["temp_bytes"]
    assert by[("jaxlstm-tm-ckpt8", 64)]["temp_bytes"] < by[("jaxlstm-tm", 64)]["temp_bytes"]
    assert (tmp_path / "memory.png").exists()


def test_layout_variants_compute_the_lstm():
    """The layout evidence times real LSTMs: every variant matches jaxlstm.lstm."""
    from benchmarks.layout import variants

    B, T, D, H = 2, 3, 4, 8
    p = jaxlstm.init_lstm(jax.random.key(0), D, H)
    xs = jax.random.normal(jax.random.key(1), (B, T, D))
    want = jnp.swapaxes(jaxlstm.lstm(p, xs)[0], 0, 1)
    for name, f in variants(p, B, T, D, H).items():
        np.testing.assert_allclose(f(xs, 1), want, atol=1e-5, err_msg=name)


def test_allocator_mode_picks_the_results_folder(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert C.allocator() == "default" and C.results_dir().endswith(os.path.join("benchmarks", "runs", C.device_name()))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:" + C.THP_TUNABLE)
    assert C.allocator() == "thp" and C.results_dir().endswith(C.device_name() + "-thp")
    assert C.machine_info()["malloc_env"]["GLIBC_TUNABLES"].endswith(C.THP_TUNABLE)


def test_sharding_quick(tmp_path):
    from benchmarks import sharding

    rows = sharding.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "sharding.json").read_text())
    cases = {(r["kind"], r["mode"], r["case"]) for r in data["rows"]}
    n = [k for k in (2,) if k <= len(jax.devices())]  # --quick: one mesh size
    assert cases == {("data", "train", c) for c in ["1 device"] + [f"data x{k}" for k in n]} | {
        ("model", m, c) for m in ("forward", "train") for c in ["1 device"] + [f"model x{k}" for k in n]
    }
    assert all(r["median_s"] > 0 for r in rows) and all(r["vs_1"] == 1.0 for r in rows if r["case"] == "1 device")


def test_variants_quick(tmp_path):
    from benchmarks import variants

    rows = variants.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "variants.json").read_text())
    assert {(r["variant"], r["mode"]) for r in data["rows"]} == {
        (v, m) for v in variants.VARIANTS for m in ("forward", "train")
    }
    assert all(r["vs_plain"] == 1.0 for r in rows if r["variant"] == "plain")


def test_activations_quick(tmp_path):
    """benchmarks/activations.py: the generic activations path and the ConvLSTM against flax, timed."""
    from benchmarks import activations

    activations.main(["--quick", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "activations.json").read_text())
    assert out["lstm"]["path"]["other"] == "xla-fused"
    assert {"default/train", "other-fused/train", "other-autodiff/forward"} <= set(out["lstm"]["times"])
    impls = ("jaxlstm", "jaxlstm-autodiff", "flax")
    assert set(out["conv_lstm"]["times"]) == {f"{i}/{m}" for i in impls for m in ("forward", "train")}


def test_streaming_quick(tmp_path):
    """benchmarks/streaming.py: per-call times of the step, the cell, flax (and torch when installed)."""
    from benchmarks import streaming

    result = streaming.main(["--quick", "--calls", "20", "--out", str(tmp_path)])
    impls = {r["impl"] for r in result["records"]}
    assert {"jaxlstm", "jaxlstm-cell", "flax"} <= impls and ("torch" in impls) == C_torch()
    assert all(r["us"] > 0 for r in result["records"])
    assert (tmp_path / "streaming.json").exists() and "| lstm | 1, 64, 64 |" in streaming.table(result)


def test_programs_compare_ignores_names_and_metadata_not_ops(tmp_path, capsys):
    """benchmarks.programs (the refactor A/B by compiled programs): metadata, stack frames and instruction
    names do not make two programs differ; a changed operation does."""
    from benchmarks import programs

    hlo = (
        "HloModule m\n0 {file_name_id=1}\nENTRY %main {\n"
        '  %a.1 = f32[2] parameter(0), metadata={op_name="x" source_line=3}\n'
        "  %b.2 = f32[2] add(%a.1, %a.1), stack_frame_id=4\n}\n"
    )
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    (tmp_path / "a" / "p.hlo").write_text(programs.normalised(hlo))
    renamed = hlo.replace("%a.1", "%a.7").replace('op_name="x"', 'op_name="y"').replace("=4", "=9")
    (tmp_path / "b" / "p.hlo").write_text(programs.normalised(renamed))
    (tmp_path / "c" / "p.hlo").write_text(programs.normalised(hlo.replace("add(", "multiply(")))
    assert "file_name_id" not in programs.normalised(hlo) and "metadata" not in programs.normalised(hlo)
    assert programs.compare(str(tmp_path / "a"), str(tmp_path / "b")) == 0
    assert programs.compare(str(tmp_path / "a"), str(tmp_path / "c")) == 1
    assert "p.hlo: differs" in capsys.readouterr().out
