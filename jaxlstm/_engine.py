"""The recurrence engine: it knows scans, layouts, masking and reversal, and no cell.

Every recurrent layer (LSTM, GRU, Elman RNN) runs through ``apply_sequence``
with its own ``core``; the core usually calls ``scan_masked`` with its step.

Words used here with one meaning each:

* *reverse*: read a sequence in reverse time order (``reverse=True``); padding
  never enters, so only each sequence's valid prefix is reversed
  (``reverse_time``).
* *transpose*: swap the batch and feature axes of a step, batch-major
  ``[B, F]`` <-> feature-major ``[F, B]`` (``transpose_features``).
* *time-major*: ``[T, B, F]``, the layout every scan runs in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------
# dtypes and dots


def _canonical(dtype) -> jnp.dtype:
    # float64 is float32 with x64 off: never ask JAX for a dtype it would warn about.
    return jnp.dtype(jax.dtypes.canonicalize_dtype(dtype))


def accum_dtype(*dtypes) -> jnp.dtype:
    """float32, or float64 where an input is float64 (x64 mode)."""
    wide = any(_canonical(d) == jnp.float64 for d in dtypes)
    return jnp.dtype(jnp.float64) if wide else jnp.dtype(jnp.float32)


def matmul_dtype(compute_dtype, *dtypes) -> jnp.dtype:
    """The matmul operand dtype: ``compute_dtype`` if given, else the widest input dtype."""
    if compute_dtype is not None:
        return _canonical(compute_dtype)
    return max((_canonical(d) for d in dtypes), key=lambda d: (d.itemsize, d == jnp.float32))


def add_bias(z: Array, b: Array) -> Array:
    """``z [..., F] + b [F]`` with the broadcast spelled out (strict rank promotion)."""
    return z + b.astype(z.dtype).reshape((1,) * (z.ndim - 1) + b.shape)


def operand(a: Array, mm_dtype, acc_dtype) -> Array:
    """A matmul operand: ``a`` rounded to ``mm_dtype``. On CPU a narrower ``mm_dtype`` (bfloat16)
    is then widened to ``acc_dtype`` again: XLA:CPU has no bf16 x bf16 -> float32 GEMM of its
    own (a dot whose bf16 operands it does not fuse with their converts fails at run time,
    "Unsupported element type for DotThunk"), and the numbers are the same: a product of two
    bf16 is exact in float32, and the sums are float32 either way (docs/precision.md)."""
    a = a.astype(mm_dtype)
    if jnp.dtype(mm_dtype).itemsize < jnp.dtype(acc_dtype).itemsize and jax.default_backend() == "cpu":
        a = a.astype(acc_dtype)
    return a


def dot(a: Array, w: Array, mm_dtype, acc_dtype) -> Array:
    """``a @ w`` with operands in ``mm_dtype`` and accumulation in ``acc_dtype``."""
    a, w = operand(a, mm_dtype, acc_dtype), operand(w, mm_dtype, acc_dtype)
    return jnp.matmul(a, w, preferred_element_type=acc_dtype)


def mesh_active() -> bool:
    """Whether the trace runs under ``jax.set_mesh`` with more than one device: the
    fused backward passes then contract their weight gradients over ``(t, b)`` as
    einsums, which keep a sharded batch axis sharded (each device contracts its part,
    one all-reduce follows). Without a mesh they contract ``[F, T*B]`` views, which
    XLA:CPU runs about 2.5x faster on one device but which, merging a sharded batch
    axis into ``T*B``, would make XLA all-gather the batch first."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


def contract_rows(a: Array, b: Array, mm_dtype, acc_dtype) -> Array:
    """``a [T, B, F1]``, ``b [T, B, F2]`` -> ``[F1, F2]``, summed over all T·B rows:
    a weight gradient as one GEMM (on ``[T*B, F]`` views, or as an einsum under a
    device mesh, see ``mesh_active``)."""
    a, b = operand(a, mm_dtype, acc_dtype), operand(b, mm_dtype, acc_dtype)
    if mesh_active():
        return jnp.einsum("tbi,tbj->ij", a, b, preferred_element_type=acc_dtype)
    T, B = a.shape[:2]
    return jnp.matmul(a.reshape((T * B, -1)).T, b.reshape((T * B, -1)), preferred_element_type=acc_dtype)


