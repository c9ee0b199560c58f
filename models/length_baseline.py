"""The length-only baseline users compare against: multinomial logistic regression on reply lengths.

Features: log characters and log words of each reply, as A-minus-B and as absolute gap, plus the
total (long battles tie less often). Trained on both A/B orders and predicted with swap TTA, so it
is the same fair comparison the other stages get. Saved as plain JSON coefficients.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from battles.files import write_json
from battles.labels import expand_targets, label_matrix, row_weights, swap_battles
from battles.schema import Section
from battles.text import plain_text, words
from models.stage import Stage, StageContext


def length_features(battles: pd.DataFrame) -> np.ndarray:
    def side(col):
        texts = [plain_text(t) for t in battles[col]]
        return np.log1p([len(t) for t in texts]), np.log1p([len(words(t)) for t in texts])

    (ca, wa), (cb, wb) = side("response_a"), side("response_b")
    return np.column_stack([ca - cb, wa - wb, np.abs(ca - cb), np.abs(wa - wb), ca + cb, wa + wb])


class LengthParams(Section):
    C: float = 1.0  # inverse L2 strength of the logistic regression


class LengthLogisticStage(Stage):
    kind = "length_lr"
    Params = LengthParams

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self.scaler = StandardScaler()
        self.model = LogisticRegression(C=self.params.C, max_iter=1000)

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "LengthLogisticStage":
        both = pd.concat([train, swap_battles(train)], ignore_index=True)
        rows, y, w = expand_targets(label_matrix(both), row_weights(both))
        x = self.scaler.fit_transform(length_features(both))[rows]
        self.model.fit(x, y, sample_weight=w)
        return self

    def predict_one_order(self, battles: pd.DataFrame) -> np.ndarray:
        return self.model.predict_log_proba(self.scaler.transform(length_features(battles)))

    def save(self, directory) -> None:
        write_json(Path(directory) / "stage.json", {
            "kind": self.kind, "params": self.params.as_dict(),
            "scaler_mean": self.scaler.mean_, "scaler_scale": self.scaler.scale_,
            "coef": self.model.coef_, "intercept": self.model.intercept_, "classes": self.model.classes_,
        })

    @classmethod
    def load(cls, directory, context: StageContext | None = None) -> "LengthLogisticStage":
        meta = json.loads((Path(directory) / "stage.json").read_text())
        stage = cls(meta["params"], context)
        stage.scaler.mean_, stage.scaler.scale_ = np.array(meta["scaler_mean"]), np.array(meta["scaler_scale"])
        stage.scaler.n_features_in_ = len(stage.scaler.mean_)
        stage.model.coef_, stage.model.intercept_ = np.array(meta["coef"]), np.array(meta["intercept"])
        stage.model.classes_ = np.array(meta["classes"])
        return stage
