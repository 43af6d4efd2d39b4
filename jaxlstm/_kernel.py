"""The compiled CPU kernel: the LSTM, GRU and Elman recurrences as XLA FFI custom calls.

``jaxlstm/csrc/lstm_cpu.cc`` is built by the package's own build (``pip install``
compiles it with the machine's C++ compiler against the XLA FFI headers that jaxlib
ships; where that fails the package installs without it). It holds the two loops
over time, forward and backward, with the hidden units split over the machine's
cores: each core keeps its slice of ``W_hh`` in its cache and computes its units'
gates with a register-blocked GEMM, and one spin barrier per step publishes ``h``.
The input projection runs inside the forward loop and the weight and input
gradients inside the backward loop (GEMMs over chunks of ~256 rows): on this
project's machines a ``[T, B, 4H]`` buffer between the loop and XLA cost more to
first touch (fresh pages on every call) than its GEMM took.

:func:`jaxlstm.lstm` runs :func:`kernel_lstm` in place of :func:`jaxlstm._fused.fused_lstm`
where :func:`applies` (float32 on CPU, no projection or variant, no recurrent
dropout or zoneout, no checkpointing, no device mesh) and :func:`jaxlstm.tuning.kernel_path`
chose it: lengths, masks, resets and ``reverse`` are supported. :func:`jaxlstm.gru` and
:func:`jaxlstm.rnn` run :func:`kernel_cell` in place of :func:`jaxlstm._fused_gru.fused_cell`
on the same terms (the same loops, with the GRU's three gates or the Elman RNN's one). ``JAXLSTM_KERNEL=0``
turns it off (the XLA path, which is the reference it is tested against);
``JAXLSTM_KERNEL_THREADS=n`` sets its team of threads (default: by the work per step,
at most one per CPU this process may run on).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ._engine import Steps, counted_steps, mesh_active
from .params import LSTMParams

__all__ = ["applies", "available", "build_id", "chosen", "enabled", "kernel_cell", "kernel_lstm", "load_error"]

_FORWARD, _BACKWARD = "jaxlstm_lstm_forward", "jaxlstm_lstm_backward"
_CELL_FORWARD, _CELL_BACKWARD = "jaxlstm_cell_forward", "jaxlstm_cell_backward"
# The single-state cells: the kernel's ``cell`` attribute and the floats it saves per unit and step.
_CELLS = {"gru": (1, 4), "rnn": (2, 1)}
_F32 = jnp.dtype(jnp.float32)


@functools.cache
def _load() -> str | None:
    """Loads and registers the kernel; ``None`` on success, else why not."""
    spec = importlib.util.find_spec("jaxlstm._lstm_cpu")
    if spec is None or spec.origin is None:
        return "the compiled kernel jaxlstm/_lstm_cpu*.so is not built (reinstall with a C++ compiler)"
    try:
        lib = ctypes.CDLL(spec.origin)
        jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.JaxlstmLstmForward), platform="cpu")
        jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.JaxlstmLstmBackward), platform="cpu")
        jax.ffi.register_ffi_target(_CELL_FORWARD, jax.ffi.pycapsule(lib.JaxlstmCellForward), platform="cpu")
        jax.ffi.register_ffi_target(_CELL_BACKWARD, jax.ffi.pycapsule(lib.JaxlstmCellBackward), platform="cpu")
    except (OSError, AttributeError) as e:
        return f"the compiled kernel {spec.origin} did not load: {e}"
    return None


@functools.cache
def build_id() -> str:
    """A short hash of the built kernel (``""`` where it is not built): tuning's choices
    between it and the XLA path are keyed on it, so a rebuilt kernel is measured afresh."""
    spec = importlib.util.find_spec("jaxlstm._lstm_cpu")
    if spec is None or spec.origin is None:
        return ""
    try:
        with open(spec.origin, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()[:12]
    except OSError:
        return ""


def load_error() -> str | None:
    """Why the kernel is unavailable, or ``None`` when it is built and loaded."""
    return _load()


def available() -> bool:
    """The kernel is built and registered with XLA."""
    return _load() is None


def enabled() -> bool:
    """Available and not turned off with ``JAXLSTM_KERNEL=0``."""
    return os.environ.get("JAXLSTM_KERNEL", "1") != "0" and available()


def applies(params, mm_dtype, acc_dtype, *, batch: int, steps: int, h_mask, zoneout, checkpoint_every=None) -> bool:
    """Whether the kernel can run this :func:`jaxlstm.lstm` (``LSTMParams``), :func:`jaxlstm.gru`
    or :func:`jaxlstm.rnn` call (its fused path); :func:`jaxlstm.tuning.kernel_path` then says
    whether it should."""
    plain = not isinstance(params, LSTMParams) or (not params.is_variant and params.w_hr is None)
    return (
        enabled()
        and jax.default_backend() == "cpu"
        and jnp.dtype(mm_dtype) == _F32
        and jnp.dtype(acc_dtype) == _F32
        and all(w is None or w.dtype == _F32 for w in params)
        and plain
        and h_mask is None
        and zoneout is None
        and checkpoint_every is None
        and batch * steps > 0
        and not mesh_active()
    )


def chosen(
    cell: str, params, mm_dtype, acc_dtype, *, backward: str, batch: int, steps: int, h_mask, zoneout,
    checkpoint_every=None,
) -> bool:  # fmt: skip
    """Whether a ``cell`` (``"lstm"``, ``"gru"``, ``"rnn"``) call runs on the kernel: on its fused
    path (``backward="fused"``) where the kernel :func:`applies` and :func:`jaxlstm.tuning.kernel_path`
    chose it for the shape."""
    from . import tuning

    return (
        backward == "fused"
        and applies(
            params,
            mm_dtype,
            acc_dtype,
            batch=batch,
            steps=steps,
            h_mask=h_mask,
            zoneout=zoneout,
            checkpoint_every=checkpoint_every,
        )  # fmt: skip
        and tuning.kernel_path(batch, params.w_ih.shape[0], params.w_hh.shape[0], steps, cell=cell)
    )


def _flags(steps: Steps | None, T: int, B: int):
    """``valid`` and ``reset`` ``[T, B]`` as bytes: the step counts; it starts from the reset state."""
    lengths, mask, resets = (None, None, None) if steps is None else steps
    valid = counted_steps(T, B, lengths, mask)
    reset = jnp.zeros((T, B), bool) if resets is None else resets & valid
    return valid.astype(jnp.uint8), reset.astype(jnp.uint8)


def _require() -> None:
    error = _load()
    if error is not None:
        raise RuntimeError(error)


def _forward(batch_major: bool, params: LSTMParams, carry0, xs, steps, reset_carry, save: bool):
    _require()
    B, T = xs.shape[:2] if batch_major else xs.shape[1::-1]
    H = params.w_hh.shape[0]
    b = jnp.zeros((4 * H,), _F32) if params.b is None else params.b
    valid, reset = _flags(steps, T, B)
    out = lambda *shape: jax.ShapeDtypeStruct(shape, _F32)
    saved = (out(T, B, 4 * H), out(T, B, H), out(T, B, H)) if save else (out(0), out(0), out(0))
    ys = out(B, T, H) if batch_major else out(T, B, H)
    call = jax.ffi.ffi_call(_FORWARD, (ys, out(B, H), out(B, H), *saved), vmap_method="sequential")
    ys, h, c, acts, cs, h_in = call(
        xs, params.w_ih, b, params.w_hh, *carry0, *reset_carry, valid, reset, batch_major=np.int32(batch_major)
    )
    return ys, (h, c), (acts, cs, h_in, valid, reset)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def kernel_lstm(batch_major: bool, params: LSTMParams, carry0, xs, steps: Steps | None, reset_carry):
    """:func:`jaxlstm._fused.fused_lstm`'s contract on the kernel: ``xs [T, B, D]``
    (``[B, T, D]`` with ``batch_major``), ``carry0`` / ``reset_carry`` ``(h [B, H], c [B, H])``,
    ``steps`` time-major (``[T, B]`` flags). Returns ``(ys, (h, c))``, ``ys`` ``[T, B, H]``
    (``[B, T, H]``)."""
    ys, carry, _ = _forward(batch_major, params, carry0, xs, steps, reset_carry, save=False)
    return ys, carry


def _kernel_fwd(batch_major, params, carry0, xs, steps, reset_carry):
    ys, carry, saved = _forward(batch_major, params, carry0, xs, steps, reset_carry, save=True)
    return (ys, carry), (params, carry0[1], reset_carry[1], xs, saved)


def _kernel_bwd(batch_major, res, cotangents):
    params, c0, c_reset, xs, (acts, cs, h_in, valid, reset) = res
    dys, (dh, dc) = cotangents
    D, H = xs.shape[-1], cs.shape[-1]
    B = c0.shape[0]
    out = lambda *shape: jax.ShapeDtypeStruct(shape, _F32)
    shapes = (out(*xs.shape), out(D, 4 * H), out(H, 4 * H), out(4 * H), *(out(B, H) for _ in range(4)))
    call = jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="sequential")
    dxs, dw_ih, dw_hh, db, dh0, dc0, dh_reset, dc_reset = call(
        xs,
        params.w_ih,
        params.w_hh,
        acts,
        cs,
        h_in,
        c0,
        c_reset,
        valid,
        reset,
        dys,
        dh,
        dc,
        batch_major=np.int32(batch_major),
    )
    grads = LSTMParams(dw_ih, dw_hh, None if params.b is None else db, None)
    return grads, (dh0, dc0), dxs, None, (dh_reset, dc_reset)


kernel_lstm.defvjp(_kernel_fwd, _kernel_bwd)


def _cell_forward(kind: str, batch_major: bool, params, h0, xs, steps, h_reset, save: bool):
    _require()
    cell, saved_per_unit = _CELLS[kind]
    B, T = xs.shape[:2] if batch_major else xs.shape[1::-1]
    H = params.w_hh.shape[0]
    b_hn = params.b_hn if kind == "gru" else jnp.zeros((0,), _F32)
    valid, reset = _flags(steps, T, B)
    out = lambda *shape: jax.ShapeDtypeStruct(shape, _F32)
    saved = (out(T, B, saved_per_unit * H), out(T, B, H)) if save else (out(0), out(0))
    ys = out(B, T, H) if batch_major else out(T, B, H)
    call = jax.ffi.ffi_call(_CELL_FORWARD, (ys, out(B, H), *saved), vmap_method="sequential")
    ys, h, acts, h_in = call(
        xs, params.w_ih, params.b, b_hn, params.w_hh, h0, h_reset, valid, reset,
        batch_major=np.int32(batch_major), cell=np.int32(cell),
    )  # fmt: skip
    return ys, h, (acts, h_in, valid, reset)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def kernel_cell(kind: str, batch_major: bool, params, h0, xs, steps: Steps | None, h_reset):
    """:func:`jaxlstm._fused_gru.fused_cell`'s contract on the kernel, for ``kind`` ``"gru"``
    (``GRUParams``) or ``"rnn"`` (``RNNParams``): ``xs [T, B, D]`` (``[B, T, D]`` with
    ``batch_major``), ``h0`` / ``h_reset`` ``[B, H]``, ``steps`` time-major. Returns
    ``(ys, h)``, ``ys`` ``[T, B, H]`` (``[B, T, H]``)."""
    ys, h, _ = _cell_forward(kind, batch_major, params, h0, xs, steps, h_reset, save=False)
    return ys, h


def _cell_fwd(kind, batch_major, params, h0, xs, steps, h_reset):
    ys, h, saved = _cell_forward(kind, batch_major, params, h0, xs, steps, h_reset, save=True)
    return (ys, h), (params, xs, saved)


def _cell_bwd(kind, batch_major, res, cotangents):
    params, xs, (acts, h_in, valid, reset) = res
    dys, dh = cotangents
    cell, _ = _CELLS[kind]
    (D, GH), H = params.w_ih.shape, params.w_hh.shape[0]
    B = dh.shape[0]
    out = lambda *shape: jax.ShapeDtypeStruct(shape, _F32)
    shapes = (out(*xs.shape), out(D, GH), out(H, GH), out(GH), out(H if kind == "gru" else 0), out(B, H), out(B, H))
    call = jax.ffi.ffi_call(_CELL_BACKWARD, shapes, vmap_method="sequential")
    dxs, dw_ih, dw_hh, db, db_hn, dh0, dh_reset = call(
        xs, params.w_ih, params.w_hh, acts, h_in, valid, reset, dys, dh,
        batch_major=np.int32(batch_major), cell=np.int32(cell),
    )  # fmt: skip
    grads = type(params)(dw_ih, dw_hh, db, db_hn) if kind == "gru" else type(params)(dw_ih, dw_hh, db)
    return grads, dh0, dxs, None, dh_reset


kernel_cell.defvjp(_cell_fwd, _cell_bwd)
