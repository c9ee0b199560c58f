"""Turn a list of feature blocks into LightGBM's model matrix, in both A/B orders.

Blocks whose output depends only on the battle (and label-free ``prepare``) are computed once per
distinct battle and cached in memory, so a five-fold run does the text work once, not five times.
Blocks marked ``fold_dependent`` (TF-IDF) are recomputed after every ``fit``.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

from features.base import FeatureBlock, SidedFeatures


def battle_keys(battles: pd.DataFrame) -> list[str]:
    return [
        hashlib.blake2b(json.dumps([list(p), list(a), list(b)]).encode("utf-8", "surrogatepass"),
                        digest_size=12).hexdigest()
        for p, a, b in zip(battles["prompt"], battles["response_a"], battles["response_b"])
    ]


class FeatureMatrix:
    """Holds the blocks of one feature set and produces ``(X, X_swapped, names)`` for battles."""

    def __init__(self, blocks: list[FeatureBlock]):
        self.blocks = blocks
        self._cache: list[dict] = [{} for _ in blocks]

    def _sided(self, i: int, block: FeatureBlock, battles: pd.DataFrame, keys: list[str]) -> SidedFeatures:
        if getattr(block, "fold_dependent", False):
            return block.transform(battles)
        cache = self._cache[i]
        missing = [j for j, k in enumerate(keys) if k not in cache]
        if missing:
            fresh = block.transform(battles.iloc[missing])
            for r, j in enumerate(missing):
                cache[keys[j]] = (fresh.a[r], fresh.b[r], fresh.shared[r])
            cache["__meta__"] = (fresh.names, fresh.shared_names, fresh.combine)
        names, shared_names, combine = cache["__meta__"]
        rows = [cache[k] for k in keys]
        return SidedFeatures(names, np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                             shared_names, np.array([r[2] for r in rows]).reshape(len(rows), -1), combine)

    def warm(self, battles: pd.DataFrame) -> None:
        """Compute and cache every fold-independent block for these battles (done once per run)."""
        keys = battle_keys(battles)
        for i, block in enumerate(self.blocks):
            if not getattr(block, "fold_dependent", False):
                self._sided(i, block, battles, keys)

    def build(self, battles: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
        keys = battle_keys(battles)
        straight, swapped, names = [], [], []
        for i, block in enumerate(self.blocks):
            sided = self._sided(i, block, battles, keys)
            x, n = sided.matrix(prefix=f"{block.name}_")
            xs, _ = sided.swapped().matrix(prefix=f"{block.name}_")
            straight.append(x)
            swapped.append(xs)
            names += n
        return np.hstack(straight), np.hstack(swapped), names
