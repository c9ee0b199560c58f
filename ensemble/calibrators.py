"""The calibrated mappings from stage logits to final probabilities, all swap-equivariant.

* :class:`TemperatureCalibrator` on one stage or on the plain average of stages: logits / T plus a
  tie bias (A and B share a bias of zero, so swapping stays exact). Two parameters; hard to overfit.
* :class:`LogisticStacker`: multinomial logistic regression on the log-probabilities of every stage
  (optionally with cheap meta features), fitted on the rows and their swapped copies and predicted
  with swap averaging, so it is exactly equivariant.

Every calibrator serialises to plain JSON (``to_json``/``from_json``): no pickles.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax
from sklearn.linear_model import LogisticRegression

from battles.labels import swap_columns


def stage_log_probs(logits: list[np.ndarray]) -> list[np.ndarray]:
    return [log_softmax(np.asarray(x, dtype=np.float64), axis=1) for x in logits]


def _swap_stack(x: np.ndarray, n_stages: int) -> np.ndarray:
    """Swap A/B columns inside every stage's 3-column group of a stacked logit matrix."""
    perm = np.concatenate([3 * s + np.array([1, 0, 2]) for s in range(n_stages)])
    return x[:, perm]


class TemperatureCalibrator:
    """softmax(mean_s(log p_s) / T + [0, 0, tie_bias]) over the chosen stages (one stage: plain temperature)."""

    kind = "temperature"

    def __init__(self, stages: list[int] | None = None):
        self.stages = stages
        self.temperature, self.tie_bias = 1.0, 0.0

    def _base(self, logits: list[np.ndarray]) -> np.ndarray:
        chosen = [logits[i] for i in (self.stages if self.stages is not None else range(len(logits)))]
        return np.mean(stage_log_probs(chosen), axis=0)

    def fit(self, logits, y, weight=None):
        base = self._base(logits)
        onehot = np.eye(3)[y]
        w = np.ones(len(y)) if weight is None else weight

        def loss(theta):
            z = base / np.exp(theta[0]) + np.array([0.0, 0.0, theta[1]])
            return -(w * (onehot * log_softmax(z, axis=1)).sum(axis=1)).sum() / w.sum()

        # Bounded: a near-constant stage would otherwise drive T towards 0 (overflowing logits).
        res = minimize(loss, np.zeros(2), method="L-BFGS-B", bounds=[(np.log(0.02), np.log(50.0)), (-5.0, 5.0)])
        self.temperature, self.tie_bias = float(np.exp(res.x[0])), float(res.x[1])
        return self

    def predict_proba(self, logits) -> np.ndarray:
        return softmax(self._base(logits) / self.temperature + np.array([0.0, 0.0, self.tie_bias]), axis=1)

    def to_json(self) -> dict:
        return {"kind": self.kind, "stages": self.stages, "temperature": self.temperature, "tie_bias": self.tie_bias}

    @classmethod
    def from_json(cls, d):
        c = cls(d["stages"])
        c.temperature, c.tie_bias = d["temperature"], d["tie_bias"]
        return c


class LogisticStacker:
    """Multinomial logistic regression on all stages' log-probabilities, fitted on both A/B orders."""

    kind = "logistic"

    def __init__(self, C: float = 1.0):
        self.C = C
        self.coef_ = self.intercept_ = None

    def fit(self, logits, y, weight=None):
        x = np.hstack(stage_log_probs(logits))
        xs = _swap_stack(x, len(logits))
        w = np.ones(len(y)) if weight is None else weight
        model = LogisticRegression(C=self.C, max_iter=2000)
        model.fit(np.vstack([x, xs]), np.concatenate([y, np.array([1, 0, 2])[y]]), sample_weight=np.concatenate([w, w]))
        self.coef_, self.intercept_ = model.coef_, model.intercept_
        return self

    def _log_proba(self, x):
        return log_softmax(x @ self.coef_.T + self.intercept_, axis=1)

    def predict_proba(self, logits) -> np.ndarray:
        x = np.hstack(stage_log_probs(logits))
        xs = _swap_stack(x, len(logits))
        return softmax(0.5 * (self._log_proba(x) + swap_columns(self._log_proba(xs))), axis=1)

    def to_json(self) -> dict:
        return {"kind": self.kind, "C": self.C, "coef": self.coef_.tolist(), "intercept": self.intercept_.tolist()}

    @classmethod
    def from_json(cls, d):
        c = cls(d["C"])
        c.coef_, c.intercept_ = np.array(d["coef"]), np.array(d["intercept"])
        return c


CALIBRATORS = {"temperature": TemperatureCalibrator, "logistic": LogisticStacker}


def calibrator_from_json(d: dict):
    return CALIBRATORS[d["kind"]].from_json(d)
