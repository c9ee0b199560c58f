"""Predicting new battles with a finished run: the saved fold models of every stage and the saved ensemble.

    from pipeline.predict import Predictor
    predictor = Predictor.load("runs/x")
    probs = predictor.predict_proba(battles)      # (n, 3) in [a, b, tie] order
    frame = predictor.predict_frame(battles)      # id + winner_model_a/winner_model_b/winner_tie

``battles`` is a battle table, a frame in the raw competition format (text cells as JSON strings),
or a list of dicts ``{"prompt", "response_a", "response_b"}`` (optional ``id``) whose values are a
string (one turn) or a list of strings (one per turn). Everything goes through the data layer's
validation (:func:`battles.io.battles_from_frame`).

Each stage predicts with every fold's model (swap TTA inside ``predict_logits``, as in training),
the folds are averaged as cross-fitting averages test logits (:func:`models.stage.average_logits`),
and the ensemble chosen by ``run.py tune``/``stack`` (``ensemble/ensemble.json``) maps them to
probabilities. So predicting a run's own test file reproduces its ``submission.csv``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from battles.io import TEXT_COLUMNS, battles_from_frame
from ensemble.calibrators import calibrator_from_json
from ensemble.meta import meta_features
from models.stage import StageContext, stage_class
from battles.files import read_json
from pipeline.runner import ENSEMBLE_DIR, RunError, probs_frame

log = logging.getLogger(__name__)


class IncompleteRunError(RunError):
    """The run lacks something prediction needs; the message names the stage and what is missing."""


def as_battles(data) -> pd.DataFrame:
    """Validate any accepted input into the battle table (labels, if any, are ignored)."""
    if isinstance(data, pd.DataFrame):
        frame, where = data, "<DataFrame>"
    elif isinstance(data, (list, tuple)):
        rows = []
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise TypeError(f"battle {i}: expected a dict with prompt/response_a/response_b, got {type(item).__name__}")
            row = {"id": str(item.get("id", i))}
            for c in TEXT_COLUMNS:
                if c not in item:
                    raise ValueError(f"battle {i}: missing {c!r}")
                row[c] = [item[c]] if isinstance(item[c], str) else item[c]  # a plain string is one turn
            rows.append(row)
        frame, where = pd.DataFrame(rows, columns=["id", *TEXT_COLUMNS]), "<list of battles>"
    else:
        raise TypeError(f"expected a DataFrame or a list of dicts, got {type(data).__name__}")
    battles, _ = battles_from_frame(frame, where, require_labels=False)
    return battles


class Predictor:
    """The fold models of a run's stages and its saved ensemble, ready to predict."""

    def __init__(self, run_dir, stage_names: list[str], fold_models: dict, ensemble: dict):
        self.run_dir = Path(run_dir)
        self.stage_names = stage_names
        self.fold_models = fold_models  # stage name -> FoldModels (every fold's model of the stage)
        self.ensemble = ensemble
        self.model = calibrator_from_json(ensemble["model"])
        self.uses_meta = bool(ensemble.get("meta_features"))

    @classmethod
    def load(cls, run_dir) -> "Predictor":
        run_dir = Path(run_dir)
        check_complete(run_dir)
        ensemble = read_json(run_dir / ENSEMBLE_DIR / "ensemble.json")
        config = read_json(run_dir / "config.json")
        n_folds = _n_folds(run_dir)
        context = StageContext(resource_dir=run_dir / "resources", seed=config.get("seed", 42), progress=False)
        fold_models = {}
        for name in ensemble["stages"]:
            spec = read_json(run_dir / "stages" / name / "spec.json")
            fold_models[name] = stage_class(spec["type"]).load_folds(
                [run_dir / "stages" / name / f"fold{k}" / "model" for k in range(n_folds)], context)
        log.info("predictor: %s, stages %s x %d folds, ensemble %s", run_dir, ensemble["stages"], n_folds,
                 ensemble["chosen"])
        return cls(run_dir, list(ensemble["stages"]), fold_models, ensemble)

    def stage_logits(self, battles: pd.DataFrame) -> list[np.ndarray]:
        """Per stage: the fold models' logits averaged like cross-fitting averages test logits."""
        return [self.fold_models[n].predict_logits(battles) for n in self.stage_names]

    def predict_proba(self, data) -> np.ndarray:
        battles = as_battles(data)
        meta = meta_features(battles) if self.uses_meta else None
        return self.model.predict_proba(self.stage_logits(battles), meta=meta)

    def predict_frame(self, data) -> pd.DataFrame:
        battles = as_battles(data)
        meta = meta_features(battles) if self.uses_meta else None
        return probs_frame(battles["id"], self.model.predict_proba(self.stage_logits(battles), meta=meta))


def _n_folds(run_dir: Path) -> int:
    path = run_dir / "folds.csv"
    if not path.exists():
        raise IncompleteRunError(f"{run_dir}: no folds.csv; is this a run directory?")
    return int(pd.read_csv(path)["fold"].nunique())


def check_complete(run_dir) -> None:
    """Raise :class:`IncompleteRunError` naming the first stage (and what it lacks) that cannot predict."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IncompleteRunError(f"{run_dir}: run directory not found")
    n_folds = _n_folds(run_dir)
    path = run_dir / ENSEMBLE_DIR / "ensemble.json"
    if not path.exists():
        raise IncompleteRunError(f"{run_dir}: no saved ensemble ({path}); run `run.py tune --run {run_dir}` first")
    ensemble = read_json(path)
    for name in ensemble["stages"]:
        stage_dir = run_dir / "stages" / name
        if not (stage_dir / "done.json").exists():
            raise IncompleteRunError(f"{run_dir}: stage {name!r} is incomplete: {stage_dir}/done.json is missing "
                                     f"(the stage did not finish); rerun it, then `run.py tune`")
        missing = [f"fold{k}" for k in range(n_folds)
                   if not (stage_dir / f"fold{k}" / "done.json").exists() or not (stage_dir / f"fold{k}" / "model").is_dir()]
        if missing:
            raise IncompleteRunError(f"{run_dir}: stage {name!r} is incomplete: fold model(s) {missing} missing "
                                     f"under {stage_dir}; rerun the stage")
        key = ensemble.get("stage_keys", {}).get(name)
        if key is not None and read_json(stage_dir / "done.json").get("key") != key:
            raise IncompleteRunError(f"{run_dir}: stage {name!r} was refitted after the ensemble was tuned; "
                                     f"run `run.py tune --run {run_dir}` again")
        if not (stage_dir / "spec.json").exists():
            raise IncompleteRunError(f"{run_dir}: stage {name!r} is incomplete: {stage_dir}/spec.json is missing")


def write_predictions(frame: pd.DataFrame, out, overwrite: bool = False) -> Path:
    """Write a prediction table atomically; refuse to replace an existing file unless ``overwrite``."""
    from battles.files import write_atomic

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    write_atomic(out, lambda p: frame.to_csv(p, index=False, float_format="%.9g"))
    return out
