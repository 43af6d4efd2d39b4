"""Weight layouts of other libraries <-> jaxlstm params.

nn.GRU and nn.RNN use the same key names (gate order r, z, n for the GRU).

PyTorch ``nn.LSTM`` (``from_torch`` / ``to_torch``), for layer ``k`` and suffix
``""`` (forward) or ``"_reverse"`` (backward direction)::

    weight_ih_l{k}{sfx}  [4H, D_in]  ->  w_ih = weight_ih.T          [D_in, 4H]
    weight_hh_l{k}{sfx}  [4H, R]     ->  w_hh = weight_hh.T          [R, 4H]
    bias_ih_l{k}{sfx} + bias_hh_l{k}{sfx}  [4H]  ->  b               [4H]
    weight_hr_l{k}{sfx}  [P, H]      ->  w_hr = weight_hr.T          [H, P]

Both use gate order i, f, g, o, so no gate is permuted. ``to_torch`` writes the
summed bias into ``bias_ih_*`` and zeros into ``bias_hh_*``. torch is imported
only inside these functions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .conv import ConvLSTMParams
from .params import GATE_ORDER, GRUParams, LSTMParams, RNNParams

__all__ = [
    "from_cudnn",
    "from_flax",
    "from_haiku",
    "from_keras",
    "from_torch",
    "keras_kwargs",
    "to_cudnn",
    "to_flax",
    "to_haiku",
    "to_keras",
    "to_torch",
]

_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().float().numpy() if str(v.dtype) == "torch.bfloat16" else v.detach().cpu().numpy()
    return np.asarray(v)


def _state_dict(module_or_state_dict) -> dict[str, np.ndarray]:
    sd = module_or_state_dict.state_dict() if hasattr(module_or_state_dict, "state_dict") else module_or_state_dict
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected an nn.LSTM or its state_dict, got {type(module_or_state_dict).__name__}")
    return {k: _to_numpy(v) for k, v in sd.items()}


def _layout(sd: Mapping[str, Any], kind: str):
    """Infers ``(num_layers, num_directions, has_proj)`` from the keys."""
    found = {}
    for k in sd:
        m = _KEY.match(k)
        if m is None:
            raise ValueError(f"unexpected key {k!r} in a {kind} state_dict")
        found.setdefault((int(m.group(2)), 1 if m.group(3) else 0), set()).add(m.group(1))
    if not found:
        raise ValueError(f"the {kind} state_dict has no weight_ih_l0 key")
    L = max(l for l, _ in found) + 1
    dirs = max(d for _, d in found) + 1
    has_proj = any("weight_hr" in v for v in found.values())
    for l in range(L):
        for d in range(dirs):
            sfx = "_reverse" if d else ""
            need = ["weight_ih", "weight_hh"] + (["weight_hr"] if has_proj else [])
            for name in need:
                if name not in found.get((l, d), set()):
                    raise ValueError(f"the {kind} state_dict is missing {name}_l{l}{sfx}")
    return L, dirs, has_proj


def _kind(module_or_state_dict, sd) -> str:
    name = type(module_or_state_dict).__name__
    if name in ("LSTM", "GRU", "RNN"):
        return name.lower()
    if any(k.startswith("weight_hr") for k in sd):
        return "lstm"
    if "weight_hh_l0" not in sd:
        raise ValueError("the state_dict is missing weight_hh_l0")
    rows, cols = sd["weight_hh_l0"].shape
    kinds = {4: "lstm", 3: "gru", 1: "rnn"}
    if rows % cols or rows // cols not in kinds:
        raise ValueError(f"cannot tell LSTM/GRU/RNN from weight_hh_l0 of shape {(rows, cols)}")
    return kinds[rows // cols]


def _layer_params(kind, sd, sfx, has_proj, dtype):
    a = lambda name: jnp.asarray(sd[name + sfx], dtype)
    w_ih, w_hh = a("weight_ih").T, a("weight_hh").T
    G = w_ih.shape[1]
    has_bias = "bias_ih" + sfx in sd or "bias_hh" + sfx in sd
    zeros = jnp.zeros((G,), dtype)
    b_ih = a("bias_ih") if "bias_ih" + sfx in sd else zeros
    b_hh = a("bias_hh") if "bias_hh" + sfx in sd else zeros
    if kind == "lstm":  # bias=False: a layer without bias (b=None)
        return LSTMParams(w_ih, w_hh, b_ih + b_hh if has_bias else None, a("weight_hr").T if has_proj else None)
    if kind == "rnn":
        return RNNParams(w_ih, w_hh, b_ih + b_hh)
    return _gru_params(w_ih, w_hh, b_ih, b_hh)


def _gru_params(w_ih, w_hh, b_ih, b_hh) -> GRUParams:
    """A GRU with input and recurrent biases (gate order r, z, n; PyTorch's and, reordered, Keras'):
    the r and z biases summed into ``b``, ``b_hn`` apart because r multiplies it."""
    H = w_hh.shape[0]
    return GRUParams(w_ih, w_hh, b_ih + b_hh.at[2 * H :].set(0), b_hh[2 * H :])


def from_torch(module_or_state_dict, *, dtype=jnp.float32):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (or a ``state_dict``) -> ``params[layer][direction]``.

    ``num_layers``, ``bidirectional`` and ``proj_size`` are inferred from the keys
    (and the kind from the module's class, or from the shape of ``weight_hh_l0``);
    an LSTM built with ``bias=False`` gives ``b=None`` (a layer without bias), a
    GRU or RNN zero biases. LSTM params feed
    ``jaxlstm.lstm_stack``; each ``params[l][d]`` feeds ``jaxlstm.lstm``,
    ``jaxlstm.gru`` or ``jaxlstm.rnn``. nn.RNN's ``nonlinearity='relu'``
    is not supported (jaxlstm's Elman RNN is tanh).
    """
    sd = _state_dict(module_or_state_dict)
    if getattr(module_or_state_dict, "nonlinearity", "tanh") != "tanh":
        raise ValueError("only nn.RNN(nonlinearity='tanh') is supported")
    kind = _kind(module_or_state_dict, sd)
    L, dirs, has_proj = _layout(sd, "nn." + kind.upper())
    return tuple(
        tuple(_layer_params(kind, sd, f"_l{l}" + ("_reverse" if d else ""), has_proj, dtype) for d in range(dirs))
        for l in range(L)
    )


