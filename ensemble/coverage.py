"""Stacking stages that cover different rows, honestly; how sure each figure is; and how much evidence
it takes to move the ensemble off its default.

A costly stage may have out-of-fold logits for only some training rows (a fold plan of one fold), and
a stage may be no better than predicting the class prior. An ensemble can only be fitted and scored on
rows that every stage in it covers, so the candidates are *stage sets*, each on its own rows.

**Stages against the prior** (:func:`stage_against_prior`). Each stage alone, temperature-scaled by
cross-fitting over the outer folds of its rows, is scored row by row against the fold-wise class
prior on the same rows. It *beats the prior* when the paired 90% interval (below) of its log loss
minus the prior's lies entirely below zero.

**Candidate sets** (:func:`stage_sets`), from the default to the widest, each on the labelled rows
every member covers (a set equal to an earlier one, or with no row, is left out):

1. the default: the full-coverage stages that beat the prior, on every labelled row (when none of them
   beats the prior: every full-coverage stage; with no full-coverage stage: the stages that beat the
   prior, else every stage);
2. the default plus the partial-coverage stages that beat the prior;
3. every stage (adds those not better than the prior).

Each set is chosen and scored by :func:`ensemble.stacking.fit_stacker` (nested CV) on its rows. When
those rows span fewer than three of the run's folds, the nested CV runs on new grouped folds made
within them (:func:`battles.folds.make_folds`), so no score uses a row twice or a row a stage was
trained on.

**The rule that decides** (:data:`RULE`, :func:`compare_sets`). The default stands unless a wider set
shows it is better: going down the list, a set replaces the one chosen so far only when the paired
90% bootstrap interval of its nested-CV log loss minus the chosen set's, on the rows the wider set
covers (the chosen set covers them too), lies entirely below zero. A stage that covers few rows, or
one no better than the prior, therefore never carries weight unless the evidence says the set with
it is better; a mean gain whose interval spans zero (a few hundred rows move by +-0.01-0.02 by chance)
keeps the default. No minimum gain is asked on top: the interval already scales with the rows and
their noise, and an upper bound below zero is a one-sided 95% test of "better on these rows". The
choice between sets is made on the rows it is reported on (not nested): with at most two tests, each
at that level, the optimism this leaves is small, and the report says so.

**Intervals.** :func:`bootstrap_interval` gives the 90% interval of a mean log loss over rows (1000
resamples seeded with the run's seed: the same inputs give the same interval and the same decision),
shown beside every nested score with its number of rows: a figure on 280 rows is much less certain
than one on 57k. The paired intervals that decide (a stage against the prior, a set against another)
resample prompt groups, not rows: battles that share a prompt share a fold, and their losses move
together.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from battles.folds import make_folds, prompt_groups
from ensemble.meta import meta_features
from ensemble.metrics import clip_probs, prior_log_loss, prior_probs
from ensemble.stacking import Candidate, StackerConfig, StackResult, cross_fit_probs, fit_stacker

log = logging.getLogger(__name__)

MIN_OUTER_FOLDS = 3  # nested CV chooses on the other folds by an inner CV: two inner folds at least
BOOTSTRAP_SAMPLES = 1000
INTERVAL = 0.90
RULE = ("a wider stage set replaces the set chosen so far only when the paired 90% bootstrap interval (prompt "
        "groups resampled) of its nested-CV log loss minus the chosen set's, on the rows it covers, lies entirely "
        "below 0; a stage beats the class prior when the same interval of its calibrated log loss minus the "
        "prior's lies below 0")


def row_log_loss(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-row log loss (its mean is the log loss)."""
    return -np.log(clip_probs(probs)[np.arange(len(y)), y])


def bootstrap_interval(losses: np.ndarray, seed: int = 0, paired_with: np.ndarray | None = None,
                       groups: np.ndarray | None = None) -> list[float]:
    """90% bootstrap interval of the mean of ``losses`` (or of ``losses - paired_with``, resampling the
    same rows for both: a paired interval of a difference). With ``groups`` (a key per row), whole
    groups are resampled and each resample's mean is over the rows it holds."""
    values = np.asarray(losses, dtype=np.float64)
    if paired_with is not None:
        values = values - np.asarray(paired_with, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if groups is None:
        means = np.array([values[rng.integers(0, len(values), len(values))].mean() for _ in range(BOOTSTRAP_SAMPLES)])
    else:
        _, group = np.unique(np.asarray(groups), return_inverse=True)
        sums, sizes = np.bincount(group, weights=values), np.bincount(group).astype(np.float64)
        picks = (rng.integers(0, len(sums), len(sums)) for _ in range(BOOTSTRAP_SAMPLES))
        means = np.array([sums[p].sum() / sizes[p].sum() for p in picks])
    tail = (1 - INTERVAL) / 2
    return [float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))]


