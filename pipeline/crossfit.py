"""Cross-fitting one stage over the run's folds, with resume: :class:`StageFit`.

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

Nothing finished is changed before the new work has finished (:mod:`pipeline.rundir`'s transactions):
a model is fitted in ``fold<k>.partial/`` and renamed to ``fold<k>/`` when done; a finished stage whose
key changed is refitted in ``stages/<name>.new/`` (models with unchanged keys hard-linked in) and
replaces the old stage at :meth:`StageFit.commit`, after the command's work succeeded.

One rounding rule: every logit this module hands on is :func:`kernel.files.as_stored` (the value a
table stores), whether fitted now or read back, so a resumed run is byte-identical to an uninterrupted one.

A :class:`StageFit` is made per stage and command from the run's frozen data
(:class:`pipeline.rundata.RunData`), the stage's spec, the run's context and timings; it owns the
stage's resume keys, its fold loop, its test logits and its refit, and returns a :class:`StageResult`.

Stages that can (:func:`models.stage.predict_with_orders`) also leave their single-order OOF
log-probabilities before swap TTA (``oof_logits_straight.csv`` / ``oof_logits_swapped.csv``), for the
report's position-bias check.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from battles.columns import LABEL_COLUMNS, SOFT_COLUMNS
from battles.labels import hard_mask, label_index
from ensemble.metrics import probs_from_logits, scores
from kernel.context import StageContext
from kernel.dist import is_main_process, wait_for_everyone
from kernel.files import content_key, read_json, write_json
from models.stage import Stage, average_logits, make_stage, predict_with_orders, stage_class
from pipeline.config import StageSpec
from pipeline.manifests import check_done, mark_done
from pipeline.results import StageResult
from pipeline.rundata import RunData
from pipeline.rundir import (
    LOGIT_COLUMNS,
    ORDERS,
    STAGING,
    FoldDir,
    RunDir,
    StageDir,
    as_stored,
    link_tree,
    read_id_table,
    read_logits,
    write_logits,
)
from pipeline.timings import Timings

log = logging.getLogger(__name__)


def planned_folds(spec: StageSpec, folds: np.ndarray) -> list[int]:
    return list(spec.folds) if spec.folds is not None else sorted(int(k) for k in np.unique(folds))


def _label_free(battles: pd.DataFrame) -> pd.DataFrame:
    return battles.drop(columns=[c for c in [*LABEL_COLUMNS, *SOFT_COLUMNS] if c in battles.columns])


def _with_extra(rows: pd.DataFrame, extra: pd.DataFrame | None) -> pd.DataFrame:
    """A model's training rows: ``rows`` plus the external training-only rows, if any."""
    if extra is None or not len(extra):
        return rows
    return pd.concat([rows, extra], ignore_index=True)


def _done(place: FoldDir | StageDir, key: str) -> dict | None:
    """The ``done.json`` record of a fold or stage finished with this key, else None."""
    if place.done.exists():
        record = read_json(place.done)
        if record.get("key") == key:
            check_done(place, record)  # what is reused must be what was written
            return record
    return None