def to_torch(params, *, as_numpy: bool = False) -> dict[str, Any]:
    """``params[layer][direction]`` (or any pytree of that structure, such as its
    gradients) -> an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` ``state_dict`` of torch
    tensors (numpy arrays with ``as_numpy=True``), in the params' dtype. Load it
    with ``load_state_dict``. The whole bias goes to ``bias_ih_*``; ``bias_hh_*``
    is zero except a GRU's n slice, which holds ``b_hn``. An LSTM without bias
    (``b=None``) writes no bias keys: it loads into ``nn.LSTM(..., bias=False)``."""
    out = {}
    for l, layer in enumerate(params):
        for d, p in enumerate(layer):
            if isinstance(p, LSTMParams):
                _plain(p, f"params[{l}][{d}]", "torch.nn.LSTM")
            sfx = f"_l{l}" + ("_reverse" if d else "")
            out["weight_ih" + sfx] = np.asarray(p.w_ih).T
            out["weight_hh" + sfx] = np.asarray(p.w_hh).T
            if p.b is not None:
                b = np.asarray(p.b)
                out["bias_ih" + sfx] = b
                b_hh = np.zeros_like(b)
                if isinstance(p, GRUParams):
                    b_hh[2 * (b.shape[0] // 3) :] = np.asarray(p.b_hn)
                out["bias_hh" + sfx] = b_hh
            if isinstance(p, LSTMParams) and p.w_hr is not None:
                out["weight_hr" + sfx] = np.asarray(p.w_hr).T
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}
    if as_numpy:
        return out
    try:
        import torch  # pyright: ignore[reportMissingImports]  (the optional torch extra)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            'to_torch needs PyTorch: pip install "jaxlstm[torch]" (or pip install torch); '
            "to_torch(..., as_numpy=True) gives the same weights as NumPy arrays without it"
        ) from e

    def tensor(v):  # torch reads no numpy bfloat16: go through float32
        if v.dtype == jnp.bfloat16:
            return torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(v.copy())

    return {k: tensor(v) for k, v in out.items()}


