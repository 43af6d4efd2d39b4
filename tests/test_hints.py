"""A first try as a PyTorch or Flax user meets an error that says what to do (jaxlstm/_hints.py,
the linen cells' check of foreign params, the examples' and converters' optional imports)."""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxlstm
import jaxlstm.linen as jl
from jaxlstm import convert

KEY = jax.random.key(0)
P = jaxlstm.init_lstm(KEY, 3, 4)
XS = jnp.zeros((2, 5, 3))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: jaxlstm.init_lstm(KEY, 3, 4, num_layers=2), "'num_layers': one layer; .*jaxlstm.init_lstm_stack"),
        (lambda: jaxlstm.init_lstm(KEY, 3, 4, bidirectional=True), "'bidirectional': .*init_lstm_stack"),
        (lambda: jaxlstm.lstm(P, XS, batch_first=False), r"'batch_first': .*\[T, B, D\] pass time_major=True"),
        (lambda: jaxlstm.lstm(P, XS, num_layers=2), "'num_layers': .*jaxlstm.lstm_stack"),
        (lambda: jaxlstm.lstm(P, XS, dropout=0.1), "'dropout': .*input_dropout= / recurrent_dropout="),
        (lambda: jaxlstm.gru(jaxlstm.init_gru(KEY, 3, 4), XS, batch_first=True), "'batch_first': .*time_major"),
        (lambda: jaxlstm.init_gru(KEY, 3, 4, num_layers=2), "'num_layers': one layer"),
        (lambda: jaxlstm.lstm_stack(jaxlstm.init_lstm_stack(KEY, 3, 4), XS, batch_first=False), "'batch_first': .*"),
    ],
)
def test_a_pytorch_keyword_says_what_to_use(call, match):
    with pytest.raises(TypeError, match="got an unexpected keyword argument " + match):
        call()


def test_hints_leave_the_signature_and_other_errors_alone():
    import inspect

    assert "time_major" in inspect.signature(jaxlstm.lstm).parameters  # docs, jit's static_argnames
    jax.jit(jaxlstm.lstm, static_argnames=("time_major",))(P, XS, time_major=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        jaxlstm.lstm(P, XS, nonsense=1)  # pyright: ignore[reportCallIssue]


@pytest.mark.parametrize("name", ["LSTM", "LSTMCell", "GRU", "RNN", "OptimizedLSTMCell"])
def test_a_module_name_from_torch_or_flax_says_where_it_is(name):
    with pytest.raises(AttributeError, match=f"no attribute '{name}': use jaxlstm"):
        getattr(jaxlstm, name)
    with pytest.raises(AttributeError, match="no attribute 'surely_not'$"):
        jaxlstm.surely_not  # noqa: B018  # pyright: ignore[reportAttributeAccessIssue]


def test_a_flax_checkpoint_in_a_jaxlstm_cell_points_to_from_flax():
    xs = jnp.ones((2, 3, 4))
    variables = nn.RNN(nn.OptimizedLSTMCell(8)).init(KEY, xs)
    with pytest.raises(ValueError, match=r"expects params \['b', 'w_hh', 'w_ih'\].*convert.from_flax"):
        nn.RNN(jl.LSTMCell(8)).apply(variables, xs)
    converted = convert.from_flax(variables, as_variables=True)  # what the message says, and it runs
    ys = nn.RNN(jl.LSTMCell(8)).apply(converted, xs)
    assert jnp.allclose(ys, nn.RNN(nn.OptimizedLSTMCell(8)).apply(variables, xs), atol=1e-5)


def test_missing_optional_libraries_name_their_extra(monkeypatch):
    from examples import recurrent_ppo, uea

    for module in ("gymnax", "aeon", "aeon.datasets", "torch"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import raises
    with pytest.raises(ModuleNotFoundError, match=r"gymnax is not installed.*'rl' extra: pip install -e \"\.\[rl\]\""):
        recurrent_ppo.make_train(recurrent_ppo.Config(), recurrent=True)
    with pytest.raises(ModuleNotFoundError, match=r"'scale' extra: pip install -e \"\.\[scale\]\""):
        uea.load("BasicMotions")
    with pytest.raises(ModuleNotFoundError, match=r"to_torch needs PyTorch: pip install \"jaxlstm\[torch\]\""):
        convert.to_torch([[P]])
    assert set(convert.to_torch([[P]], as_numpy=True)) >= {"weight_ih_l0", "weight_hh_l0"}
