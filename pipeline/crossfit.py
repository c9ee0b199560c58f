"""Cross-fitting one stage over the run's folds, with resume.

For every fold of the stage's plan the stage is fitted on the other folds (plus any training-only
rows, such as external data) with the fold's battles as its validation set, then predicts the fold
(out-of-fold logits) and the test battles. The plan (:class:`pipeline.config.StageSpec`) may name a
subset of the folds (``folds: [0]``: one model, OOF logits for fold 0's rows only) and may add one
model refitted on every training row (``refit_full``), whose test logits then replace the folds'.

Resume: each fitted model lives in its own directory (``stages/<name>/fold<k>/`` or ``full/``) with
a ``done.json`` holding its key: the stage type and resolved params, the training data, the folds,
the training-only rows and the seed. The plan and the test file are not part of that key: widening
``folds`` reuses the folds already fitted, and a new test file is predicted by the saved model
without refitting (the fold's test logits are keyed by the test data's hash). A fold directory whose
key changed is emptied before it is refitted; one with the same key keeps what an interrupted fit
left there (a deep stage's training checkpoints, :attr:`kernel.context.StageContext.work_dir`).

Stages that can (:func:`models.stage.predict_with_orders`) also leave their single-order OOF
log-probabilities before swap TTA (``oof_logits_straight.csv`` / ``oof_logits_swapped.csv``), for the
report's position-bias check.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from battles.columns import LABEL_COLUMNS, SOFT_COLUMNS
from battles.io import data_hash
from battles.labels import hard_mask, label_index
from ensemble.metrics import probs_from_logits, scores
from kernel.context import StageContext
from kernel.dist import wait_for_everyone
from kernel.files import content_key, read_json, write_json
from models.stage import average_logits, make_stage, predict_with_orders, stage_class
from pipeline.config import StageSpec
from pipeline.rundir import (
    LOGIT_COLUMNS,
    ORDERS,
    FoldDir,
    RunDir,
    StageDir,
    as_stored,
    read_id_table,
    read_logits,
    write_logits,
)
from pipeline.timings import Timings

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """A finished stage: OOF logits where it has them (NaN rows elsewhere), test logits, metrics."""

    name: str
    oof_logits: np.ndarray  # (n_train, 3); NaN on rows the plan does not cover
    covered: np.ndarray  # (n_train,) bool: rows with OOF logits
    test_logits: np.ndarray | None
    metrics: dict
    orders: tuple[np.ndarray, np.ndarray] | None = None  # single-order OOF log-probs (straight, swapped)
    key: str = ""  # the stage's resume key (what the ensemble was fitted on; predict checks it)


def planned_folds(spec: StageSpec, folds: np.ndarray) -> list[int]:
    return list(spec.folds) if spec.folds is not None else sorted(int(k) for k in np.unique(folds))


def data_keys(train: pd.DataFrame, test: pd.DataFrame | None, extra: pd.DataFrame | None) -> dict:
    """Content hashes of a run's tables (computed once per run: hashing 500k battles takes seconds)."""
    return {"train": data_hash(train), "test": data_hash(test) if test is not None else None,
            "extra": data_hash(extra) if extra is not None else None}


def model_key(spec: StageSpec, keys: dict, folds: np.ndarray, seed: int, which) -> str:
    """What one fitted model depends on (``which``: a fold index or "full"); not the plan, not the test file."""
    return content_key({"type": spec.type, "params": spec.params}, keys["train"], folds.tolist(), keys["extra"],
                       seed, which)


def _label_free(battles: pd.DataFrame) -> pd.DataFrame:
    return battles.drop(columns=[c for c in [*LABEL_COLUMNS, *SOFT_COLUMNS] if c in battles.columns])


def _done(place: FoldDir | StageDir, key: str) -> dict | None:
    """The ``done.json`` record of a fold or stage finished with this key, else None."""
    if place.done.exists():
        record = read_json(place.done)
        if record.get("key") == key:
            return record
    return None


class _Fitter:
    """The stage object of one cross-fitting call, prepared on first use (label-free resources)."""

    def __init__(self, name, spec, context, everything, timings):
        self.name, self.spec, self.context, self.everything, self.timings = name, spec, context, everything, timings
        self.stage = None
        self.holds = None  # which model the stage object holds now (a fold index or "full")

    def get(self):
        if self.stage is None:
            self.stage = make_stage(self.spec.type, self.spec.params, self.context)
            with self.timings.step(f"{self.name}: features"):
                self.stage.prepare(self.everything())
        return self.stage