# ---------------------------------------------------------------------------
# flax.linen: LSTMCell / OptimizedLSTMCell (same names) and jaxlstm.linen.LSTMCell
#
#   ii, if, ig, io: {"kernel": [D, H]}              (input side, no bias)
#   hi, hf, hg, ho: {"kernel": [H, H], "bias": [H]} (hidden side, with bias)
#   ->  w_ih = [ii | if | ig | io],  w_hh = [hi | hf | hg | ho],  b = [bi | bf | bg | bo]


def _plain(p: LSTMParams, name: str, target: str) -> None:
    """Only a plain LSTM has a counterpart in the other libraries."""
    if p.is_variant:
        raise ValueError(
            f"{name} is an LSTM variant (peepholes, layer norm or heads), which {target} does not have; "
            "only plain LSTMs convert"
        )


def _unwrap(params):
    """Strips ``{"params": ...}`` and ``nn.RNN``'s ``{"cell": ...}`` wrappers."""
    while isinstance(params, Mapping) and len(params) == 1 and next(iter(params)) in ("params", "cell"):
        params = params[next(iter(params))]
    return params


def from_flax(params, *, as_variables: bool = False):
    """Params of ``flax.linen.LSTMCell`` / ``OptimizedLSTMCell`` (or of
    ``jaxlstm.linen.LSTMCell``), optionally wrapped in ``{"params": ...}`` or
    ``nn.RNN``'s ``{"cell": ...}``, -> ``LSTMParams``; of ``flax.linen.ConvLSTMCell``
    -> ``ConvLSTMParams`` (gate order i, g, f, o and its forget gate's +1 moved into ``b``).

    With ``as_variables=True`` it returns the variables of
    ``nn.RNN(jaxlstm.linen.LSTMCell(H))`` instead,
    ``{"params": {"cell": {"w_ih", "w_hh", "b"}}}``, ready for its ``apply``.
    """
    if as_variables:
        lp = from_flax(params)
        return {"params": {"cell": {k: v for k, v in lp._asdict().items() if v is not None}}}
    p = _unwrap(params)
    if not isinstance(p, Mapping):
        raise TypeError(f"expected a flax params dict, got {type(params).__name__}")
    if {"w_ih", "w_hh"} <= set(p):
        return LSTMParams(p["w_ih"], p["w_hh"], p.get("b"), p.get("w_hr"))
    if set(p) == {"ih", "hh"}:  # flax.linen.ConvLSTMCell
        return _from_flax_conv(p)
    need = [f"{side}{g}" for side in "ih" for g in GATE_ORDER]
    missing = [k for k in need if k not in p]
    if missing:
        raise ValueError(f"flax LSTM params are missing {missing} (found {sorted(p)})")
    cat = lambda ks, leaf: jnp.concatenate([p[k][leaf] for k in ks], axis=-1)
    return LSTMParams(cat(need[:4], "kernel"), cat(need[4:], "kernel"), cat(need[4:], "bias"))


# flax.linen.ConvLSTMCell: two Convs "ih" and "hh" of 4H features, each with a bias, gate order i, g, f, o,
# and 1 added to the forget gate inside the cell (as Haiku's LSTM); jaxlstm's one bias holds both and the 1.
_IGFO = (0, 2, 1, 3)  # jaxlstm's i, f, g, o from i, g, f, o (flax's ConvLSTMCell, Haiku's LSTM), and back
FORGET_BIAS_INSIDE = 1.0  # what those two cells add to the forget gate's pre-activation themselves


def _from_igfo(w, b):
    """Gate blocks i, g, f, o -> i, f, g, o, the cell's own +1 on the forget gate moved into the bias."""
    H = b.shape[-1] // 4
    return _blocks(w, _IGFO, 4), _blocks(b, _IGFO, 4).at[H : 2 * H].add(FORGET_BIAS_INSIDE)


def _to_igfo(w, b):
    """The inverse of ``_from_igfo``."""
    H = b.shape[-1] // 4
    return _blocks(w, _IGFO, 4), _blocks(b.at[H : 2 * H].add(-FORGET_BIAS_INSIDE), _IGFO, 4)


def _hn_block(params: GRUParams):
    """``b_hn`` as a ``[3H]`` bias in jaxlstm's gate order: zeros on r and z, ``b_hn`` on n."""
    H = params.w_hh.shape[0]
    return jnp.concatenate([jnp.zeros((2 * H,), params.b.dtype), params.b_hn])


