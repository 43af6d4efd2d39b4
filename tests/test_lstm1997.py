"""examples/lstm1997.py: the data of Hochreiter & Schmidhuber (1997), Experiments 4-6, exactly as specified,
its stopping rules, and a reproduction that learns (short lengths here; the full tables are a long run)."""

import json

import numpy as np
import pytest

from examples import lstm1997 as L


def _marks(xs, lengths):
    """Positions of the +1 markers within each sequence's length."""
    return [np.flatnonzero(xs[i, : lengths[i], 1] == 1.0) for i in range(len(xs))]


@pytest.mark.parametrize("T", [100, 500])
@pytest.mark.parametrize("task", ["adding", "multiplication"])
def test_marked_pairs_follow_the_paper(task, T):
    rng = np.random.default_rng(0)
    n = 4000
    xs, lengths, y = getattr(L, task)(rng, n, T)
    assert xs.shape == (n, T + T // 10, 2) and y.shape == (n, 1) and xs.dtype == np.float32
    assert lengths.min() == T and lengths.max() == T + T // 10  # uniform over [T, T + T/10], both ends reached
    low = -1.0 if task == "adding" else 0.0
    first_marked = 0
    for i, pos in enumerate(_marks(xs, lengths)):
        L_i, v, m = lengths[i], xs[i, :, 0], xs[i, :, 1]
        assert len(pos) == 2, pos
        a, b = pos
        assert a < 10 and b < T // 2 - 1  # one in the first ten, the other in the first T/2 - 1
        assert (v[L_i:] == 0).all() and (m[L_i:] == 0).all()  # padding past the end
        assert m[L_i - 1] == -1.0  # the last marker
        assert m[0] == (1.0 if a == 0 else -1.0)
        others = np.delete(np.arange(1, L_i - 1), np.isin(np.arange(1, L_i - 1), pos).nonzero()[0])
        assert (m[others] == 0).all()
        assert low <= v[:L_i].min() and v[:L_i].max() <= 1.0
        x1, x2 = v[a], v[b]
        if a == 0:  # the rare case: the first pair marked
            first_marked += 1
            assert x1 == (0.0 if task == "adding" else 1.0)
        want = 0.5 + (x1 + x2) / 4 if task == "adding" else x1 * x2
        np.testing.assert_allclose(y[i, 0], want, atol=1e-6)
    # the first mark is uniform over the first ten pairs, the second over the rest of the first T/2 - 1
    assert 0.07 < first_marked / n < 0.15


@pytest.mark.parametrize("variant,classes", [("a", 4), ("b", 8)])
def test_temporal_order_follows_the_paper(variant, classes):
    rng = np.random.default_rng(1)
    n = 2000
    xs, lengths, y = L.temporal_order(rng, n, variant)
    assert xs.shape == (n, 110, 8) and y.shape == (n, classes)
    assert lengths.min() == 100 and lengths.max() == 110
    sym = {c: i for i, c in enumerate(L.SYMBOLS)}
    labels = set()
    for i in range(n):
        L_i = lengths[i]
        assert (xs[i, :L_i].sum(-1) == 1).all() and (xs[i, L_i:] == 0).all()  # one-hot, then padding
        s = xs[i, :L_i].argmax(-1)
        assert s[0] == sym["E"] and s[-1] == sym["B"]
        xy = np.flatnonzero(s >= sym["X"])
        assert len(xy) == len(L.ORDER_POSITIONS[variant])
        for p, (lo, hi) in zip(xy, L.ORDER_POSITIONS[variant], strict=True):
            assert lo <= p + 1 <= hi  # 1-based, as the paper counts
        assert set(s[1:-1][s[1:-1] < sym["X"]]) <= {0, 1, 2, 3}  # a-d elsewhere
        label = int("".join(str(int(s[p] == sym["Y"])) for p in xy), 2)
        assert y[i].argmax() == label and y[i].sum() == 1
        labels.add(label)
    assert labels == set(range(classes))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="T must be at least 22"):
        L.adding(np.random.default_rng(0), 2, 10)
    with pytest.raises(ValueError, match="variant"):
        L.temporal_order(np.random.default_rng(0), 2, "c")
    with pytest.raises(ValueError, match="experiment"):
        L.Task("xor", 1)


