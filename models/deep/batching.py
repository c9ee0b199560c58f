"""Inference batches and multi-process sharding, for both deep stages.

- :func:`length_batches`: rows sorted by length into batches of at most ``max_size`` rows (None: no
  row cap) and ``max_tokens`` padded tokens (longest first, so running out of memory shows at once).
- :func:`predict_sharded`: under a multi-process launch (``torchrun`` / ``accelerate launch``: DDP)
  every rank scores its own token-balanced shard of the rows and the shards are gathered back in row
  order on every rank, so the caller sees the full array everywhere; in one process it is a plain call.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from kernel.dist import process_group


def length_batches(lengths, max_tokens: int, max_size: int | None = None) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, longest first, each padded size <= ``max_tokens``
    and at most ``max_size`` rows (None: as many as the token budget holds); a row longer than
    ``max_tokens`` goes alone."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        too_many = max_size is not None and len(current) + 1 > max_size
        if current and (too_many or (len(current) + 1) * longest > max_tokens):
            batches.append(np.array(current))
            current = []
        current.append(i)
    if current:
        batches.append(np.array(current))
    return batches


def shard_indices(lengths, n_shards: int) -> list[np.ndarray]:
    """Split rows into ``n_shards`` with balanced length totals (longest first, to the lightest shard)."""
    lengths = np.asarray(lengths)
    shards, loads = [[] for _ in range(n_shards)], np.zeros(n_shards)
    for i in np.argsort(-lengths, kind="stable"):
        k = int(np.argmin(loads))
        shards[k].append(int(i))
        loads[k] += lengths[i]
    return [np.array(sorted(s), dtype=np.int64) for s in shards]


def battle_chars(battles: pd.DataFrame) -> np.ndarray:
    """Characters per battle: a tokenizer-free stand-in for its length, good enough to balance shards."""
    return np.array([sum(len(t) for turns in row for t in turns)
                     for row in zip(battles["prompt"], battles["response_a"], battles["response_b"])])


def predict_sharded(predict: Callable[[pd.DataFrame], np.ndarray], battles: pd.DataFrame) -> np.ndarray:
    """``predict(battles)``, split across the ranks of a process group and gathered in row order."""
    rank, size = process_group()
    if size == 1:
        return predict(battles)
    from accelerate.utils import gather_object

    shard = shard_indices(battle_chars(battles), size)[rank]
    part = predict(battles.iloc[shard].reset_index(drop=True)) if len(shard) else np.zeros((0, 3))
    pieces = gather_object([(shard, np.asarray(part, dtype=np.float64))])
    out = np.full((len(battles), 3), np.nan)
    for idx, values in pieces:
        out[idx] = values
    if np.isnan(out).any():
        raise RuntimeError("sharded prediction: some rows came back from no rank")
    return out
