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
import numpy as np

from . import _hints
from ._hints import hints

__all__ = [
    "GATE_ORDER",
    "LSTMParams",
    "block_diagonal",
    "LSTMState",
    "init_lstm",
    "zero_state",
    "kernel_init",
    "recurrent_init",
    "lstm_bias_init",
    "GRUParams",
    "RNNParams",
    "init_gru",
    "init_rnn",
]

GATE_ORDER = ("i", "f", "g", "o")
"""Order of the four gate blocks along the ``4H`` axis."""


class LSTMParams(NamedTuple):
    """Weights of one LSTM layer in one direction.

    Attributes:
      w_ih: input kernel ``[D, 4H]``.
      w_hh: recurrent kernel ``[R, 4H]`` (``R = P`` if projected, else ``H``); with
        ``k`` heads (multi-head recurrence) the block-diagonal kernel's blocks
        ``[k, R/k, 4H/k]``: ``w_hh[j]`` maps head j's ``R/k`` units of ``h`` to head
        j's gate columns, in the order ``i, f, g, o`` of its ``H/k`` units each
        (``block_diagonal`` gives the dense ``[R, 4H]`` matrix).
      b: bias ``[4H]``, or ``None`` for a layer without bias (PyTorch's
        ``bias=False``).
      w_hr: projection kernel ``[H, P]``, or ``None`` without projection.
      peephole: peephole weights ``[3, H]`` (rows ``p_i, p_f, p_o``), or ``None``.
      ln_gates: layer-norm gains and biases of the two projections ``[4, 4H]``
        (rows ``γ_x, β_x, γ_h, β_h``), or ``None``.
      ln_cell: layer-norm gain and bias of the cell state ``[2, H]``, or ``None``.

    The last three (and multi-head ``w_hh``) are the variants of
    ``jaxlstm._variant``; a plain LSTM has them ``None``.
    """

    w_ih: jax.Array
    w_hh: jax.Array
    b: jax.Array | None
    w_hr: jax.Array | None = None
    peephole: jax.Array | None = None
    ln_gates: jax.Array | None = None
    ln_cell: jax.Array | None = None

    @property
    def num_heads(self) -> int:
        """``k`` of a multi-head (block-diagonal) recurrent kernel; 1 for a dense one."""
        return 1 if self.w_hh.ndim == 2 else self.w_hh.shape[0]

    @property
    def is_variant(self) -> bool:
        """Peepholes, layer norm or several heads: runs on ``jaxlstm._variant``."""
        return self.num_heads > 1 or any(v is not None for v in (self.peephole, self.ln_gates, self.ln_cell))