def _reset_before_bias(params: GRUParams):
    """The one bias of a reset-before GRU (Keras' ``reset_after=False``, ``hk.GRU``), jaxlstm's gate order:
    there ``b_hn`` is plain bias, added to the n block of ``b``."""
    return params.b + _hn_block(params)


def _from_flax_conv(p) -> ConvLSTMParams:
    w_ih, w_hh = jnp.asarray(p["ih"]["kernel"]), jnp.asarray(p["hh"]["kernel"])
    if w_ih.ndim < 3 or w_hh.ndim != w_ih.ndim:
        raise ValueError(f"flax ConvLSTMCell kernels must be [*kernel_size, in, 4H]; got {w_ih.shape}, {w_hh.shape}")
    H = w_ih.shape[-1] // 4
    bias = jnp.zeros((4 * H,), w_ih.dtype)
    for side in ("ih", "hh"):
        if p[side].get("bias") is not None:
            bias = bias + jnp.asarray(p[side]["bias"])
    w_ih, b = _from_igfo(w_ih, bias)
    return ConvLSTMParams(w_ih, _blocks(w_hh, _IGFO, 4), b)


def _to_flax_conv(params: ConvLSTMParams) -> dict:
    H = params.w_ih.shape[-1] // 4
    b = jnp.zeros((4 * H,), params.w_ih.dtype) if params.b is None else params.b
    w_ih, b = _to_igfo(params.w_ih, b)
    return {
        "ih": {"kernel": w_ih, "bias": b},
        "hh": {"kernel": _blocks(params.w_hh, _IGFO, 4), "bias": jnp.zeros_like(b)},
    }


def to_flax(params) -> dict:
    """``LSTMParams`` (no projection) -> the param dict of ``flax.linen.LSTMCell`` /
    ``OptimizedLSTMCell`` (without the ``{"params": ...}`` wrapper); ``ConvLSTMParams`` -> that of
    ``flax.linen.ConvLSTMCell`` (its gate order i, g, f, o; the bias in ``ih``, less the 1 its cell adds
    to the forget gate). The recurrent convolution must keep the state's shape, so the flax cell needs
    ``strides=1`` and ``padding="SAME"``."""
    if isinstance(params, ConvLSTMParams):
        return _to_flax_conv(params)
    _plain(params, "params", "flax's LSTM cells")
    if params.w_hr is not None:
        raise ValueError("flax's LSTM cells have no projection: params.w_hr must be None")
    bias = jnp.zeros(params.w_ih.shape[-1:], params.w_ih.dtype) if params.b is None else params.b
    w_ih, w_hh, b = (jnp.split(a, 4, axis=-1) for a in (params.w_ih, params.w_hh, bias))
    out = {f"i{g}": {"kernel": w_ih[j]} for j, g in enumerate(GATE_ORDER)}
    out.update({f"h{g}": {"kernel": w_hh[j], "bias": b[j]} for j, g in enumerate(GATE_ORDER)})
    return out


# ---------------------------------------------------------------------------
# cuDNN flat weights, as used by jax.experimental.rnn: for each layer and
# direction W_ih [4H, D_in] then W_hh [4H, H], all flattened; then for each
# b_ih [4H] and b_hh [4H]. Gate order i, f, g, o, as in PyTorch.


def from_cudnn(weights, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False):
    """A ``jax.experimental.rnn`` / cuDNN flat weight vector -> ``params[layer][direction]``."""
    from jax.experimental import rnn as jrnn

    expected = jrnn.get_num_params_in_lstm(input_size, hidden_size, num_layers, bidirectional)
    if weights.shape != (expected,):
        raise ValueError(
            f"weights must have shape ({expected},) for input_size={input_size}, "
            f"hidden_size={hidden_size}, num_layers={num_layers}, bidirectional={bidirectional}; "
            f"got {tuple(weights.shape)}"
        )
    w_ih, w_hh, b_ih, b_hh = jrnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers, bidirectional)
    dirs = 2 if bidirectional else 1
    # The same per-layer mapping as from_torch (it is PyTorch's layout), on jnp arrays: jit- and grad-friendly.
    sd = lambda i: {"weight_ih": w_ih[i], "weight_hh": w_hh[i], "bias_ih": b_ih[i], "bias_hh": b_hh[i]}
    flat = [_layer_params("lstm", sd(i), "", False, weights.dtype) for i in range(num_layers * dirs)]
    return tuple(tuple(flat[l * dirs : (l + 1) * dirs]) for l in range(num_layers))


