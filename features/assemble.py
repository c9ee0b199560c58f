"""Turn a list of feature blocks into LightGBM's model matrix, in both A/B orders.

Blocks whose output depends only on the battle (and label-free ``prepare``) are served by a
run-level :class:`features.cache.BlockCache`: computed once per distinct battle of the run, on disk
under the run's resources so every stage using the same block (and a resumed run) shares the pass.
Blocks that declare ``fold_dependent`` (TF-IDF; :class:`features.base.FeatureBlock`) are recomputed
after every ``fit``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from features.base import FeatureBlock
from battles.keys import battle_keys
from features.cache import BlockCache


class FeatureMatrix:
    """Holds the blocks of one feature set and produces ``(X, X_swapped, names)`` for battles."""

    def __init__(self, blocks: list[FeatureBlock]):
        self.blocks = blocks
        self._caches = [None if b.fold_dependent else BlockCache(b) for b in blocks]

    def warm(self, battles: pd.DataFrame, blocks: list[FeatureBlock] | None = None) -> None:
        """Compute (or read from the run's cache) the fold-independent blocks (all, or those listed)
        for these battles."""
        keys = battle_keys(battles) if any(self._caches) else None  # once for every block
        for block, cache in zip(self.blocks, self._caches):
            if cache is not None and (blocks is None or block in blocks):
                cache.warm(battles, keys)

    def build(self, battles: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
        straight, swapped, names = [], [], []
        keys = battle_keys(battles) if any(self._caches) else None  # once for every block
        for block, cache in zip(self.blocks, self._caches):
            sided = block.transform(battles) if cache is None else cache.sided(battles, keys)
            x, n = sided.matrix(prefix=f"{block.name}_")
            xs, _ = sided.swapped().matrix(prefix=f"{block.name}_")
            straight.append(x)
            swapped.append(xs)
            names += n
        return np.hstack(straight), np.hstack(swapped), names
