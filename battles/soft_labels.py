"""Soft labels for learners that only take hard classes: a checked table-level wrapper of
:func:`battles.labels.expand_targets` (the one expansion, which models/lgbm.py uses).

A battle with soft labels ``(soft_a, soft_b, soft_tie)`` becomes three rows, one per class, each
weighted by that class's probability times the row's ``weight``. The weighted log loss of a model on
the expanded rows equals its cross-entropy against the soft labels on the original rows, so
LightGBM (or any ``sample_weight`` learner) trains on pseudo-labels exactly. Hard-labelled rows
stay one row each. Deep stages use a KL loss on ``label_matrix`` instead.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from battles.labels import SOFT_COLUMNS, expand_targets, has_labels, label_matrix, row_weights, soft_mask

def expand_soft_labels(battles: pd.DataFrame, min_weight: float = 0.0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """``(expanded battles, y, sample_weight)``; ``expanded['row']`` points back at the input row.

    Soft rows give up to three rows (classes whose weight is <= ``min_weight`` are left out); rows
    without soft labels need hard labels. Soft labels must be non-negative and sum to 1 (1e-3).
    """
    soft = soft_mask(battles)
    base_w = row_weights(battles)
    if (~soft).any() and not has_labels(battles):
        raise ValueError(f"{int((~soft).sum())} row(s) have neither soft labels nor hard label columns")
    probs = battles.loc[soft, SOFT_COLUMNS].to_numpy(dtype=float) if soft.any() else np.zeros((0, 3))
    if (probs < 0).any() or (np.abs(probs.sum(axis=1) - 1) > 1e-3).any():
        bad = np.flatnonzero(soft)[np.flatnonzero((probs < 0).any(axis=1) | (np.abs(probs.sum(axis=1) - 1) > 1e-3))[0]]
        raise ValueError(f"row {bad} (id {battles['id'].iat[bad]!r}): soft labels must be >= 0 and sum to 1, "
                         f"got {battles[SOFT_COLUMNS].iloc[bad].tolist()}")
    row, y, w = expand_targets(label_matrix(battles), base_w)  # the one expansion, in battles.labels
    keep = w > min_weight
    row, y, w = row[keep], y[keep], w[keep]
    expanded = battles.iloc[row].reset_index(drop=True)
    expanded["row"] = row
    return expanded, y.astype(np.int64), w