def to_cudnn(params) -> jax.Array:
    """``params[layer][direction]`` (no projection) -> the flat cuDNN weight vector of
    ``jax.experimental.rnn.lstm`` (bias whole in ``b_ih``, zeros in ``b_hh``)."""
    flat = [p for layer in params for p in layer]
    for p in flat:
        _plain(p, "params", "cuDNN's LSTM")
    if any(p.w_hr is not None for p in flat):
        raise ValueError("cuDNN LSTM weights have no projection: every w_hr must be None")
    ws = [jnp.ravel(w.T) for p in flat for w in (p.w_ih, p.w_hh)]
    zeros = [jnp.zeros(p.w_ih.shape[-1:], p.w_ih.dtype) for p in flat]
    bs = [b for p, z in zip(flat, zeros, strict=True) for b in (z if p.b is None else p.b, z)]
    return jnp.concatenate(ws + bs)


# ---------------------------------------------------------------------------
# Keras 3 (keras.layers.LSTM / GRU, any backend): get_weights() / set_weights() lists.
#   LSTM: kernel [D, 4H], recurrent_kernel [H, 4H], bias [4H]; gate order i, f, c, o: jaxlstm's i, f, g, o.
#   GRU (reset_after=True, the default): kernel [D, 3H], recurrent_kernel [H, 3H], bias [2, 3H] (input and
#   recurrent biases); gate order z, r, h, against jaxlstm's r, z, n. Both compute
#   h = z * h(t-1) + (1 - z) * tanh(x W_h + b_ih_h + r * (h U_h + b_hh_h)).
# Keras' defaults (activation tanh, recurrent_activation sigmoid) are jaxlstm's gates.

_KERAS_TO_GRU = (1, 0, 2)  # jaxlstm's block j is Keras' block _KERAS_TO_GRU[j] (and back: the same swap)


def _blocks(a, order, n):
    parts = jnp.split(jnp.asarray(a), n, axis=-1)
    return jnp.concatenate([parts[j] for j in order], axis=-1)


# Keras' activation names -> the JAX functions that compute the same (Keras 3's definitions).
_KERAS_ACTIVATIONS = {
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "hard_sigmoid": jax.nn.hard_sigmoid,
    "linear": lambda z: z,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "softplus": jax.nn.softplus,
    "softsign": jax.nn.soft_sign,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "exponential": jnp.exp,
}


def keras_kwargs(layer) -> dict:
    """What a Keras 3 layer computes beyond its weights, as the keyword arguments of the jaxlstm call that
    computes the same: ``jaxlstm.lstm`` / ``gru`` / ``rnn`` / ``conv_lstm(convert.from_keras(layer), xs,
    **convert.keras_kwargs(layer))``.

    * the nonlinearities: ``gate_activation`` from ``recurrent_activation`` and ``activation`` (a
      ``SimpleRNN``: ``activation`` only); a Keras activation with no JAX counterpart here raises a
      ``ValueError`` naming it;
    * a ``GRU``'s ``reset_after`` (``False``: the reset-before form);
    * a ``ConvLSTM1D/2D/3D``'s ``strides``, ``padding`` and ``dilation`` (Keras' ``dilation_rate``).

    Examples:
      >>> from jaxlstm import convert
      >>> layer = keras.layers.GRU(32, activation="relu", reset_after=False)  # doctest: +SKIP
      >>> ys, h = jaxlstm.gru(convert.from_keras(layer), xs, **convert.keras_kwargs(layer))  # doctest: +SKIP
    """
    cell = getattr(layer, "cell", layer)
    out = {}
    for attr, key in (("recurrent_activation", "gate_activation"), ("activation", "activation")):
        fn = getattr(cell, attr, None)
        if fn is None:
            continue
        name = getattr(fn, "__name__", repr(fn))
        if name not in _KERAS_ACTIVATIONS:
            raise ValueError(
                f"the Keras layer's {attr} is {name!r}, which has no JAX counterpart here (known: "
                f"{sorted(_KERAS_ACTIVATIONS)}): pass the JAX function as {key}= yourself"
            )
        out[key] = _KERAS_ACTIVATIONS[name]
    if getattr(cell, "reset_after", None) is not None:
        out["reset_after"] = bool(cell.reset_after)
    if getattr(cell, "strides", None) is not None and type(layer).__name__.startswith("ConvLSTM"):
        out.update(strides=tuple(cell.strides), padding=str(cell.padding), dilation=tuple(cell.dilation_rate))
    return out


