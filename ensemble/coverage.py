"""Stacking stages that cover different rows, honestly, and how sure each figure is.

A costly stage may have out-of-fold logits for only some training rows (a fold plan of one fold).
An ensemble can only be fitted and scored on rows that every stage in it covers, so the candidates
are *stage sets*, each on its own rows:

* every stage, on the rows all of them cover (e.g. the decoder's one fold);
* when some stages cover every row, those stages alone, on every row.

Each set is chosen and scored by :func:`ensemble.stacking.fit_stacker` (nested CV) on its rows. When
those rows span fewer than three of the run's folds, the nested CV runs on new grouped folds made
within them (:func:`battles.folds.make_folds`), so no score uses a row twice or a row a stage was
trained on. The sets are compared on the rows they share, with a paired bootstrap interval of the
difference; the better one there is used. That last choice between two sets is made on the same
rows it is reported on (not nested), which the report says beside the figures.

:func:`bootstrap_interval` gives the 90% interval of a mean log loss over rows, shown beside every
nested score with its number of rows: a figure on 280 rows is much less certain than one on 57k.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from battles.folds import make_folds
from ensemble.meta import meta_features
from ensemble.metrics import clip_probs, prior_log_loss
from ensemble.stacking import StackerConfig, StackResult, fit_stacker

log = logging.getLogger(__name__)

MIN_OUTER_FOLDS = 3  # nested CV chooses on the other folds by an inner CV: two inner folds at least
BOOTSTRAP_SAMPLES = 1000
INTERVAL = 0.90


def row_log_loss(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-row log loss (its mean is the log loss)."""
    return -np.log(clip_probs(probs)[np.arange(len(y)), y])


def bootstrap_interval(losses: np.ndarray, seed: int = 0, paired_with: np.ndarray | None = None) -> list[float]:
    """90% bootstrap interval of the mean of ``losses`` (or of ``losses - paired_with``, resampling the
    same rows for both: a paired interval of a difference)."""
    values = np.asarray(losses, dtype=np.float64)
    if paired_with is not None:
        values = values - np.asarray(paired_with, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([values[rng.integers(0, len(values), len(values))].mean() for _ in range(BOOTSTRAP_SAMPLES)])
    tail = (1 - INTERVAL) / 2
    return [float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))]


@dataclass
class StageSet:
    """One candidate set of stages, the rows they all cover, and its fitted ensemble."""

    names: list[str]
    rows: np.ndarray  # (n_train,) bool
    folds: np.ndarray  # the outer folds of its nested CV (for its rows)
    fold_source: str  # "run folds" or "grouped folds within these rows"
    stacked: StackResult | None = None
    prior: float = float("nan")


def stage_sets(names: list[str], covered: dict, scored: np.ndarray) -> list[tuple[list[str], np.ndarray]]:
    """The candidate stage sets and their rows (rows with a hard label that every member covers)."""
    every = scored.copy()
    for n in names:
        every &= covered[n]
    sets = [(list(names), every)]
    full = [n for n in names if covered[n][scored].all()]
    if full and len(full) < len(names):
        sets.append((full, scored.copy()))
    return [(members, rows) for members, rows in sets if rows.any()]


def outer_folds(train: pd.DataFrame, rows: np.ndarray, run_folds: np.ndarray, n_folds: int, seed: int):
    """Outer folds for the nested CV on ``rows``: the run's folds when they give three or more, else new
    grouped, stratified folds made within the rows."""
    present = np.unique(run_folds[rows])
    if len(present) >= MIN_OUTER_FOLDS:
        return run_folds[rows], "run folds"
    k = max(MIN_OUTER_FOLDS, min(n_folds, 5))
    try:
        return make_folds(train[rows], k, seed), f"{k} grouped folds within these rows"
    except ValueError as exc:
        raise ValueError(f"cannot score an ensemble on the {int(rows.sum())} rows all its stages cover: {exc}") from None


def fit_over_coverage(names: list[str], oof: dict, covered: dict, train: pd.DataFrame, y: np.ndarray,
                      scored: np.ndarray, run_folds: np.ndarray, config: StackerConfig, n_folds: int,
                      seed: int) -> tuple[StageSet, list[dict]]:
    """Fit every candidate stage set on its rows; return the one used and the comparison table.

    ``oof[name]``: (n_train, 3) logits (NaN where not covered); ``y``: class per training row (only
    ``scored`` rows are read); ``scored``: rows with a hard label."""
    sets = []
    for members, rows in stage_sets(names, covered, scored):
        folds, source = outer_folds(train, rows, run_folds, n_folds, seed)
        s = StageSet(members, rows, folds, source)
        meta = meta_features(train[rows]) if config.meta_features else None
        s.stacked = fit_stacker(members, [oof[n][rows] for n in members], y[rows], folds, config, meta=meta)
        s.prior = prior_log_loss(y[rows], folds)
        sets.append(s)
    if not sets:
        raise ValueError("no training row is covered by every stage; check the stages' fold plans")
    common = sets[0].rows  # the rows every stage covers: where the sets are compared
    chosen = sets[0]
    if len(sets) > 1:
        losses = {id(s): _nested_row_losses(s, common, y) for s in sets}
        chosen = min(sets, key=lambda s: losses[id(s)].mean())
    table = []
    for s in sets:
        nested = row_log_loss(y[s.rows], s.stacked.oof_probs)
        row = {"stages": s.names, "rows": int(s.rows.sum()), "outer_folds": s.fold_source,
               "chosen": s is chosen, "method": s.stacked.chosen.label(s.names),
               "nested_log_loss": float(nested.mean()), "interval": bootstrap_interval(nested, seed),
               "prior_log_loss": s.prior}
        if len(sets) > 1:
            mine, theirs = losses[id(s)], losses[id(chosen)]
            row.update({"common_rows": int(common.sum()), "log_loss_on_common_rows": float(mine.mean()),
                        "minus_chosen_on_common_rows": float((mine - theirs).mean()),
                        "minus_chosen_interval": bootstrap_interval(mine, seed, paired_with=theirs)})
        table.append(row)
    if len(sets) > 1:
        log.info("ensemble: %s on %d rows chosen over %s (compared on the %d rows all stages cover)",
                 "+".join(chosen.names), int(chosen.rows.sum()),
                 [("+".join(s.names), int(s.rows.sum())) for s in sets if s is not chosen], int(common.sum()))
    return chosen, table


def _nested_row_losses(s: StageSet, rows: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row nested log loss of set ``s`` on ``rows`` (a subset of its own rows)."""
    position = np.cumsum(s.rows) - 1  # row index -> position in s's nested OOF probabilities
    probs = s.stacked.oof_probs[position[rows]]
    return row_log_loss(y[rows], probs)
