"""flax.linen modules: thin shells over the functional core, no maths here.

* :class:`LSTMCell` is a ``flax.linen.RNNCellBase`` with Flax's ``(c, h)`` carry,
  so ``flax.linen.RNN(jaxlstm.linen.LSTMCell(H))`` works wherever
  ``OptimizedLSTMCell`` does (``seq_lengths``, ``reverse``, ``Bidirectional``).
  Its step is :func:`jaxlstm.lstm_cell`.
* :class:`LSTM` is a whole (multi-layer, bidirectional, projected) LSTM that calls
  :func:`jaxlstm.lstm_stack`, so it gets the fused backward; it does not use
  ``nn.RNN``.

Parameters are ``w_ih [D, 4H]``, ``w_hh [R, 4H]``, ``b [4H]`` (and ``w_hr [H, P]``),
gate order i, f, g, o; :mod:`jaxlstm.convert` maps flax's own LSTM cells to them.
``dtype`` is the computation dtype (inputs are cast to it, outputs come out in
it); ``param_dtype`` is the parameters' dtype.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .params import LSTMParams, LSTMState, kernel_init, lstm_bias_init, lstm_param_shapes, recurrent_init, stack_layout
from .recurrence import lstm_cell
from .stack import group_layers, layer_name, lstm_stack

Initializer = Callable[..., jax.Array]


def _layer_params(module: nn.Module, prefix: str, d_in: int, H: int, proj_size: Optional[int]) -> LSTMParams:
    inits = {"kernel": module.kernel_init, "recurrent": module.recurrent_kernel_init,
             "bias": module.bias_init or lstm_bias_init(module.forget_bias)}
    arrays = {name: module.param(prefix + name, inits[role], shape, module.param_dtype)
              for name, (shape, role) in lstm_param_shapes(d_in, H, proj_size).items()}
    return LSTMParams(**arrays)


def _compute(module, xs):
    return xs if module.dtype is None else xs.astype(module.dtype)


class LSTMCell(nn.RNNCellBase):
    """One LSTM step with Flax's ``(c, h)`` carry; drop-in for ``nn.OptimizedLSTMCell``.

    Attributes:
      features: hidden size H.
      kernel_init / recurrent_kernel_init / bias_init: initialisers (defaults:
        Glorot-uniform, orthogonal per gate, zeros with ``forget_bias`` on f).
      forget_bias: used by the default ``bias_init``.
      dtype: computation dtype (``None``: the inputs' dtype).
      param_dtype: parameter dtype.
    """

    features: int
    kernel_init: Initializer = kernel_init
    recurrent_kernel_init: Initializer = recurrent_init
    bias_init: Optional[Initializer] = None
    forget_bias: float = 1.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    carry_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, carry: Tuple[jax.Array, jax.Array], inputs: jax.Array):
        c, h = carry
        params = _layer_params(self, "", inputs.shape[-1], self.features, None)
        inputs = _compute(self, inputs)
        state, y = lstm_cell(params, LSTMState(h.astype(inputs.dtype), c), inputs, compute_dtype=self.dtype)
        return (state.c.astype(c.dtype), state.h), y

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: Tuple[int, ...]):
        shape = tuple(input_shape[:-1]) + (self.features,)
        kc, kh = jax.random.split(rng)
        return self.carry_init(kc, shape, self.param_dtype), self.carry_init(kh, shape, self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class LSTM(nn.Module):
    """A multi-layer, optionally bidirectional and projected LSTM on :func:`jaxlstm.lstm_stack`.

    Called as ``(xs, initial_state=None, seq_lengths=None, deterministic=True)``;
    returns ``(ys [..., T, dirs*R], LSTMState(h [L*dirs, ..., R], c [L*dirs, ..., H]))``.
    Dropout (between layers) draws from the ``'dropout'`` RNG stream.

    Example:
      >>> model = LSTM(hidden_size=32, num_layers=2, bidirectional=True)
      >>> variables = model.init(jax.random.key(0), jnp.ones((4, 10, 8)))
      >>> ys, state = model.apply(variables, jnp.ones((4, 10, 8)))
    """

    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: Optional[int] = None
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = kernel_init
    recurrent_kernel_init: Initializer = recurrent_init
    bias_init: Optional[Initializer] = None
    forget_bias: float = 1.0
    unroll: int = 1
    checkpoint_every: Optional[int] = None
    time_major: bool = False

    @nn.compact
    def __call__(self, xs, initial_state: Optional[LSTMState] = None, seq_lengths=None, deterministic: bool = True):
        layout = stack_layout(xs.shape[-1], self.hidden_size, self.num_layers, self.bidirectional, self.proj_size)
        flat = [_layer_params(self, layer_name(l, d) + "_", d_in, self.hidden_size, self.proj_size) for l, d, d_in in layout]
        params = group_layers(flat, 2 if self.bidirectional else 1)
        active = self.dropout > 0.0 and not deterministic
        return lstm_stack(
            params, _compute(self, xs), initial_state, seq_lengths=seq_lengths,
            dropout=self.dropout if active else 0.0, key=self.make_rng("dropout") if active else None,
            time_major=self.time_major, unroll=self.unroll, checkpoint_every=self.checkpoint_every,
            compute_dtype=self.dtype,
        )