def _keras_weights(layer_or_weights) -> tuple[list, str | None, bool | None]:
    """The weight list, the layer's class name and its ``reset_after`` (``None`` for a bare list)."""
    if hasattr(layer_or_weights, "get_weights"):
        layer = layer_or_weights
        cell = getattr(layer, "cell", layer)
        return list(layer.get_weights()), type(layer).__name__, getattr(cell, "reset_after", None)
    if isinstance(layer_or_weights, (list, tuple)):
        return list(layer_or_weights), None, None
    raise TypeError(
        f"expected a keras.layers.LSTM / GRU (or its get_weights() list), got {type(layer_or_weights).__name__}"
    )


def from_keras(layer_or_weights, *, dtype=jnp.float32):
    """A Keras 3 ``keras.layers.LSTM``, ``GRU`` or ``ConvLSTM1D/2D/3D`` (or its ``get_weights()`` list) ->
    ``LSTMParams``, ``GRUParams`` or ``ConvLSTMParams``. The weights only: what else the layer computes
    (activations, a GRU's ``reset_after``, a ConvLSTM's strides, padding and dilation) is
    ``keras_kwargs(layer)``, to pass to the call. A GRU with ``reset_after=False`` (its ``bias`` is
    ``[3H]``) gives params for ``jaxlstm.gru(..., reset_after=False)``; a layer built with
    ``use_bias=False`` gives an LSTM without bias, a GRU with zero biases."""
    weights, name, reset_after = _keras_weights(layer_or_weights)
    if len(weights) not in (2, 3):
        raise ValueError(f"expected [kernel, recurrent_kernel(, bias)] from Keras, got {len(weights)} arrays")
    kernel, rec = (jnp.asarray(_to_numpy(w), dtype) for w in weights[:2])
    bias = None if len(weights) == 2 else jnp.asarray(_to_numpy(weights[2]), dtype)
    if kernel.ndim in (3, 4, 5) and name in (None, "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D", "ConvLSTMCell"):
        # Keras' ConvLSTM: [*kernel_size, in, 4H] kernels, gate order i, f, c, o: jaxlstm's layout as it is
        H = kernel.shape[-1] // 4
        if rec.ndim != kernel.ndim or rec.shape[-2:] != (H, 4 * H) or (bias is not None and bias.shape != (4 * H,)):
            raise ValueError(f"Keras ConvLSTM kernel / recurrent_kernel / bias shapes {kernel.shape} / {rec.shape} / "
                             f"{None if bias is None else bias.shape} do not match")  # fmt: skip
        return ConvLSTMParams(kernel, rec, bias)
    if kernel.ndim != 2 or rec.ndim != 2 or rec.shape[1] != kernel.shape[1] or rec.shape[1] % rec.shape[0]:
        raise ValueError(f"Keras kernel / recurrent_kernel shapes {kernel.shape} / {rec.shape} do not match")
    H, gates = rec.shape[0], rec.shape[1] // rec.shape[0]
    if gates == 4 and name in (None, "LSTM", "LSTMCell"):
        if bias is not None and bias.shape != (4 * H,):
            raise ValueError(f"a Keras LSTM bias must have shape ({4 * H},), got {bias.shape}")
        return LSTMParams(kernel, rec, bias)
    if gates != 3 or name not in (None, "GRU", "GRUCell"):
        raise ValueError(f"a Keras {name or 'layer'} with recurrent_kernel {rec.shape} is neither an LSTM nor a GRU")
    if reset_after is False or (bias is not None and bias.shape == (3 * H,)):
        # reset-before: tanh(x W + (r * h) U + b), one bias (jaxlstm.gru(..., reset_after=False))
        bias = jnp.zeros((3 * H,), dtype) if bias is None else bias
        if bias.shape != (3 * H,):
            raise ValueError(f"a Keras GRU with reset_after=False has a bias of shape ({3 * H},), got {bias.shape}")
        w_ih, w_hh, b = (_blocks(a, _KERAS_TO_GRU, 3) for a in (kernel, rec, bias))
        return GRUParams(w_ih, w_hh, b, jnp.zeros((H,), dtype))
    if bias is None:
        bias = jnp.zeros((2, 3 * H), dtype)
    if bias.shape != (2, 3 * H):
        raise ValueError(f"a Keras GRU bias must have shape (2, {3 * H}), got {bias.shape}")
    w_ih, w_hh, b_ih, b_hh = (_blocks(a, _KERAS_TO_GRU, 3) for a in (kernel, rec, bias[0], bias[1]))
    return _gru_params(w_ih, w_hh, b_ih, b_hh)


