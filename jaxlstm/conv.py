"""ConvLSTM (Shi et al. 2015): the LSTM with convolutions in place of its two matmuls, for 1-D, 2-D and 3-D
inputs, channels last (Keras' ``ConvLSTM1D/2D/3D``, flax's ``ConvLSTMCell``, Haiku's ``Conv2DLSTM``).

Per step, with ``∗`` a convolution over the spatial dims and gate order i, f, g, o::

    z = conv(x(t), w_ih; strides, padding, dilation) + b + conv(h(t-1), w_hh; stride 1, "same")
    i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)
    c(t) = f ∗ c(t-1) + i ∗ g,   h(t) = o ∗ tanh(c(t))

as Keras computes it: ``strides``, ``padding`` and ``dilation`` apply to the input convolution; the
recurrent one keeps the state's spatial shape (stride 1, ``"same"``). Kernels are ``[*kernel_size, in, 4H]``
(Keras' and flax's ``Conv`` layout, ``lax.conv`` 's ``...IO``), so ``convert.from_keras`` takes a Keras
ConvLSTM's weights as they are.

The sequence call runs the input convolution once for all steps (``T·B`` images in one call) and scans
the recurrent one; lengths, masks, resets, reverse, time-major inputs and the activations behave as in
``jaxlstm.lstm`` (the same engine: ``jaxlstm._engine.apply_sequence``, on the flattened spatial map).
Gradients are JAX autodiff of that scan: the hoisted input convolution's gradient is already one call
over all steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from ._engine import accum_dtype, add_bias, apply_sequence, matmul_dtype, operand, scan_masked, without_residuals
from .gates import lstm_pointwise
from .params import LSTMState, lstm_bias_init

__all__ = ["ConvLSTMParams", "conv_lstm", "conv_lstm_cell", "conv_zero_state", "init_conv_lstm"]

_SPECS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}
_PADDINGS = ("same", "valid")


class ConvLSTMParams(NamedTuple):
    """``w_ih [*kernel_size, C, 4H]``, ``w_hh [*recurrent_kernel_size, H, 4H]``, ``b [4H]`` or ``None``
    (gate order i, f, g, o); the spatial rank (1, 2 or 3) is ``w_ih.ndim - 2``."""

    w_ih: jax.Array
    w_hh: jax.Array
    b: jax.Array | None = None


def _kernel_size(name: str, value) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not 1 <= len(value) <= 3:
        raise TypeError(
            f"{name} must be a tuple of 1 to 3 ints, one per spatial dim ((3, 3) for 2-D inputs), got {value!r}"
        )
    return tuple(_checks.positive_int(f"{name}[{i}]", k) for i, k in enumerate(value))


def init_conv_lstm(
    key: jax.Array,
    input_channels: int,
    hidden_channels: int,
    kernel_size: Sequence[int],
    *,
    recurrent_kernel_size: Sequence[int] | None = None,
    forget_bias: float = 1.0,
    bias: bool = True,
    dtype=jnp.float32,
) -> ConvLSTMParams:
    """ConvLSTM params: Glorot-uniform ``w_ih``, orthogonal ``w_hh`` (Keras' initialisers: over the
    flattened ``[*kernel, in]`` rows), a zero bias with ``forget_bias`` on f.

    Args:
      key: PRNG key.
      input_channels: C, the inputs' last dim.
      hidden_channels: H, the state's channels.
      kernel_size: one int per spatial dim: ``(k,)``, ``(kh, kw)`` or ``(kd, kh, kw)``.
      recurrent_kernel_size: the recurrent convolution's (default: ``kernel_size``).
      forget_bias, bias, dtype: as ``jaxlstm.init_lstm``.

    Examples:
      >>> import jax, jaxlstm
      >>> p = jaxlstm.init_conv_lstm(jax.random.key(0), 3, 8, (3, 3))
      >>> p.w_ih.shape, p.w_hh.shape, p.b.shape
      ((3, 3, 3, 32), (3, 3, 8, 32), (32,))
    """
    C = _checks.positive_int("input_channels", input_channels)
    H = _checks.positive_int("hidden_channels", hidden_channels)
    shapes = conv_lstm_param_shapes(C, H, kernel_size, recurrent_kernel_size, _checks.static_bool("bias", bias))
    k_ih, k_hh = jax.random.split(key)
    w_ih = conv_kernel_init(k_ih, shapes["w_ih"], dtype)
    w_hh = conv_recurrent_init(k_hh, shapes["w_hh"], dtype)
    b = lstm_bias_init(forget_bias)(None, shapes["b"], dtype) if bias else None
    return ConvLSTMParams(w_ih, w_hh, b)


def conv_lstm_param_shapes(C: int, H: int, kernel_size, recurrent_kernel_size=None, bias: bool = True) -> dict:
    """``{"w_ih": ..., "w_hh": ...[, "b": ...]}``: the shapes of ConvLSTM params (the modules' too)."""
    k = _kernel_size("kernel_size", kernel_size)
    rk = k if recurrent_kernel_size is None else _kernel_size("recurrent_kernel_size", recurrent_kernel_size)
    if len(rk) != len(k):
        raise ValueError(f"recurrent_kernel_size must have {len(k)} dims like kernel_size {k}, got {rk}")
    shapes = {"w_ih": k + (C, 4 * H), "w_hh": rk + (H, 4 * H)}
    return {**shapes, "b": (4 * H,)} if bias else shapes


def conv_kernel_init(key, shape, dtype=jnp.float32):
    """Glorot-uniform over a ``[*kernel, in, out]`` kernel (fan-in ``prod(kernel) * in``), float32 then cast."""
    return jax.nn.initializers.glorot_uniform()(key, shape, jnp.float32).astype(dtype)


def conv_recurrent_init(key, shape, dtype=jnp.float32):
    """Orthogonal over the flattened ``[prod(kernel) * H, 4H]`` rows of a recurrent kernel (Keras')."""
    return jax.nn.initializers.orthogonal()(key, shape, jnp.float32).astype(dtype)


class _Geometry(NamedTuple):
    rank: int
    C: int
    H: int
    strides: tuple
    padding: str
    dilation: tuple


def _per_dim(name: str, value, rank: int) -> tuple[int, ...]:
    values = (value,) * rank if isinstance(value, (int, np.integer)) else value
    if not isinstance(values, (tuple, list)) or len(values) != rank:
        raise ValueError(f"{name} must be an int or a tuple of {rank} ints (one per spatial dim), got {value!r}")
    return tuple(_checks.positive_int(f"{name}", v) for v in values)


def _geometry(params, strides, padding, dilation) -> _Geometry:
    if not isinstance(params, ConvLSTMParams):
        raise TypeError(f"params must be ConvLSTMParams (jaxlstm.init_conv_lstm), got {type(params).__name__}")
    for name in ("w_ih", "w_hh"):
        _checks.float_array(f"params.{name}", getattr(params, name))
    rank = params.w_ih.ndim - 2
    if rank not in _SPECS:
        raise ValueError(f"params.w_ih must be [*kernel_size, C, 4H] with 1 to 3 spatial dims, got shape "
                         f"{tuple(params.w_ih.shape)}")  # fmt: skip
    G = params.w_ih.shape[-1]
    if G % 4:
        raise ValueError(f"params.w_ih's last dim must be 4 * hidden_channels, got {G}")
    H = G // 4
    if params.w_hh.ndim != rank + 2 or params.w_hh.shape[-2:] != (H, G):
        raise ValueError(f"params.w_hh must be [*kernel_size ({rank} dims), {H}, {G}], got shape "
                         f"{tuple(params.w_hh.shape)}")  # fmt: skip
    if params.b is not None:
        _checks.vector("params.b", params.b, G)
    if not isinstance(padding, str) or padding.lower() not in _PADDINGS:
        raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
    return _Geometry(rank, params.w_ih.shape[-2], H, _per_dim("strides", strides, rank), padding.upper(),
                     _per_dim("dilation", dilation, rank))  # fmt: skip


def _conv(x, w, strides, padding, dilation, mm, acc):
    """Channels-last ``x [N, *spatial, C]`` with ``w [*k, C, F]`` -> ``[N, *spatial', F]`` in ``acc``."""
    rank = w.ndim - 2
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, _SPECS[rank])
    return jax.lax.conv_general_dilated(
        operand(x, mm, acc), operand(w, mm, acc), window_strides=strides, padding=padding, rhs_dilation=dilation,
        dimension_numbers=dn, preferred_element_type=acc,
    )  # fmt: skip


