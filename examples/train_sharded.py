"""A jaxlstm.linen LSTM classifier trained data-parallel over every device, on real data.

    # 8 simulated CPU devices on one machine (the flag must be set before JAX starts):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m examples.train_sharded
    python -m examples.train_sharded --quick          # a smoke run, seconds

Data: the UEA multivariate classification sets that aeon ships in its package
(:mod:`examples.uea`): JapaneseVowels (12 channels, lengths 7-29, 9 classes; the
default) or BasicMotions. Variable lengths go to the LSTM as ``seq_lengths``.

Model: ``jaxlstm.linen.LSTM`` (bidirectional), a mean over each sequence's valid
steps, a dense read-out; Adam (optax). Data parallel with ``jax.sharding``: a
``Mesh`` of all devices on one ``'data'`` axis, each batch ``NamedSharding(mesh,
P('data'))``, the parameters and optimiser state replicated, the train step one
``jax.jit`` under ``jax.set_mesh``: XLA partitions it, and the only communication
is the all-reduce of the gradients after the time loops (``tests/test_sharding.py``
inspects the compiled HLO). No code here knows how many devices there are beyond
the batch size being a multiple of it.

Checkpoint: the trained state is saved with Orbax, restored into the same
shardings and checked to give identical test predictions.

Multi-host: start one process per host with the same command and
``--distributed``, which calls ``jax.distributed.initialize()`` (on a cluster
scheduler such as SLURM or Cloud TPU it reads the coordinator from the
environment; elsewhere set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``). The mesh then spans every process's devices; each process
loads the data, feeds its own slice of each global batch
(``jax.make_array_from_process_local_data``) and must see the same checkpoint
directory (a shared file system or a bucket).

Writes ``train_sharded_<dataset>.json`` to ``--out`` and the checkpoint to
``--checkpoint-dir`` (default ``<out>/checkpoint_<dataset>``, untracked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlstm.linen as jl
from examples import cpu_record, optional, uea


class Classifier(nn.Module):
    """``(xs [B, T, C], lengths [B]) -> logits [B, K]``."""

    num_classes: int
    hidden: int = 64
    num_layers: int = 1
    dropout: float = 0.0

    @nn.compact
    def __call__(self, xs, lengths, deterministic: bool = True):
        ys, _ = jl.LSTM(self.hidden, num_layers=self.num_layers, bidirectional=True, dropout=self.dropout)(
            xs, seq_lengths=lengths, deterministic=deterministic
        )
        valid = (jnp.arange(xs.shape[1])[None, :] < lengths[:, None]).astype(ys.dtype)
        pooled = (ys * valid[..., None]).sum(1) / jnp.maximum(valid.sum(1, keepdims=True), 1.0)
        return nn.Dense(self.num_classes)(pooled)


def _global_batch(mesh: Mesh, arrays, index):
    """Rows ``index`` (the global batch) of each array, as one array sharded over
    ``'data'`` built from this process's slice of them (the whole batch on one host)."""
    sharding = NamedSharding(mesh, P("data"))
    n, procs, me = len(index), jax.process_count(), jax.process_index()
    local = index[me * n // procs : (me + 1) * n // procs]
    return tuple(jax.make_array_from_process_local_data(sharding, a[local], (n,) + a.shape[1:]) for a in arrays)


def _padded_index(n: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """``arange(n)`` padded (with row 0) to a multiple of ``multiple``, and the weights (0 on padding)."""
    total = -(-n // multiple) * multiple
    index = np.concatenate([np.arange(n), np.zeros(total - n, np.int64)])
    return index, (np.arange(total) < n).astype(np.float32)


def train(args, data: uea.Dataset, mesh: Mesh) -> dict[str, Any]:
    n_dev = mesh.devices.size
    batch = args.batch - args.batch % n_dev or n_dev  # a multiple of the device count
    model = Classifier(len(data.classes), args.hidden, args.num_layers, args.dropout)
    key = jax.random.key(args.seed)
    tr, te = data.train, data.test
    replicated = NamedSharding(mesh, P())
    params = model.init(key, jnp.asarray(tr.xs[:1]), jnp.asarray(tr.lengths[:1]))["params"]
    steps_per_epoch = len(tr.labels) // batch
    tx = optax.adamw(optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch), weight_decay=1e-4)
    state = jax.device_put({"params": params, "opt": tx.init(params)}, replicated)

    def loss_fn(params, xs, lengths, labels, dropout_key):
        logits = model.apply({"params": params}, xs, lengths, False, rngs={"dropout": dropout_key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(state, xs, lengths, labels, dropout_key):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], xs, lengths, labels, dropout_key)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

    @jax.jit
    def predict(params, xs, lengths):
        return jnp.argmax(model.apply({"params": params}, xs, lengths), -1)

    test_index, test_weight = _padded_index(len(te.labels), n_dev)
    test_batch = _global_batch(mesh, (te.xs, te.lengths), test_index)

    def accuracy(params):
        pred = np.asarray(predict(params, *test_batch))
        return float(((pred == te.labels[test_index]) * test_weight).sum() / test_weight.sum()), pred

    rng = np.random.default_rng(args.seed)
    losses, t0 = [], time.perf_counter()
    with jax.set_mesh(mesh):
        for _ in range(args.epochs):
            order = rng.permutation(len(tr.labels))
            for i in range(steps_per_epoch):
                xs, lengths, labels = _global_batch(
                    mesh, (tr.xs, tr.lengths, tr.labels), order[i * batch : (i + 1) * batch]
                )
                key, sub = jax.random.split(key)
                state, loss = step(state, xs, lengths, labels, sub)
            losses.append(float(loss))
        jax.block_until_ready(state)
        wall = time.perf_counter() - t0
        acc, pred = accuracy(state["params"])
        restored = _checkpoint_roundtrip(state, os.path.abspath(args.checkpoint_dir))
        acc2, pred2 = accuracy(restored["params"])
    same = bool(np.array_equal(pred, pred2))
    return {
        "dataset": data.name,
        "devices": n_dev,
        "global_batch": batch,
        "test_accuracy": acc,
        "n_test": len(te.labels),
        "train_wall_s": wall,
        "steps": args.epochs * steps_per_epoch,
        "steps_per_s": args.epochs * steps_per_epoch / wall,
        "final_loss": losses[-1],
        "restored_test_accuracy": acc2,
        "restored_predictions_identical": same,
        "params_sharding": str(jax.tree.leaves(restored["params"])[0].sharding),
    }


def _checkpoint_roundtrip(state, path: str):
    """Saves ``state`` with Orbax and restores it into the same shapes, dtypes and shardings."""
    ocp = optional("orbax.checkpoint")
    if os.path.exists(path) and jax.process_index() == 0:
        shutil.rmtree(path)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, state)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return ckpt.restore(path, abstract)


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="JapaneseVowels", choices=sorted(uea.LOADERS))
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="global batch, rounded down to a multiple of the devices")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.0, help="between LSTM layers")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    ap.add_argument(
        "--checkpoint-dir", default=None, help="default <out>/checkpoint_<dataset> (shared by every host if multi-host)"
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 epochs, hidden 8")
    ap.add_argument(
        "--out",
        default=os.path.join("examples", "runs"),
        help="untracked by default; the committed results: --out examples/results",
    )
    args = ap.parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    if args.quick:
        args.epochs, args.hidden = 2, 8
    os.makedirs(args.out, exist_ok=True)
    args.checkpoint_dir = args.checkpoint_dir or os.path.join(args.out, f"checkpoint_{args.dataset}")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    data = uea.load(args.dataset)
    result = train(args, data, mesh)
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("out", "checkpoint_dir")}
    result["cpu"] = cpu_record()
    print(
        f"{result['dataset']}: test accuracy {result['test_accuracy']:.4f} on {result['n_test']} series, "
        f"{result['devices']} devices, {result['train_wall_s']:.1f} s ({result['steps_per_s']:.1f} steps/s), "
        f"restored checkpoint identical: {result['restored_predictions_identical']}"
    )
    if jax.process_index() == 0:
        with open(os.path.join(args.out, f"train_sharded_{args.dataset}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