def to_keras(params, *, reset_after: bool = True) -> list[np.ndarray]:
    """``LSTMParams`` (plain, no projection) or ``GRUParams`` -> the list for a Keras 3 ``LSTM`` / ``GRU``
    layer's ``set_weights`` (an LSTM without bias: a layer built with ``use_bias=False``; the GRU: the r
    and z biases in the input half of ``bias``; with ``reset_after=False``, params of
    ``jaxlstm.gru(..., reset_after=False)`` for a layer built so, one ``bias [3H]``); ``ConvLSTMParams``
    -> a ``ConvLSTM1D/2D/3D``'s."""
    if not isinstance(reset_after, bool):
        raise TypeError(f"reset_after must be a bool, got {type(reset_after).__name__} {reset_after!r}")
    if isinstance(params, ConvLSTMParams):
        return [np.asarray(w) for w in params if w is not None]
    if isinstance(params, GRUParams) and not reset_after:
        ws = (params.w_ih, params.w_hh, _reset_before_bias(params))
        return [np.asarray(_blocks(a, _KERAS_TO_GRU, 3)) for a in ws]
    if isinstance(params, GRUParams):
        b_rec = _hn_block(params)  # r, z: all in the input half
        bias = jnp.stack([_blocks(params.b, _KERAS_TO_GRU, 3), _blocks(b_rec, _KERAS_TO_GRU, 3)])
        ws = [_blocks(params.w_ih, _KERAS_TO_GRU, 3), _blocks(params.w_hh, _KERAS_TO_GRU, 3), bias]
        return [np.asarray(w) for w in ws]
    if not isinstance(params, LSTMParams):
        raise TypeError(f"expected LSTMParams, GRUParams or ConvLSTMParams, got {type(params).__name__}")
    _plain(params, "params", "Keras' LSTM")
    if params.w_hr is not None:
        raise ValueError("Keras' LSTM has no projection: params.w_hr must be None")
    ws = [params.w_ih, params.w_hh] + ([] if params.b is None else [params.b])
    return [np.asarray(w) for w in ws]


# ---------------------------------------------------------------------------
# Haiku (dm-haiku): hk.LSTM is one hk.Linear over [x, h] ("<module>/linear": w [D + H, 4H], b [4H]) with
# gate order i, g, f, o and 1 added to the forget gate's pre-activation inside the cell (sonnet's forget
# bias); jaxlstm's bias carries that 1. hk.GRU ("<module>": w_i [D, 3H], w_h [H, 3H], b [3H], gate order
# z, r, a) applies the reset gate before its recurrent matmul (tanh(x W_a + (r * h) U_a + b_a)): jaxlstm's
# gru(..., reset_after=False). Its update gate is the other way round, h(t) = (1 - z) h + z a, where
# jaxlstm's (PyTorch's) is h(t) = (1 - z') n + z' h: z' = 1 - z = σ(-pre), so the z columns change sign.


def _haiku_module(params, suffix: str, name: str | None, fields=("w", "b")) -> tuple[str, Mapping]:
    if not isinstance(params, Mapping):
        raise TypeError(f"expected Haiku params (a dict of modules), got {type(params).__name__}")
    if set(fields) <= set(params):
        return suffix, params
    keys = [k for k in params if (k == name if name is not None else k == suffix or k.endswith("/" + suffix))]
    if len(keys) != 1:
        which = f"name={name!r}" if name is not None else f"a module ending in {suffix!r}"
        raise ValueError(f"expected one Haiku module with {which} (pass name=), found {sorted(params)}")
    return keys[0], params[keys[0]]


def _haiku_gru_blocks(a, to_haiku: bool = False):
    """Haiku's z, r, a blocks -> jaxlstm's r, z, n, the z block's sign flipped (``to_haiku``: back)."""
    first, second, third = jnp.split(jnp.asarray(a), 3, axis=-1)
    if to_haiku:  # jaxlstm's r, z', n -> Haiku's z = -z', r, a
        return jnp.concatenate([-second, first, third], axis=-1)
    return jnp.concatenate([second, -first, third], axis=-1)


