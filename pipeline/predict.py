"""Predicting new battles with a finished run: the saved models of every stage and the saved ensemble.

    from pipeline.predict import Predictor
    predictor = Predictor.load("runs/x")
    probs = predictor.predict_proba(battles)      # (n, 3) in [a, b, tie] order
    frame = predictor.predict_frame(battles)      # id + winner_model_a/winner_model_b/winner_tie

``battles`` is a battle table, a frame in the raw competition format (text cells as JSON strings),
or a list of dicts ``{"prompt", "response_a", "response_b"}`` (optional ``id``) whose values are a
string (one turn) or a list of strings (one per turn). Everything goes through the data layer's
validation (:func:`battles.io.battles_from_frame`).

Each stage predicts with the models its fold plan made (every fold's model, or the one refitted on
all rows), loaded together by the stage type (:meth:`models.stage.Stage.load_folds`: the decoder
loads its base model once for all adapters) and averaged as cross-fitting averages test logits; the
ensemble chosen by ``run.py tune`` (``ensemble/ensemble.json``) maps them to probabilities. Each
stage's logits are held as the run stores them (:func:`pipeline.rundir.as_stored`), so predicting a
run's own test file reproduces its ``submission.csv`` byte for byte, whether the run predicted its test
file in one command or resumed (each model's logits are rounded as stored before they are averaged:
:func:`models.stage.average_logits`). Before it starts, the predictor
logs its plan (models and forward passes per battle per stage) and, after a timed first chunk, an
estimate of the whole job; one progress bar with an ETA covers every stage and chunk.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from battles.columns import TEXT_COLUMNS
from battles.io import battles_from_frame
from ensemble.meta import meta_features
from ensemble.record import EnsembleRecord
from kernel.context import StageContext
from kernel.dist import join_launch
from kernel.files import read_json
from models.stage import stage_class
from pipeline.config import RunConfig, StageSpec
from pipeline.bundle import open_bundle
from pipeline.crossfit import planned_folds
from pipeline.manifests import check_done, check_ensemble
from pipeline.rundir import FoldDir, RunDir, RunDirError, as_stored, probs_frame, read_folds

log = logging.getLogger(__name__)
CHUNK = 2048  # battles per prediction chunk (bounds memory; the progress bar moves per chunk)


class IncompleteRunError(RunDirError):
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


def stage_models(run: RunDir, name: str, spec: StageSpec, folds: np.ndarray) -> list[FoldDir]:
    """The saved models a stage predicts with: the refitted one, else one per planned fold."""
    stage = run.stage(name)
    if spec.refit_full:
        return [stage.full]
    return [stage.fold(k) for k in planned_folds(spec, folds)]


class Predictor:
    """The saved models of a run's stages and its saved ensemble, ready to predict."""

    def __init__(self, run: RunDir, specs: dict, stage_models: dict, ensemble: EnsembleRecord, progress: bool = True):
        self.run = run
        self.specs = specs  # stage name -> StageSpec
        self.stage_names = list(specs)  # the ensemble's stages (from load); stage_logits predicts these
        self.stage_models = stage_models  # stage name -> FoldModels (the stage's saved models, together)
        self.ensemble = ensemble
        self.model = ensemble.calibrator()
        self.progress = progress
        self.bundle = None  # the export bundle it was loaded from (pipeline.bundle), if any

    @classmethod
    def load(cls, run_dir, progress: bool = True, base_dir=None) -> "Predictor":
        """A run directory's or an export bundle's models, verified against their manifests before loading
        (:mod:`pipeline.manifests`, :mod:`pipeline.bundle`); ``base_dir``: where a bundle's referenced base
        checkpoints live on this machine."""
        run = RunDir.open(run_dir)
        bundle = open_bundle(run, base_dir)  # a bundle: every file checked against bundle.json
        if bundle is None:
            check_ensemble(run)
        join_launch()  # under torchrun / accelerate launch: the process group the deep stages shard over
        ensemble, config, folds = check_complete(run)
        context = StageContext(resource_dir=run.resources, seed=config.seed, progress=False)
        specs = {n: config.stages[n] for n in ensemble.stages}
        places = {n: stage_models(run, n, s, folds) for n, s in specs.items()}
        if bundle is None:
            for n, models in places.items():
                for place in (run.stage(n), *models):
                    check_done(place)
        models = {n: stage_class(s.type).load_folds(
                      bundle.model_dirs([m.model for m in places[n]]) if bundle else [m.model for m in places[n]],
                      context) for n, s in specs.items()}
        log.info("predictor: %s, ensemble %s over %s", run, ensemble.chosen, ensemble.stages)
        predictor = cls(run, specs, models, ensemble, progress)
        predictor.bundle = bundle  # keeps its scratch views of remapped model folders while the models live
        return predictor

    def plan(self) -> list[dict]:
        """Per stage: models averaged and forward passes per battle (two per model with swap TTA)."""
        rows = []
        for name in self.stage_names:
            n_models = len(self.stage_models[name])
            # both A/B orders unless the stage's resolved params turn swap TTA off (only deep stages have the option)
            orders = 1 if self.specs[name].params.get("swap_tta") is False else 2
            rows.append({"stage": name, "type": self.specs[name].type, "models": n_models,
                         "passes_per_battle": n_models * orders})
        return rows

    def stage_logits(self, battles: pd.DataFrame) -> list[np.ndarray]:
        """Per stage: its models' logits averaged like cross-fitting averages test logits, chunk by chunk
        under one progress bar (with an estimate of the whole job after the first chunk)."""
        plan = self.plan()
        log.info("predict plan: %d battles; %s", len(battles), "; ".join(
            f"{p['stage']} ({p['type']}): {p['models']} model(s), {p['passes_per_battle']} forward passes per battle"
            for p in plan))
        out = [np.zeros((len(battles), 3)) for _ in self.stage_names]
        bar = tqdm(total=len(battles), desc="predict", unit="battle", disable=not self.progress)
        started = time.time()
        for start in range(0, len(battles), CHUNK):
            chunk = battles.iloc[start:start + CHUNK]
            for i, name in enumerate(self.stage_names):
                out[i][start:start + len(chunk)] = as_stored(self.stage_models[name].predict_logits(chunk))
            bar.update(len(chunk))
            if start == 0 and len(battles) > CHUNK:
                per_battle = (time.time() - started) / len(chunk)
                log.info("predict: first %d battles took %.1f s; estimate for all %d: %.0f s", len(chunk),
                         time.time() - started, len(battles), per_battle * len(battles))
        bar.close()
        return out

    def predict_proba(self, data) -> np.ndarray:
        return self._proba(as_battles(data))

    def predict_frame(self, data) -> pd.DataFrame:
        battles = as_battles(data)
        return probs_frame(battles["id"], self._proba(battles))

    def predict_within(self, data, budget):
        """Probabilities for ``data`` that are ready before ``budget`` (a :class:`pipeline.budget.Budget`)
        ends, degraded by the stated plan where the projection says they would not be: a
        :class:`pipeline.budget.BudgetResult` (probabilities, each row's treatment, a one-line summary)."""
        from pipeline.budget import predict_within

        return predict_within(self, as_battles(data), budget)

    def _proba(self, battles: pd.DataFrame) -> np.ndarray:
        return self.ensemble_proba(battles, dict(zip(self.stage_names, self.stage_logits(battles))))

    def ensemble_proba(self, battles: pd.DataFrame, logits: dict[str, np.ndarray]) -> np.ndarray:
        """The saved ensemble's probabilities from its stages' ``logits`` (stage name -> (n, 3))."""
        meta = meta_features(battles) if self.ensemble.meta_features else None
        return self.model.predict_proba([logits[n] for n in self.ensemble.stages], meta=meta)