def rows_dot_t(g: Array, w: Array, mm_dtype, acc_dtype) -> Array:
    """``g [T, B, G] · wᵀ`` with ``w [D, G]`` -> ``[T, B, D]``: an input gradient as one
    GEMM (on a ``[T*B, G]`` view, or as an einsum under a device mesh)."""
    if mesh_active():
        g, w = operand(g, mm_dtype, acc_dtype), operand(w, mm_dtype, acc_dtype)
        return jnp.einsum("tbg,dg->tbd", g, w, preferred_element_type=acc_dtype)
    T, B = g.shape[:2]
    return dot(g.reshape((T * B, -1)), w.T, mm_dtype, acc_dtype).reshape((T, B, w.shape[0]))


def transpose_features(tree):
    """Batch-major <-> feature-major on the last two axes: ``[..., B, F] <-> [..., F, B]``."""
    return jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, -1, -2), tree)


# ----------------------------------------------------------------------------
# masking and the scan


class Steps(NamedTuple):
    """Which steps of a time-major batch count, and where the state restarts.

    * ``lengths [B]``: step t counts where ``t < lengths``;
    * ``mask [T, B]`` (bool): step t counts where true (holes allowed);
    * ``resets [T, B]`` (bool): where true, the state entering a counted step t is
      the initial state (in the order the scan runs).

    A step that does not count leaves the state unchanged and emits zeros. Any
    field may be ``None``.
    """

    lengths: Array | None = None
    mask: Array | None = None
    resets: Array | None = None

    @property
    def per_step(self) -> bool:
        """Whether the scan reads per-step flags (a mask or resets)."""
        return self.mask is not None or self.resets is not None


def valid_steps(t, lengths: Array | None, feature_major: bool = False, mask_t=None) -> Array | None:
    """``[B, 1]`` (``[1, B]`` if ``feature_major``) boolean: does step ``t`` count
    (``t < lengths`` and ``mask_t``). ``None`` when every step counts."""
    valid = None if lengths is None else t < lengths
    if mask_t is not None:
        valid = mask_t if valid is None else valid & mask_t
    if valid is None:
        return None
    return valid[None, :] if feature_major else valid[:, None]


def resets_at(valid, resets_t, feature_major: bool = False):
    """``[B, 1]`` (``[1, B]``) boolean: is the state entering this step reset
    (resets only apply to steps that count). ``None`` without resets."""
    if resets_t is None:
        return None
    r = resets_t[None, :] if feature_major else resets_t[:, None]
    return r if valid is None else r & valid


def where_valid(valid: Array | None, new, old):
    """``new`` where the step is valid, else ``old`` (a pytree, or a scalar ``old``)."""
    if valid is None:
        return new
    if not isinstance(old, (tuple, list)) and not hasattr(old, "shape"):
        return jnp.where(valid, new, jnp.asarray(old, new.dtype))
    return jax.tree_util.tree_map(lambda n, o: jnp.where(valid, n, o), new, old)


def route_state_cotangent(valid, reset, d_step, d_through, d_reset):
    """In a backward scan: the cotangent of the state entering a step. A step that
    counts passes ``d_step`` (its VJP's), one that does not passes ``d_through``
    on; at a reset that cotangent belongs to the reset state instead, so it is
    added to ``d_reset`` and zeros go on. Returns ``(d_state, d_reset)``."""
    d = where_valid(valid, d_step, d_through)
    if reset is None:
        return d, d_reset
    d_reset = jax.tree_util.tree_map(lambda a, x: a + jnp.where(reset, x, 0), d_reset, d)
    return jax.tree_util.tree_map(lambda x: jnp.where(reset, 0, x), d), d_reset


def scan_masked(
    step: Callable,
    carry0,
    xs,
    steps: Steps | Array | None,
    *,
    unroll: int = 1,
    t_offset=0,
    feature_major: bool = False,
    reset_to=None,
    save_carry_in: bool = False,
) -> tuple[Any, Any, Any]:
    """Scans ``step(carry, x) -> (carry, y, aux)`` over the leading axis of ``xs``.

    ``steps`` (a ``Steps``, or bare ``lengths [B]``): steps that do not count
    (``t_offset + t >= lengths``, or masked) keep the carry and emit ``y = 0``;
    where ``resets`` is true the carry entering a counted step is ``reset_to``
    (default ``carry0``). ``steps.mask`` and ``steps.resets`` are aligned with
    ``xs``. ``aux`` (residuals for a backward pass) is returned unmasked, and with
    ``save_carry_in`` as ``(aux, carry entering the step)``. ``y`` and ``aux`` may
    be ``None``. Carries and ``y`` are ``[B, F]``, or ``[F, B]`` with
    ``feature_major``.

    Returns:
      ``(final_carry, ys, auxs)``.
    """
    if steps is not None and not isinstance(steps, Steps):
        steps = Steps(lengths=steps)
    steps = steps or Steps()
    T = jax.tree_util.tree_leaves(xs)[0].shape[0]
    reset_to = carry0 if reset_to is None else reset_to

    # Only what is needed is scanned (without lengths, no step index: one dynamic slice less per step).
    def body(carry, inp):
        t, m, r, x = inp
        valid = valid_steps(None if t is None else t_offset + t, steps.lengths, feature_major, m)
        reset = resets_at(valid, r, feature_major)
        if reset is not None:
            carry = where_valid(reset, reset_to, carry)
        new, y, aux = step(carry, x)
        new = where_valid(valid, new, carry)
        if y is not None:
            y = where_valid(valid, y, 0)
        return new, (y, (aux, carry) if save_carry_in else aux)

    ts = None if steps.lengths is None else jnp.arange(T, dtype=jnp.int32)
    inputs = (ts, steps.mask, steps.resets, xs)
    carry, (ys, aux) = jax.lax.scan(body, carry0, inputs, unroll=unroll)
    return carry, ys, aux


