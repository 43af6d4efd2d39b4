"""What to use instead, where a PyTorch or Flax user's first guess is close: keyword arguments
that jaxlstm's entry points do not take, and names the package does not have."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

_STACK = "one layer; stacks (num_layers, bidirectional) are jaxlstm.{init}_stack / jaxlstm.lstm_stack"
_LAYOUT = (
    "jaxlstm reads batch-major [..., T, D] inputs (PyTorch's batch_first=True) by default; "
    "for PyTorch's default [T, B, D] pass time_major=True"
)
_DROPOUT = "jaxlstm's dropout is input_dropout= / recurrent_dropout= (with key= and deterministic=)"
# the activations under other libraries' names
_ACTIVATIONS = {
    "gate_fn": "the gates' nonlinearity is gate_activation= (flax's gate_fn)",
    "recurrent_activation": "the gates' nonlinearity is gate_activation= (Keras' recurrent_activation)",
    "activation_fn": "the candidate's (and tanh(c)'s) nonlinearity is activation= (flax's activation_fn)",
    "nonlinearity": "the nonlinearity is activation=, a function: PyTorch's nonlinearity='relu' is "
    "activation=jax.nn.relu",
}

# keyword -> hint, per kind of entry point
INIT = {"num_layers": _STACK.format(init="init_lstm"), "bidirectional": _STACK.format(init="init_lstm")}
INIT_CELL = {"num_layers": "one layer; jaxlstm has stacks of LSTMs only (jaxlstm.init_lstm_stack)"}
SEQUENCE = {
    "batch_first": _LAYOUT,
    "num_layers": "one layer; stacks of LSTM layers are jaxlstm.lstm_stack (params from jaxlstm.init_lstm_stack)",
    "bidirectional": "one direction; a bidirectional stack is jaxlstm.lstm_stack with init_lstm_stack(..., "
    "bidirectional=True), or reverse=True for one layer's backward-in-time direction",
    "dropout": _DROPOUT,
    "hx": "the initial state is initial_state= (LSTMState(h, c) for the LSTM)",
    **_ACTIVATIONS,
}
STACK = {"batch_first": _LAYOUT, **_ACTIVATIONS}  # lstm_stack has its own dropout= (between layers)


def hints(table: dict[str, str]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Wraps an entry point: a keyword of ``table`` raises a ``TypeError`` that names it and
    says what to use instead (the function's own error says only that it is unexpected)."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            for name in kwargs:
                if name in table:
                    raise TypeError(f"{fn.__name__}() got an unexpected keyword argument {name!r}: {table[name]}")
            return fn(*args, **kwargs)

        return inner

    return wrap


# jaxlstm.<name> -> where it is
MODULES = {
    "LSTM": "jaxlstm.linen.LSTM (flax.linen) or jaxlstm.nnx.LSTM (flax.nnx); functional: jaxlstm.lstm",
    "LSTMCell": "jaxlstm.linen.LSTMCell or jaxlstm.nnx.LSTMCell; functional: jaxlstm.lstm_cell",
    "GRU": "jaxlstm.gru (functional); its params: jaxlstm.init_gru",
    "RNN": "jaxlstm.rnn (functional, the Elman RNN); its params: jaxlstm.init_rnn",
    "OptimizedLSTMCell": "jaxlstm.linen.LSTMCell (a drop-in for flax's; jaxlstm.convert.from_flax converts its params)",
}
