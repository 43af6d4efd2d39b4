"""UEA multivariate classification sets that ``aeon`` ships inside its package (no download).

    >>> from examples import uea
    >>> data = uea.load("JapaneseVowels")            # doctest: +SKIP
    >>> data.train.xs.shape, data.train.lengths.max() # doctest: +SKIP
    ((270, 29, 12), 26)

Variable lengths stay variable: each split is zero-padded on the right to the
longest series of either split and comes with ``lengths``, for ``seq_lengths``
(no resampling, no truncation). Channels are standardised with the training
split's mean and standard deviation over its valid steps only; padding stays 0.
Labels are integers ``0..K-1`` in the order of ``classes``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from examples import optional

# name -> aeon loader; these are the multivariate classification sets in aeon's package data.
LOADERS = {"JapaneseVowels": "load_japanese_vowels", "BasicMotions": "load_basic_motions"}


class Split(NamedTuple):
    xs: np.ndarray  # [N, T, C] float32, zero past each length
    lengths: np.ndarray  # [N] int32
    labels: np.ndarray  # [N] int32


class Dataset(NamedTuple):
    name: str
    train: Split
    test: Split
    classes: tuple

    @property
    def num_channels(self) -> int:
        return self.train.xs.shape[-1]


def _series(X) -> list[np.ndarray]:
    """aeon gives ``[N, C, T]`` (equal length) or a list of ``[C, T_i]``: a list of ``[T_i, C]``."""
    return [np.asarray(x, np.float64).T for x in X]


def load(name: str) -> Dataset:
    """One of :data:`LOADERS`, both splits, padded with lengths and standardised."""
    if name not in LOADERS:
        raise ValueError(f"name must be one of {sorted(LOADERS)} (bundled with aeon), got {name!r}")
    loader = getattr(optional("aeon.datasets"), LOADERS[name])
    raw = {split: loader(split=split) for split in ("train", "test")}
    series = {split: _series(X) for split, (X, _) in raw.items()}
    classes = tuple(sorted({str(y) for _, ys in raw.values() for y in ys}))
    T = max(len(s) for ss in series.values() for s in ss)
    valid = np.concatenate(series["train"], axis=0)  # every valid training step, [sum T_i, C]
    mean, std = valid.mean(axis=0), valid.std(axis=0) + 1e-8

    def split(name: str) -> Split:
        ss = series[name]
        xs = np.zeros((len(ss), T, ss[0].shape[1]), np.float32)
        for i, s in enumerate(ss):
            xs[i, : len(s)] = (s - mean) / std
        lengths = np.array([len(s) for s in ss], np.int32)
        labels = np.array([classes.index(str(y)) for y in raw[name][1]], np.int32)
        return Split(xs, lengths, labels)

    return Dataset(name, split("train"), split("test"), classes)