def check_complete(run: RunDir) -> tuple[EnsembleRecord, RunConfig, np.ndarray]:
    """Raise :class:`IncompleteRunError` naming the first stage (and what it lacks) that cannot predict;
    return what was read to check it: the saved ensemble, the run's config and its folds."""
    if not run.folds.exists():
        raise IncompleteRunError(f"{run}: no folds.csv; the run did not get past reading its data")
    if not run.ensemble.exists():
        raise IncompleteRunError(f"{run}: no saved ensemble ({run.ensemble}); run `run.py tune --run {run} --apply` first")
    ensemble = EnsembleRecord.read(run.ensemble)
    config = RunConfig.model_validate(read_json(run.config))
    folds = read_folds(run.folds)["fold"].to_numpy()
    for name in ensemble.stages:
        stage_dir = run.stage(name)
        if name not in config.stages or not stage_dir.done.exists():
            raise IncompleteRunError(f"{run}: stage {name!r} is incomplete: {stage_dir.done} is missing "
                                     f"(the stage did not finish); rerun it, then `run.py tune --apply`")
        missing = [m.path.name for m in stage_models(run, name, config.stages[name], folds)
                   if not m.done.exists() or not m.model.is_dir()]
        if missing:
            raise IncompleteRunError(f"{run}: stage {name!r} is incomplete: model(s) {missing} missing under "
                                     f"{stage_dir.path}; rerun the stage")
        key = ensemble.stage_keys.get(name)
        if key is not None and read_json(stage_dir.done).get("key") != key:
            raise IncompleteRunError(f"{run}: stage {name!r} was refitted after the ensemble was tuned; "
                                     f"run `run.py tune --run {run} --apply` again")
    return ensemble, config, folds
