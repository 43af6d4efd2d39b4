"""flax.nnx modules: thin shells over the functional core, no maths here.

* ``LSTMCell``: one step, Flax's ``(c, h)`` carry, for ``nnx.RNN``; params
  ``w_ih``, ``w_hh``, ``b``.
* ``LSTM``: multi-layer / bidirectional / projected, on
  ``jaxlstm.lstm_stack`` (fused backward pass). Its params are nested per
  layer and direction as in ``jaxlstm.linen.LSTM``
  (``layer_0.forward.w_ih``, ``layer_0.reverse.w_ih``, ...);
  ``stack_params`` and ``set_stack_params`` read and write them as the
  functional ``params[layer][direction]``.

Sizes are ``in_features`` and ``hidden_features``, as in flax.nnx. Dropout
between layers (``dropout``), inside them (``recurrent_dropout``) and zoneout follow
``nnx.Dropout``: the ``deterministic`` attribute, which ``model.train()`` /
``model.eval()`` switch, unless the call passes ``deterministic``. Shapes and
initialisers come from ``jaxlstm.params``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from . import _checks, conv
from .conv import ConvLSTMParams, conv_kernel_init, conv_lstm_param_shapes, conv_recurrent_init
from .params import (
    VARIANT_INITS,
    LSTMParams,
    LSTMState,
    kernel_init,
    lstm_bias_init,
    lstm_param_shapes,
    recurrent_init,
    stack_layout,
)
from .recurrence import lstm_cell
from .stack import DIRECTIONS, StackParams, check_stack, draws_masks, layer_key, module_call

__all__ = ["LSTM", "ConvLSTM", "LSTMCell", "set_stack_params", "stack_params"]

Initializer = Callable[..., jax.Array]


class _Weights(nnx.Module):
    """The params of one layer-direction (or of a cell)."""

    def __init__(self, d_in, H, proj_size, bias, inits, param_dtype, rngs: nnx.Rngs, variants=None):
        shapes = lstm_param_shapes(d_in, H, proj_size, bias, **(variants or {}))

        def make(name):
            shape, role = shapes[name]
            return nnx.Param(inits[role](rngs.params(), shape, param_dtype))

        self.w_ih, self.w_hh = make("w_ih"), make("w_hh")
        for name in LSTMParams._fields[2:]:  # absent fields (no bias, no projection, ...) are None
            setattr(self, name, make(name) if name in shapes else nnx.data(None))

    def lstm_params(self) -> LSTMParams:
        """The weights as ``LSTMParams`` for the functional API."""
        opt = lambda v: None if v is None else v[...]
        return LSTMParams(self.w_ih[...], self.w_hh[...], *(opt(getattr(self, f)) for f in LSTMParams._fields[2:]))


class _Layer(nnx.Module):
    def __init__(self, weights):
        for d, w in enumerate(weights):
            setattr(self, DIRECTIONS[d], w)


def _inits(kernel, recurrent, bias, forget_bias):
    return {"kernel": kernel, "recurrent": recurrent, "bias": bias or lstm_bias_init(forget_bias), **VARIANT_INITS}


class LSTMCell(_Weights):
    """One LSTM step with Flax's ``(c, h)`` carry (like ``nnx.OptimizedLSTMCell``)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        kernel_init: Initializer = kernel_init,
        recurrent_kernel_init: Initializer = recurrent_init,
        bias_init: Initializer | None = None,
        forget_bias: float = 1.0,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        gate_activation: Callable = jax.nn.sigmoid,
        activation: Callable = jnp.tanh,
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.hidden_features = _checks.positive_int("hidden_features", hidden_features)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.gate_activation, self.activation = gate_activation, activation
        inits = _inits(kernel_init, recurrent_kernel_init, bias_init, forget_bias)
        super().__init__(in_features, hidden_features, None, use_bias, inits, param_dtype, rngs)

    def __call__(self, carry, inputs):
        c, h = carry
        if self.dtype is not None:
            inputs = inputs.astype(self.dtype)
        state, y = lstm_cell(
            self.lstm_params(), LSTMState(h.astype(inputs.dtype), c), inputs, compute_dtype=self.dtype,
            gate_activation=self.gate_activation, activation=self.activation,
        )  # fmt: skip
        return (state.c.astype(c.dtype), state.h), y

    def initialize_carry(self, input_shape, rngs=None):
        shape = tuple(input_shape[:-1]) + (self.hidden_features,)
        return jnp.zeros(shape, self.param_dtype), jnp.zeros(shape, self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class LSTM(nnx.Module):
    """Multi-layer, optionally bidirectional and projected LSTM on ``jaxlstm.lstm_stack``.

    Called as ``(xs, initial_state=None, seq_lengths=None, deterministic=None, *,
    mask=None, resets=None, reset_state=None)`` (as ``jaxlstm.lstm_stack``);
    returns ``(ys [..., T, dirs*R], LSTMState(h [L*dirs, ..., R], c [L*dirs, ..., H]))``.
    Other arguments as ``jaxlstm.linen.LSTM``.

    Examples:
      >>> import jax.numpy as jnp, jaxlstm.nnx as jn
      >>> from flax import nnx
      >>> model = jn.LSTM(8, 32, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
      >>> ys, state = model(jnp.ones((4, 10, 8)))
      >>> ys.shape, model.layer_1.reverse.w_ih.shape
      ((4, 10, 64), (64, 128))
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        proj_size: int | None = None,
        dropout: float = 0.0,
        *,
        recurrent_dropout: float = 0.0,
        peephole: bool = False,
        layer_norm: bool = False,
        num_heads: int = 1,
        zoneout_c: float = 0.0,
        zoneout_h: float = 0.0,
        deterministic: bool = False,
        kernel_init: Initializer = kernel_init,
        recurrent_kernel_init: Initializer = recurrent_init,
        bias_init: Initializer | None = None,
        forget_bias: float = 1.0,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        unroll: int | None = None,
        checkpoint_every: int | None = None,
        backward: str = "fused",
        time_major: bool = False,
        gate_activation: Callable = jax.nn.sigmoid,
        activation: Callable = jnp.tanh,
        rngs: nnx.Rngs,
    ):
        self.in_features = _checks.positive_int("in_features", in_features)
        self.hidden_features = _checks.positive_int("hidden_features", hidden_features)
        self.num_layers = _checks.positive_int("num_layers", num_layers)
        self.bidirectional, self.proj_size, self.dropout = bidirectional, proj_size, dropout
        self.deterministic, self.recurrent_dropout = deterministic, recurrent_dropout
        self.zoneout_c, self.zoneout_h = zoneout_c, zoneout_h
        self.dtype, self.param_dtype, self.unroll = dtype, param_dtype, unroll
        self.checkpoint_every, self.backward, self.time_major = checkpoint_every, backward, time_major
        self.gate_activation, self.activation = gate_activation, activation
        inits = _inits(kernel_init, recurrent_kernel_init, bias_init, forget_bias)
        layout = stack_layout(in_features, hidden_features, num_layers, bidirectional, proj_size)
        variants = {"peephole": peephole, "layer_norm": layer_norm, "num_heads": num_heads}
        for l in range(num_layers):
            ws = [
                _Weights(d_in, hidden_features, proj_size, use_bias, inits, param_dtype, rngs, variants)
                for l2, _, d_in in layout
                if l2 == l
            ]
            setattr(self, layer_key(l), _Layer(ws))
        self.rngs = rngs["dropout"].fork() if draws_masks(self) else nnx.data(None)

    def __call__(
        self,
        xs,
        initial_state: LSTMState | None = None,
        seq_lengths=None,
        deterministic: bool | None = None,
        *,
        mask=None,
        resets=None,
        reset_state: LSTMState | None = None,
    ):
        deterministic = self.deterministic if deterministic is None else deterministic
        active = draws_masks(self) and not deterministic
        key = self.rngs() if active and self.rngs is not None else None
        return module_call(self, stack_params(self), xs, initial_state, seq_lengths, mask, resets, reset_state, key)


class ConvLSTM(nnx.Module):
    """A ConvLSTM layer on ``jaxlstm.conv_lstm``: ``ConvLSTM(in_features, features, kernel_size, *, ...,
    rngs)``, called as ``jaxlstm.linen.ConvLSTM`` is (its attributes are the keyword arguments here).
    Params ``w_ih``, ``w_hh``, ``b`` (``nnx.Param``).

    Examples:
      >>> import jax.numpy as jnp, jaxlstm.nnx as jn
      >>> from flax import nnx
      >>> model = jn.ConvLSTM(1, 8, (3, 3), strides=2, rngs=nnx.Rngs(0))
      >>> ys, state = model(jnp.ones((2, 5, 16, 16, 1)))
      >>> ys.shape, model.w_hh.shape
      ((2, 5, 8, 8, 8), (3, 3, 8, 32))
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        kernel_size: tuple,
        *,
        strides=1,
        padding: str = "same",
        dilation=1,
        recurrent_kernel_size: tuple | None = None,
        use_bias: bool = True,
        forget_bias: float = 1.0,
        kernel_init: Initializer = conv_kernel_init,
        recurrent_kernel_init: Initializer = conv_recurrent_init,
        bias_init: Initializer | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        gate_activation: Callable = jax.nn.sigmoid,
        activation: Callable = jnp.tanh,
        unroll: int = 1,
        time_major: bool = False,
        backward: str = "fused",
        rngs: nnx.Rngs,
    ):
        C = _checks.positive_int("in_features", in_features)
        H = _checks.positive_int("features", features)
        self.strides, self.padding, self.dilation = strides, padding, dilation
        self.dtype, self.unroll, self.time_major, self.backward = dtype, unroll, time_major, backward
        self.gate_activation, self.activation = gate_activation, activation
        shapes = conv_lstm_param_shapes(C, H, kernel_size, recurrent_kernel_size, use_bias)
        self.w_ih = nnx.Param(kernel_init(rngs.params(), shapes["w_ih"], param_dtype))
        self.w_hh = nnx.Param(recurrent_kernel_init(rngs.params(), shapes["w_hh"], param_dtype))
        b_init = bias_init or lstm_bias_init(forget_bias)
        self.b = nnx.Param(b_init(rngs.params(), shapes["b"], param_dtype)) if use_bias else nnx.data(None)

    def conv_params(self) -> ConvLSTMParams:
        return ConvLSTMParams(self.w_ih[...], self.w_hh[...], None if self.b is None else self.b[...])

    def __call__(
        self, xs, initial_state=None, seq_lengths=None, *, mask=None, resets=None, reset_state=None, reverse=False
    ):
        params = self.conv_params()
        return conv.module_call(self, params, xs, initial_state, seq_lengths, mask, resets, reset_state, reverse)


def _layers(module: LSTM):
    if not isinstance(module, LSTM):
        raise TypeError(f"module must be a jaxlstm.nnx.LSTM, got {type(module).__name__}")
    return [getattr(module, layer_key(l)) for l in range(module.num_layers)]


def stack_params(module: LSTM) -> StackParams:
    """The weights of a ``LSTM`` as ``params[layer][direction]`` for ``jaxlstm.lstm_stack``."""
    return tuple(
        tuple(getattr(layer, d).lstm_params() for d in DIRECTIONS if hasattr(layer, d)) for layer in _layers(module)
    )


def set_stack_params(module: LSTM, params: StackParams) -> None:
    """Writes ``params[layer][direction]`` (same shapes) into a ``LSTM``, in place."""
    want = jax.tree.map(jnp.shape, stack_params(module))
    check_stack(params)
    if jax.tree.map(jnp.shape, params) != want:
        raise ValueError(f"params must have the module's shapes {want}, got {jax.tree.map(jnp.shape, params)}")
    for layer, ps in zip(_layers(module), params, strict=True):
        for d, p in enumerate(ps):
            w = getattr(layer, DIRECTIONS[d])
            for name, v in p._asdict().items():
                if v is not None:
                    getattr(w, name)[...] = v
