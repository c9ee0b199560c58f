"""External rows join training folds only: the one function a cross-fitting runner calls per fold.

Validation rows and every reported score stay on target data. External battles carry a ``weight``
= per-source weight (from the config) x optional importance weight (:mod:`battles.shift`); target
rows keep their own ``weight`` (1 when absent). Stages read ``weight`` as sample weights.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

TARGET_SOURCE = "target"


def external_weights(external: pd.DataFrame, source_weights: dict, shift_weights=None) -> np.ndarray:
    """Per-row weight of external battles: source weight x importance weight x any existing weight.

    Every source in ``external`` must be named in ``source_weights`` (a typo would otherwise train
    on a source at full weight); a weight of 0 drops that source.
    """
    sources = external["source"].astype(str).to_numpy()
    unknown = sorted(set(sources) - set(source_weights))
    if unknown:
        raise KeyError(f"no weight for external source(s) {unknown}; source_weights has {sorted(source_weights)}")
    w = np.array([float(source_weights[s]) for s in sources])
    if "weight" in external.columns:
        w = w * external["weight"].fillna(1.0).to_numpy(dtype=float)
    if shift_weights is not None:
        shift_weights = np.asarray(shift_weights, dtype=float)
        if shift_weights.shape != (len(external),):
            raise ValueError(f"shift_weights has shape {shift_weights.shape}, expected ({len(external)},)")
        w = w * shift_weights
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("external weights must be finite and non-negative")
    return w


def external_rows(external: pd.DataFrame, source_weights: dict, shift_weights=None) -> pd.DataFrame:
    """External battles with their final ``weight`` (zero-weight rows left out): what the runner
    passes as ``extra_train`` to :func:`pipeline.crossfit.crossfit_stage`, which adds them to every
    fold's training part and never to validation or OOF."""
    ext = external.copy()
    ext["weight"] = external_weights(external, source_weights, shift_weights)
    return ext[ext["weight"] > 0].reset_index(drop=True)


def training_rows(target_train_fold: pd.DataFrame, external: pd.DataFrame | None, source_weights: dict,
                  shift_weights=None) -> pd.DataFrame:
    """One fold's training table: the fold's target rows plus all external rows, with ``weight``.

    External rows with weight 0 are left out. Ids must not collide with target ids (the converters
    prefix them with their source). The result is never used for validation.
    """
    train = target_train_fold.copy()
    train["weight"] = train["weight"].fillna(1.0).astype(float) if "weight" in train.columns else 1.0
    if "source" not in train.columns:
        train["source"] = TARGET_SOURCE
    if external is None or len(external) == 0:
        return train.reset_index(drop=True)
    ext = external_rows(external, source_weights, shift_weights)
    clash = set(ext["id"].astype(str)) & set(train["id"].astype(str))
    if clash:
        raise ValueError(f"{len(clash)} external ids equal target ids (e.g. {sorted(clash)[:3]}); prefix them by source")
    return pd.concat([train, ext], ignore_index=True, sort=False)
