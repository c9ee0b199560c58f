"""External rows join training folds only: their final weights, checked once before any training.

Validation rows and every reported score stay on target data. External battles carry a ``weight``
= per-source weight (from the config) x optional importance weight (:mod:`battles.shift`) x any
weight the file itself carries; target rows keep their own ``weight`` (1 when absent). Stages read
``weight`` as sample weights (:func:`battles.labels.row_weights`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from battles.labels import row_weights


def external_weights(external: pd.DataFrame, source_weights: dict, shift_weights=None) -> np.ndarray:
    """Per-row weight of external battles: source weight x importance weight x any existing weight.

    Every source in ``external`` must be named in ``source_weights`` (a typo would otherwise train
    on a source at full weight); a weight of 0 drops that source.
    """
    sources = external["source"].astype(str).to_numpy()
    unknown = sorted(set(sources) - set(source_weights))
    if unknown:
        raise KeyError(f"no weight for external source(s) {unknown}; source_weights has {sorted(source_weights)}")
    w = np.array([float(source_weights[s]) for s in sources]) * row_weights(external)
    if shift_weights is not None:
        shift_weights = np.asarray(shift_weights, dtype=float)
        if shift_weights.shape != (len(external),):
            raise ValueError(f"shift_weights has shape {shift_weights.shape}, expected ({len(external)},)")
        w = w * shift_weights
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("external weights must be finite and non-negative")
    return w


def external_rows(external: pd.DataFrame, source_weights: dict, shift_weights=None,
                  target_ids=None) -> pd.DataFrame:
    """External battles with their final ``weight`` (zero-weight rows left out): the rows the runner
    adds to every fold's training part (never to validation or OOF). Their ids must differ from
    ``target_ids`` (the converters prefix ids with the source), or a row could be trained and scored."""
    ext = external.copy()
    ext["weight"] = external_weights(external, source_weights, shift_weights)
    ext = ext[ext["weight"] > 0].reset_index(drop=True)
    if target_ids is not None:
        clash = set(ext["id"].astype(str)) & set(map(str, target_ids))
        if clash:
            raise ValueError(f"{len(clash)} external ids equal training ids (e.g. {sorted(clash)[:3]}); "
                             "give external rows ids of their own (the converters prefix them with the source)")
    return ext
