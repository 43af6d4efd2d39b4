"""jaxlstm: LSTMs for JAX as pure functions on ``lax.scan``.

Conventions: kernels ``[in, out]``; gate order i, f, g, o; one bias ``[4H]``;
``LSTMState(h, c)``; batch-major ``[..., T, D]`` inputs.

The public surface is what this module exports, plus the submodules
``jaxlstm.gates`` (the gate equations, one function per gate),
``jaxlstm.convert`` (other libraries' weight layouts), ``jaxlstm.linen`` and
``jaxlstm.nnx`` (Flax modules). Modules whose names start with ``_`` are
internal.
"""

from . import convert, gates
from ._hints import MODULES as _MOVED
from ._native import NativeInfo, native_info
from ._path import PATHS, path_of
from .conv import ConvLSTMParams, conv_lstm, conv_lstm_cell, conv_zero_state, init_conv_lstm
from .params import LSTMParams, LSTMState, init_lstm, zero_state
from .recurrence import lstm, lstm_cell
from .rnn import GRUParams, RNNParams, gru, gru_cell, init_gru, init_rnn, rnn, rnn_cell
from .stack import init_lstm_stack, lstm_stack
from .streaming import step

__version__ = "0.1.0"


def _register_for_export() -> None:
    """The params and state types, named for ``jax.export``'s serialization, so that a function
    taking them can be exported (docs/export.md)."""
    try:
        from jax import export
    except ImportError:  # a JAX without jax.export
        return
    for cls in (LSTMParams, LSTMState, GRUParams, RNNParams, ConvLSTMParams):
        try:
            export.register_namedtuple_serialization(cls, serialized_name=f"jaxlstm.{cls.__name__}")
        except ValueError:  # registered already (importlib.reload)
            pass


_register_for_export()


def __getattr__(name: str):
    """Names a PyTorch or Flax user may look for here: where they are."""
    if name in _MOVED:
        raise AttributeError(f"module 'jaxlstm' has no attribute {name!r}: use {_MOVED[name]}")
    raise AttributeError(f"module 'jaxlstm' has no attribute {name!r}")


__all__ = [
    "ConvLSTMParams",
    "GRUParams",
    "LSTMParams",
    "LSTMState",
    "NativeInfo",
    "PATHS",
    "RNNParams",
    "conv_lstm",
    "conv_lstm_cell",
    "conv_zero_state",
    "convert",
    "gates",
    "gru",
    "gru_cell",
    "init_conv_lstm",
    "init_gru",
    "init_lstm",
    "init_lstm_stack",
    "init_rnn",
    "lstm",
    "lstm_cell",
    "lstm_stack",
    "native_info",
    "path_of",
    "rnn",
    "rnn_cell",
    "step",
    "zero_state",
]