def below_zero(interval: list[float]) -> bool:
    """The rule's test: the whole interval of a difference lies below zero."""
    return interval[1] < 0


@dataclass
class StageSet:
    """One candidate set of stages, the rows they all cover, and its fitted ensemble."""

    names: list[str]
    rows: np.ndarray  # (n_train,) bool
    folds: np.ndarray  # the outer folds of its nested CV (for its rows)
    fold_source: str  # "run folds" or "grouped folds within these rows"
    stacked: StackResult | None = None
    prior: float = float("nan")
    selection: dict | None = None  # the chosen set only: the rule, what decided, each stage against the prior


def stage_sets(names: list[str], covered: dict, scored: np.ndarray,
               beat_prior: list[str] | None = None) -> list[tuple[list[str], np.ndarray]]:
    """The candidate stage sets and their rows (rows with a hard label that every member covers), from
    the default to the widest (see the module docstring); ``beat_prior``: the stages that beat the class
    prior (None: all of them)."""
    good = list(names) if beat_prior is None else [n for n in names if n in beat_prior]
    full = [n for n in names if covered[n][scored].all()]
    default = [n for n in full if n in good] or full or good or list(names)
    sets = []
    for members in (default, [n for n in names if n in default or n in good], list(names)):
        rows = scored.copy()
        for n in members:
            rows &= covered[n]
        if rows.any() and all(members != m for m, _ in sets):
            sets.append((members, rows))
    return sets


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


def stage_against_prior(name: str, logits: np.ndarray, y: np.ndarray, folds: np.ndarray, groups: np.ndarray,
                        seed: int) -> dict:
    """Stage ``name`` alone on its rows (``logits``, ``y``, ``folds``, ``groups``: those rows only),
    temperature-scaled by cross-fitting over ``folds``, against the fold-wise class prior on the same
    rows: per-row log losses and the paired interval of the difference."""
    mine = row_log_loss(y, cross_fit_probs(Candidate("temperature", (0,)), [logits], y, folds))
    prior = row_log_loss(y, prior_probs(y, folds))
    interval = bootstrap_interval(mine, seed, paired_with=prior, groups=groups)
    return {"stage": name, "rows": int(len(y)), "calibrated_log_loss": float(mine.mean()),
            "prior_log_loss": float(prior.mean()), "minus_prior": float((mine - prior).mean()),
            "minus_prior_interval": interval, "beats_prior": below_zero(interval)}


def compare_sets(wider: StageSet, chosen: StageSet, y: np.ndarray, groups: np.ndarray, seed: int) -> dict:
    """The rule's test of ``wider`` against ``chosen`` on the rows ``wider`` covers: the paired interval
    of the difference in nested-CV log loss, and whether ``wider`` replaces ``chosen``."""
    rows = wider.rows
    if (rows & ~chosen.rows).any():
        raise ValueError("a wider stage set must cover a subset of the rows of the set it is compared with")
    mine, theirs = _nested_row_losses(wider, rows, y), _nested_row_losses(chosen, rows, y)
    interval = bootstrap_interval(mine, seed, paired_with=theirs, groups=groups[rows])
    return {"compared_with": list(chosen.names), "compared_on_rows": int(rows.sum()),
            "minus_compared": float((mine - theirs).mean()), "minus_compared_interval": interval,
            "replaced_it": below_zero(interval)}