# ----------------------------------------------------------------------------
# reversal


def _reversed_index(T: int, lengths: Array) -> Array:
    t = jnp.arange(T, dtype=lengths.dtype)[:, None]
    return jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)


def _reverse_prefix(xs: Array, lengths: Array) -> Array:
    # take_along_axis is a gather batched over B, which a batch-sharded xs keeps
    # sharded; xs[idx, arange(B)] made XLA all-gather the batch first.
    idx = _reversed_index(xs.shape[0], lengths)
    return jnp.take_along_axis(xs, idx.reshape(idx.shape + (1,) * (xs.ndim - 2)), axis=0)


@jax.custom_vjp
def _reverse_prefix_gather_vjp(xs: Array, lengths: Array) -> Array:
    return _reverse_prefix(xs, lengths)


def _reverse_prefix_fwd(xs, lengths):
    return _reverse_prefix(xs, lengths), lengths


def _reverse_prefix_bwd(lengths, g):
    # A permutation that is its own inverse is its own transpose: a gather, not
    # the scatter-add that autodiff of a gather gives.
    return _reverse_prefix(g, lengths), None


_reverse_prefix_gather_vjp.defvjp(_reverse_prefix_fwd, _reverse_prefix_bwd)


def reverse_time(xs: Array, lengths: Array | None, *, supports_jvp: bool = True) -> Array:
    """Reverses each sequence's valid prefix of time-major ``xs [T, B, ...]``:
    ``out[t, b] = xs[len_b - 1 - t, b]`` for ``t < len_b``; padded steps stay in
    place. Its own inverse.

    ``supports_jvp=False`` uses a ``custom_vjp`` whose VJP is a gather (cheaper
    than autodiff's scatter-add) at the price of forward-mode AD."""
    if lengths is None:
        return jnp.flip(xs, axis=0)
    return _reverse_prefix(xs, lengths) if supports_jvp else _reverse_prefix_gather_vjp(xs, lengths)


# ----------------------------------------------------------------------------
# layouts


def batch_size(batch_shape) -> int:
    return math.prod(batch_shape)


def to_time_major(xs: Array, batch_shape: tuple, time_major: bool) -> Array:
    """``[..., T, F]`` (or ``[T, ..., F]``) -> ``[T, B, F]`` with the batch dims flattened."""
    x = xs if time_major else jnp.moveaxis(xs, -2, 0)
    return x.reshape((x.shape[0], batch_size(batch_shape), xs.shape[-1]))


def from_time_major(ys_tm: Array, batch_shape: tuple, time_major: bool) -> Array:
    """Inverse of ``to_time_major``."""
    ys = ys_tm.reshape((ys_tm.shape[0],) + tuple(batch_shape) + ys_tm.shape[2:])
    return ys if time_major else jnp.moveaxis(ys, 0, -2)


def flat_lengths(seq_lengths: Array | None, batch_shape: tuple, T: int) -> Array | None:
    """``seq_lengths [*batch_shape]`` -> int32 ``[B]`` clipped to ``[0, T]`` (or ``None``)."""
    if seq_lengths is None:
        return None
    return jnp.clip(jnp.asarray(seq_lengths).reshape((batch_size(batch_shape),)).astype(jnp.int32), 0, T)


def reverse_sequences(
    xs: Array, seq_lengths: Array | None, *, time_major: bool = False, supports_jvp: bool = True
) -> Array:
    """``reverse_time`` on ``xs [..., T, F]`` (``[T, ..., F]`` if ``time_major``)."""
    if seq_lengths is None:
        return jnp.flip(xs, axis=0 if time_major else -2)
    batch_shape = xs.shape[1:-1] if time_major else xs.shape[:-2]
    x = to_time_major(xs, batch_shape, time_major)
    x = reverse_time(x, flat_lengths(seq_lengths, batch_shape, x.shape[0]), supports_jvp=supports_jvp)
    return from_time_major(x, batch_shape, time_major)


