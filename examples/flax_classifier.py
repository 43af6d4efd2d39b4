"""A Flax sequence classifier on a bidirectional 2-layer jaxlstm LSTM, trained with optax.

    python -m examples.flax_classifier              # flax.linen, about a minute on 2 CPU cores
    python -m examples.flax_classifier --api nnx    # the same model in flax.nnx

Data: scikit-learn's bundled handwritten digits (1797 images of 8x8, no
download), read pixel by pixel: T=64 steps of one feature each, the small cousin
of sequential MNIST. Each sequence ends at its last non-blank pixel, so lengths
vary and the model uses ``seq_lengths``.

Model: per-step linear embedding -> ``jaxlstm.linen.LSTM(64, num_layers=2,
bidirectional=True, dropout=0.1)`` -> mean over each sequence's valid steps ->
dense to 10 classes. Reports held-out test accuracy, saves the trained params
with ``flax.serialization`` and checks that the restored model predicts the same.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization
from tqdm import tqdm

import jaxlstm.linen as jl
import jaxlstm.nnx as jn


def load_digits(seed: int = 0, test_fraction: float = 0.2):
    """Pixel sequences ``[N, 64, 1]`` in [0, 1], lengths ``[N]`` and labels, split into train/test."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    xs = (d.images.reshape(-1, 64, 1) / 16.0).astype(np.float32)
    nonzero = xs[..., 0] > 0
    lengths = (64 - np.argmax(nonzero[:, ::-1], axis=1)).astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(xs))
    n_test = int(len(xs) * test_fraction)
    split = lambda idx: (xs[idx], lengths[idx], d.target[idx].astype(np.int32))
    return split(order[n_test:]), split(order[:n_test])


def masked_mean(ys, lengths):
    mask = (jnp.arange(ys.shape[-2])[None, :] < lengths[:, None]).astype(ys.dtype)[..., None]
    return (ys * mask).sum(-2) / jnp.maximum(lengths, 1).astype(ys.dtype)[:, None]


class LinenClassifier(nn.Module):
    hidden: int = 64
    embed: int = 16
    classes: int = 10
    dropout: float = 0.1

    @nn.compact
    def __call__(self, xs, lengths, deterministic=True):
        h = nn.Dense(self.embed)(xs)
        ys, _ = jl.LSTM(self.hidden, num_layers=2, bidirectional=True, dropout=self.dropout)(
            h, seq_lengths=lengths, deterministic=deterministic
        )
        return nn.Dense(self.classes)(masked_mean(ys, lengths))


class NNXClassifier(nnx.Module):
    def __init__(self, hidden=64, embed=16, classes=10, dropout=0.1, *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(1, embed, rngs=rngs)
        self.lstm = jn.LSTM(embed, hidden, num_layers=2, bidirectional=True, dropout=dropout, rngs=rngs)
        self.head = nnx.Linear(2 * hidden, classes, rngs=rngs)

    def __call__(self, xs, lengths):  # dropout follows model.train() / model.eval(), as nnx.Dropout does
        ys, _ = self.lstm(self.embed(xs), seq_lengths=lengths)
        return self.head(masked_mean(ys, lengths))


def _batches(rng, n, batch):
    idx = rng.permutation(n)
    return [idx[i : i + batch] for i in range(0, n - batch + 1, batch)]


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_linen(train, test, args):
    model = LinenClassifier(hidden=args.hidden)
    params = model.init(jax.random.key(args.seed), train[0][:2], train[1][:2])["params"]
    opt = optax.adam(args.lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, l, y, key):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, l, deterministic=False, rngs={"dropout": key})
            return _xent(logits, y), (logits.argmax(-1) == y).mean()

        (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss, acc

    def linen_step(carry, x, l, y, key):
        params, state, loss, acc = step(*carry, x, l, y, key)
        return (params, state), loss, acc

    predict = jax.jit(lambda p, x, l: model.apply({"params": p}, x, l).argmax(-1))
    params = _loop(linen_step, (params, state), train, args)[0]
    return params, predict


def train_nnx(train, test, args):
    model = NNXClassifier(hidden=args.hidden, rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, l, y):
        def loss_fn(m):
            logits = m(x, l)
            return _xent(logits, y), (logits.argmax(-1) == y).mean()

        (loss, acc), g = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, g)
        return loss, acc

    def nnx_step(carry, x, l, y, key):  # dropout keys come from the model's own rng stream
        loss, acc = step(*carry, x, l, y)
        return carry, loss, acc

    model.train()
    _loop(nnx_step, (model, optimizer), train, args)
    model.eval()
    predict = nnx.jit(lambda m, x, l: m(x, l).argmax(-1))
    # Pure nested dicts of arrays serialize like linen params.
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)), lambda params, x, l: predict(
        _with_params(model, params), x, l
    )


def _with_params(model, pure_params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure_params)
    nnx.update(model, state)
    return model


def _loop(step, carry, train, args):
    x, l, y = train
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed + 1)
    bar = tqdm(range(args.epochs), desc="epochs")
    for _ in bar:
        losses, accs = [], []
        for idx in _batches(rng, len(x), args.batch):
            key, sub = jax.random.split(key)
            carry, loss, acc = step(carry, x[idx], l[idx], y[idx], sub)
            losses.append(float(loss))
            accs.append(float(acc))
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", acc=f"{np.mean(accs):.3f}")
    return carry


def accuracy(predict, params, data, batch=256):
    x, l, y = data
    preds = np.concatenate(
        [np.asarray(predict(params, x[i : i + batch], l[i : i + batch])) for i in range(0, len(x), batch)]
    )
    return float((preds == y).mean()), preds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", choices=["linen", "nnx"], default="linen")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out",
        default=os.path.join("examples", "runs"),
        help="untracked by default; the committed results: --out examples/results",
    )
    args = ap.parse_args(argv)
    train, test = load_digits(args.seed)
    t0 = time.time()
    params, predict = (train_linen if args.api == "linen" else train_nnx)(train, test, args)
    train_s = time.time() - t0
    test_acc, preds = accuracy(predict, params, test)

    # Save, restore into a fresh template, and check the predictions are identical.
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"digits_{args.api}.msgpack")
    with open(path, "wb") as f:
        f.write(serialization.to_bytes(params))
    template = jax.tree.map(jnp.zeros_like, params)
    with open(path, "rb") as f:
        restored = serialization.from_bytes(template, f.read())
    _, preds_restored = accuracy(predict, restored, test)
    identical = bool((preds == preds_restored).all())
    result = {
        "api": args.api,
        "test_accuracy": test_acc,
        "n_train": len(train[0]),
        "n_test": len(test[0]),
        "epochs": args.epochs,
        "train_s": train_s,
        "restored_predictions_identical": identical,
    }
    with open(os.path.join(args.out, f"flax_classifier_{args.api}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"[{args.api}] test accuracy {test_acc:.4f} on {len(test[0])} held-out digits "
        f"(trained {train_s:.0f}s); restored params give identical predictions: {identical}"
    )
    return result


if __name__ == "__main__":
    main()