def fit_over_coverage(names: list[str], oof: dict, covered: dict, train: pd.DataFrame, y: np.ndarray,
                      scored: np.ndarray, run_folds: np.ndarray, config: StackerConfig, n_folds: int,
                      seed: int) -> tuple[StageSet, list[dict]]:
    """Score every stage against the prior, fit every candidate stage set on its rows, and choose by
    :data:`RULE`; return the set used (its ``selection`` says what decided) and the comparison table
    (one row per set, default first).

    ``oof[name]``: (n_train, 3) logits (NaN where not covered); ``y``: class per training row (only
    ``scored`` rows are read); ``scored``: rows with a hard label."""
    groups = np.unique(prompt_groups(train), return_inverse=True)[1]  # one integer per prompt group
    against_prior = []
    for n in names:
        rows = scored & covered[n]
        if rows.any():
            folds, _ = outer_folds(train, rows, run_folds, n_folds, seed)
            against_prior.append(stage_against_prior(n, oof[n][rows], y[rows], folds, groups[rows], seed))
    for e in against_prior:
        if not e["beats_prior"]:
            log.info("ensemble: stage %s is not better than the class prior on its %d rows (calibrated %.4f vs prior "
                     "%.4f, paired 90%% interval of the difference [%+.4f, %+.4f]): it enters only a set that beats "
                     "the default by the rule", e["stage"], e["rows"], e["calibrated_log_loss"], e["prior_log_loss"],
                     *e["minus_prior_interval"])
    beat_prior = [e["stage"] for e in against_prior if e["beats_prior"]]
    if not beat_prior:
        log.warning("ensemble: no stage beats the class prior by the paired 90%% interval on its rows; the default "
                    "set holds every full-coverage stage")

    sets = []
    for members, rows in stage_sets(names, covered, scored, beat_prior):
        folds, source = outer_folds(train, rows, run_folds, n_folds, seed)
        s = StageSet(members, rows, folds, source)
        meta = meta_features(train[rows]) if config.meta_features else None
        s.stacked = fit_stacker(members, [oof[n][rows] for n in members], y[rows], folds, config, meta=meta)
        s.prior = prior_log_loss(y[rows], folds)
        sets.append(s)
    if not sets:
        raise ValueError("no training row is covered by every stage; check the stages' fold plans")

    chosen, tests = sets[0], {}
    for s in sets[1:]:
        tests[id(s)] = compare_sets(s, chosen, y, groups, seed)
        if tests[id(s)]["replaced_it"]:
            chosen = s
    decided_by = _decision(sets, tests, chosen)
    chosen.selection = {"rule": RULE, "decided_by": decided_by, "stages_against_prior": against_prior}
    log.info("ensemble: %s", decided_by)

    common = np.logical_and.reduce([s.rows for s in sets])  # the rows every set covers
    losses = {id(s): _nested_row_losses(s, common, y) for s in sets} if len(sets) > 1 else {}
    table = []
    for s in sets:
        nested = row_log_loss(y[s.rows], s.stacked.oof_probs)
        row = {"stages": s.names, "rows": int(s.rows.sum()), "outer_folds": s.fold_source,
               "chosen": s is chosen, "method": s.stacked.chosen.label(s.names),
               "nested_log_loss": float(nested.mean()), "interval": bootstrap_interval(nested, seed),
               "prior_log_loss": s.prior, "role": _role(s, sets[0], beat_prior), **tests.get(id(s), {})}
        if len(sets) > 1:
            mine, theirs = losses[id(s)], losses[id(chosen)]
            row.update({"common_rows": int(common.sum()), "log_loss_on_common_rows": float(mine.mean()),
                        "minus_chosen_on_common_rows": float((mine - theirs).mean()),
                        "minus_chosen_interval": bootstrap_interval(mine, seed, paired_with=theirs,
                                                                    groups=groups[common])})
        table.append(row)
    return chosen, table


def _role(s: StageSet, default: StageSet, beat_prior: list[str]) -> str:
    """What a set is: the default, or what it adds to the default."""
    if s is default:
        return "default"
    added = [n for n in s.names if n not in default.names]
    weak = [n for n in added if n not in beat_prior]
    parts = [f"adds {'+'.join(n for n in added if n in beat_prior)}" if len(weak) < len(added) else "",
             f"adds {'+'.join(weak)} (not better than the prior)" if weak else ""]
    return "; ".join(p for p in parts if p)


def _decision(sets: list[StageSet], tests: dict, chosen: StageSet) -> str:
    """One line: which set is used and what decided it, with the figures."""
    if len(sets) == 1:
        return f"{'+'.join(chosen.names)} on {int(chosen.rows.sum())} rows (the only candidate set)"
    lines = []
    for s in sets[1:]:
        t = tests[id(s)]
        lo, hi = t["minus_compared_interval"]
        verdict = "lies below 0: it replaced" if t["replaced_it"] else "does not lie below 0: it did not replace"
        lines.append(f"{'+'.join(s.names)} minus {'+'.join(t['compared_with'])} on {t['compared_on_rows']} rows "
                     f"{t['minus_compared']:+.4f}, paired 90% interval [{lo:+.4f}, {hi:+.4f}] {verdict} it")
    how = "the default stands" if chosen is sets[0] else "the evidence moved it off the default"
    return f"{'+'.join(chosen.names)} on {int(chosen.rows.sum())} rows ({how}): " + "; ".join(lines)


def _nested_row_losses(s: StageSet, rows: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row nested log loss of set ``s`` on ``rows`` (a subset of its own rows)."""
    position = np.cumsum(s.rows) - 1  # row index -> position in s's nested OOF probabilities
    probs = s.stacked.oof_probs[position[rows]]
    return row_log_loss(y[rows], probs)