def test_thinned_curves_keep_their_ends():
    curve = [[32 * (i + 1), 1.0 / (i + 1), 0] for i in range(1000)]
    thin = L._thin(curve, 50)
    assert len(thin) <= 50 and thin[0] == curve[0] and thin[-1] == curve[-1]
    assert [p[0] for p in thin] == sorted({p[0] for p in thin})  # in order, no repeats
    assert L._thin(curve[:10], 50) == curve[:10]


def test_stopping_rules():
    ok, sq = np.full(L.WINDOW, 0.01), np.full(L.WINDOW, 1e-4)
    add = L.Task("adding", 100)
    assert add.stop(ok, sq) and not add.stop(ok[:-1], sq[:-1])  # needs the whole window
    assert not add.stop(np.r_[ok[:-1], 0.05], sq)  # one wrong sequence
    assert not add.stop(ok, np.full(L.WINDOW, 0.011))  # the average error too high
    mul = L.Task("multiplication", 13)
    some_wrong = np.r_[np.full(12, 0.05), ok[12:]]
    assert mul.stop(some_wrong, sq) and not mul.stop(np.r_[np.full(13, 0.05), ok[13:]], sq)
    assert not add.stop(np.r_[ok[:-1], np.nan], sq)  # a NaN is a wrong sequence, not a right one
    order = L.Task("order", "a")
    assert order.stop(np.full(L.WINDOW, 0.29), np.full(L.WINDOW, 0.09))
    assert not order.stop(np.full(L.WINDOW, 0.3), np.full(L.WINDOW, 0.09))
    assert not order.stop(np.full(L.WINDOW, 0.29), np.full(L.WINDOW, 0.1))


@pytest.mark.usefixtures("standard_promotion")  # optax's updates mix Python floats and int32 counts
def test_lstm_reaches_the_adding_criterion():
    """The reproduction learns: the LSTM meets the paper's stopping rule at T=30 and then passes its test."""
    args = L.parse_args(["--budget", "60000"])
    trial = L.run_trial(L.Task("adding", 30), "lstm", args, seed=0)
    assert trial["reached"], trial["curve"][-3:]
    assert trial["test_wrong"] < 40 and trial["test_mse"] < 0.01  # of 2,560 fresh sequences


@pytest.mark.usefixtures("standard_promotion")
def test_quick_run_writes_the_table(tmp_path):
    result = L.main(["--quick", "--trials", "1", "--budget", "256", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "lstm1997.json").read_text())
    assert [r["task"] for r in data["rows"]] == ["adding T=30", "multiplication n_seq=140", "temporal order 6a"]
    for row in data["rows"]:
        assert set(row["trials"]) == {"lstm", "gru", "rnn"}
        for trials in row["trials"].values():
            (t,) = trials
            assert t["sequences"] == 256 and not t["reached"] and 0 <= t["test_wrong"] <= L.TEST_SIZE
    assert (tmp_path / "lstm1997.png").exists()
    assert "| temporal order 6a | paper (LSTM 1997) | 20 |" in L.table(result)
    assert "| temporal order 6a | 31,390, 1 wrong (20 trials) | 0/1, " in L.compact_table(result)


@pytest.mark.usefixtures("standard_promotion")
def test_runs_side_by_side_merge(tmp_path):
    parts = {
        "a": ["adding", "--models", "lstm"],
        "b": ["order", "--models", "lstm"],
        "c": ["adding", "--models", "rnn"],
    }
    for name, (only, *models) in parts.items():
        L.main(["--quick", "--only", only, *models, "--trials", "1", "--budget", "64", "--out", str(tmp_path / name)])
    merged = L.main(["--merge", *(str(tmp_path / name / "lstm1997.json") for name in parts), "--out", str(tmp_path)])
    assert [r["task"] for r in merged["rows"]] == ["adding T=30", "temporal order 6a"]  # one row per task
    assert set(merged["rows"][0]["trials"]) == {"lstm", "rnn"}
    assert json.loads((tmp_path / "lstm1997.json").read_text())["rows"][1]["summary"]["lstm"]["trials"] == 1
