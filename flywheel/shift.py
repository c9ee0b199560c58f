"""Distribution shift: does an external source look like the target's prompts? (adversarial validation)

For each external source, a classifier (TF-IDF word 1-2 grams of the prompt text + logistic
regression) learns to tell target prompts from that source's prompts, cross-validated over unique
normalised prompts (so the same prompt never sits on both sides of a split: grouped by prompt).
The out-of-fold ROC AUC answers "does this source look like arena traffic?": 0.5 means it cannot
be told apart, 1.0 means it is a different world.

The out-of-fold probability ``p = P(target | prompt)`` of each external prompt becomes an
importance weight ``w = p / (1 - p) * (n_source / n_target)`` (density ratio target/source),
normalised to mean 1 over the source's battles and clipped to ``[clip_min, clip_max]``. Train
with these weights (times the source weight, :func:`flywheel.sources.external_rows`) to lean on
the external battles that look like target battles.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from battles.folds import prompt_groups
from battles.text import plain_text
from kernel.context import DEFAULT_SEED
from kernel.schema import PositiveFloat, PositiveInt, Section

log = logging.getLogger(__name__)


class ShiftConfig(Section):
    """The config's ``external.shift`` section: the adversarial classifier and the weight clipping."""

    n_folds: int = Field(5, ge=2)  # cross-validation folds of the adversarial classifier
    max_chars: PositiveInt = 2000  # prompt text per battle fed to TF-IDF
    max_features: PositiveInt = 50_000  # TF-IDF vocabulary of the classifier
    C: PositiveFloat = 1.0  # inverse L2 strength of its logistic regression
    clip_min: PositiveFloat = 0.05  # importance weights are clipped to [clip_min, clip_max]
    clip_max: PositiveFloat = 5.0  # upper clip of the importance weights

    @model_validator(mode="after")
    def _clip_order(self):
        if self.clip_min > self.clip_max:
            raise ValueError(f"clip_min {self.clip_min} must be <= clip_max {self.clip_max}")
        return self


def adversarial_auc(target_prompts: list[str], source_prompts: list[str],
                    config: ShiftConfig | None = None, seed: int = DEFAULT_SEED) -> tuple[float, np.ndarray]:
    """OOF AUC of target-vs-source on unique prompts and P(target) for each source prompt."""
    config = config or ShiftConfig()
    texts = [t[:config.max_chars] for t in target_prompts] + [t[:config.max_chars] for t in source_prompts]
    y = np.r_[np.ones(len(target_prompts)), np.zeros(len(source_prompts))].astype(int)
    n_folds = min(config.n_folds, len(target_prompts), len(source_prompts))
    if n_folds < 2:
        raise ValueError(f"need at least 2 distinct prompts on each side, got {len(target_prompts)} target "
                         f"and {len(source_prompts)} source prompts")
    oof = np.zeros(len(texts))
    for train_idx, valid_idx in StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(texts, y):
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=config.max_features, sublinear_tf=True)
        x_train = vec.fit_transform([texts[i] for i in train_idx])
        model = LogisticRegression(C=config.C, max_iter=1000, class_weight="balanced")
        model.fit(x_train, y[train_idx])
        oof[valid_idx] = model.predict_proba(vec.transform([texts[i] for i in valid_idx]))[:, 1]
    return float(roc_auc_score(y, oof)), oof[len(target_prompts):]


def importance_weights(p_target: np.ndarray, n_source: int, n_target: int, clip_min: float, clip_max: float) -> np.ndarray:
    """``p/(1-p) * n_source/n_target``, normalised to mean 1, clipped to ``[clip_min, clip_max]``."""
    p = np.clip(np.asarray(p_target, dtype=float), 1e-6, 1 - 1e-6)
    w = p / (1 - p) * (n_source / n_target)
    w = w / w.mean()
    return np.clip(w, clip_min, clip_max)


def shift_weights(target: pd.DataFrame, external: pd.DataFrame,
                  config: ShiftConfig | None = None, seed: int = DEFAULT_SEED) -> tuple[np.ndarray, dict]:
    """Importance weight per external battle (mean 1 per source before clipping) and a report
    ``{source: {auc, n_target_prompts, n_source_prompts, weight_min/median/max}}``."""
    config = config or ShiftConfig()
    t_groups = prompt_groups(target)
    t_first = pd.Series(np.arange(len(target))).groupby(t_groups).first()
    target_prompts = [plain_text(target["prompt"].iat[i]) for i in t_first.to_numpy()]
    e_groups = prompt_groups(external)
    sources = external["source"].astype(str).to_numpy()
    weights = np.ones(len(external))
    report = {}
    for source in sorted(set(sources)):
        rows = np.flatnonzero(sources == source)
        uniq, inverse = np.unique(e_groups[rows], return_inverse=True)
        first = {g: rows[k] for k, g in reversed(list(enumerate(e_groups[rows])))}
        source_prompts = [plain_text(external["prompt"].iat[first[g]]) for g in uniq]
        auc, p = adversarial_auc(target_prompts, source_prompts, config, seed)
        w_rows = importance_weights(p[inverse], len(uniq), len(target_prompts), config.clip_min, config.clip_max)
        weights[rows] = w_rows
        report[source] = {"auc": auc, "n_target_prompts": len(target_prompts), "n_source_prompts": len(uniq),
                          "n_battles": len(rows), "weight_min": float(w_rows.min()),
                          "weight_median": float(np.median(w_rows)), "weight_max": float(w_rows.max()),
                          "share_at_clip_min": float(np.mean(w_rows <= config.clip_min))}
        log.info("adversarial validation %s: AUC %.3f over %d target vs %d source prompts; weights %.3g..%.3g",
                 source, auc, len(target_prompts), len(uniq), w_rows.min(), w_rows.max())
    return weights, report