def counted_steps(T: int, B: int, lengths: Array | None, mask: Array | None) -> Array:
    """Boolean ``[T, B]``: step t of sequence b counts (``t < lengths[b]`` and ``mask[t, b]``)."""
    valid = jnp.ones((T, B), bool)
    if lengths is not None:
        valid = valid & (jnp.arange(T, dtype=jnp.int32)[:, None] < lengths[None, :])
    if mask is not None:
        valid = valid & mask
    return valid


def _segment_ends(resets: Array, lengths: Array | None, mask: Array | None) -> Array:
    """``[T, B]``: is step t the last counted step of its segment, i.e. does the next
    counted step start one (``resets``). Read backwards, these are the resets."""
    T, B = resets.shape
    valid = counted_steps(T, B, lengths, mask)

    def body(next_reset, inp):
        r, v = inp
        return jnp.where(v, r, next_reset), next_reset

    _, ends = jax.lax.scan(body, jnp.zeros(resets.shape[1:], bool), (resets, valid), reverse=True)
    return ends


def feature_major_core(core_fm: Callable) -> Callable:
    """Adapts ``core_fm(xs [T, D, B], carry [F, B], steps)`` to the time-major
    ``core`` of ``apply_sequence``. XLA fuses the transposes with the
    batch <-> time-major ones around them."""

    def core(xs_tm, carry, steps):
        ys, carry = core_fm(transpose_features(xs_tm), transpose_features(carry), steps)
        return transpose_features(ys), transpose_features(carry)

    return core


def apply_sequence(
    core: Callable,
    xs: Array,
    carry0,
    batch_shape: tuple,
    *,
    seq_lengths: Array | None,
    reverse: bool,
    time_major: bool,
    supports_jvp: bool = True,
    mask: Array | None = None,
    resets: Array | None = None,
    per_step=None,
    batch_major_core: bool = False,
):
    """Runs ``core(xs_tm [T, B, D], carry [B, ...], steps: Steps | None) -> (ys_tm, carry)``
    on ``xs`` of any layout; ``carry0`` leaves are ``[*batch_shape, F]``; ``mask``
    and ``resets`` are boolean ``[*batch_shape, T]`` (``[T, *batch_shape]`` if
    ``time_major``), ``resets[t]`` marking the steps that start a new segment.

    With ``reverse`` each sequence's counted steps run from last to first, and
    each segment is read backwards from the reset state: the same segments as
    forwards (the reset falls on each segment's last step).

    ``supports_jvp=False`` lets the reversal use a cheaper VJP that has no JVP;
    pass it only when ``core`` is itself reverse-mode only.

    ``per_step`` (a tuple of time-major ``[T, B, ...]`` arrays or ``None`` s, aligned
    with the input positions): more per-step inputs, reversed with ``xs``; the
    core then gets ``(xs_tm, *per_step)`` as its first argument.

    ``batch_major_core``: the core also takes batch-major ``xs [B, T, D]`` (and then
    returns ``ys [B, T, R]``) as ``core(xs, carry, steps, batch_major=True)``; it gets them
    when ``xs`` is batch-major and nothing is reversed, which saves two transposes
    (the flags in ``steps`` stay time-major).

    Returns ``(ys, final_carry)`` in the layout of ``xs`` and ``carry0``.
    """
    batch_major = batch_major_core and not time_major and not reverse and per_step is None
    B, T = batch_size(batch_shape), xs.shape[0 if time_major else -2]
    xs_tm = xs.reshape((B, T, xs.shape[-1])) if batch_major else to_time_major(xs, batch_shape, time_major)
    carry = jax.tree_util.tree_map(lambda a: a.reshape((B,) + a.shape[len(batch_shape) :]), carry0)
    lengths = flat_lengths(seq_lengths, batch_shape, T)
    flags = lambda f: None if f is None else to_time_major(f[..., None], batch_shape, time_major)[..., 0]
    mask_tm, resets_tm = flags(mask), flags(resets)
    if reverse and resets_tm is not None:
        resets_tm = _segment_ends(resets_tm, lengths, mask_tm)
    if reverse:
        xs_tm = reverse_time(xs_tm, lengths, supports_jvp=supports_jvp)
        mask_tm, resets_tm = (None if f is None else reverse_time(f, lengths) for f in (mask_tm, resets_tm))
        if per_step is not None:
            per_step = tuple(None if f is None else reverse_time(f, lengths) for f in per_step)
    steps = None if lengths is None and mask_tm is None and resets_tm is None else Steps(lengths, mask_tm, resets_tm)
    if batch_major:
        ys, carry = core(xs_tm, carry, steps, batch_major=True)
        ys = ys.reshape(tuple(batch_shape) + ys.shape[1:])
    else:
        ys_tm, carry = core(xs_tm if per_step is None else (xs_tm, *per_step), carry, steps)
        if reverse:
            ys_tm = reverse_time(ys_tm, lengths, supports_jvp=supports_jvp)
        ys = from_time_major(ys_tm, batch_shape, time_major)
    carry = jax.tree_util.tree_map(lambda a: a.reshape(tuple(batch_shape) + a.shape[1:]), carry)
    return ys, carry