def crossfit_stage(run: RunDir, name: str, spec: StageSpec, train: pd.DataFrame, folds: np.ndarray,
                   test: pd.DataFrame | None = None, extra_train: pd.DataFrame | None = None,
                   seed: int = 42, progress: bool = True, timings: Timings | None = None,
                   feature_memo: dict | None = None, hashes: dict | None = None) -> StageResult:
    """Fit the stage's fold plan (resuming what is done); return its OOF and test logits.
    ``feature_memo``: the run's in-memory store of fold-independent features, shared by its stages;
    ``hashes``: :func:`data_keys` of the tables (computed here when not given)."""
    timings = timings or Timings()
    stage_dir = run.stage(name)
    plan = planned_folds(spec, folds)
    hashes = hashes or data_keys(train, test, extra_train)
    test_hash = hashes["test"]
    keys = {k: model_key(spec, hashes, folds, seed, k) for k in plan}
    if spec.refit_full:
        keys["full"] = model_key(spec, hashes, folds, seed, "full")
    stage_key = content_key({str(k): v for k, v in keys.items()}, spec.folds, spec.refit_full, test_hash)
    if _done(stage_dir, stage_key) is not None:
        log.info("stage %s: finished earlier with the same config and data, reusing it", name)
        return load_stage_result(run, name, train, test)

    context = StageContext(resource_dir=run.resources, seed=seed, progress=progress,
                           feature_memo=feature_memo if feature_memo is not None else {})
    fitter = _Fitter(name, spec, context, lambda: pd.concat(
        [_label_free(x) for x in (train, test, extra_train) if x is not None], ignore_index=True), timings)
    started = time.time()
    n = len(train)
    oof = np.full((n, 3), np.nan)
    orders = {o: np.full((n, 3), np.nan) for o in ORDERS}
    have_orders = True
    test_per_fold = []
    bar = tqdm(plan, desc=name, unit="fold", disable=not progress)
    for k in bar:
        fold, valid_mask = stage_dir.fold(k), folds == k
        valid = train[valid_mask]
        record = _done(fold, keys[k])
        if record is not None:
            oof[valid_mask] = read_logits(fold.valid_logits, valid["id"].tolist())
            have_orders = have_orders and all(fold.valid_order(o).exists() for o in ORDERS)
            if have_orders:
                for o in ORDERS:
                    orders[o][valid_mask] = read_logits(fold.valid_order(o), valid["id"].tolist())
            bar.set_postfix_str(f"fold {k} reused")
        else:
            stage = fitter.get()  # label-free preparation is its own step ("<name>: features")
            with timings.step(f"{name}: fold {k}"):
                _fit(stage, fold, keys[k], _with_extra(train[~valid_mask], extra_train), valid)
                oof[valid_mask], straight, swapped = predict_with_orders(stage, valid)
                write_logits(fold.valid_logits, valid["id"].tolist(), oof[valid_mask])
                if straight is None:
                    have_orders = False
                else:
                    for o, values in zip(ORDERS, (straight, swapped)):
                        orders[o][valid_mask] = values
                        write_logits(fold.valid_order(o), valid["id"].tolist(), values)
                record = _finish(fitter, fold, keys[k], int(k))
        if test is not None and not spec.refit_full:
            test_per_fold.append(_test_logits(fitter, k, fold, record, test, test_hash, timings,
                                              f"{name}: test fold {k}"))
    test_logits = None
    if spec.refit_full:
        test_logits = _refit_full(fitter, stage_dir.full, keys["full"], train, extra_train, test, test_hash, timings)
    elif test is not None:
        test_logits = average_logits(test_per_fold)

    covered = ~np.isnan(oof).any(axis=1)
    oof, test_logits = as_stored(oof), None if test_logits is None else as_stored(test_logits)
    result = StageResult(name, oof, covered, test_logits, {},
                         tuple(as_stored(orders[o]) for o in ORDERS) if have_orders else None, stage_key)
    result.metrics = stage_metrics(name, spec, train, result, plan, time.time() - started)
    _write_stage(run, result, spec, train, test)
    return result


def _test_logits(fitter: _Fitter, which, fold: FoldDir, record: dict, test, test_hash, timings, step) -> np.ndarray:
    """A fitted model's test logits: saved for this test file, else predicted now by the model just
    fitted or the saved one, without refitting."""
    if record.get("test") == test_hash and fold.test_logits.exists():
        return read_logits(fold.test_logits, test["id"].tolist())
    with timings.step(step):
        stage = fitter.stage if fitter.holds == which else stage_class(fitter.spec.type).load(fold.model, fitter.context)
        logits = stage.predict_logits(test)
    write_logits(fold.test_logits, test["id"].tolist(), logits)
    write_json(fold.done, {**record, "test": test_hash})
    return logits


