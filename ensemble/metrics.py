"""Scores every report uses: 3-class log loss and accuracy, overall and per true class, and the class prior."""
from __future__ import annotations

import numpy as np
from scipy.special import softmax
from sklearn.metrics import accuracy_score, log_loss

from battles.labels import CLASS_NAMES


def probs_from_logits(logits) -> np.ndarray:
    """Probabilities ``(n, 3)`` from logits (log-probabilities up to a per-row constant): softmax."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=1)


def clip_probs(probs: np.ndarray, eps: float = 1e-15) -> np.ndarray:
    probs = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0)
    return probs / probs.sum(axis=1, keepdims=True)


def scores(y: np.ndarray, probs: np.ndarray) -> dict:
    """Log loss and accuracy overall, and per true class (log loss and recall on that class's rows)."""
    probs = clip_probs(probs)
    out = {"log_loss": float(log_loss(y, probs, labels=[0, 1, 2])),
           "accuracy": float(accuracy_score(y, probs.argmax(axis=1))), "n": int(len(y))}
    for c, name in enumerate(CLASS_NAMES):
        mask = y == c
        if mask.any():
            out[f"log_loss_{name}"] = float(-np.log(probs[mask, c]).mean())
            out[f"accuracy_{name}"] = float((probs[mask].argmax(axis=1) == c).mean())
    return out


def prior_probs(y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each row's fold-wise class prior: the class frequencies (plus one) of the other folds."""
    probs = np.zeros((len(y), 3))
    for k in np.unique(folds):
        counts = np.bincount(y[folds != k], minlength=3) + 1.0
        probs[folds == k] = counts / counts.sum()
    return probs


def prior_log_loss(y: np.ndarray, folds: np.ndarray) -> float:
    """Log loss of predicting each fold's training class frequencies: the floor any model must beat."""
    return float(log_loss(y, prior_probs(y, folds), labels=[0, 1, 2]))
