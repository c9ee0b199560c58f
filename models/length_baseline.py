"""The length-only baseline users compare against: multinomial logistic regression on reply lengths.

Features: log characters and log words of each reply, as A-minus-B and as absolute gap, plus the
total (long battles tie less often). The counts are the ``chars`` and ``words`` columns of the text
statistics block, read through the run-level feature cache (:mod:`features.cache`), so the run
counts them once for this stage and the LightGBM stages together. Trained on both A/B orders and
predicted with swap TTA, so it is the same fair comparison the other stages get. Saved as plain
JSON coefficients.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import log_softmax
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from battles.labels import expand_targets, label_matrix, row_weights, swap_columns
from features.base import SidedFeatures
from features.cache import BlockCache
from features.text_stats import SIDE_NAMES, TextStatsBlock
from kernel.schema import PositiveFloat, Section
from models.stage import Stage, StageContext

_CHARS, _WORDS = SIDE_NAMES.index("chars"), SIDE_NAMES.index("words")
UNSEEN_CLASS_PROB = 1e-4  # probability given to a class no training row had (e.g. no tie in a small fold)


def length_features(stats: SidedFeatures) -> np.ndarray:
    """The six length features from the text statistics of the battles."""
    ca, wa = np.log1p(stats.a[:, _CHARS]), np.log1p(stats.a[:, _WORDS])
    cb, wb = np.log1p(stats.b[:, _CHARS]), np.log1p(stats.b[:, _WORDS])
    return np.column_stack([ca - cb, wa - wb, np.abs(ca - cb), np.abs(wa - wb), ca + cb, wa + wb])


class LengthParams(Section):
    C: PositiveFloat = 1.0  # inverse L2 strength of the logistic regression


class LengthLogisticStage(Stage):
    kind = "length_lr"
    Params = LengthParams

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self.stats = BlockCache(TextStatsBlock(context=self.context))
        self.scaler = StandardScaler()
        self.model = LogisticRegression(C=self.params.C, max_iter=1000)

    def prepare(self, battles: pd.DataFrame) -> None:
        self.stats.warm(battles)

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "LengthLogisticStage":
        stats = self.stats.sided(train)
        both = np.vstack([length_features(stats), length_features(stats.swapped())])
        targets = label_matrix(train)
        weights = row_weights(train)
        rows, y, w = expand_targets(np.vstack([targets, swap_columns(targets)]), np.concatenate([weights, weights]))
        x = self.scaler.fit_transform(both)[rows]
        self.model.fit(x, y, sample_weight=w)
        return self

    def predict_both_orders(self, battles: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Both orders from one lookup of the statistics (the swapped battle's are the sides exchanged)."""
        stats = self.stats.sided(battles)
        return tuple(self._log_proba(self.scaler.transform(length_features(s))) for s in (stats, stats.swapped()))

    def _log_proba(self, x: np.ndarray) -> np.ndarray:
        """``(n, 3)`` log-probabilities; scikit-learn gives a column only per class the training rows had."""
        if len(self.model.classes_) == 3:
            return log_softmax(self.model.predict_log_proba(x), axis=1)
        probs = np.full((len(x), 3), UNSEEN_CLASS_PROB)
        probs[:, self.model.classes_] = self.model.predict_proba(x)
        return np.log(probs / probs.sum(axis=1, keepdims=True))

    def save(self, directory) -> None:
        """Everything in ``stage.json``: params, the scaler and the coefficients (plain JSON)."""
        self.write_stage_json(directory, scaler_mean=self.scaler.mean_, scaler_scale=self.scaler.scale_,
                              coef=self.model.coef_, intercept=self.model.intercept_, classes=self.model.classes_)

    @classmethod
    def load(cls, directory, context: StageContext | None = None) -> "LengthLogisticStage":
        meta = cls.read_stage_json(directory)
        stage = cls(meta["params"], context)
        stage.scaler.mean_, stage.scaler.scale_ = np.array(meta["scaler_mean"]), np.array(meta["scaler_scale"])
        stage.scaler.n_features_in_ = len(stage.scaler.mean_)
        stage.model.coef_, stage.model.intercept_ = np.array(meta["coef"]), np.array(meta["intercept"])
        stage.model.classes_ = np.array(meta["classes"])
        return stage
