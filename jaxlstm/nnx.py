"""flax.nnx modules: thin shells over the functional core, no maths here.

* :class:`LSTMCell`: one step, Flax's ``(c, h)`` carry, for ``nnx.RNN``.
* :class:`LSTM`: multi-layer / bidirectional / projected, on
  :func:`jaxlstm.lstm_stack` (fused backward). Same call signature as
  :class:`jaxlstm.linen.LSTM`: ``(xs, initial_state=None, seq_lengths=None,
  deterministic=True)`` -> ``(ys, LSTMState)``.

Parameters are ``nnx.Param`` attributes named as in the linen modules
(``l0_fwd_w_ih``, ...; ``w_ih``/``w_hh``/``b`` for the cell); the shapes and
initialisers come from :mod:`jaxlstm.params`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from .params import LSTMParams, LSTMState, kernel_init, lstm_bias_init, lstm_param_shapes, recurrent_init, stack_layout
from .recurrence import lstm_cell
from .stack import group_layers, layer_name, lstm_stack

Initializer = Callable[..., jax.Array]


class _Weights:
    """Creates and reads the ``nnx.Param`` s of LSTM layers on a module."""

    @staticmethod
    def create(module, prefix, d_in, H, proj_size, rngs, inits, param_dtype):
        for name, (shape, role) in lstm_param_shapes(d_in, H, proj_size).items():
            setattr(module, prefix + name, nnx.Param(inits[role](rngs.params(), shape, param_dtype)))

    @staticmethod
    def read(module, prefix) -> LSTMParams:
        get = lambda n: getattr(module, prefix + n)[...] if hasattr(module, prefix + n) else None
        return LSTMParams(get("w_ih"), get("w_hh"), get("b"), get("w_hr"))


def _inits(kernel, recurrent, bias, forget_bias):
    return {"kernel": kernel, "recurrent": recurrent, "bias": bias or lstm_bias_init(forget_bias)}


class LSTMCell(nnx.Module):
    """One LSTM step with Flax's ``(c, h)`` carry (like ``nnx.OptimizedLSTMCell``)."""

    def __init__(self, in_features: int, hidden_features: int, *, kernel_init: Initializer = kernel_init,
                 recurrent_kernel_init: Initializer = recurrent_init, bias_init: Optional[Initializer] = None,
                 forget_bias: float = 1.0, dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.in_features, self.hidden_features = in_features, hidden_features
        self.dtype, self.param_dtype = dtype, param_dtype
        _Weights.create(self, "", in_features, hidden_features, None, rngs,
                        _inits(kernel_init, recurrent_kernel_init, bias_init, forget_bias), param_dtype)

    def __call__(self, carry, inputs):
        c, h = carry
        if self.dtype is not None:
            inputs = inputs.astype(self.dtype)
        state, y = lstm_cell(_Weights.read(self, ""), LSTMState(h.astype(inputs.dtype), c), inputs, compute_dtype=self.dtype)
        return (state.c.astype(c.dtype), state.h), y

    def initialize_carry(self, input_shape, rngs=None):
        shape = tuple(input_shape[:-1]) + (self.hidden_features,)
        return jnp.zeros(shape, self.param_dtype), jnp.zeros(shape, self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class LSTM(nnx.Module):
    """Multi-layer, optionally bidirectional and projected LSTM on :func:`jaxlstm.lstm_stack`.

    Example:
      >>> model = LSTM(8, 32, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
      >>> ys, state = model(jnp.ones((4, 10, 8)))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False,
                 proj_size: Optional[int] = None, dropout: float = 0.0, *, kernel_init: Initializer = kernel_init,
                 recurrent_kernel_init: Initializer = recurrent_init, bias_init: Optional[Initializer] = None,
                 forget_bias: float = 1.0, dtype: Any = None, param_dtype: Any = jnp.float32, unroll: int = 1,
                 checkpoint_every: Optional[int] = None, time_major: bool = False, rngs: nnx.Rngs):
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bidirectional, self.proj_size, self.dropout = bidirectional, proj_size, dropout
        self.dtype, self.param_dtype, self.unroll = dtype, param_dtype, unroll
        self.checkpoint_every, self.time_major = checkpoint_every, time_major
        inits = _inits(kernel_init, recurrent_kernel_init, bias_init, forget_bias)
        for l, d, d_in in stack_layout(input_size, hidden_size, num_layers, bidirectional, proj_size):
            _Weights.create(self, layer_name(l, d) + "_", d_in, hidden_size, proj_size, rngs, inits, param_dtype)
        self.rngs = rngs["dropout"].fork() if dropout > 0 else nnx.data(None)

    def params(self):
        """The weights as ``params[layer][direction]`` for the functional API."""
        layout = stack_layout(self.input_size, self.hidden_size, self.num_layers, self.bidirectional, self.proj_size)
        return group_layers([_Weights.read(self, layer_name(l, d) + "_") for l, d, _ in layout],
                            2 if self.bidirectional else 1)

    def __call__(self, xs, initial_state: Optional[LSTMState] = None, seq_lengths=None, deterministic: bool = True):
        active = self.dropout > 0.0 and not deterministic
        if self.dtype is not None:
            xs = xs.astype(self.dtype)
        return lstm_stack(
            self.params(), xs, initial_state, seq_lengths=seq_lengths,
            dropout=self.dropout if active else 0.0, key=self.rngs() if active else None,
            time_major=self.time_major, unroll=self.unroll, checkpoint_every=self.checkpoint_every,
            compute_dtype=self.dtype,
        )