class LSTMState(NamedTuple):
    """Recurrent state: ``h [..., R]`` and ``c [..., H]``."""

    h: jax.Array
    c: jax.Array


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def lstm_param_shapes(
    input_size: int,
    hidden_size: int,
    proj_size: int | None = None,
    bias: bool = True,
    *,
    peephole: bool = False,
    layer_norm: bool = False,
    num_heads: int = 1,
) -> dict:
    """``{field: (shape, role)}`` of one layer's ``LSTMParams`` (fields that are
    ``None`` left out); role is one of ``"kernel"``, ``"recurrent"``, ``"bias"``,
    ``"peephole"``, ``"ln_gates"``, ``"ln_cell"`` (which initialiser a module uses)."""
    H, R = hidden_size, hidden_size if proj_size is None else proj_size
    k = _check_size("num_heads", num_heads)
    if H % k or R % k:
        raise ValueError(f"num_heads must divide hidden_size={H} (and proj_size), got {k}")
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "w_ih": ((input_size, 4 * H), "kernel"),
        "w_hh": ((R, 4 * H) if k == 1 else (k, R // k, 4 * H // k), "recurrent"),
    }
    if bias:
        shapes["b"] = ((4 * H,), "bias")
    if proj_size is not None:
        shapes["w_hr"] = ((H, R), "kernel")
    if _check_flag("peephole", peephole):
        shapes["peephole"] = ((3, H), "peephole")
    if _check_flag("layer_norm", layer_norm):
        shapes["ln_gates"] = ((4, 4 * H), "ln_gates")
        shapes["ln_cell"] = ((2, H), "ln_cell")
    return shapes


def layer_norm_init(key, shape, dtype=jnp.float32):
    """Gains 1 and biases 0 of ``[2m, F]`` rows ``(γ, β, γ, β, ...)``."""
    return jnp.tile(jnp.array([1.0, 0.0], dtype)[:, None], (shape[0] // 2, shape[1]))


def peephole_init(key, shape, dtype=jnp.float32):
    """Zeros: a peephole LSTM starts as the plain one."""
    return jnp.zeros(shape, dtype)


# The initialisers of the variant fields, by role (lstm_param_shapes), for the modules.
VARIANT_INITS = {"peephole": peephole_init, "ln_gates": layer_norm_init, "ln_cell": layer_norm_init}


def block_diagonal(w_hh: jax.Array) -> jax.Array:
    """The dense ``[R, 4H]`` recurrent kernel of a multi-head ``[k, R/k, 4H/k]`` one
    (zeros off the blocks); a dense kernel is returned as it is."""
    if w_hh.ndim == 2:
        return w_hh
    k, rk, gk = w_hh.shape
    hk = gk // 4
    dense = jnp.zeros((k, rk, 4, k, hk), w_hh.dtype)  # [head of h, unit, gate, head of gate, unit]
    blocks = w_hh.reshape(k, rk, 4, hk)
    dense = dense.at[jnp.arange(k), :, :, jnp.arange(k), :].set(blocks)
    return dense.reshape(k * rk, 4 * k * hk)


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
    QR has no bfloat16 kernel); of each head's block for a multi-head ``[k, R/k, G*H/k]`` one."""
    if len(shape) == 3:
        keys = jax.random.split(key, shape[0])
        return jnp.stack([recurrent_init(k, shape[1:], dtype, n_gates=n_gates) for k in keys])
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


@hints(_hints.INIT)
def init_lstm(
    key: jax.Array,
    input_size: int,
    hidden_size: int,
    *,
    proj_size: int | None = None,
    forget_bias: float = 1.0,
    bias: bool = True,
    peephole: bool = False,
    layer_norm: bool = False,
    num_heads: int = 1,
    dtype=jnp.float32,
) -> LSTMParams:
    """Initialise one LSTM layer.

    Glorot-uniform input kernel, orthogonal recurrent kernel (per gate block),
    zero bias except ``forget_bias`` on the f slice, Glorot-uniform projection;
    peepholes zero, layer-norm gains 1 and biases 0.

    Args:
      key: a PRNG key.
      input_size: D.
      hidden_size: H.
      proj_size: P for an LSTMP layer, or ``None``.
      forget_bias: added to the forget-gate bias (1.0 is the usual choice).
      bias: ``False`` for a layer without bias (``b=None``).
      peephole: peephole connections (Gers & Schmidhuber 2000).
      layer_norm: layer-normalised LSTM (Ba et al. 2016): the two projections
        and the cell state before its ``tanh``.
      num_heads: ``k > 1``: a block-diagonal recurrent kernel of ``k`` heads.
      dtype: parameter dtype.

    Returns:
      ``LSTMParams``.

    Examples:
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
    shapes = lstm_param_shapes(
        D,
        H,
        proj_size,
        bias,
        peephole=peephole,
        layer_norm=layer_norm,
        num_heads=num_heads,
    )
    k_ih, k_hh, k_hr = jax.random.split(key, 3)
    opt = lambda name, make: make(shapes[name][0]) if name in shapes else None
    return LSTMParams(
        kernel_init(k_ih, shapes["w_ih"][0], dtype),
        recurrent_init(k_hh, shapes["w_hh"][0], dtype),
        opt("b", lambda s: lstm_bias_init(forget_bias)(None, s, dtype)),
        opt("w_hr", lambda s: kernel_init(k_hr, s, dtype)),
        opt("peephole", lambda s: peephole_init(None, s, dtype)),
        opt("ln_gates", lambda s: layer_norm_init(None, s, dtype)),
        opt("ln_cell", lambda s: layer_norm_init(None, s, dtype)),
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


class RNNParams(NamedTuple):
    """Elman RNN weights: ``w_ih [D, H]``, ``w_hh [H, H]``, ``b [H]``."""

    w_ih: jax.Array
    w_hh: jax.Array
    b: jax.Array


class GRUParams(NamedTuple):
    """GRU weights, gate order r, z, n: ``w_ih [D, 3H]``, ``w_hh [H, 3H]``, ``b [3H]``, ``b_hn [H]``."""

    w_ih: jax.Array
    w_hh: jax.Array
    b: jax.Array
    b_hn: jax.Array


@hints(_hints.INIT_CELL)
def init_rnn(key, input_size: int, hidden_size: int, *, dtype=jnp.float32) -> RNNParams:
    """Glorot-uniform ``w_ih``, orthogonal ``w_hh``, zero bias."""
    D, H = _check_size("input_size", input_size), _check_size("hidden_size", hidden_size)
    k1, k2 = jax.random.split(key)
    return RNNParams(
        kernel_init(k1, (D, H), dtype), recurrent_init(k2, (H, H), dtype, n_gates=1), jnp.zeros((H,), dtype)
    )


@hints(_hints.INIT_CELL)
def init_gru(key, input_size: int, hidden_size: int, *, dtype=jnp.float32) -> GRUParams:
    """Glorot-uniform ``w_ih``, orthogonal ``w_hh`` per gate block, zero biases."""
    D, H = _check_size("input_size", input_size), _check_size("hidden_size", hidden_size)
    k1, k2 = jax.random.split(key)
    return GRUParams(
        kernel_init(k1, (D, 3 * H), dtype),
        recurrent_init(k2, (H, 3 * H), dtype, n_gates=3),
        jnp.zeros((3 * H,), dtype),
        jnp.zeros((H,), dtype),
    )
