"""The LSTM equations as pure functions.

The textbook form, one function per gate, each reading the concatenation
``[h(t-1), x(t)]`` (so each gate kernel ``W_*`` is ``[R + D, H]``)::

    f  = σ(W_f · [h(t-1), x(t)] + b_f)          forget gate
    i  = σ(W_i · [h(t-1), x(t)] + b_i)          input gate
    C̃  = tanh(W_C · [h(t-1), x(t)] + b_C)       candidate
    C  = f ∗ C(t-1) + i ∗ C̃                      cell update
    o  = σ(W_o · [h(t-1), x(t)] + b_o)          output gate
    h  = o ∗ tanh(C)                             hidden output

The engine does not call these one by one: it computes all four pre-activations
``z = x @ w_ih + h @ w_hh + b`` (gate order i, f, g, o along the last axis) in one
matmul and calls ``lstm_pointwise``, the fused form of the same equations.
``tests/test_gates.py`` checks that the two agree.

The nonlinearities can be replaced (``Activations``: flax's ``gate_fn`` / ``activation_fn``, Keras'
``recurrent_activation`` / ``activation``): ``gate`` stands for σ (i, f, o) and ``cell`` for tanh (the
candidate and ``tanh(C(t))``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Activations",
    "DEFAULT_ACTIVATIONS",
    "forget_gate",
    "input_gate",
    "candidate",
    "cell_update",
    "output_gate",
    "hidden_output",
    "split_gates",
    "activate_gates",
    "activation_derivative",
    "lstm_pointwise",
    "with_derivative",
]


class Activations(NamedTuple):
    """A cell's two nonlinearities, any elementwise JAX functions: ``gate`` (σ by default: the LSTM's
    i, f, o and the GRU's r, z; Keras' ``recurrent_activation``, flax's ``gate_fn``) and ``cell``
    (tanh: the LSTM's candidate and ``h = o ∗ cell(C)``, the GRU's n, the Elman RNN's state; Keras'
    ``activation``, flax's ``activation_fn``). Static and hashable: a new lambda per call is a new
    program under ``jit``, so define the function once."""

    gate: Callable = jax.nn.sigmoid
    cell: Callable = jnp.tanh


DEFAULT_ACTIVATIONS = Activations()


def with_derivative(fn: Callable, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(fn(z), fn'(z))`` of an elementwise ``fn``: its value and derivative, by one ``jax.jvp``."""
    return jax.jvp(fn, (z,), (jnp.ones_like(z),))


def _affine(w: jax.Array, b: jax.Array, h_prev: jax.Array, x: jax.Array) -> jax.Array:
    z = jnp.concatenate([h_prev, x], axis=-1) @ w
    return z + b.reshape((1,) * (z.ndim - 1) + b.shape)


def forget_gate(w_f, b_f, h_prev, x):
    """``f = σ(W_f · [h(t-1), x(t)] + b_f)``: how much of ``C(t-1)`` to keep."""
    return jax.nn.sigmoid(_affine(w_f, b_f, h_prev, x))


def input_gate(w_i, b_i, h_prev, x):
    """``i = σ(W_i · [h(t-1), x(t)] + b_i)``: how much of the candidate to write."""
    return jax.nn.sigmoid(_affine(w_i, b_i, h_prev, x))


def candidate(w_c, b_c, h_prev, x):
    """``C̃ = tanh(W_C · [h(t-1), x(t)] + b_C)``: the new content."""
    return jnp.tanh(_affine(w_c, b_c, h_prev, x))


def output_gate(w_o, b_o, h_prev, x):
    """``o = σ(W_o · [h(t-1), x(t)] + b_o)``: how much of the cell to expose."""
    return jax.nn.sigmoid(_affine(w_o, b_o, h_prev, x))


def cell_update(f, c_prev, i, c_tilde):
    """``C(t) = f ∗ C(t-1) + i ∗ C̃``."""
    return f * c_prev + i * c_tilde


def hidden_output(o, c, activation: Callable = jnp.tanh):
    """``h(t) = o ∗ tanh(C(t))`` (``activation`` in place of tanh)."""
    return o * activation(c)


def split_gates(a: jax.Array, axis: int = -1):
    """Split ``[..., 4H]`` into its four ``[..., H]`` blocks (order i, f, g, o).

    ``axis`` is the gate axis: ``-2`` for the feature-major ``[4H, B]`` layout
    of the sequence scans."""
    return jnp.split(a, 4, axis=axis)


def _candidate_mask(shape, axis: int = -1) -> jax.Array:
    """True on the g (candidate) block of the ``4H`` gate axis."""
    axis = axis % len(shape)
    H = shape[axis] // 4
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis) // H == 2


def activate_gates(z: jax.Array, axis: int = -1, act: Activations | None = None) -> jax.Array:
    """``[σ(z_i), σ(z_f), tanh(z_g), σ(z_o)]`` over the whole ``4H`` gate axis.

    One elementwise pass with one ``tanh`` per element, using
    ``σ(x) = (1 + tanh(x / 2)) / 2``: XLA:CPU emits one fused loop (and one
    saved residual) per step instead of four. With ``act`` (other than the
    defaults) ``[gate(z_i), gate(z_f), cell(z_g), gate(z_o)]``.
    """
    if act is not None and act != DEFAULT_ACTIVATIONS:
        i, f, g, o = split_gates(z, axis)
        return jnp.concatenate([act.gate(i), act.gate(f), act.cell(g), act.gate(o)], axis=axis)
    is_g = _candidate_mask(z.shape, axis)
    t = jnp.tanh(jnp.where(is_g, z, 0.5 * z))
    return jnp.where(is_g, t, 0.5 * t + 0.5)


def activation_derivative(a: jax.Array, axis: int = -1) -> jax.Array:
    """Derivative of ``activate_gates`` in terms of its output ``a``:
    ``σ' = a(1-a)`` on i, f, o and ``tanh' = 1 - a²`` on g."""
    return jnp.where(_candidate_mask(a.shape, axis), 1 - a * a, a * (1 - a))


def lstm_pointwise(z: jax.Array, c_prev: jax.Array, axis: int = -1, act: Activations | None = None):
    """Fused LSTM step from pre-activations.

    Args:
      z: pre-activations ``[..., 4H]`` in gate order i, f, g, o.
      c_prev: ``C(t-1)`` ``[..., H]``.
      axis: the gate axis of ``z`` (and the feature axis of ``c_prev``); ``-2``
        for the feature-major ``[4H, B]`` layout.
      act: the nonlinearities (``Activations``); ``None``: σ and tanh.

    Returns:
      ``(m, c, a)``: ``m = o ∗ tanh(C(t))`` (the hidden output before any
      projection), ``c = C(t)`` and the activated gates ``a = [i, f, g, o]``
      ``[..., 4H]``.
    """
    a = activate_gates(z, axis, act)
    i, f, g, o = split_gates(a, axis)
    c = cell_update(f, c_prev, i, g)
    return hidden_output(o, c, jnp.tanh if act is None else act.cell), c, a
