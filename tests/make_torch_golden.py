"""Generates the PyTorch golden vectors in tests/golden/ (run with the `torch` extra).

    python tests/make_torch_golden.py

Each .npz holds an nn.LSTM state_dict (keys ``sd.<name>``), the inputs, the
outputs, h_n, c_n, and the gradients of a fixed weighted loss with respect to
the input (``dx``) and to every parameter (``grad.<name>``). The parity tests
read these files, so they run without torch; with torch installed they also run
live (see ``torch_lstm_run``).
"""

import os

import numpy as np

CONFIGS = {
    "l1_uni": dict(num_layers=1, bidirectional=False, proj_size=0, lengths=None, init=False),
    "l2_bi_packed": dict(num_layers=2, bidirectional=True, proj_size=0, lengths=[5, 2, 4], init=False),
    "l3_proj_packed_init": dict(num_layers=3, bidirectional=False, proj_size=3, lengths=[3, 5, 1], init=True),
    "l2_bi_proj_packed_init": dict(num_layers=2, bidirectional=True, proj_size=3, lengths=[1, 5, 4], init=True),
    "l1_bi_init": dict(num_layers=1, bidirectional=True, proj_size=0, lengths=None, init=True),
}
B, T, D, H = 3, 5, 4, 6


def loss_weights(shape_out, shape_h, shape_c, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(shape_out).astype(np.float32),
        rng.standard_normal(shape_h).astype(np.float32),
        rng.standard_normal(shape_c).astype(np.float32),
    )


def torch_lstm_run(sd, x, lengths, h0, c0, cfg):
    """Runs torch.nn.LSTM with the given weights; returns (out, h_n, c_n, dx, grads)."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    m = torch.nn.LSTM(
        D,
        H,
        num_layers=cfg["num_layers"],
        bidirectional=cfg["bidirectional"],
        proj_size=cfg["proj_size"],
        batch_first=True,
    )
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    xt = torch.from_numpy(np.array(x)).requires_grad_(True)
    state = None if h0 is None else (torch.from_numpy(np.array(h0)), torch.from_numpy(np.array(c0)))
    if lengths is None:
        out, (h_n, c_n) = m(xt, state)
    else:
        packed = pack_padded_sequence(xt, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = m(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    wo, wh, wc = loss_weights(out.shape, h_n.shape, c_n.shape)
    loss = (out * torch.from_numpy(wo)).sum() + (h_n * torch.from_numpy(wh)).sum() + (c_n * torch.from_numpy(wc)).sum()
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in m.named_parameters()}
    return out.detach().numpy(), h_n.detach().numpy(), c_n.detach().numpy(), xt.grad.numpy(), grads


def main():
    import torch

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
    os.makedirs(here, exist_ok=True)
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        m = torch.nn.LSTM(
            D,
            H,
            num_layers=cfg["num_layers"],
            bidirectional=cfg["bidirectional"],
            proj_size=cfg["proj_size"],
            batch_first=True,
        )
        sd = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
        rng = np.random.default_rng(i)
        x = rng.standard_normal((B, T, D)).astype(np.float32)
        dirs = 2 if cfg["bidirectional"] else 1
        R = cfg["proj_size"] or H
        h0 = c0 = None
        if cfg["init"]:
            h0 = rng.standard_normal((cfg["num_layers"] * dirs, B, R)).astype(np.float32)
            c0 = rng.standard_normal((cfg["num_layers"] * dirs, B, H)).astype(np.float32)
        out, h_n, c_n, dx, grads = torch_lstm_run(sd, x, cfg["lengths"], h0, c0, cfg)
        arrays = {f"sd.{k}": v for k, v in sd.items()}
        arrays.update({f"grad.{k}": v for k, v in grads.items()})
        arrays.update(x=x, out=out, h_n=h_n, c_n=c_n, dx=dx)
        if cfg["lengths"] is not None:
            arrays["lengths"] = np.asarray(cfg["lengths"], np.int32)
        if h0 is not None:
            arrays.update(h0=h0, c0=c0)
        np.savez(os.path.join(here, f"lstm_{name}.npz"), **arrays)
        print("wrote", name)


def make_gru_rnn_golden():
    """One-layer nn.GRU / nn.RNN goldens with packed lengths and an initial state."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
    for i, (name, cls) in enumerate([("gru", torch.nn.GRU), ("rnn", torch.nn.RNN)]):
        torch.manual_seed(10 + i)
        m = cls(D, H, batch_first=True)
        rng = np.random.default_rng(10 + i)
        x = rng.standard_normal((B, T, D)).astype(np.float32)
        h0 = rng.standard_normal((1, B, H)).astype(np.float32)
        w_out = rng.standard_normal((B, T, H)).astype(np.float32)
        lengths = [5, 2, 4]
        xt = torch.from_numpy(x).requires_grad_(True)
        packed = pack_padded_sequence(xt, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        out, h_n = m(packed, torch.from_numpy(h0))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        (out * torch.from_numpy(w_out)).sum().backward()
        arrays = {f"sd.{k}": v.detach().numpy().copy() for k, v in m.state_dict().items()}
        arrays.update(
            x=x,
            h0=h0,
            w_out=w_out,
            lengths=np.asarray(lengths, np.int32),
            out=out.detach().numpy(),
            h_n=h_n.detach().numpy(),
            dx=xt.grad.numpy(),
        )
        np.savez(os.path.join(here, f"{name}_packed_init.npz"), **arrays)
        print("wrote", name)


if __name__ == "__main__":
    main()
    make_gru_rnn_golden()