def dropout_masks(xs, batch_shape, R, acc, p_in, p_rec, key, time_major):
    """Inverted dropout masks, one per sequence for all its steps: applies the input
    mask to ``xs`` (``[..., T, D]``, or ``[T, ..., D]`` if ``time_major``) and returns
    ``(xs, h_mask [*batch_shape, R] or None)``, the mask a cell applies to ``h(t-1)``
    where it enters the recurrent dot. ``k_in, k_rec = jax.random.split(key)``."""
    if p_in == 0.0 and p_rec == 0.0:
        return xs, None
    if key is None:
        raise ValueError(
            "input_dropout / recurrent_dropout > 0 need a PRNG key in training: pass key=jax.random.key(...), "
            "or deterministic=True for evaluation"
        )
    k_in, k_rec = jax.random.split(key)
    if p_in > 0.0:
        keep = jax.random.bernoulli(k_in, 1.0 - p_in, batch_shape + (xs.shape[-1],))
        m = jnp.where(keep, jnp.asarray(1.0 / (1.0 - p_in), xs.dtype), jnp.zeros((), xs.dtype))
        xs = xs * (m[None] if time_major else m[..., None, :])
    h_mask = None
    if p_rec > 0.0:
        keep = jax.random.bernoulli(k_rec, 1.0 - p_rec, batch_shape + (R,))
        h_mask = jnp.where(keep, jnp.asarray(1.0 / (1.0 - p_rec), acc), jnp.zeros((), acc))
    return xs, h_mask


def zoneout_masks(T: int, batch_shape: tuple, H: int, R: int, rates, key):
    """Zoneout keep masks of training, one per step and unit: ``(zc [T, B, H], zh
    [T, B, R])`` booleans (time-major, batch flattened, aligned with the input
    positions; ``None`` for a rate of 0), true where the unit keeps its previous
    value. ``k_c, k_h = jax.random.split(jax.random.fold_in(key, 1))``, then
    ``bernoulli(k_c, rate_c, (T, *batch_shape, H))`` and so for ``h``."""
    if key is None:
        raise ValueError(
            "zoneout_c / zoneout_h > 0 need a PRNG key in training: pass key=jax.random.key(...), "
            "or deterministic=True for evaluation"
        )
    k_c, k_h = jax.random.split(jax.random.fold_in(key, 1))
    B = batch_size(batch_shape)
    draw = lambda k, p, F: (
        None if p == 0.0 else jax.random.bernoulli(k, p, (T,) + batch_shape + (F,)).reshape((T, B, F))
    )
    return draw(k_c, rates[0], H), draw(k_h, rates[1], R)


# ----------------------------------------------------------------------------
# zoneout


class Zoneout(NamedTuple):
    """Zoneout rates of ``c`` and ``h`` (Krueger et al. 2017): the probability that
    a unit keeps its previous value at a step. Static (hashable)."""

    c: float = 0.0
    h: float = 0.0


def keep_weight(mask_t, rate: float, dtype):
    """The weight of the previous value in a zoneout step: the step's keep mask
    (training), else the rate (evaluation: the expectation), else ``None`` (no zoneout)."""
    if mask_t is not None:
        return mask_t.astype(dtype)
    return rate if rate > 0.0 else None


def zoneout_mix(k, prev, new):
    """``k ∗ prev + (1 - k) ∗ new`` (``new`` where ``k`` is ``None``)."""
    return new if k is None else new + k * (prev - new)


def without_residuals(step: Callable) -> Callable:
    """A step ``(carry, x) -> (carry, y, residuals)`` of a fused backward pass, with ``None`` for its
    residuals: the same step for a forward-only scan or autodiff."""
    return lambda carry, x: step(carry, x)[:2] + (None,)