def _out_spatial(geo: _Geometry, params: ConvLSTMParams, spatial: tuple) -> tuple:
    x = jax.ShapeDtypeStruct((1,) + spatial + (geo.C,), jnp.float32)
    w = jax.ShapeDtypeStruct(params.w_ih.shape, jnp.float32)
    conv = lambda x, w: _conv(x, w, geo.strides, geo.padding, geo.dilation, jnp.float32, jnp.float32)
    out = jax.eval_shape(conv, x, w).shape[1:-1]
    if 0 in out:
        raise ValueError(f"the input convolution leaves no output: spatial shape {spatial} with kernel "
                         f"{tuple(params.w_ih.shape[:-2])}, strides {geo.strides}, dilation {geo.dilation} and "
                         f"padding {geo.padding.lower()!r} gives {out}")  # fmt: skip
    return out


def _input(name: str, x, geo: _Geometry, lead: int) -> tuple[tuple, tuple]:
    """``(leading dims, spatial dims)`` of ``x [*lead dims..., *spatial, C]`` (an array or its
    ``jax.ShapeDtypeStruct``); ``lead`` the dims before the spatial ones that are not batch (1 for a
    sequence's T)."""
    _checks.float_array(name, x)
    if x.ndim < geo.rank + 1 + lead or x.shape[-1] != geo.C:
        what = "[..., T, " if lead else "[..., "
        raise ValueError(f"{name} must be {what}*spatial ({geo.rank} dims), {geo.C}] (channels last, C = "
                         f"params.w_ih.shape[-2]), got shape {tuple(x.shape)}")  # fmt: skip
    return tuple(x.shape[: x.ndim - geo.rank - 1]), tuple(x.shape[x.ndim - geo.rank - 1 : -1])


