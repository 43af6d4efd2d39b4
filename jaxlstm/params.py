"""Parameter and state pytrees for the LSTM, and their initialisers.

Layout conventions (the same everywhere in jaxlstm):

* kernels are ``[in, out]``, so the code computes ``x @ w`` (the JAX convention);
* the ``4H`` gate axis is ordered **i, f, g, o** (input, forget, candidate C̃,
  output), as in PyTorch, cuDNN and ``flax.linen.OptimizedLSTMCell``;
* there is one bias ``b`` of shape ``[4H]`` (PyTorch's ``b_ih + b_hh``);
* with a projection (LSTMP, ``proj_size=P``), ``h = (o * tanh(c)) @ w_hr`` and the
  recurrence reads the projected ``h``; so ``w_hh`` is ``[R, 4H]`` with ``R = P``
  when projected and ``R = H`` otherwise;
* the state is ``LSTMState(h, c)``, h first, as in PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "GATE_ORDER",
    "LSTMParams",
    "LSTMState",
    "init_lstm",
    "zero_state",
    "kernel_init",
    "recurrent_init",
    "lstm_bias_init",
]

GATE_ORDER = ("i", "f", "g", "o")
"""Order of the four gate blocks along the ``4H`` axis."""


class LSTMParams(NamedTuple):
    """Weights of one LSTM layer in one direction.

    Attributes:
      w_ih: input kernel ``[D, 4H]``.
      w_hh: recurrent kernel ``[R, 4H]`` (``R = P`` if projected, else ``H``).
      b: bias ``[4H]``, or ``None`` for a layer without bias (PyTorch's
        ``bias=False``).
      w_hr: projection kernel ``[H, P]``, or ``None`` without projection.
    """

    w_ih: jax.Array
    w_hh: jax.Array
    b: jax.Array | None
    w_hr: jax.Array | None = None


class LSTMState(NamedTuple):
    """Recurrent state: ``h [..., R]`` and ``c [..., H]``."""

    h: jax.Array
    c: jax.Array


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def lstm_param_shapes(input_size: int, hidden_size: int, proj_size: int | None = None, bias: bool = True) -> dict:
    """``{field: (shape, role)}`` of one layer's ``LSTMParams`` (fields that are
    ``None`` left out); role is one of ``"kernel"``, ``"recurrent"``, ``"bias"``
    (which initialiser a module uses)."""
    H, R = hidden_size, hidden_size if proj_size is None else proj_size
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "w_ih": ((input_size, 4 * H), "kernel"),
        "w_hh": ((R, 4 * H), "recurrent"),
    }
    if bias:
        shapes["b"] = ((4 * H,), "bias")
    if proj_size is not None:
        shapes["w_hr"] = ((H, R), "kernel")
    return shapes


def stack_layout(input_size: int, hidden_size: int, num_layers: int, bidirectional: bool, proj_size: int | None):
    """``[(layer, direction, layer_input_size), ...]`` of a stack, in PyTorch's order."""
    dirs = 2 if bidirectional else 1
    R = hidden_size if proj_size is None else proj_size
    return [(l, d, input_size if l == 0 else dirs * R) for l in range(num_layers) for d in range(dirs)]


def kernel_init(key, shape, dtype=jnp.float32):
    """Glorot-uniform, drawn in float32 and cast (the default input/projection kernel init)."""
    return jax.nn.initializers.glorot_uniform()(key, shape, jnp.float32).astype(dtype)


def recurrent_init(key, shape, dtype=jnp.float32, *, n_gates: int = 4):
    """Orthogonal per gate block of a ``[R, G*H]`` recurrent kernel (float32, then cast;
    QR has no bfloat16 kernel)."""
    R, GH = shape
    orth = jax.nn.initializers.orthogonal()
    blocks = [orth(k, (R, GH // n_gates), jnp.float32) for k in jax.random.split(key, n_gates)]
    return jnp.concatenate(blocks, axis=1).astype(dtype)


def lstm_bias_init(forget_bias: float = 1.0):
    """Zeros with ``forget_bias`` on the f slice of a ``[4H]`` bias."""

    def init(key, shape, dtype=jnp.float32):
        (G,) = shape
        H = G // 4
        return jnp.zeros(shape, jnp.float32).at[H : 2 * H].set(forget_bias).astype(dtype)

    return init


def init_lstm(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    *,
    proj_size: int | None = None,
    forget_bias: float = 1.0,
    bias: bool = True,
    dtype=jnp.float32,
) -> LSTMParams:
    """Initialise one LSTM layer.

    Glorot-uniform input kernel, orthogonal recurrent kernel (per gate block),
    zero bias except ``forget_bias`` on the f slice, Glorot-uniform projection.

    Args:
      key: a PRNG key.
      input_size: D.
      hidden_size: H.
      proj_size: P for an LSTMP layer, or ``None``.
      forget_bias: added to the forget-gate bias (1.0 is the usual choice).
      bias: ``False`` for a layer without bias (``b=None``).
      dtype: parameter dtype.

    Returns:
      ``LSTMParams``.

    Example:
      >>> import jax, jaxlstm
      >>> params = jaxlstm.init_lstm(jax.random.key(0), 8, 16)
      >>> params.w_ih.shape, params.w_hh.shape
      ((8, 64), (16, 64))
    """
    D = _check_size("input_size", input_size)
    H = _check_size("hidden_size", hidden_size)
    if proj_size is not None:
        P = _check_size("proj_size", proj_size)
        if P >= H:
            raise ValueError(f"proj_size must be smaller than hidden_size={H}, got {P}")
    R = H if proj_size is None else proj_size
    k_ih, k_hh, k_hr = jax.random.split(key, 3)
    return LSTMParams(
        kernel_init(k_ih, (D, 4 * H), dtype),
        recurrent_init(k_hh, (R, 4 * H), dtype),
        lstm_bias_init(forget_bias)(None, (4 * H,), dtype) if bias else None,
        None if proj_size is None else kernel_init(k_hr, (H, R), dtype),
    )


def zero_state(
    batch_shape: Sequence[int] | int,
    hidden_size: int,
    *,
    proj_size: int | None = None,
    dtype=jnp.float32,
) -> LSTMState:
    """All-zero ``LSTMState`` with ``h [*batch_shape, R]`` and ``c [*batch_shape, H]``."""
    if isinstance(batch_shape, int):
        batch_shape = (batch_shape,)
    H = _check_size("hidden_size", hidden_size)
    R = H if proj_size is None else _check_size("proj_size", proj_size)
    batch_shape = tuple(batch_shape)
    return LSTMState(jnp.zeros(batch_shape + (R,), dtype), jnp.zeros(batch_shape + (H,), dtype))
