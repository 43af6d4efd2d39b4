"""jaxlstm: LSTMs for JAX as pure functions on ``lax.scan``.

Conventions: kernels ``[in, out]``; gate order i, f, g, o; one bias ``[4H]``;
``LSTMState(h, c)``; batch-major ``[..., T, D]`` inputs.
"""

from .gates import (
    candidate,
    cell_update,
    forget_gate,
    hidden_output,
    input_gate,
    lstm_pointwise,
    output_gate,
)
from .params import GATE_ORDER, LSTMParams, LSTMState, init_lstm, zero_state
from .recurrence import lstm, lstm_cell
from .stack import init_lstm_stack, lstm_stack
from .rnn import GRUParams, RNNParams, gru, gru_cell, init_gru, init_rnn, rnn, rnn_cell
from . import convert

__version__ = "0.1.0"

__all__ = [
    "GATE_ORDER",
    "GRUParams",
    "RNNParams",
    "LSTMParams",
    "LSTMState",
    "candidate",
    "cell_update",
    "forget_gate",
    "hidden_output",
    "convert",
    "gru",
    "gru_cell",
    "init_gru",
    "init_lstm",
    "init_lstm_stack",
    "init_rnn",
    "input_gate",
    "lstm",
    "lstm_cell",
    "lstm_stack",
    "lstm_pointwise",
    "output_gate",
    "rnn",
    "rnn_cell",
    "zero_state",
]