class StageFit:
    """One stage fitted over its fold plan on the run's data (see the module docstring).

    ``keys``: the resume key of each model (a fold index or "full"); ``key``: the stage's, which adds
    the plan and the test data. :meth:`result` reuses what finished with the same keys and fits the rest."""

    def __init__(self, run: RunDir, name: str, spec: StageSpec, data: RunData, context: StageContext,
                 timings: Timings):
        self.name, self.spec, self.data, self.timings = name, spec, data, timings
        self.final = run.stage(name)  # the stage's directory
        self.dir = self.final  # where this command writes it: the stage's directory, or its staging one
        self.context = replace(context, work_dir=None)  # this stage's own (work_dir is per model); memo shared
        self.plan = planned_folds(spec, data.folds)
        self.keys = {k: self._model_key(k) for k in self.plan}
        if spec.refit_full:
            self.keys["full"] = self._model_key("full")
        self.key = content_key({str(k): v for k, v in self.keys.items()}, spec.folds, spec.refit_full, data.keys.test)
        self._stage: Stage | None = None  # the stage object, prepared on first use (label-free resources)
        self._holds = None  # which model the stage object holds now (a fold index or "full")

    def _model_key(self, which) -> str:
        """What one fitted model depends on (``which``: a fold index or "full"); not the plan, not the test file."""
        return content_key({"type": self.spec.type, "params": self.spec.params}, self.data.keys.train,
                           self.data.folds.tolist(), self.data.keys.extra, self.context.seed, which)

    # -- the stage's result ---------------------------------------------------------------------
    def result(self, commit: bool = True) -> StageResult:
        """Fit the stage's fold plan (resuming what is done); return its OOF and test logits. A finished
        stage with another key is refitted beside it and replaces it at :meth:`commit` (here, unless
        ``commit=False``: the caller commits once all of its work has succeeded)."""
        self.final.settle()
        if _done(self.final, self.key) is not None:
            log.info("stage %s: finished earlier with the same config and data, reusing it", self.name)
            return load_stage_result(self.final, self.name, self.data)
        if self.final.done.exists():
            self.dir = self.final.staging
            self.dir.path.mkdir(parents=True, exist_ok=True)
            log.info("stage %s: refitting in %s; the finished stage stays until this one has finished", self.name,
                     self.dir.path)
            if _done(self.dir, self.key) is not None:
                result = load_stage_result(self.dir, self.name, self.data)
                if commit:
                    self.commit()
                return result
        result = self._fit_plan()
        if commit:
            self.commit()
        return result

    def commit(self) -> None:
        """A stage refitted in staging replaces the finished one (once its own ``done.json`` is written)."""
        if self.dir.path.name.endswith(STAGING) and self.dir.done.exists():
            self.final.replace_with(self.dir)
            self.dir = self.final
            log.info("stage %s: the refitted stage replaced the earlier one", self.name)

    def _fit_plan(self) -> StageResult:
        data = self.data
        started = time.time()
        n = len(data.train)
        oof = np.full((n, 3), np.nan)
        orders = {o: np.full((n, 3), np.nan) for o in ORDERS}
        have_orders = True
        test_per_fold = []
        bar = tqdm(self.plan, desc=self.name, unit="fold", disable=not self.context.progress)
        for k in bar:
            valid_mask = data.folds == k
            record, oof[valid_mask], single = self._fold(k, bar)
            if single is None:
                have_orders = False
            else:
                for o, values in zip(ORDERS, single):
                    orders[o][valid_mask] = values
            if data.test is not None and not self.spec.refit_full:
                test_per_fold.append(self._test_logits(k, self.dir.fold(k), record))
        test_logits = None
        if self.spec.refit_full:
            refit = self._refit_full()
            test_logits = None if refit is None else average_logits([refit])  # as the predictor does
        elif data.test is not None:
            test_logits = average_logits(test_per_fold)

        covered = ~np.isnan(oof).any(axis=1)
        oof = as_stored(oof)
        result = StageResult(self.name, oof, covered, None if test_logits is None else as_stored(test_logits),
                             self._metrics(oof, covered, time.time() - started),
                             tuple(as_stored(orders[o]) for o in ORDERS) if have_orders else None, self.key)
        self._write(result)
        return result

    def _reusable(self, which) -> tuple[FoldDir, dict | None]:
        """The model directory ``which`` (a fold index or "full") of this command's stage directory and
        its ``done`` record when it finished with its key: in that directory, or in the finished stage
        being refitted (then hard-linked into the staging directory)."""
        place = self.dir.full if which == "full" else self.dir.fold(which)
        place.settle()
        record = _done(place, self.keys[which])
        if record is None and self.dir is not self.final:
            before = self.final.full if which == "full" else self.final.fold(which)
            if _done(before, self.keys[which]) is not None:
                if is_main_process():
                    link_tree(before.path, place.path)
                wait_for_everyone()
                record = _done(place, self.keys[which])
        return place, record

    def _fold(self, k: int, bar) -> tuple[dict, np.ndarray, tuple | None]:
        """Fold ``k``'s model, reused or fitted: its ``done`` record, its OOF logits and its single-order
        log-probabilities (None where the stage or the saved fold has none)."""
        valid_mask = self.data.folds == k
        fold, record = self._reusable(k)
        valid = self.data.train[valid_mask]
        ids = valid["id"].tolist()
        if record is not None:
            bar.set_postfix_str(f"fold {k} reused")
            single = None
            if all(fold.valid_order(o).exists() for o in ORDERS):
                single = tuple(read_logits(fold.valid_order(o), ids) for o in ORDERS)
            return record, read_logits(fold.valid_logits, ids), single
        stage = self._prepared()  # label-free preparation is its own step ("<name>: features")
        work = fold.partial
        with self.timings.step(f"{self.name}: fold {k}"):
            self._fit(stage, work, k, _with_extra(self.data.train[~valid_mask], self.data.extra), valid)
            logits, straight, swapped = predict_with_orders(stage, valid)
            write_logits(work.valid_logits, ids, logits)
            single = None if straight is None else (straight, swapped)
            for o, values in zip(ORDERS, single or ()):
                write_logits(work.valid_order(o), ids, values)
            return self._finish(fold, int(k)), as_stored(logits), single and tuple(as_stored(v) for v in single)

    def _refit_full(self) -> np.ndarray | None:
        """The model refitted on every training row (reused or fitted) and its test logits."""
        full, record = self._reusable("full")
        if record is None:
            stage = self._prepared()
            with self.timings.step(f"{self.name}: refit on all rows"):
                self._fit(stage, full.partial, "full", _with_extra(self.data.train, self.data.extra), None)
                record = self._finish(full, "full")
        return None if self.data.test is None else self._test_logits("full", full, record)

    def _test_logits(self, which, place: FoldDir, record: dict) -> np.ndarray:
        """A fitted model's test logits: saved for this test file, else predicted now by the model just
        fitted or the saved one, without refitting."""
        test, test_key = self.data.test, self.data.keys.test
        if record.get("test") == test_key and place.test_logits.exists():
            return read_logits(place.test_logits, test["id"].tolist())
        step = f"{self.name}: test (refit)" if which == "full" else f"{self.name}: test fold {which}"
        with self.timings.step(step):
            stage = self._stage if self._holds == which else stage_class(self.spec.type).load(place.model,
                                                                                               self.context)
            logits = as_stored(stage.predict_logits(test))  # as a resumed run reads them back
        write_logits(place.test_logits, test["id"].tolist(), logits)
        mark_done(place, {**record, "test": test_key})
        return logits

    # -- one model ------------------------------------------------------------------------------
    def _prepared(self) -> Stage:
        """The stage object, built and prepared on the run's label-free texts on first use."""
        if self._stage is None:
            self._stage = make_stage(self.spec.type, self.spec.params, self.context)
            with self.timings.step(f"{self.name}: features"):
                tables = (self.data.train, self.data.test, self.data.extra)
                self._stage.prepare(pd.concat([_label_free(x) for x in tables if x is not None], ignore_index=True))
        return self._stage

    def _fit(self, stage: Stage, place: FoldDir, which, fit_rows: pd.DataFrame, valid: pd.DataFrame | None) -> None:
        """Claim the model's directory, then fit (its directory is the stage's scratch space: checkpoints)."""
        place.claim(self.keys[which])
        stage.context.work_dir = place.path
        stage.fit(fit_rows, valid)

    def _finish(self, place: FoldDir, which) -> dict:
        """Save the model just fitted in ``place``'s partial directory, mark it done (after everything else
        it writes), then make it ``place`` (:meth:`FoldDir.promote`); return the record."""
        work = place.partial
        self._stage.save(work.model)
        self._holds = which
        record = mark_done(work, {"key": self.keys[which], "stage": self.name, "fold": which, "test": None})
        wait_for_everyone()
        place.promote()
        return record

    # -- the stage's files ----------------------------------------------------------------------
    def _metrics(self, oof: np.ndarray, covered: np.ndarray, seconds: float) -> dict:
        """Coverage and OOF scores (on covered rows with a hard label) of the stage."""
        train = self.data.train
        scored = covered & hard_mask(train)
        metrics = {"stage": self.name, "type": self.spec.type, "seconds": round(seconds, 1),
                   "coverage": {"folds": self.plan, "rows": int(covered.sum()), "of": len(train),
                                "refit_full": self.spec.refit_full}}
        truncation = self._truncation()
        if truncation:
            metrics["truncation"] = truncation
        if scored.any():
            metrics["oof"] = scores(label_index(train[scored]), probs_from_logits(oof[scored]))
            log.info("stage %s: OOF log loss %.4f, accuracy %.3f on %d rows", self.name, metrics["oof"]["log_loss"],
                     metrics["oof"]["accuracy"], int(scored.sum()))
        return metrics

    def _truncation(self) -> dict:
        """What packing cut of each fitted model's training battles (``Stage.saved_figures``), per fold
        and all folds together (:func:`models.packing.merge_truncation`); empty for stages that keep none."""
        from models.packing import merge_truncation

        cls = stage_class(self.spec.type)
        places = {f"fold {k}": self.dir.fold(k) for k in self.plan}
        if self.spec.refit_full:
            places["refit on all rows"] = self.dir.full
        per_model = {name: fig["truncation"] for name, place in places.items()
                     if place.model.is_dir() and "truncation" in (fig := cls.saved_figures(place.model))}
        if not per_model:
            return {}
        folds = [v for k, v in per_model.items() if k.startswith("fold ")]
        return {"per_model": per_model, **({"folds": merge_truncation(folds)} if folds else {})}

    def _write(self, result: StageResult) -> None:
        stage_dir = self.dir
        ids = self.data.train["id"].to_numpy()[result.covered].tolist()
        write_logits(stage_dir.oof_logits, ids, result.oof_logits[result.covered])
        for o, values in zip(ORDERS, result.orders or (None, None)):
            if values is not None:
                write_logits(stage_dir.oof_order(o), ids, values[result.covered])
            elif stage_dir.oof_order(o).exists():
                stage_dir.oof_order(o).unlink()
        if result.test_logits is not None:
            write_logits(stage_dir.test_logits, self.data.test["id"].tolist(), result.test_logits)
        write_json(stage_dir.metrics, result.metrics)
        write_json(stage_dir.spec, self.spec.as_dict())
        mark_done(stage_dir, {"key": result.key, "stage": result.name})


def load_stage_result(stage_dir: StageDir, name: str, data: RunData) -> StageResult:
    """A stage finished earlier, read back from its files (resuming)."""
    if not stage_dir.done.exists():
        raise FileNotFoundError(f"{stage_dir.path}: stage {name!r} has not finished (no done.json); run it first")
    check_done(stage_dir)
    train, test = data.train, data.test
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
