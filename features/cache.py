"""Run-level cache of fold-independent feature blocks: each block's features are computed once per run.

A block whose output depends only on the battle (and on label-free ``prepare``: text statistics,
similarities, Word2Vec means, frozen-encoder embeddings) gives the same row for a battle in every
fold and every stage. :class:`BlockCache` computes it once for every distinct battle of the run and
serves any subset by row lookup; with a ``resource_dir`` the matrices are kept on disk
(``<resource_dir>/features/<block>-<key>/``: ``a.npy``, ``b.npy``, ``shared.npy``, ``meta.json``;
plain arrays, no pickles), so the stages of one run that use the same block (``length_lr``,
``lgbm_stats`` and ``lgbm_full`` all read the text statistics) and a resumed run share one pass.
The key is the block's type, its params, its prepared state (:meth:`FeatureBlock.state_key`, e.g.
the Word2Vec vectors) and a digest of the battles' texts: different data or settings never meet.

Within one run the stages share the computed matrices in memory (``StageContext.feature_memo``,
keyed like the directory); the files are read back only by a later process (a resumed run).

Battles are matched by content (the turns of prompt, A and B), so slices, concatenations and
swapped copies of the run's table all hit; a battle the cache has not seen is transformed on the
spot (prediction on new battles) and kept in memory only.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from battles.keys import BattleKey, battle_keys, texts_digest
from features.base import FeatureBlock, SidedFeatures
from kernel.files import content_key, write_json, write_npy

log = logging.getLogger(__name__)

class BlockCache:
    """The features of one fold-independent block for every battle it has seen (see module doc)."""

    def __init__(self, block: FeatureBlock):
        self.block = block
        self._index: dict[BattleKey, int] = {}
        self._parts: list[SidedFeatures] = []  # row blocks, in index order (stacked into one when read)

    def _key(self, keys: list[BattleKey]) -> str:
        key = content_key(self.block.name, self.block.params.as_dict(), self.block.state_key(), texts_digest(keys))
        return f"{self.block.name}-{key}"

    def _directory(self, key: str) -> Path | None:
        root = self.block.context.resource_dir
        return None if root is None else Path(root) / "features" / key

    def _add(self, keys: list[BattleKey], sided: SidedFeatures) -> None:
        start = len(self._index)
        self._index.update((k, start + i) for i, k in enumerate(keys))
        self._parts.append(sided)

    def _transform(self, battles: pd.DataFrame, keys: list[BattleKey], fresh: list[BattleKey]) -> SidedFeatures:
        """The block's features of the ``fresh`` battles (distinct keys), from their first rows in ``battles``."""
        first: dict[BattleKey, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        return self.block.transform(battles.iloc[[first[k] for k in fresh]])

    def warm(self, battles: pd.DataFrame, keys: list[BattleKey] | None = None) -> None:
        """Features of every distinct battle not seen yet: read from the run's cache, or computed (and saved).
        ``keys``: :func:`battle_keys` of ``battles``, when the caller has them already."""
        keys = battle_keys(battles) if keys is None else keys
        fresh = list(dict.fromkeys(k for k in keys if k not in self._index))
        if not fresh:
            return
        key = self._key(fresh)
        directory, memo = self._directory(key), self.block.context.feature_memo
        if key in memo:  # another stage of this run computed it
            sided = memo[key]
        elif directory is not None and (directory / "meta.json").exists():  # a finished earlier process (resume)
            meta = json.loads((directory / "meta.json").read_text())
            sided = SidedFeatures(meta["names"], np.load(directory / "a.npy"), np.load(directory / "b.npy"),
                                  meta["shared_names"], np.load(directory / "shared.npy"), tuple(meta["combine"]))
            log.info("features: %s for %d battles read from %s", self.block.name, len(fresh), directory)
        else:
            sided = self._transform(battles, keys, fresh)
            if directory is not None:
                for part in ("a", "b", "shared"):  # each file atomic; meta.json last marks the directory finished
                    write_npy(directory / f"{part}.npy", getattr(sided, part))
                write_json(directory / "meta.json", {"block": self.block.name, "n_battles": len(fresh),
                                                     "names": sided.names, "shared_names": sided.shared_names,
                                                     "combine": list(sided.combine)})
        memo[key] = sided
        self._add(fresh, sided)

    def sided(self, battles: pd.DataFrame, keys: list[BattleKey] | None = None) -> SidedFeatures:
        """The block's features of these battles (rows in their order); battles not seen yet are
        transformed on the spot and kept in memory only."""
        keys = battle_keys(battles) if keys is None else keys
        fresh = list(dict.fromkeys(k for k in keys if k not in self._index))
        if fresh:
            self._add(fresh, self._transform(battles, keys, fresh))
        if len(self._parts) > 1:
            parts = self._parts
            self._parts = [SidedFeatures(parts[0].names, np.vstack([p.a for p in parts]), np.vstack([p.b for p in parts]),
                                         parts[0].shared_names, np.vstack([p.shared for p in parts]), parts[0].combine)]
        rows = np.fromiter((self._index[k] for k in keys), dtype=np.int64, count=len(keys))
        s = self._parts[0]
        return SidedFeatures(s.names, s.a[rows], s.b[rows], s.shared_names, s.shared[rows], s.combine)
