"""The one fold builder: grouped by prompt, stratified by label, fixed by a seed.

The same prompt appears in several battles (people ask the arena the same thing); those battles
must fall in the same fold or validation scores are optimistic. Folds are computed once per run,
saved with it, and every stage reads them from there.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from battles.labels import has_labels, label_index
from battles.text import normalised


def prompt_groups(battles: pd.DataFrame) -> np.ndarray:
    """A group key per battle: a hash of the whitespace- and case-normalised prompt turns."""
    return np.array(
        [hashlib.md5(json.dumps([normalised(t) for t in p]).encode("utf-8", "surrogatepass")).hexdigest()
         for p in battles["prompt"]]
    )


def make_folds(battles: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> np.ndarray:
    """Fold index (0..n_folds-1) per battle, grouped by prompt and stratified by label when labelled."""
    groups = prompt_groups(battles)
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise ValueError(f"only {n_groups} distinct prompts: cannot make {n_folds} grouped folds")
    folds = np.full(len(battles), -1, dtype=np.int64)
    if has_labels(battles):
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(battles)), label_index(battles), groups)
    else:
        # GroupKFold has no shuffle before sklearn 1.6; permute group ids with the seed instead.
        rng = np.random.default_rng(seed)
        uniq = np.unique(groups)
        remap = dict(zip(uniq, rng.permutation(len(uniq))))
        splits = GroupKFold(n_splits=n_folds).split(np.zeros(len(battles)), groups=[remap[g] for g in groups])
    for k, (_, valid_idx) in enumerate(splits):
        folds[valid_idx] = k
    return folds
