"""Slow, obvious reference implementations: a Python loop over the textbook equations.

Written against an array module ``xp`` (``numpy`` for values, ``jax.numpy`` for
autodiff), one sequence at a time, so that masking and reversal are plain slicing.
"""

import numpy as np


def _sigmoid(xp, z):
    return 1.0 / (1.0 + xp.exp(-z))


def _same(a):
    return a


def lstm_step_ref(xp, params, h, c, x, operand=_same, gate_fn=None, act_fn=None):
    """Textbook step: each gate is σ(W·[h, x] + b) with W = [W_hh; W_ih] for its slice.
    ``operand`` is applied to every matmul operand (a bfloat16 rounding, say);
    ``gate_fn`` / ``act_fn`` replace σ / tanh."""
    sig = gate_fn or (lambda z: _sigmoid(xp, z))
    tanh = act_fn or xp.tanh
    H = params["w_ih"].shape[1] // 4
    hx = operand(xp.concatenate([h, x], axis=-1))

    def gate(k):
        w = xp.concatenate([params["w_hh"][:, k * H : (k + 1) * H], params["w_ih"][:, k * H : (k + 1) * H]], axis=0)
        w = operand(w)
        return hx @ w + params["b"][k * H : (k + 1) * H]

    i = sig(gate(0))
    f = sig(gate(1))
    g = tanh(gate(2))
    o = sig(gate(3))
    c = f * c + i * g
    h = o * tanh(c)
    if params.get("w_hr") is not None:
        h = h @ params["w_hr"]
    return h, c


def run_ref(xp, step, xs, h0, c0, lengths=None, reverse=False, mask=None, resets=None):
    """Runs ``step(h, c, x) -> (h, c)`` over batch-major ``xs [B, T, D]`` sequence by sequence.

    ``c0`` may be ``None`` for cells without a cell state. Only the steps ``t <
    lengths[b]`` with ``mask[b, t]`` run (in reverse order with ``reverse``); the
    others output zeros. ``resets[b, t]`` marks a step that starts a new segment:
    each segment runs on its own from zeros (the reset state), read backwards with
    ``reverse``; the first segment run starts from ``(h0, c0)`` unless a reset
    opens it.
    Returns ``(ys [B, T, R], hT [B, R], cT [B, H] or None)``.
    """
    B, T, _ = xs.shape
    R = h0.shape[-1]
    ys_all, hs, cs = [], [], []
    for b in range(B):
        L = T if lengths is None else int(lengths[b])
        steps = [t for t in range(L) if mask is None or bool(mask[b, t])]
        # split the counted steps into segments at the resets, then run each one
        segments = []
        for t in steps:
            if not segments or (resets is not None and bool(resets[b, t])):
                segments.append([])
            segments[-1].append(t)
        if reverse:
            segments = [seg[::-1] for seg in segments[::-1]]
        h, c = h0[b], None if c0 is None else c0[b]
        out = {}
        for i, seg in enumerate(segments):
            if i > 0 or (not reverse and resets is not None and bool(resets[b, seg[0]])):
                h, c = 0 * h0[b], None if c0 is None else 0 * c0[b]
            for t in seg:
                h, c = step(h, c, xs[b, t])
                out[t] = h
        zero = xp.zeros((R,), dtype=xs.dtype)
        ys_all.append(xp.stack([out.get(t, zero) for t in range(T)]) if T else xp.zeros((0, R), xs.dtype))
        hs.append(h)
        cs.append(c)
    return xp.stack(ys_all), xp.stack(hs), None if c0 is None else xp.stack(cs)


def lstm_ref(
    xp, params, xs, h0, c0, lengths=None, reverse=False, mask=None, resets=None, operand=_same, gate_fn=None,
    act_fn=None,
):  # fmt: skip
    def step(h, c, x):
        return lstm_step_ref(xp, params, h, c, x, operand, gate_fn, act_fn)

    return run_ref(xp, step, xs, h0, c0, lengths, reverse, mask, resets)


def as_dict(params):
    return {k: (None if v is None else np.asarray(v, np.float64)) for k, v in params._asdict().items()}


def rnn_ref(xp, params, xs, h0, lengths=None, reverse=False, mask=None, resets=None, operand=_same, act_fn=None):
    tanh = act_fn or xp.tanh

    def step(h, _c, x):
        o = operand
        return tanh(o(x) @ o(params["w_ih"]) + o(h) @ o(params["w_hh"]) + params["b"]), None

    ys, h, _ = run_ref(xp, step, xs, h0, None, lengths, reverse, mask, resets)
    return ys, h