def _is_haiku_gru(params, name) -> bool:
    if not isinstance(params, Mapping):
        return False
    if {"w_i", "w_h", "b"} <= set(params):
        return True
    if name is not None:
        return isinstance(params.get(name), Mapping) and {"w_i", "w_h"} <= set(params[name])
    return any(k == "gru" or k.endswith("/gru") for k in params) and not any(k.endswith("lstm/linear") for k in params)


def from_haiku(params, *, name: str | None = None):
    """The params of ``hk.LSTM`` (the whole Haiku params dict, with one ``.../lstm/linear`` module or the
    one named ``name``; or that module's ``{"w", "b"}``) -> ``LSTMParams``; of ``hk.GRU`` (one ``.../gru``
    module, the one named ``name``, or its ``{"w_i", "w_h", "b"}``) -> ``GRUParams`` for
    ``jaxlstm.gru(..., reset_after=False)``: Haiku's GRU is the reset-before form, and its update gate
    is the complement of jaxlstm's (the z columns change sign; see the module notes). Haiku's LSTM adds 1
    to the forget gate inside; jaxlstm's ``b`` holds it, so the two compute the same function."""
    if _is_haiku_gru(params, name):
        _, m = _haiku_module(params, "gru", name, fields=("w_i", "w_h", "b"))
        w_i, w_h, b = (jnp.asarray(m[k]) for k in ("w_i", "w_h", "b"))
        H = w_h.shape[0] if w_h.ndim == 2 else 0
        if H == 0 or w_h.shape != (H, 3 * H) or w_i.ndim != 2 or w_i.shape[1] != 3 * H or b.shape != (3 * H,):
            raise ValueError(f"hk.GRU's params must be w_i [D, 3H], w_h [H, 3H], b [3H]; got {w_i.shape}, "
                             f"{w_h.shape}, {b.shape}")  # fmt: skip
        w_ih, w_hh, bias = (_haiku_gru_blocks(a) for a in (w_i, w_h, b))
        return GRUParams(w_ih, w_hh, bias, jnp.zeros((H,), bias.dtype))
    _, m = _haiku_module(params, "lstm/linear", name)
    w, b = jnp.asarray(m["w"]), jnp.asarray(m["b"])
    H = w.shape[1] // 4 if w.ndim == 2 else 0
    if H == 0 or w.shape[1] != 4 * H or b.shape != (4 * H,) or w.shape[0] <= H:
        raise ValueError(f"hk.LSTM's linear must be w [D + H, 4H], b [4H]; got {w.shape}, {b.shape}")
    D = w.shape[0] - H
    w, b = _from_igfo(w, b)
    return LSTMParams(w[:D], w[D:], b)


def to_haiku(params, *, name: str | None = None) -> dict:
    """``LSTMParams`` (plain, no projection) -> ``{name: {"w", "b"}}``, the params of ``hk.LSTM`` named
    ``name`` (default ``"lstm/linear"``, its default module name) for ``transform(...).apply``;
    ``GRUParams`` of ``jaxlstm.gru(..., reset_after=False)`` -> ``{name: {"w_i", "w_h", "b"}}`` of
    ``hk.GRU`` (default ``"gru"``; ``b_hn``, plain bias in that form, joins ``b``)."""
    if isinstance(params, GRUParams):
        ws = (params.w_ih, params.w_hh, _reset_before_bias(params))
        w_i, w_h, b = (_haiku_gru_blocks(a, to_haiku=True) for a in ws)
        return {name or "gru": {"w_i": w_i, "w_h": w_h, "b": b}}
    name = name or "lstm/linear"
    if not isinstance(params, LSTMParams):
        raise TypeError(f"expected LSTMParams or GRUParams, got {type(params).__name__}")
    _plain(params, "params", "hk.LSTM")
    if params.w_hr is not None:
        raise ValueError("hk.LSTM has no projection: params.w_hr must be None")
    H = params.w_hh.shape[0]
    b = jnp.zeros((4 * H,), params.w_ih.dtype) if params.b is None else params.b
    w, b = _to_igfo(jnp.concatenate([params.w_ih, params.w_hh]), b)
    return {name: {"w": w, "b": b}}