def _with_extra(rows: pd.DataFrame, extra_train: pd.DataFrame | None) -> pd.DataFrame:
    """A model's training rows: ``rows`` plus the external training-only rows, if any."""
    if extra_train is None or not len(extra_train):
        return rows
    return pd.concat([rows, extra_train], ignore_index=True)


def _fit(stage, place: FoldDir, key: str, fit_rows: pd.DataFrame, valid: pd.DataFrame | None) -> None:
    """Claim the model's directory, then fit (its directory is the stage's scratch space: checkpoints)."""
    place.claim(key)
    stage.context.work_dir = place.path
    stage.fit(fit_rows, valid)


def _finish(fitter: _Fitter, place: FoldDir, key: str, which) -> dict:
    """Save the model just fitted and mark it done (after everything else it writes); return the record."""
    fitter.stage.save(place.model)
    fitter.holds = which
    record = {"key": key, "stage": fitter.name, "fold": which, "test": None}
    write_json(place.done, record)
    wait_for_everyone()
    return record


def _refit_full(fitter: _Fitter, full: FoldDir, key: str, train, extra_train, test, test_hash, timings):
    record = _done(full, key)
    if record is None:
        stage = fitter.get()
        with timings.step(f"{fitter.name}: refit on all rows"):
            _fit(stage, full, key, _with_extra(train, extra_train), None)
            record = _finish(fitter, full, key, "full")
    if test is None:
        return None
    return _test_logits(fitter, "full", full, record, test, test_hash, timings, f"{fitter.name}: test (refit)")


def stage_metrics(name: str, spec: StageSpec, train: pd.DataFrame, result: StageResult, plan: list[int],
                  seconds: float) -> dict:
    """Coverage and OOF scores (on covered rows with a hard label) of a stage."""
    scored = result.covered & hard_mask(train)
    metrics = {"stage": name, "type": spec.type, "seconds": round(seconds, 1),
               "coverage": {"folds": plan, "rows": int(result.covered.sum()), "of": len(train),
                            "refit_full": spec.refit_full}}
    if scored.any():
        metrics["oof"] = scores(label_index(train[scored]), probs_from_logits(result.oof_logits[scored]))
        log.info("stage %s: OOF log loss %.4f, accuracy %.3f on %d rows", name, metrics["oof"]["log_loss"],
                 metrics["oof"]["accuracy"], int(scored.sum()))
    return metrics


def _write_stage(run: RunDir, result: StageResult, spec: StageSpec, train, test) -> None:
    stage_dir = run.stage(result.name)
    ids = train["id"].to_numpy()[result.covered].tolist()
    write_logits(stage_dir.oof_logits, ids, result.oof_logits[result.covered])
    for o, values in zip(ORDERS, result.orders or (None, None)):
        if values is not None:
            write_logits(stage_dir.oof_order(o), ids, values[result.covered])
        elif stage_dir.oof_order(o).exists():
            stage_dir.oof_order(o).unlink()
    if result.test_logits is not None:
        write_logits(stage_dir.test_logits, test["id"].tolist(), result.test_logits)
    write_json(stage_dir.metrics, result.metrics)
    write_json(stage_dir.spec, spec.as_dict())
    write_json(stage_dir.done, {"key": result.key, "stage": result.name})


def load_stage_result(run: RunDir, name: str, train: pd.DataFrame, test: pd.DataFrame | None) -> StageResult:
    """A stage finished earlier, read back from its files (resuming)."""
    stage_dir = run.stage(name)
    if not stage_dir.done.exists():
        raise FileNotFoundError(f"{stage_dir.path}: stage {name!r} has not finished (no done.json); run it first")
    index = pd.Series(np.arange(len(train)), index=train["id"].astype(str).to_numpy())
    table = read_id_table(stage_dir.oof_logits)
    ids = table["id"].tolist()
    rows = index.loc[ids].to_numpy()
    covered = np.zeros(len(train), dtype=bool)
    covered[rows] = True
    oof = np.full((len(train), 3), np.nan)
    oof[rows] = table[LOGIT_COLUMNS].to_numpy(dtype=np.float64)
    orders = None
    if all(stage_dir.oof_order(o).exists() for o in ORDERS):
        orders = tuple(np.full((len(train), 3), np.nan) for _ in ORDERS)
        for values, o in zip(orders, ORDERS):
            values[rows] = read_logits(stage_dir.oof_order(o), ids)
    test_logits = None
    if test is not None and stage_dir.test_logits.exists():
        test_logits = read_logits(stage_dir.test_logits, test["id"].tolist())
    return StageResult(name, oof, covered, test_logits, read_json(stage_dir.metrics), orders,
                       read_json(stage_dir.done)["key"])
