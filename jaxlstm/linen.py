"""flax.linen modules: thin shells over the functional core, no maths here.

* ``LSTMCell`` is a ``flax.linen.RNNCellBase`` with Flax's ``(c, h)`` carry,
  so ``flax.linen.RNN(jaxlstm.linen.LSTMCell(H))`` works wherever
  ``OptimizedLSTMCell`` does (``seq_lengths``, ``reverse``, ``Bidirectional``).
  Its step is ``jaxlstm.lstm_cell``; its params are ``w_ih [D, 4H]``,
  ``w_hh [H, 4H]``, ``b [4H]`` (``jaxlstm.convert.from_flax`` maps flax's
  own cells to them).
* ``LSTM`` is a whole (multi-layer, bidirectional, projected) LSTM that calls
  ``jaxlstm.lstm_stack``, so it gets the fused backward pass; it does not
  use ``nn.RNN``. Its params are nested per layer and direction::

      {"layer_0": {"forward": {"w_ih", "w_hh", "b"[, "w_hr"]}, "reverse": {...}}, "layer_1": ...}

  ``stack_params`` and ``stack_variables`` convert between that tree and
  the functional ``params[layer][direction]``.

Sizes are ``features`` (the hidden size H), as in flax.linen; the input size
comes from the input. ``dtype`` is the computation dtype (inputs are cast to
it, outputs come out in it); ``param_dtype`` is the parameters' dtype. Gate
order i, f, g, o.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
from .stack import DIRECTIONS, StackParams, draws_masks, layer_key, module_call

__all__ = ["LSTM", "ConvLSTM", "LSTMCell", "stack_params", "stack_variables"]

Initializer = Callable[..., jax.Array]


def _inits(module) -> dict:
    return {
        "kernel": module.kernel_init,
        "recurrent": module.recurrent_kernel_init,
        "bias": module.bias_init or lstm_bias_init(module.forget_bias),
        **VARIANT_INITS,
    }


def _layer_params(
    module: nn.Module, inits: dict, d_in: int, H: int, proj_size: int | None, bias: bool, variants=()
) -> LSTMParams:
    """One layer-direction's params; ``variants``: ``(("peephole", True), ...)`` for
    ``jaxlstm.params.lstm_param_shapes``."""
    shapes = lstm_param_shapes(d_in, H, proj_size, bias, **dict(variants))
    if not module.is_initializing():
        have = set(module.variables.get("params", {}))
        if have and not have & set(shapes):  # someone else's names: flax's cells have ii, if, ... or i, h
            raise ValueError(
                f"{type(module).__name__} expects params {sorted(shapes)} (jaxlstm's layout), got {sorted(have)}: "
                "params of flax.linen.LSTMCell / OptimizedLSTMCell convert with "
                "jaxlstm.convert.from_flax(params, as_variables=True)"
            )
    dtype = module.param_dtype
    arrays = {name: module.param(name, inits[role], shape, dtype) for name, (shape, role) in shapes.items()}
    return _from_arrays(arrays)


def _from_arrays(arrays: Mapping) -> LSTMParams:
    return LSTMParams(arrays["w_ih"], arrays["w_hh"], *(arrays.get(f) for f in LSTMParams._fields[2:]))


def _variants(module) -> tuple:
    return (("peephole", module.peephole), ("layer_norm", module.layer_norm), ("num_heads", module.num_heads))


def _compute(module, xs):
    return xs if module.dtype is None else xs.astype(module.dtype)


class LSTMCell(nn.RNNCellBase):
    """One LSTM step with Flax's ``(c, h)`` carry; drop-in for ``nn.OptimizedLSTMCell``.

    Attributes:
      features: hidden size H.
      kernel_init / recurrent_kernel_init / bias_init: initialisers (defaults:
        Glorot-uniform, orthogonal per gate, zeros with ``forget_bias`` on f).
      forget_bias: used by the default ``bias_init``.
      use_bias: ``False`` for a cell without bias (no ``b`` param).
      dtype: computation dtype (``None``: the inputs' dtype).
      param_dtype: parameter dtype.
      gate_activation / activation: the nonlinearities in place of σ and tanh
        (flax's ``gate_fn`` / ``activation_fn``), as ``jaxlstm.lstm`` takes them.
    """

    features: int
    kernel_init: Initializer = kernel_init
    recurrent_kernel_init: Initializer = recurrent_init
    bias_init: Initializer | None = None
    forget_bias: float = 1.0
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    carry_init: Initializer = nn.initializers.zeros_init()
    gate_activation: Callable = jax.nn.sigmoid
    activation: Callable = jnp.tanh

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, jax.Array], inputs: jax.Array):
        _checks.positive_int("features", self.features)
        c, h = carry
        params = _layer_params(self, _inits(self), inputs.shape[-1], self.features, None, self.use_bias)
        inputs = _compute(self, inputs)
        state, y = lstm_cell(
            params, LSTMState(h.astype(inputs.dtype), c), inputs, compute_dtype=self.dtype,
            gate_activation=self.gate_activation, activation=self.activation,
        )  # fmt: skip
        return (state.c.astype(c.dtype), state.h), y

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]):
        _checks.positive_int("features", self.features)
        shape = tuple(input_shape[:-1]) + (self.features,)
        kc, kh = jax.random.split(rng)
        return self.carry_init(kc, shape, self.param_dtype), self.carry_init(kh, shape, self.param_dtype)

    @property
    def num_feature_axes(self) -> int:
        return 1


class _Direction(nn.Module):
    """The params of one layer-direction: a scope in the tree, no maths."""

    shape: tuple  # (d_in, features, proj_size, use_bias, variants)
    inits: Any
    param_dtype: Any

    @nn.compact
    def __call__(self) -> LSTMParams:
        return _layer_params(self, self.inits, *self.shape)


class _Layer(nn.Module):
    """One layer: a scope holding its ``forward`` (and ``reverse``) direction."""

    shape: tuple
    num_directions: int
    inits: Any
    param_dtype: Any

    @nn.compact
    def __call__(self) -> tuple:
        return tuple(
            _Direction(self.shape, self.inits, self.param_dtype, name=DIRECTIONS[d])()
            for d in range(self.num_directions)
        )


class LSTM(nn.Module):
    """A multi-layer, optionally bidirectional and projected LSTM on ``jaxlstm.lstm_stack``.

    Called as ``(xs, initial_state=None, seq_lengths=None, deterministic=None, *,
    mask=None, resets=None, reset_state=None)`` (as ``jaxlstm.lstm_stack``);
    returns ``(ys [..., T, dirs*R], LSTMState(h [L*dirs, ..., R], c [L*dirs, ..., H]))``.

    Dropout (between layers, ``dropout > 0``; variational dropout on ``h(t-1)``
    inside each layer, ``recurrent_dropout > 0``) and zoneout (``zoneout_c``,
    ``zoneout_h``: in evaluation by its expectation) follow ``flax.linen.Dropout``:
    ``deterministic`` is an attribute or a call argument (exactly one of them),
    and masks draw from the ``'dropout'`` RNG stream.

    Attributes:
      features: hidden size H. num_layers, bidirectional, proj_size, dropout,
        recurrent_dropout, zoneout_c, zoneout_h, unroll, checkpoint_every,
        backward, time_major: as in ``jaxlstm.lstm_stack``. peephole,
        layer_norm, num_heads: the variants, as in ``jaxlstm.init_lstm``
        (the params gain ``peephole``, ``ln_gates``, ``ln_cell``; with heads
        ``w_hh`` is ``[k, R/k, 4H/k]``). deterministic: see above. dtype: computation
        dtype (also the matmul ``compute_dtype``); param_dtype; initialisers,
        ``use_bias``, ``gate_activation`` and ``activation`` as ``LSTMCell``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlstm.linen as jl
      >>> model = jl.LSTM(32, num_layers=2, bidirectional=True)
      >>> variables = model.init(jax.random.key(0), jnp.ones((4, 10, 8)))
      >>> ys, state = model.apply(variables, jnp.ones((4, 10, 8)))
      >>> ys.shape, sorted(variables["params"]["layer_1"])
      ((4, 10, 64), ['forward', 'reverse'])
    """

    features: int
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int | None = None
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    peephole: bool = False
    layer_norm: bool = False
    num_heads: int = 1
    zoneout_c: float = 0.0
    zoneout_h: float = 0.0
    deterministic: bool | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = kernel_init
    recurrent_kernel_init: Initializer = recurrent_init
    bias_init: Initializer | None = None
    forget_bias: float = 1.0
    use_bias: bool = True
    unroll: int | None = None  # None: 16 on GPUs, 1 elsewhere (jaxlstm.tuning.default_unroll)
    checkpoint_every: int | None = None
    backward: str = "fused"
    time_major: bool = False
    gate_activation: Callable = jax.nn.sigmoid
    activation: Callable = jnp.tanh

    @nn.compact
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
        _checks.positive_int("features", self.features)
        _checks.positive_int("num_layers", self.num_layers)
        layout = stack_layout(xs.shape[-1], self.features, self.num_layers, self.bidirectional, self.proj_size)
        dirs = 2 if self.bidirectional else 1
        params = tuple(
            _Layer(
                (d_in, self.features, self.proj_size, self.use_bias, _variants(self)),
                dirs,
                _inits(self),
                self.param_dtype,
                name=layer_key(l),
            )()
            for l, d, d_in in layout
            if d == 0
        )
        active = False
        if draws_masks(self):
            active = not nn.merge_param("deterministic", self.deterministic, deterministic)
        key = self.make_rng("dropout") if active else None
        return module_call(self, params, xs, initial_state, seq_lengths, mask, resets, reset_state, key)


class ConvLSTM(nn.Module):
    """A ConvLSTM layer over a sequence of 1-D, 2-D or 3-D maps, channels last, on ``jaxlstm.conv_lstm``.

    Called as ``(xs [..., T, *spatial, C], initial_state=None, seq_lengths=None, *, mask=None,
    resets=None, reset_state=None, reverse=False)``; returns ``(ys [..., T, *spatial', features],
    LSTMState(h, c))``. Params ``w_ih [*kernel_size, C, 4H]``, ``w_hh [*recurrent_kernel_size, H, 4H]``,
    ``b [4H]`` (``jaxlstm.ConvLSTMParams``; ``convert.from_flax`` / ``from_keras`` give them from flax's
    ``ConvLSTMCell`` and Keras' ``ConvLSTM2D``).

    Attributes:
      features: H, the state's channels. kernel_size: one int per spatial dim. strides, padding
        (``"same"`` / ``"valid"``), dilation: of the input convolution, as ``jaxlstm.conv_lstm``.
      recurrent_kernel_size: default ``kernel_size``. use_bias, forget_bias, initialisers (Glorot
        uniform, orthogonal, zeros with ``forget_bias`` on f), dtype, param_dtype, gate_activation,
        activation, unroll, time_major, backward: as ``LSTM`` (``backward`` as ``jaxlstm.conv_lstm``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlstm.linen as jl
      >>> model = jl.ConvLSTM(8, kernel_size=(3, 3))
      >>> variables = model.init(jax.random.key(0), jnp.ones((2, 5, 16, 16, 1)))
      >>> ys, state = model.apply(variables, jnp.ones((2, 5, 16, 16, 1)))
      >>> ys.shape
      (2, 5, 16, 16, 8)
    """

    features: int
    kernel_size: tuple
    strides: Any = 1
    padding: str = "same"
    dilation: Any = 1
    recurrent_kernel_size: tuple | None = None
    use_bias: bool = True
    forget_bias: float = 1.0
    kernel_init: Initializer = conv_kernel_init
    recurrent_kernel_init: Initializer = conv_recurrent_init
    bias_init: Initializer | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    gate_activation: Callable = jax.nn.sigmoid
    activation: Callable = jnp.tanh
    unroll: int = 1
    time_major: bool = False
    backward: str = "fused"

    @nn.compact
    def __call__(
        self, xs, initial_state=None, seq_lengths=None, *, mask=None, resets=None, reset_state=None, reverse=False
    ):
        _checks.positive_int("features", self.features)
        shapes = conv_lstm_param_shapes(
            xs.shape[-1], self.features, self.kernel_size, self.recurrent_kernel_size, self.use_bias
        )
        inits = {
            "w_ih": self.kernel_init,
            "w_hh": self.recurrent_kernel_init,
            "b": self.bias_init or lstm_bias_init(self.forget_bias),
        }
        arrays = {name: self.param(name, inits[name], shape, self.param_dtype) for name, shape in shapes.items()}
        params = ConvLSTMParams(arrays["w_ih"], arrays["w_hh"], arrays.get("b"))
        return conv.module_call(self, params, xs, initial_state, seq_lengths, mask, resets, reset_state, reverse)


def stack_params(variables: Mapping) -> StackParams:
    """``LSTM`` variables (or their ``"params"``) -> ``params[layer][direction]``
    for ``jaxlstm.lstm_stack``."""
    p = variables.get("params", variables) if isinstance(variables, Mapping) else variables
    if not isinstance(p, Mapping) or layer_key(0) not in p:
        raise TypeError(
            f"variables must be jaxlstm.linen.LSTM variables with a '{layer_key(0)}' entry, "
            f"got {type(variables).__name__}" + (f" with keys {sorted(p)}" if isinstance(p, Mapping) else "")
        )
    layers = []
    for l in range(len(p)):
        layer = p[layer_key(l)]
        layers.append(tuple(_from_arrays(layer[d]) for d in DIRECTIONS if d in layer))
    return tuple(layers)


def stack_variables(params: StackParams) -> dict:
    """``params[layer][direction]`` -> ``{"params": ...}`` for ``LSTM``'s ``apply``."""
    return {
        "params": {
            layer_key(l): {
                DIRECTIONS[d]: {k: v for k, v in p._asdict().items() if v is not None} for d, p in enumerate(layer)
            }
            for l, layer in enumerate(params)
        }
    }
