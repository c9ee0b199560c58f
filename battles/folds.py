"""The one fold builder: grouped by prompt, stratified by label, fixed by a seed.

The same prompt appears in several battles (people ask the arena the same thing); those battles
must fall in the same fold or validation scores are optimistic. Folds are computed once per run,
saved with it, and every stage reads them from there.

Stratification class of a row: the most probable class of its target (``argmax`` of
:func:`battles.labels.label_matrix`): its hard label, or, for a row with a soft label (a
pseudo-labelled or distilled row), the class its soft label favours (ties go to the first of
``[a, b, tie]``). For a file of hard labels that is exactly the label, so those folds do not change;
a file that mixes hard and soft-only rows gets every row in a fold, each class spread evenly.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from battles.columns import SOFT_COLUMNS
from battles.labels import has_labels, label_matrix
from battles.text import normalised


def prompt_groups(battles: pd.DataFrame) -> np.ndarray:
    """A group key per battle: a hash of the whitespace- and case-normalised prompt turns."""
    return np.array(
        [hashlib.md5(json.dumps([normalised(t) for t in p]).encode("utf-8", "surrogatepass")).hexdigest()
         for p in battles["prompt"]]
    )


def make_folds(battles: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..n_folds-1) per battle, grouped by prompt and, when the battles carry targets,
    stratified by each row's most probable class (see the module docstring)."""
    groups = prompt_groups(battles)
    n_groups = len(set(groups))
    if n_groups < n_folds:
        raise ValueError(f"only {n_groups} distinct prompts: cannot make {n_folds} grouped folds")
    folds = np.full(len(battles), -1, dtype=np.int64)
    strata = _strata(battles)
    if strata is not None:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(battles)), strata, groups)
    else:
        # GroupKFold has no shuffle before sklearn 1.6; permute group ids with the seed instead.
        rng = np.random.default_rng(seed)
        uniq = np.unique(groups)
        remap = dict(zip(uniq, rng.permutation(len(uniq))))
        splits = GroupKFold(n_splits=n_folds).split(np.zeros(len(battles)), groups=[remap[g] for g in groups])
    for k, (_, valid_idx) in enumerate(splits):
        folds[valid_idx] = k
    return folds


def _strata(battles: pd.DataFrame) -> np.ndarray | None:
    """The stratification class per row (argmax of its target), or None for a table without targets."""
    if not has_labels(battles) and not all(c in battles.columns for c in SOFT_COLUMNS):
        return None
    targets = label_matrix(battles)
    missing = np.isnan(targets).any(axis=1)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} row(s) have neither a hard nor a soft label "
                         f"(e.g. id {battles['id'].iloc[int(np.flatnonzero(missing)[0])]!r})")
    return targets.argmax(axis=1)
