"""Label order and the one swap rule every part of the stack shares.

Label order is always ``[a, b, tie]``. Swapping responses A and B swaps columns 0 and 1 of any
per-battle array (labels, probabilities, logits) and leaves the tie column alone.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from battles.columns import LABEL_COLUMNS, SIDE_PAIRS, SOFT_COLUMNS  # noqa: F401  (re-exported: label names)

CLASS_NAMES = ["a", "b", "tie"]
SWAP_PERMUTATION = [1, 0, 2]

def swap_columns(values: np.ndarray) -> np.ndarray:
    """Return ``(n, 3)`` values with the A and B columns exchanged (tie column unchanged)."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[1] != 3:
        raise ValueError(f"swap_columns expects an (n, 3) array in [a, b, tie] order, got shape {values.shape}")
    return values[:, SWAP_PERMUTATION]


def swap_battles(battles: pd.DataFrame) -> pd.DataFrame:
    """Return a copy of a battle table with sides A and B exchanged.

    Responses, model names and the A/B label columns (and soft-label columns, if present) trade
    places; prompt, id, source and the tie label stay. This is the only place the swap rule is
    written for tables; arrays use :func:`swap_columns`.
    """
    out = battles.copy()
    for left, right in SIDE_PAIRS:
        if left in out.columns and right in out.columns:
            out[left], out[right] = battles[right].values, battles[left].values
    return out


def has_labels(battles: pd.DataFrame) -> bool:
    return all(c in battles.columns for c in LABEL_COLUMNS)


def hard_mask(battles: pd.DataFrame) -> np.ndarray:
    """True where a row has a hard label (soft-labelled rows of a pseudo-label file may have none)."""
    if not has_labels(battles):
        return np.zeros(len(battles), dtype=bool)
    return ~np.isnan(battles[LABEL_COLUMNS].to_numpy(dtype=float)).any(axis=1)


def label_index_or_missing(battles: pd.DataFrame) -> np.ndarray:
    """Hard class index per battle, -1 where a row has no hard label (a soft-labelled row)."""
    scored = hard_mask(battles)
    y = np.full(len(battles), -1)
    y[scored] = label_index(battles[scored])
    return y


def label_index(battles: pd.DataFrame) -> np.ndarray:
    """Hard class index (0=a, 1=b, 2=tie) per battle; every row must have a hard label."""
    if not has_labels(battles):
        raise ValueError(f"battle table has no label columns {LABEL_COLUMNS}")
    values = battles[LABEL_COLUMNS].to_numpy(dtype=float)
    if np.isnan(values).any():
        raise ValueError(f"{int(np.isnan(values).any(axis=1).sum())} row(s) have no hard label (soft labels only)")
    return values.argmax(axis=1)


SOFT_TOLERANCE = 1e-3  # a soft label's three probabilities must sum to 1 within this


def soft_label_problem(values) -> str | None:
    """Why one row's ``(soft_a, soft_b, soft_tie)`` is not a soft label, or None when it is one (or
    when all three are missing: the row has no soft label). The one validity rule for soft labels."""
    v = np.asarray(values, dtype=np.float64)
    if np.isnan(v).all():
        return None
    if np.isnan(v).any():
        return "soft labels need all three of soft_a, soft_b, soft_tie"
    if not np.isfinite(v).all() or (v < 0).any():
        return "soft labels must be finite and >= 0"
    if abs(v.sum() - 1.0) > SOFT_TOLERANCE:
        return f"soft labels must sum to 1 (within {SOFT_TOLERANCE:g}), got {v.sum():.6g}"
    return None


def soft_mask(battles: pd.DataFrame) -> np.ndarray:
    """True where a row's target is its soft label (all three ``soft_*`` columns present and not NaN)."""
    if not all(c in battles.columns for c in SOFT_COLUMNS):
        return np.zeros(len(battles), dtype=bool)
    return ~np.isnan(battles[SOFT_COLUMNS].to_numpy(dtype=float)).any(axis=1)


def label_matrix(battles: pd.DataFrame) -> np.ndarray:
    """Per-battle target distribution ``(n, 3)``: soft labels where given (:func:`soft_mask`), else one-hot."""
    use_soft = soft_mask(battles)
    if use_soft.any():
        soft = battles[SOFT_COLUMNS].to_numpy(dtype=float)
        hard = np.full_like(soft, np.nan)
        have = hard_mask(battles)
        if have.any():
            hard[have] = np.eye(3)[battles.loc[have, LABEL_COLUMNS].to_numpy(dtype=float).argmax(axis=1)]
        return np.where(use_soft[:, None], soft, hard)
    return np.eye(3)[label_index(battles)]


def expand_targets(targets: np.ndarray, weights: np.ndarray | None = None):
    """Turn per-row target distributions into (row index, class, weight) triples for hard-label learners.

    A one-hot row stays one row; a soft row (teacher probabilities, pseudo-labels) becomes one row
    per class with non-zero probability, weighted by that probability times the row weight. Learners
    that take sample weights (LightGBM, logistic regression) then minimise the same expected
    cross-entropy as a soft-label loss.
    """
    targets = np.asarray(targets, dtype=np.float64)
    weights = np.ones(len(targets)) if weights is None else np.asarray(weights, dtype=np.float64)
    rows, classes = np.nonzero(targets > 0)
    return rows, classes, targets[rows, classes] * weights[rows]


def row_weights(battles: pd.DataFrame) -> np.ndarray:
    """Per-row training weight: the ``weight`` column where present (NaN counts as 1), else ones."""
    if "weight" not in battles.columns:
        return np.ones(len(battles))
    w = battles["weight"].to_numpy(dtype=np.float64)
    return np.where(np.isnan(w), 1.0, w)


def label_support_problem(battles: pd.DataFrame, n_folds: int) -> str | None:
    """Why a training table's labels cannot support a 3-class model cross-fitted on ``n_folds`` folds,
    or None when they can. The one rule (README, "Labels a run needs"): each of the three outcomes
    (A wins, B wins, tie) is the target of at least ``n_folds`` battles, so that every fold can
    validate on, and train on, all three. A battle counts for the outcome its target favours (its hard
    label, or the largest of its soft label), as the stratified folds count it. One outcome only, an
    outcome missing or nearly missing, fewer battles than folds: all refused here, before any fitting."""
    targets = label_matrix(battles)
    known = ~np.isnan(targets).any(axis=1)
    counts = np.bincount(targets[known].argmax(axis=1), minlength=3)
    short = [LABEL_COLUMNS[k] for k in range(3) if counts[k] < n_folds]
    if not short:
        return None
    listed = f"{int(counts.sum())} battles: " + ", ".join(f"{LABEL_COLUMNS[k]} {counts[k]}" for k in range(3))
    present = int((counts > 0).sum())
    if present == 1:
        what = f"every labelled battle has the same outcome ({LABEL_COLUMNS[int(counts.argmax())]})"
    elif present == 2:
        what = f"no battle has the outcome {LABEL_COLUMNS[int(np.flatnonzero(counts == 0)[0])]}"
    else:
        what = f"too few battles have the outcome {' or '.join(short)}"
    return (f"the labels cannot support a 3-class model on {n_folds} folds: {what} ({listed}); each outcome "
            f"needs at least n_folds={n_folds} battles, so that every fold trains and validates on all three")
