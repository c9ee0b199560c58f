"""Stacking layer: choose and fit the final calibrated mapping from stage OOF logits, scored honestly.

Candidates (``default_candidates``), grouped into *methods* for the tune table:

* ``single: <stage>`` - one stage with temperature scaling;
* ``average`` - the plain average of all stages' log-probabilities with temperature scaling;
* ``weighted`` - simplex weights per stage fitted on OOF, then temperature (:class:`WeightedAverage`);
* ``logistic`` - logistic stacking over all stages at several regularisation strengths;
* ``logistic+meta`` - the same with the cheap meta features of :mod:`ensemble.meta`.

One cross-fitting grid (:func:`cross_fit_grid`) serves every figure. For each outer fold k and each
candidate it holds the predictions of the candidate fitted on the other folds, and the candidate's
inner-CV log loss computed on those other folds only. A *nested* score of any set of candidates then
picks, for every outer fold, the candidate with the best inner-CV loss and takes its outer-fold
predictions: the choice is never scored on the rows it was made with. The methods' rows are nested
over their own candidates (e.g. the C of ``logistic``); the final row ("selected") is nested over
all candidates, which is the honest score of the whole procedure. The model finally used is the
candidate with the best CV loss over all rows, refitted on all rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import joblib
import numpy as np
from pydantic import Field
from sklearn.metrics import log_loss
from threadpoolctl import threadpool_limits

from ensemble.calibrators import LogisticStacker, TemperatureCalibrator, WeightedAverage
from ensemble.metrics import clip_probs, scores
from kernel.schema import PositiveFloat, Section
from kernel.threads import usable_cores

log = logging.getLogger(__name__)

PARALLEL_MIN_ROWS = 20_000  # from this many OOF rows on, candidates are cross-fitted in parallel
CARRY_WEIGHT = 0.05  # a stage "carries weight" in the chosen ensemble at this share or more


class StackerConfig(Section):
    """The ensemble candidates and how one is chosen (the config's ``stacker`` section)."""

    C_grid: list[PositiveFloat] = Field(default_factory=lambda: [0.01, 0.1, 1.0], min_length=1)  # logistic stacking strengths (inverse L2), each > 0
    weighted: bool = True  # the simplex-weighted average as a candidate
    meta_features: bool = True  # logistic stacking with the cheap meta features as candidates
    exclude: list[str] = Field(default_factory=list)  # stages the ensemble never sees
    selection_tolerance: float = Field(0.0, ge=0)  # > 0: the simplest candidate within this much CV log loss of the best


@dataclass(frozen=True)
class Candidate:
    kind: str  # "temperature", "weighted" or "logistic"
    stages: tuple | None = None  # for temperature: which stages are averaged (None: all)
    C: float = 1.0
    meta: bool = False  # logistic only: add the meta features

    def label(self, names: list[str]) -> str:
        if self.kind == "logistic":
            return f"logistic{'+meta' if self.meta else ''}(C={self.C:g})"
        if self.kind == "weighted":
            return "weighted"
        chosen = names if self.stages is None else [names[i] for i in self.stages]
        return f"temperature({'+'.join(chosen)})" if len(chosen) == 1 or self.stages is not None else "temperature(average)"

    def method(self, names: list[str]) -> str:
        """The method (tune-table row) this candidate belongs to."""
        if self.kind == "logistic":
            return "logistic+meta" if self.meta else "logistic"
        if self.kind == "weighted":
            return "weighted"
        if self.stages is not None and len(self.stages) == 1:
            return f"single: {names[self.stages[0]]}"
        return "average"

    def build(self):
        if self.kind == "logistic":
            return LogisticStacker(self.C, self.meta)
        if self.kind == "weighted":
            return WeightedAverage()
        return TemperatureCalibrator(list(self.stages) if self.stages is not None else None)


def default_candidates(n_stages: int, config: StackerConfig, meta: bool = False) -> list[Candidate]:
    cands = [Candidate("temperature", (i,)) for i in range(n_stages)]
    if n_stages > 1:
        cands.append(Candidate("temperature", None))
        if config.weighted:
            cands.append(Candidate("weighted"))
        cands += [Candidate("logistic", None, C) for C in config.C_grid]
    if meta:  # meta features can help even one stage
        cands += [Candidate("logistic", None, C, meta=True) for C in config.C_grid]
    return cands


def _take(logits: list[np.ndarray], meta, mask: np.ndarray):
    return [x[mask] for x in logits], None if meta is None else meta[mask]


def _fit_predict(candidate: Candidate, logits, meta, y, fit_mask, predict_mask) -> np.ndarray:
    lt, mt = _take(logits, meta, fit_mask)
    lp, mp = _take(logits, meta, predict_mask)
    return candidate.build().fit(lt, y[fit_mask], meta=mt).predict_proba(lp, meta=mp)


def _ll(y, probs) -> float:
    return float(log_loss(y, clip_probs(probs), labels=[0, 1, 2]))


@dataclass
class CVGrid:
    """Per candidate: outer-fold predictions (``outer``) and, per outer fold, the inner-CV loss."""

    candidates: list
    folds: np.ndarray
    outer: dict  # candidate -> (n, 3) probabilities, each fold predicted by a fit on the other folds
    inner: dict  # outer fold -> {candidate: inner-CV log loss on the other folds}

    def cv_loss(self, y) -> dict:
        return {c: _ll(y, self.outer[c]) for c in self.candidates}

    def nested(self, subset, tolerance: float = 0.0) -> tuple[np.ndarray, dict]:
        """Nested-CV probabilities of choosing among ``subset`` by inner CV (with :func:`pick`), and how
        often each candidate was chosen."""
        probs = np.zeros((len(self.folds), 3))
        picked: dict = {}
        for k, losses in self.inner.items():
            best = pick(subset, losses, tolerance)
            picked[best] = picked.get(best, 0) + 1
            probs[self.folds == k] = self.outer[best][self.folds == k]
        return probs, picked


def pick(candidates, losses: dict, tolerance: float = 0.0):
    """The simplest candidate (earliest in ``candidates``, which runs from simple to complex) whose CV
    loss is within ``tolerance`` of the best. With many near-equal candidates on a few thousand rows,
    the plain minimum mostly picks noise; preferring the simpler one unless the complex one wins
    clearly makes the choice stable across folds."""
    best = min(losses[c] for c in candidates)
    return next(c for c in candidates if losses[c] <= best + tolerance)


def cross_fit_probs(candidate: Candidate, logits, y, folds, meta=None) -> np.ndarray:
    """Each fold's rows predicted by ``candidate`` fitted on the other folds (the outer predictions of
    :func:`cross_fit_grid`, without its inner CV)."""
    probs = np.zeros((len(y), 3))
    with threadpool_limits(limits=1):
        for k in np.unique(folds):
            probs[folds == k] = _fit_predict(candidate, logits, meta, y, folds != k, folds == k)
    return probs


def _cross_fit_candidate(candidate: Candidate, logits, y, folds, meta) -> tuple[np.ndarray, dict]:
    """One candidate's outer-fold predictions and, per outer fold, its inner-CV loss on the other folds."""
    fold_ids = np.unique(folds)
    outer, inner = cross_fit_probs(candidate, logits, y, folds, meta), {}
    with threadpool_limits(limits=1):  # also in a worker process
        for k in fold_ids:
            rest = folds != k
            inner_probs = np.zeros((len(y), 3))
            for j in fold_ids[fold_ids != k]:
                inner_probs[folds == j] = _fit_predict(candidate, logits, meta, y, rest & (folds != j), folds == j)
            inner[k] = _ll(y[rest], inner_probs[rest])
    return outer, inner


def cross_fit_grid(candidates, logits, y, folds, meta=None) -> CVGrid:
    """Every candidate cross-fitted (candidates are independent: one worker process per usable core
    (:func:`kernel.threads.usable_cores`) on large inputs, with the same numbers as in one process)."""
    jobs = min(usable_cores(), len(candidates)) if len(y) >= PARALLEL_MIN_ROWS else 1
    task = joblib.delayed(_cross_fit_candidate)
    results = joblib.Parallel(n_jobs=jobs)(task(c, logits, y, folds, meta) for c in candidates)
    outer = {c: r[0] for c, r in zip(candidates, results)}
    inner = {k: {c: r[1][k] for c, r in zip(candidates, results)} for k in np.unique(folds)}
    return CVGrid(list(candidates), folds, outer, inner)


@dataclass
class StackResult:
    chosen: Candidate
    model: object  # fitted calibrator on all OOF rows
    oof_probs: np.ndarray  # nested-CV probabilities (honest)
    table: list[dict]  # one row per candidate: its CV log loss, and which outer folds chose it
    nested: dict  # scores of the nested OOF probabilities
    methods: list[dict]  # one row per method: nested scores, stage weights of its model fitted on all rows
    stage_weights: dict  # stage name -> share in the chosen model
    meta: bool = False  # whether the chosen model reads meta features

    def to_json(self, names) -> dict:
        return {"chosen": self.chosen.label(names), "method": self.chosen.method(names), "model": self.model.to_json(),
                "stages": names, "meta_features": self.meta, "stage_weights": self.stage_weights,
                "carrying_weight": [n for n, w in self.stage_weights.items() if w >= CARRY_WEIGHT],
                "nested_scores": self.nested, "candidates": self.table, "methods": self.methods}


def fit_stacker(names: list[str], logits: list[np.ndarray], y: np.ndarray, folds: np.ndarray,
                config: StackerConfig | None = None, meta: np.ndarray | None = None) -> StackResult:
    """Cross-fit every candidate once, score every method and the whole selection by nested CV, and
    fit the chosen candidate on all rows. ``meta`` (``(n, m)``, see :mod:`ensemble.meta`) adds the
    ``logistic+meta`` method; ``config.meta_features`` says whether the caller passes it."""
    config = config or StackerConfig()
    candidates = default_candidates(len(logits), config, meta=meta is not None)
    with threadpool_limits(limits=1):  # BLAS threads only slow these tiny problems down (20x on a busy machine)
        return _fit_stacker(names, candidates, logits, y, folds, meta, config.selection_tolerance)


def _fit_stacker(names, candidates, logits, y, folds, meta, tolerance) -> StackResult:
    grid = cross_fit_grid(candidates, logits, y, folds, meta)
    cv = grid.cv_loss(y)
    nested, picked = grid.nested(candidates, tolerance)
    chosen = pick(candidates, cv, tolerance)
    model = chosen.build().fit(logits, y, meta=meta)

    methods = []
    for method in dict.fromkeys(c.method(names) for c in candidates):
        members = [c for c in candidates if c.method(names) == method]
        probs, _ = grid.nested(members, tolerance)
        best = pick(members, cv, tolerance)
        fitted = model if best == chosen else best.build().fit(logits, y, meta=meta)
        weights = fitted.stage_weights(len(names))
        methods.append({"method": method, **{f"nested_{k}": v for k, v in scores(y, probs).items()
                                             if k in ("log_loss", "accuracy")},
                        "best_candidate": best.label(names), "cv_log_loss": cv[best],
                        "weights": {n: float(w) for n, w in zip(names, weights)}, "chosen": best == chosen})
    methods.append({"method": "selected (nested over all)", "nested_log_loss": _ll(y, nested),
                    "nested_accuracy": float((nested.argmax(axis=1) == y).mean()),
                    "best_candidate": chosen.label(names), "cv_log_loss": cv[chosen],
                    "weights": {n: float(w) for n, w in zip(names, model.stage_weights(len(names)))}, "chosen": True})
    table = [{"candidate": c.label(names), "method": c.method(names), "cv_log_loss": float(cv[c]),
              "chosen_in_outer_folds": picked.get(c, 0), "chosen": c == chosen,
              "single_stage": names[c.stages[0]] if c.kind == "temperature" and c.stages and len(c.stages) == 1 else None}
             for c in candidates]
    log.info("stacker: chose %s (CV %.4f); nested-CV log loss %.4f", chosen.label(names), cv[chosen], _ll(y, nested))
    weights = dict(zip(names, (float(w) for w in model.stage_weights(len(names)))))
    return StackResult(chosen, model, nested, table, scores(y, nested), methods, weights, meta=chosen.meta)
