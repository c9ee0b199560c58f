"""One run, end to end: read data, fix folds, cross-fit every stage, fit the ensemble, report, submit.

The data walks through memory: the stages' results go straight to the ensemble and the ensemble's to
the report; files are read back only to resume (a stage or fold finished by an earlier command). The
run directory's layout and ownership rules are :mod:`pipeline.rundir`'s; every step is timed into
``timings.json``; warnings about what the data cannot support are logged and shown in the report.
"""
from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from battles.folds import make_folds
from battles.io import data_hash, read_battles
from battles.labels import hard_mask, label_index_or_missing
from ensemble.coverage import fit_over_coverage
from ensemble.meta import meta_features
from kernel.errors import UserError
from kernel.files import write_json
from pipeline import checks
from pipeline.config import RunConfig
from pipeline.crossfit import StageResult, crossfit_stage, load_stage_result
from pipeline.rundir import RunDir, read_folds, write_folds, write_probs
from pipeline.timings import Timings

log = logging.getLogger(__name__)


class RunError(UserError, RuntimeError):
    pass


class Run:
    """A run directory, the config and data it was made for, and the results of its stages."""

    def __init__(self, out, config: RunConfig, train_path=None, test_path=None, progress: bool = True):
        self.dir = RunDir(out)
        self.config = config
        self.train_path, self.test_path = train_path, test_path
        self.progress = progress
        self.train = self.test = self.extra_train = None
        self.folds = None
        self.repairs: dict = {}
        self.results: dict[str, StageResult] = {}
        self.warnings: list[str] = []
        self.timings = Timings()
        self.feature_memo: dict = {}  # fold-independent features shared in memory by this run's stages
        self.hashes: dict = {}  # content hashes of the tables (train, test, extra), computed once
        self.converted_sources = None  # the external sources, when a caller converted them already

    # -- data and folds -------------------------------------------------------------------------
    def load_data(self) -> None:
        """Read and check the data, claim the run directory (nothing is written before), fix the folds."""
        saved = self.dir.record() if self.dir.is_ours() else {}
        self.train_path = self.train_path or saved.get("train_path")
        if self.train_path is None:
            raise RunError(f"{self.dir}: no --train given and none recorded in this run directory")
        self.test_path = self.test_path or saved.get("test_path")
        with self.timings.step("read"):
            self.train, rep = read_battles(self.train_path, require_labels=True)
            self.repairs = {"train": rep.as_dict()}
            if not hard_mask(self.train).any():
                raise RunError(f"{self.train_path}: no battle has a hard label (winner_* columns), so nothing can be "
                               "scored; add soft-labelled battles as an external source (kind 'pseudo_labels')")
            if self.test_path is not None:
                self.test, rep = read_battles(self.test_path, require_labels=False)
                self.repairs["test"] = rep.as_dict()
        self.hashes = {"train": data_hash(self.train), "test": data_hash(self.test) if self.test is not None else None}
        train_hash = self.hashes["train"]
        RunDir.check_writable(self.dir.path, train_hash)
        self.dir.path.mkdir(parents=True, exist_ok=True)
        self.dir.write_marker({
            "train_path": str(Path(self.train_path).resolve()), "train_hash": train_hash, "n_train": len(self.train),
            "test_path": str(Path(self.test_path).resolve()) if self.test_path else None,
            "test_hash": self.hashes["test"],
            "n_test": 0 if self.test is None else len(self.test), "python": platform.python_version()})
        write_json(self.dir.config, self.config.as_dict())
        write_json(self.dir.data_report, self.repairs)
        with self.timings.step("external data"):
            self.extra_train = self._external_rows()
            self.hashes["extra"] = data_hash(self.extra_train) if self.extra_train is not None else None
        with self.timings.step("folds"):
            self._fix_folds()
        self.warnings += checks.data_warnings(self)

    def _external_rows(self) -> pd.DataFrame | None:
        """External sources from the config's ``external`` section: converted, de-duplicated against
        the training data and within themselves, optionally importance-weighted, then added to every
        fold's training part only (never validation, never scored). Reports go to external_report.json."""
        from flywheel.sources import gather_external

        rows, report = gather_external(self.train, self.config.external, self.config.seed,
                                       converted=self.converted_sources, progress=self.progress)
        if rows is not None:
            write_json(self.dir.external_report, report)
            self.warnings += checks.pseudo_label_warnings(report, self.hashes["train"])
        return rows

    def _fix_folds(self) -> None:
        n_folds, seed = self.config.n_folds, self.config.seed
        if self.dir.folds.exists():  # resuming: the run's folds are fixed once
            saved = read_folds(self.dir.folds)
            if saved["id"].tolist() == self.train["id"].tolist() and saved["fold"].nunique() == n_folds:
                self.folds = saved["fold"].to_numpy()
                return
            raise RunError(f"{self.dir.folds}: the saved folds do not match this training data / n_folds={n_folds}; "
                           "use a new --out directory")
        try:
            self.folds = make_folds(self.train, n_folds, seed)
        except ValueError as exc:
            raise RunError(f"{self.train_path}: {exc}") from None
        write_folds(self.dir.folds, self.train["id"], self.folds)
        log.info("folds: %d grouped folds by prompt, sizes %s", n_folds, np.bincount(self.folds).tolist())

    # -- stages ---------------------------------------------------------------------------------
    def fit_stage(self, name: str) -> StageResult:
        result = crossfit_stage(self.dir, name, self.config.stages[name], self.train, self.folds, self.test,
                                self.extra_train, seed=self.config.seed, progress=self.progress, timings=self.timings,
                                feature_memo=self.feature_memo, hashes=self.hashes)
        self.results[name] = result
        return result

    def finished_stages(self) -> list[str]:
        return [n for n in self.config.stages if n in self.results or self.dir.stage(n).done.exists()]

    def result(self, name: str) -> StageResult:
        """A stage's result: from this command, else read back from a finished stage (resuming)."""
        if name not in self.results:
            self.results[name] = load_stage_result(self.dir, name, self.train, self.test)
        return self.results[name]

    # -- ensemble -------------------------------------------------------------------------------
    def fit_ensemble(self) -> dict:
        """Choose, fit and save the ensemble over every finished stage (``ensemble/ensemble.json``, what
        :class:`pipeline.predict.Predictor` reads); write the nested OOF probabilities and, with a test
        set, the submission."""
        stacker = self.config.stacker
        names = [n for n in self.finished_stages() if n not in stacker.exclude]
        if not names:
            raise RunError(f"{self.dir}: no finished stage to fit an ensemble on; run the stages first")
        with self.timings.step("ensemble"):
            results = {n: self.result(n) for n in names}
            y = label_index_or_missing(self.train)
            scored = y >= 0
            chosen, sets = fit_over_coverage(
                names, {n: r.oof_logits for n, r in results.items()}, {n: r.covered for n, r in results.items()},
                self.train, y, scored, self.folds, stacker, self.config.n_folds, self.config.seed)
            summary = self._summary(chosen, sets, results)
            summary["stage_keys"] = {n: results[n].key for n in chosen.names}
            self.warnings += checks.score_warnings(summary)
            summary["warnings"] = list(self.warnings)
            write_probs(self.dir.oof_probs, self.train["id"].to_numpy()[chosen.rows], chosen.stacked.oof_probs)
            write_json(self.dir.ensemble, summary)
            if self.test is not None:
                missing = [n for n in chosen.names if results[n].test_logits is None]
                if missing:
                    raise RunError(f"stages {missing} have no test logits for {self.test_path}; rerun them with --test")
                meta = meta_features(self.test) if chosen.stacked.meta else None
                probs = chosen.stacked.model.predict_proba([results[n].test_logits for n in chosen.names], meta=meta)
                write_probs(self.dir.submission, self.test["id"], probs)
                log.info("submission: %s (%d rows)", self.dir.submission, len(self.test))
        self.ensemble_rows = chosen.rows
        self.ensemble_probs = chosen.stacked.oof_probs
        return summary

    def _summary(self, chosen, sets, results: dict) -> dict:
        names = chosen.names
        summary = chosen.stacked.to_json(names)
        summary.update({
            "rows": int(chosen.rows.sum()), "outer_folds": chosen.fold_source, "prior_log_loss": chosen.prior,
            "nested_interval": next(t["interval"] for t in sets if t["chosen"]), "stage_sets": sets,
            "coverage": {n: int(r.covered.sum()) for n, r in results.items()},
            "stages_raw": {n: r.metrics["oof"] for n, r in results.items() if "oof" in r.metrics},
            "stages_calibrated": {row["single_stage"]: row["cv_log_loss"] for row in chosen.stacked.table
                                  if row["single_stage"]},
        })
        return summary

    def write_report(self, summary: dict) -> None:
        from pipeline.report import write_report

        with self.timings.step("report"):
            write_report(self, summary)

    def finish(self) -> None:
        self.timings.write(self.dir.timings)


def run_all(run: Run, stages: list[str] | None = None) -> dict:
    """The stages (default: every configured stage; ``[]``: none, as ``tune``), then the ensemble over
    every finished stage and the report: the default command, ``train STAGE`` and ``tune``."""
    run.load_data()
    for name in run.config.stages if stages is None else stages:
        run.fit_stage(name)
    summary = run.fit_ensemble()
    run.write_report(summary)
    run.finish()
    log.info("run finished in %.0f s: final nested-CV log loss %.4f on %d rows", run.timings.as_dict()["total_seconds"],
             summary["nested_scores"]["log_loss"], summary["rows"])
    return summary
