"""The examples' data, models and outputs on tiny sizes (no long training here)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import long_memory


def test_long_memory_data_and_models():
    xs, labels = long_memory.make_batch(jax.random.key(0), 8, 12, num_classes=4)
    assert xs.shape == (8, 12, 5) and labels.shape == (8,)
    # the answer is only in step 0, marked; later steps carry no marker
    np.testing.assert_array_equal(jnp.argmax(xs[:, 0, :4], -1), labels)
    np.testing.assert_array_equal(xs[:, 0, 4], 1.0)
    np.testing.assert_array_equal(xs[:, 1:, 4], 0.0)
    sizes = long_memory.hidden_sizes(5, 32)
    counts = {m: long_memory.num_params(long_memory.init_model(jax.random.key(0), m, 5, sizes[m], 4)) for m in sizes}
    assert max(counts.values()) / min(counts.values()) < 1.1, counts
    p = long_memory.init_model(jax.random.key(0), "lstm", 5, 8, 4, gate_bias=5.0)
    np.testing.assert_array_equal(p["cell"].b[8:16], 5.0)
    np.testing.assert_array_equal(p["cell"].b[:8], -5.0)


@pytest.mark.usefixtures("standard_promotion")
def test_long_memory_runs_and_writes(tmp_path):
    result = long_memory.main(["--seq-lens", "6", "--steps", "3", "--hidden", "4", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "long_memory.json").read_text())
    assert {r["model"] for r in data["results"]} == {"rnn", "lstm", "gru"}
    for r in data["results"]:
        assert r["seq_len"] == 6 and r["solved"] == (r["metric"] >= data["solved_threshold"])
    assert all(len(g) == 6 for g in data["grad_norms"].values())
    assert (tmp_path / "long_memory_accuracy.png").exists() and (tmp_path / "long_memory_gradients.png").exists()
    assert result["grad_norm_seq_len"] == 6


def test_digits_data_lengths():
    from examples import flax_classifier as fc

    (x, l, y), (xt, lt, yt) = fc.load_digits()
    assert x.shape[1:] == (64, 1) and len(x) + len(xt) == 1797 and set(np.unique(y)) == set(range(10))
    assert l.min() >= 1 and l.max() <= 64
    # every pixel after a sequence's length is blank
    i = int(np.argmin(l))
    assert not x[i, l[i] :].any() and x[i, l[i] - 1] > 0


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_flax_classifier_runs_saves_and_restores(tmp_path, api):
    from examples import flax_classifier as fc

    result = fc.main(["--api", api, "--epochs", "1", "--hidden", "4", "--out", str(tmp_path)])
    # an accuracy over n_test digits: a whole number of them is right
    right = result["test_accuracy"] * result["n_test"]
    assert abs(right - round(right)) < 1e-6 and result["n_test"] == 359
    assert result["restored_predictions_identical"] is True
    assert (tmp_path / f"digits_{api}.msgpack").exists()


def test_ppo_agent_step_by_step_equals_one_sequence_call():
    """The rollout carries the state one step at a time with resets; the update
    re-runs the stored sequence in one call from the rollout's initial state: the
    two must agree, or PPO's ratios are off from the first epoch."""
    from examples import recurrent_ppo as ppo

    cfg = ppo.Config(hidden=8)
    N, T = 3, 9
    net = ppo.ActorCritic(2, cfg.hidden, recurrent=True)
    obs = jax.random.normal(jax.random.key(0), (N, T, 2))
    resets = jax.random.bernoulli(jax.random.key(1), 0.3, (N, T)).at[:, 0].set(True)
    s0 = ppo.initial_state(cfg, N)
    params = net.init(jax.random.key(2), obs[:, :1], s0, resets[:, :1])
    _, logits, values = net.apply(params, obs, s0, resets)
    s, step_logits, step_values = s0, [], []
    for t in range(T):
        s, lg, v = net.apply(params, obs[:, t : t + 1], s, resets[:, t : t + 1])
        step_logits.append(lg[:, 0])
        step_values.append(v[:, 0])
    np.testing.assert_allclose(jnp.stack(step_logits, 1), logits, atol=1e-5)
    np.testing.assert_allclose(jnp.stack(step_values, 1), values, atol=1e-5)
    # a reset makes the step independent of what came before it
    later = jnp.argmax(resets[0, 1:]) + 1
    if resets[0, 1:].any():
        _, lg2, _ = net.apply(params, obs.at[0, :later].set(5.0), s0, resets)
        np.testing.assert_allclose(lg2[0, later:], logits[0, later:], atol=1e-5)


@pytest.mark.usefixtures("standard_promotion")
def test_recurrent_ppo_quick_runs_and_writes(tmp_path):
    pytest.importorskip("gymnax")
    from examples import recurrent_ppo as ppo

    result = ppo.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "recurrent_ppo.json").read_text())
    assert [a["agent"] for a in data["agents"]] == ["lstm", "ff"]
    for a in data["agents"]:
        assert (
            len(a["returns"][0])
            == len(a["env_steps"])
            == ppo.Config(num_envs=4, num_steps=32, total_steps=4 * 32 * 6).num_updates
            == 6
        )
        assert a["env_steps_per_s"] > 0
        # the quick run is long enough that episodes end: a return to print and to plot
        assert a["final_return"] is not None and a["final_return"] > 0, a["returns"]
        assert sum(v is not None for v in a["returns"][0]) >= 2
    assert (tmp_path / "recurrent_ppo.png").exists() and result["config"]["seeds"] == 1


def test_uea_loader_pads_with_lengths_and_standardises():
    pytest.importorskip("aeon")
    from examples import uea

    d = uea.load("JapaneseVowels")
    assert d.train.xs.shape == (270, 29, 12) and d.test.xs.shape == (370, 29, 12) and len(d.classes) == 9
    for split in (d.train, d.test):
        assert split.lengths.min() >= 7 and split.lengths.max() <= 29
        steps = np.arange(split.xs.shape[1])[None, :] < split.lengths[:, None]
        assert not split.xs[~steps].any(), "padding must stay zero"
        assert set(np.unique(split.labels)) == set(range(9))
    valid = d.train.xs[np.arange(29)[None, :] < d.train.lengths[:, None]]  # [steps, 12]
    np.testing.assert_allclose(valid.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(valid.std(0), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="name must be one of"):
        uea.load("NotASet")


@pytest.mark.usefixtures("standard_promotion")
def test_train_sharded_quick_runs_over_all_devices_and_restores(tmp_path):
    pytest.importorskip("aeon")
    pytest.importorskip("orbax.checkpoint")
    from examples import train_sharded

    result = train_sharded.main(["--quick", "--out", str(tmp_path)])
    assert result["devices"] == len(jax.devices()) and result["global_batch"] % result["devices"] == 0
    right = result["test_accuracy"] * result["n_test"]
    assert abs(right - round(right)) < 1e-6 and result["n_test"] == 370
    assert result["restored_predictions_identical"] is True
    assert result["restored_test_accuracy"] == result["test_accuracy"]
    assert (tmp_path / "train_sharded_JapaneseVowels.json").exists()