def _dtypes(params, x_dtype, compute_dtype):
    mm = matmul_dtype(_checks.compute_dtype(compute_dtype), x_dtype, params.w_ih.dtype, params.w_hh.dtype)
    return mm, accum_dtype(x_dtype, params.w_ih.dtype)


def conv_zero_state(
    params: ConvLSTMParams, x, *, strides=1, padding: str = "same", dilation=1, dtype=jnp.float32
) -> LSTMState:
    """The zero state for one step's input ``x [..., *spatial, C]`` (or its shape): ``LSTMState(h, c)``,
    each ``[..., *spatial', H]`` with ``spatial'`` the input convolution's output, in ``dtype``."""
    geo = _geometry(params, strides, padding, dilation)
    x = jax.ShapeDtypeStruct(tuple(x), jnp.float32) if isinstance(x, (tuple, list)) else x
    lead, spatial = _input("x", x, geo, 0)
    zeros = jnp.zeros(lead + _out_spatial(geo, params, spatial) + (geo.H,), dtype)
    return LSTMState(zeros, zeros)


def _recurrent_conv(h, w_hh, mm, acc):
    """The recurrent convolution: stride 1, ``"same"``, no dilation (the state keeps its map)."""
    ones = (1,) * (w_hh.ndim - 2)
    return _conv(h, w_hh, ones, "SAME", ones, mm, acc)