def gru_ref(
    xp, params, xs, h0, lengths=None, reverse=False, mask=None, resets=None, operand=_same, gate_fn=None, act_fn=None,
    reset_after=True,
):  # fmt: skip
    """PyTorch's GRU equations, gate by gate (order r, z, n); ``gate_fn`` / ``act_fn`` replace σ / tanh;
    ``reset_after=False``: the reset gate before the recurrent matmul, ``tanh(x W_n + b_n + (r h) U_n + b_hn)``."""
    sig = gate_fn or (lambda z: _sigmoid(xp, z))
    tanh = act_fn or xp.tanh
    H = h0.shape[-1]
    W = lambda w, k: operand(w[:, k * H : (k + 1) * H])
    b = lambda k: params["b"][k * H : (k + 1) * H]

    def step(h, _c, x):
        hm, xm = operand(h), operand(x)
        r = sig(xm @ W(params["w_ih"], 0) + hm @ W(params["w_hh"], 0) + b(0))
        z = sig(xm @ W(params["w_ih"], 1) + hm @ W(params["w_hh"], 1) + b(1))
        if reset_after:
            n = tanh(xm @ W(params["w_ih"], 2) + b(2) + r * (hm @ W(params["w_hh"], 2) + params["b_hn"]))
        else:
            n = tanh(xm @ W(params["w_ih"], 2) + b(2) + operand(r * h) @ W(params["w_hh"], 2) + params["b_hn"])
        return (1 - z) * n + z * h, None

    ys, h, _ = run_ref(xp, step, xs, h0, None, lengths, reverse, mask, resets)
    return ys, h


def _layer_norm(xp, v, gain, bias, eps=1e-5):
    mean = v.mean(-1, keepdims=True)
    var = ((v - mean) ** 2).mean(-1, keepdims=True)
    return (v - mean) / xp.sqrt(var + eps) * gain + bias


def lstm_variant_step_ref(xp, params, h, c, x, gate_fn=None, act_fn=None):
    """The published equations, gate by gate, with a dense recurrent kernel
    ``params["w_hh_dense"]`` (a multi-head kernel's block-diagonal expansion).

    Peepholes (Gers & Schmidhuber 2000): ``c(t-1)`` into i and f, ``c(t)`` into o.
    Layer norm (Ba et al. 2016, §3.1): ``LN(x·W_x) + LN(h·W_h) + b`` and
    ``h = o ∗ tanh(LN(c(t)))``."""
    H = params["w_ih"].shape[1] // 4
    a, r = x @ params["w_ih"], h @ params["w_hh_dense"]
    ln = params.get("ln_gates")
    z = (_layer_norm(xp, a, ln[0], ln[1]) + _layer_norm(xp, r, ln[2], ln[3])) if ln is not None else a + r
    if params.get("b") is not None:
        z = z + params["b"]
    p = params.get("peephole")
    zi, zf, zg, zo = (z[..., k * H : (k + 1) * H] for k in range(4))
    sig = gate_fn or (lambda z: _sigmoid(xp, z))
    tanh = act_fn or xp.tanh
    i = sig(zi + (0 if p is None else p[0] * c))
    f = sig(zf + (0 if p is None else p[1] * c))
    c = f * c + i * tanh(zg)
    o = sig(zo + (0 if p is None else p[2] * c))
    lc = params.get("ln_cell")
    h = o * tanh(c if lc is None else _layer_norm(xp, c, lc[0], lc[1]))
    if params.get("w_hr") is not None:
        h = h @ params["w_hr"]
    return h, c


def block_diagonal_ref(w_hh):
    """``[k, R/k, 4H/k]`` blocks -> the dense ``[R, 4H]`` kernel, by loops: head j's
    rows feed gate column ``g * H + j * H/k + u`` from its block's column ``g * H/k + u``."""
    w = np.asarray(w_hh, np.float64)
    k, rk, gk = w.shape
    hk = gk // 4
    dense = np.zeros((k * rk, 4 * k * hk))
    for j in range(k):
        for g in range(4):
            dense[j * rk : (j + 1) * rk, g * k * hk + j * hk : g * k * hk + (j + 1) * hk] = w[j][
                :, g * hk : (g + 1) * hk
            ]
    return dense


def lstm_variant_ref(
    xp, params, xs, h0, c0, lengths=None, reverse=False, mask=None, resets=None, gate_fn=None, act_fn=None
):
    def step(h, c, x):
        return lstm_variant_step_ref(xp, params, h, c, x, gate_fn, act_fn)

    return run_ref(xp, step, xs, h0, c0, lengths, reverse, mask, resets)
