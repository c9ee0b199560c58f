"""Stacking layer v1: choose and fit the final calibrated mapping from stage OOF logits.

Candidates: each stage alone with temperature scaling, the plain average of all stages with
temperature scaling, and logistic stacking over all stages at several regularisation strengths.
Each candidate is scored by cross-validation on the run's grouped folds. The figure we report is
*nested*: for every outer fold, the choice among candidates is made by inner CV on the other folds
only, the chosen candidate is fitted there, and the outer fold is predicted. So the reported final
log loss never scores a choice on the rows it was made with.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from ensemble.calibrators import LogisticStacker, TemperatureCalibrator, calibrator_from_json
from ensemble.metrics import clip_probs, scores
from sklearn.metrics import log_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    kind: str  # "temperature" or "logistic"
    stages: tuple | None = None  # for temperature: which stages are averaged (None: all)
    C: float = 1.0

    def label(self, names: list[str]) -> str:
        if self.kind == "logistic":
            return f"logistic(C={self.C:g})"
        chosen = names if self.stages is None else [names[i] for i in self.stages]
        return f"temperature({'+'.join(chosen)})" if len(chosen) == 1 or self.stages is not None else "temperature(average)"

    def build(self):
        if self.kind == "logistic":
            return LogisticStacker(self.C)
        return TemperatureCalibrator(list(self.stages) if self.stages is not None else None)


def default_candidates(n_stages: int, c_grid=(0.01, 0.1, 1.0)) -> list[Candidate]:
    cands = [Candidate("temperature", (i,)) for i in range(n_stages)]
    if n_stages > 1:
        cands.append(Candidate("temperature", None))
        cands += [Candidate("logistic", None, C) for C in c_grid]
    return cands


def _take(logits: list[np.ndarray], mask: np.ndarray) -> list[np.ndarray]:
    return [x[mask] for x in logits]


def cv_predict(candidate: Candidate, logits, y, folds) -> np.ndarray:
    """Out-of-fold probabilities of one candidate over the given folds."""
    probs = np.zeros((len(y), 3))
    for k in np.unique(folds):
        tr, va = folds != k, folds == k
        probs[va] = candidate.build().fit(_take(logits, tr), y[tr]).predict_proba(_take(logits, va))
    return probs


def select(candidates, logits, y, folds) -> tuple[Candidate, dict]:
    cv = {c: log_loss(y, clip_probs(cv_predict(c, logits, y, folds)), labels=[0, 1, 2]) for c in candidates}
    return min(cv, key=cv.get), cv


@dataclass
class StackResult:
    chosen: Candidate
    model: object  # fitted calibrator on all OOF rows
    oof_probs: np.ndarray  # nested-CV probabilities (honest)
    table: list[dict]  # one row per candidate: its CV log loss, and which outer folds chose it
    nested: dict  # scores of the nested OOF probabilities

    def to_json(self, names) -> dict:
        return {"chosen": self.chosen.label(names), "model": self.model.to_json(), "stages": names,
                "nested_scores": self.nested, "candidates": self.table}


def fit_stacker(names: list[str], logits: list[np.ndarray], y: np.ndarray, folds: np.ndarray,
                c_grid=(0.01, 0.1, 1.0)) -> StackResult:
    candidates = default_candidates(len(logits), c_grid)
    nested = np.zeros((len(y), 3))
    picked: dict[Candidate, int] = {}
    for k in np.unique(folds):
        tr, va = folds != k, folds == k
        best, _ = select(candidates, _take(logits, tr), y[tr], folds[tr])
        picked[best] = picked.get(best, 0) + 1
        nested[va] = best.build().fit(_take(logits, tr), y[tr]).predict_proba(_take(logits, va))
    chosen, cv = select(candidates, logits, y, folds)
    model = chosen.build().fit(logits, y)
    table = [{"candidate": c.label(names), "cv_log_loss": float(cv[c]), "chosen_in_outer_folds": picked.get(c, 0),
              "chosen": c == chosen,
              "single_stage": names[c.stages[0]] if c.kind == "temperature" and c.stages and len(c.stages) == 1 else None} for c in candidates]
    log.info("stacker: chose %s (CV %.4f); nested-CV log loss %.4f", chosen.label(names), cv[chosen],
             log_loss(y, clip_probs(nested), labels=[0, 1, 2]))
    return StackResult(chosen, model, nested, table, scores(y, nested))


def load_stacker(d: dict):
    return calibrator_from_json(d["model"])


def raw_probs(logits: np.ndarray) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)