def _recurrent_conv_t(dz, w_hh, mm, acc):
    """The transpose of ``_recurrent_conv`` in ``h``: a convolution of ``dz`` with the spatially flipped,
    in/out-swapped kernel and the mirrored ``"same"`` padding (``(k - 1) // 2`` before, ``k // 2`` after
    becomes ``k // 2`` before, ``(k - 1) // 2`` after). Written out, it runs ~4x faster inside a scan on
    XLA:CPU than autodiff's transpose (Zen 4: 7.5 against 35 ms, 8 steps, 4 32x32 maps, 64 -> 16)."""
    rank = w_hh.ndim - 2
    w_t = jnp.swapaxes(jnp.flip(w_hh, tuple(range(rank))), -1, -2)
    pads = [(k // 2, (k - 1) // 2) for k in w_hh.shape[:rank]]
    ones = (1,) * rank
    return _conv(dz, w_t, ones, pads, ones, mm, acc)


def _input_gates(w_ih, b, xs, geo, spatial, mm, acc):
    """The input convolution (and the bias) of flattened frames ``xs [..., prod(spatial) * C]`` ->
    ``[..., prod(spatial') * 4H]``."""
    lead = xs.shape[:-1]
    frames = xs.reshape((math.prod(lead),) + spatial + (geo.C,))
    gx = _conv(frames, w_ih, geo.strides, geo.padding, geo.dilation, mm, acc)
    if b is not None:
        gx = add_bias(gx, b.astype(acc))
    return gx.reshape(lead + (-1,))


def _step(w_hh, geo, out_spatial, mm, acc, act, rec_conv=_recurrent_conv, inputs=None):
    """``((h, c), gx) -> ((h, c), h, h(t-1))`` on flattened maps ``[B, prod(spatial') * H]``; ``gx`` the
    input convolution (with the bias) of the step, flattened alike (with ``inputs``, a function of the
    step's frames that computes it, the step reads the frames); ``h(t-1)``, what the recurrent
    convolution read, is the step's residual."""
    shape = out_spatial + (geo.H,)

    def step(carry, gx):
        h, c = carry
        B = h.shape[0]
        if inputs is not None:
            gx = inputs(gx)
        hs = h.reshape((B,) + shape)
        z = gx.reshape((B,) + out_spatial + (4 * geo.H,)) + rec_conv(hs, w_hh, mm, acc)
        m, c_new, _ = lstm_pointwise(z, c.reshape((B,) + shape), -1, act)
        m, c_new = m.reshape((B, -1)), c_new.reshape((B, -1))
        return (m, c_new), m, h

    return step


def _fused_recurrence(geo, spatial, out_spatial, mm, acc, act, unroll):
    """The sequence after the layouts, ``(w_ih, b, w_hh, xs [T, B, prod(spatial) * C], carry0, reset_carry,
    steps) -> (ys, carry)``, with a custom VJP.

    Without differentiation each step convolves its own frames (on XLA:CPU faster than one convolution of
    all frames before the scan, whose ``[T, B, ..., 4H]`` result is written and read again: Zen 4, 4 32x32x1
    frames, 8 steps, 16 channels: 10.4 against 17.9 ms). Differentiated, the input convolution runs once
    over all ``T·B`` frames before the scan, and the backward pass computes ``dW_ih``, ``db`` and ``dxs``
    from it after the reverse scan, and ``dW_hh`` as one convolution over all steps: the weight gradient
    of a convolution inside a ``lax.scan`` runs ~14x slower on XLA:CPU than the same convolutions out of
    the loop (Zen 4: 574 against 40 ms for 8 steps of a 3x3, 16 -> 64 channel convolution on four 32x32
    maps). The reverse scan is JAX's autodiff of the step with ``w_hh`` held constant and the recurrent
    convolution's transpose written out (``_recurrent_conv_t``, 4x faster in a loop than autodiff's);
    ``dz``, the cotangent of each step's pre-activations, is that of the input convolution's output."""

    @jax.custom_vjp
    def rec_conv(h, w_hh):
        return _recurrent_conv(h, w_hh, mm, acc)

    def rec_conv_fwd(h, w_hh):
        return rec_conv(h, w_hh), w_hh

    def rec_conv_bwd(w_hh, dz):
        return _recurrent_conv_t(dz, w_hh, mm, acc), None  # h is in acc; w_hh's gradient: after the scan

    rec_conv.defvjp(rec_conv_fwd, rec_conv_bwd)

    def run(w_hh, gx, carry0, reset_carry, steps):
        step = _step(w_hh, geo, out_spatial, mm, acc, act, lambda h, w, mm, acc: rec_conv(h, w))
        carry, ys, h_in = scan_masked(step, carry0, gx, steps, unroll=unroll, reset_to=reset_carry)
        return (ys, carry), h_in

    gates = lambda w_ih, b, xs: _input_gates(w_ih, b, xs, geo, spatial, mm, acc)

    @jax.custom_vjp
    def sequence(w_ih, b, w_hh, xs, carry0, reset_carry, steps):
        step = _step(w_hh, geo, out_spatial, mm, acc, act, inputs=lambda x: gates(w_ih, b, x))
        carry, ys, _ = scan_masked(without_residuals(step), carry0, xs, steps, unroll=unroll, reset_to=reset_carry)
        return ys, carry

    def fwd(w_ih, b, w_hh, xs, carry0, reset_carry, steps):
        gx, input_vjp = jax.vjp(gates, w_ih, b, xs)
        out, vjp, h_in = jax.vjp(lambda g, c0, rc: run(w_hh, g, c0, rc, steps), gx, carry0, reset_carry,
                                 has_aux=True)  # fmt: skip
        return out, (input_vjp, vjp, h_in, w_hh)

    def bwd(res, cotangents):
        input_vjp, vjp, h_in, w_hh = res
        dgx, dcarry0, dreset = vjp(cotangents)
        T, B = dgx.shape[:2]
        maps = lambda a, C: a.reshape((T * B,) + out_spatial + (C,))
        _, wgrad = jax.vjp(lambda w: _recurrent_conv(maps(h_in, geo.H), w, mm, acc), w_hh)
        (d_w_hh,) = wgrad(maps(dgx, 4 * geo.H).astype(acc))
        d_w_ih, d_b, dxs = input_vjp(dgx)
        return d_w_ih, d_b, d_w_hh.astype(w_hh.dtype), dxs, dcarry0, dreset, None

    sequence.defvjp(fwd, bwd)
    return sequence


def _state(name, state, lead, shape):
    if not isinstance(state, LSTMState):
        raise TypeError(f"{name} must be an LSTMState(h, c), got {type(state).__name__}")
    for part in ("h", "c"):
        arr = getattr(state, part)
        _checks.float_array(f"{name}.{part}", arr)
        if tuple(arr.shape) != lead + shape:
            raise ValueError(f"{name}.{part} must have shape {lead + shape} ([..., *spatial', H]), got "
                             f"{tuple(arr.shape)}")  # fmt: skip


def conv_lstm_cell(
    params: ConvLSTMParams,
    state: LSTMState,
    x,
    *,
    strides=1,
    padding: str = "same",
    dilation=1,
    compute_dtype=None,
    gate_activation: Callable = jax.nn.sigmoid,
    activation: Callable = jnp.tanh,
) -> tuple[LSTMState, jax.Array]:
    """One ConvLSTM step: ``x [..., *spatial, C]``, ``state`` with ``h, c [..., *spatial', H]``
    (``conv_zero_state`` makes one). Returns ``(new_state, h)``; arguments as ``conv_lstm``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> p = jaxlstm.init_conv_lstm(jax.random.key(0), 3, 8, (3, 3))
      >>> x = jnp.ones((2, 16, 16, 3))
      >>> state, h = jaxlstm.conv_lstm_cell(p, jaxlstm.conv_zero_state(p, x), x)
      >>> h.shape
      (2, 16, 16, 8)
    """
    geo = _geometry(params, strides, padding, dilation)
    x = _checks.as_float_array("x", x)
    lead, spatial = _input("x", x, geo, 0)
    out = _out_spatial(geo, params, spatial)
    _state("state", state, lead, out + (geo.H,))
    act = _checks.activations(gate_activation, activation)
    mm, acc = _dtypes(params, x.dtype, compute_dtype)
    B = math.prod(lead)
    gx = _input_gates(params.w_ih, params.b, x.reshape((B, -1)), geo, spatial, mm, acc)
    flat = lambda a: a.reshape((B, -1)).astype(acc)
    (h, c), _, _ = _step(params.w_hh, geo, out, mm, acc, act)((flat(state.h), flat(state.c)), gx)
    shape = lead + out + (geo.H,)
    h = h.reshape(shape).astype(x.dtype)
    return LSTMState(h, c.reshape(shape)), h


def conv_lstm(
    params: ConvLSTMParams,
    xs,
    initial_state: LSTMState | None = None,
    *,
    strides=1,
    padding: str = "same",
    dilation=1,
    seq_lengths=None,
    mask=None,
    resets=None,
    reset_state: LSTMState | None = None,
    reverse: bool = False,
    time_major: bool = False,
    unroll: int = 1,
    compute_dtype=None,
    backward: str = "fused",
    gate_activation: Callable = jax.nn.sigmoid,
    activation: Callable = jnp.tanh,
) -> tuple[jax.Array, LSTMState]:
    """Runs a ConvLSTM layer over a sequence of 1-D, 2-D or 3-D maps, channels last.

    Args:
      params: ``ConvLSTMParams`` (``jaxlstm.init_conv_lstm``).
      xs: ``[..., T, *spatial, C]`` (any number of leading batch dims, including none), or
        ``[T, ..., *spatial, C]`` with ``time_major``: video is ``[B, T, H, W, C]`` with 2-D params.
      initial_state: ``LSTMState(h, c)``, each ``[..., *spatial', H]``; zeros if ``None``.
      strides, dilation: of the input convolution, an int or one per spatial dim (Keras'
        ``strides`` and ``dilation_rate``).
      padding: ``"same"`` or ``"valid"``, of the input convolution (the recurrent one is ``"same"``):
        ``spatial'`` is that convolution's output shape.
      seq_lengths, mask, resets, reset_state, reverse, time_major, unroll: as ``jaxlstm.lstm``.
      compute_dtype, gate_activation, activation: as ``jaxlstm.lstm``.
      backward: ``"fused"`` (default): a custom VJP whose reverse scan leaves the recurrent kernel's
        gradient to one convolution over all steps after it (XLA:CPU runs a convolution's weight
        gradient inside a loop an order of magnitude slower); ``"autodiff"``: JAX's autodiff of the
        scan, for forward-mode AD (``jax.jvp``).

    Returns:
      ``(ys [..., T, *spatial', H], LSTMState(h, c))`` (``ys`` and ``h`` in the dtype of ``xs``, ``c``
      in float32), the final state taken at each sequence's last counted step.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxlstm
      >>> p = jaxlstm.init_conv_lstm(jax.random.key(0), 1, 8, (3, 3))
      >>> ys, state = jaxlstm.conv_lstm(p, jnp.ones((2, 5, 16, 16, 1)), strides=2)
      >>> ys.shape, state.c.shape
      ((2, 5, 8, 8, 8), (2, 8, 8, 8))
    """
    geo = _geometry(params, strides, padding, dilation)
    xs = _checks.as_float_array("xs", xs)
    _checks.static_bool("time_major", time_major)
    _checks.static_bool("reverse", reverse)
    lead, spatial = _input("xs", xs, geo, 1)
    T = lead[0] if time_major else lead[-1]
    batch_shape = lead[1:] if time_major else lead[:-1]
    out = _out_spatial(geo, params, spatial)
    seq_lengths = _checks.seq_lengths(seq_lengths, batch_shape, T)
    mask = _checks.step_flags("mask", mask, batch_shape, T, time_major)
    resets = _checks.step_flags("resets", resets, batch_shape, T, time_major)
    unroll = _checks.positive_int("unroll", unroll)
    _checks.one_of("backward", backward, ("fused", "autodiff"))
    act = _checks.activations(gate_activation, activation)
    mm, acc = _dtypes(params, xs.dtype, compute_dtype)
    state_shape = out + (geo.H,)
    F = math.prod(state_shape)

    def carry_of(name, state):
        if state is None:
            return jnp.zeros(batch_shape + (F,), acc), jnp.zeros(batch_shape + (F,), acc)
        _state(name, state, batch_shape, state_shape)
        return tuple(a.reshape(batch_shape + (F,)).astype(acc) for a in state)

    def core(xs_tm, carries, steps):
        if backward == "fused" and xs_tm.shape[0] > 0:
            sequence = _fused_recurrence(geo, spatial, out, mm, acc, act, unroll)
            return sequence(params.w_ih, params.b, params.w_hh, xs_tm, carries[0], carries[1], steps)
        # autodiff: the input convolution of all steps at once, before the scan
        gx = _input_gates(params.w_ih, params.b, xs_tm, geo, spatial, mm, acc)
        step = without_residuals(_step(params.w_hh, geo, out, mm, acc, act))
        carry, ys, _ = scan_masked(step, carries[0], gx, steps, unroll=unroll, reset_to=carries[1])
        return ys, carry

    # the engine's sequence machinery on flattened maps: [..., T, prod(spatial) * C]
    flat_xs = xs.reshape(lead + (-1,))
    carries = (carry_of("initial_state", initial_state), carry_of("reset_state", reset_state))
    ys, (h, c) = apply_sequence(
        core, flat_xs, carries, batch_shape, seq_lengths=seq_lengths, reverse=reverse, time_major=time_major,
        mask=mask, resets=resets, supports_jvp=backward == "autodiff",
    )  # fmt: skip
    ys = ys.reshape(lead + state_shape).astype(xs.dtype)
    unflat = lambda a: a.reshape(batch_shape + state_shape)
    return ys, LSTMState(unflat(h).astype(xs.dtype), unflat(c))


def module_call(module, params: ConvLSTMParams, xs, initial_state, seq_lengths, mask, resets, reset_state, reverse):
    """The call the linen and nnx ``ConvLSTM`` modules share: their attributes (``strides``, ``padding``,
    ``dilation``, ``dtype``, ``unroll``, ``time_major``, ``backward``, the activations) to ``conv_lstm``."""
    return conv_lstm(
        params,
        xs if module.dtype is None else xs.astype(module.dtype),
        initial_state,
        strides=module.strides,
        padding=module.padding,
        dilation=module.dilation,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        reset_state=reset_state,
        reverse=reverse,
        time_major=module.time_major,
        unroll=module.unroll,
        compute_dtype=module.dtype,
        backward=module.backward,
        gate_activation=module.gate_activation,
        activation=module.activation,
    )
