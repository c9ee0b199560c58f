"""One run, end to end: read data, fix folds, cross-fit every stage, fit the ensemble, report, submit.

The data walks through memory as declared types: :meth:`Run.load_data` builds the run's frozen
:class:`~pipeline.rundata.RunData` once; each stage's :class:`~pipeline.crossfit.StageFit` turns it
into a :class:`~pipeline.crossfit.StageResult`; :meth:`Run.fit_ensemble` turns the results into an
:class:`~pipeline.results.EnsembleFit` (the saved :class:`~ensemble.record.EnsembleRecord` and, for the report, the rows
it stands on and its nested probabilities). Files are read back only to resume (a stage or fold
finished by an earlier command). The run directory's layout and ownership rules are
:mod:`pipeline.rundir`'s; every step is timed into ``timings.json``; warnings about what the data
cannot support are logged and shown in the report.
"""
from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from battles.folds import make_folds
from battles.io import read_battles
from battles.labels import hard_mask, label_index_or_missing
from ensemble.coverage import StageSet, fit_over_coverage
from ensemble.meta import meta_features
from ensemble.record import EnsembleRecord
from kernel.context import StageContext
from kernel.errors import UserError
from kernel.files import write_json
from pipeline import checks
from pipeline.config import RunConfig
from pipeline.crossfit import StageFit, load_stage_result
from pipeline.manifests import record_ensemble
from pipeline.results import EnsembleFit, StageResult
from pipeline.rundata import DataKeys, RunData
from pipeline.rundir import RunDir, read_folds, write_folds, write_probs
from pipeline.timings import Timings

log = logging.getLogger(__name__)


class RunError(UserError, RuntimeError):
    pass


class Run:
    """A run directory, the config it runs with, its data (after :meth:`load_data`) and the results of
    its stages. Its state is its own: the attributes below are all there is (``__slots__``)."""

    __slots__ = ("dir", "config", "train_path", "test_path", "context", "timings", "data", "results", "warnings")

    def __init__(self, out, config: RunConfig, train_path=None, test_path=None, progress: bool = True):
        self.dir = RunDir(out)
        self.config = config
        self.train_path, self.test_path = train_path, test_path  # as given; a resumed run remembers its own
        # what every stage of this run is handed besides data; its feature memo is shared by the stages
        self.context = StageContext(resource_dir=self.dir.resources, seed=config.seed, progress=progress)
        self.timings = Timings()
        self.data: RunData | None = None
        self.results: dict[str, StageResult] = {}
        self.warnings: list[str] = []

    # -- data and folds -------------------------------------------------------------------------
    def load_data(self, converted: list | None = None) -> RunData:
        """Read and check the data, claim the run directory (nothing is written before), gather the
        external rows (``converted``: the config's sources, when the caller converted them already),
        fix the folds; keep and return the run's data."""
        saved = self.dir.record() if self.dir.is_ours() else {}
        train_path = self.train_path or saved.get("train_path")
        if train_path is None:
            raise RunError(f"{self.dir}: no --train given and none recorded in this run directory")
        test_path = self.test_path or saved.get("test_path")
        test = None
        with self.timings.step("read"):
            train, rep = read_battles(train_path, require_labels=True)
            repairs = {"train": rep}
            if not hard_mask(train).any():
                raise RunError(f"{train_path}: no battle has a hard label (winner_* columns), so nothing can be "
                               "scored; add soft-labelled battles as an external source (kind 'pseudo_labels')")
            if test_path is not None:
                test, repairs["test"] = read_battles(test_path, require_labels=False)
        keys = DataKeys.of(train, test)
        RunDir.check_writable(self.dir.path, keys.train)
        self.dir.path.mkdir(parents=True, exist_ok=True)
        self.dir.write_marker({
            "train_path": str(Path(train_path).resolve()), "train_hash": keys.train, "n_train": len(train),
            "test_path": str(Path(test_path).resolve()) if test_path else None, "test_hash": keys.test,
            "n_test": 0 if test is None else len(test), "python": platform.python_version()})
        write_json(self.dir.config, self.config.as_dict())
        write_json(self.dir.data_report, {part: rep.as_dict() for part, rep in repairs.items()})
        with self.timings.step("external data"):
            extra = self._external_rows(train, keys.train, converted)
            keys = keys.with_extra(extra)
        with self.timings.step("folds"):
            folds = self._fixed_folds(train, train_path)
        self.data = RunData(train, folds, keys, test, extra, Path(train_path),
                            None if test_path is None else Path(test_path), repairs)
        self.warnings += checks.data_warnings(self.data, self.config.seed)
        return self.data

    def _external_rows(self, train: pd.DataFrame, train_key: str, converted: list | None) -> pd.DataFrame | None:
        """External sources from the config's ``external`` section: converted, de-duplicated against
        the training data and within themselves, optionally importance-weighted, then added to every
        fold's training part only (never validation, never scored). Reports go to external_report.json."""
        from flywheel.sources import gather_external

        rows, report = gather_external(train, self.config.external, self.config.seed, converted=converted,
                                       progress=self.context.progress)
        if rows is not None:
            write_json(self.dir.external_report, report)
            self.warnings += checks.pseudo_label_warnings(report, train_key)
        return rows

    def _fixed_folds(self, train: pd.DataFrame, train_path) -> np.ndarray:
        """The run's folds: saved ones when resuming (checked against the data), else made and saved."""
        n_folds, seed = self.config.n_folds, self.config.seed
        if self.dir.folds.exists():  # resuming: the run's folds are fixed once
            saved = read_folds(self.dir.folds)
            if saved["id"].tolist() == train["id"].tolist() and saved["fold"].nunique() == n_folds:
                return saved["fold"].to_numpy()
            raise RunError(f"{self.dir.folds}: the saved folds do not match this training data / n_folds={n_folds}; "
                           "use a new --out directory")
        try:
            folds = make_folds(train, n_folds, seed)
        except ValueError as exc:
            raise RunError(f"{train_path}: {exc}") from None
        write_folds(self.dir.folds, train["id"], folds)
        log.info("folds: %d grouped folds by prompt, sizes %s", n_folds, np.bincount(folds).tolist())
        return folds

    # -- stages ---------------------------------------------------------------------------------
    def fit_stage(self, name: str) -> StageResult:
        """Cross-fit the config's stage ``name`` on the run's data (resuming what is done)."""
        self.results[name] = StageFit(self.dir, name, self.config.stages[name], self.data, self.context,
                                      self.timings).result()
        return self.results[name]

    def finished_stages(self) -> list[str]:
        return [n for n in self.config.stages if n in self.results or self.dir.stage(n).done.exists()]

    def result(self, name: str) -> StageResult:
        """A stage's result: from this command, else read back from a finished stage (resuming)."""
        if name not in self.results:
            self.results[name] = load_stage_result(self.dir.stage(name), name, self.data)
        return self.results[name]

    # -- ensemble -------------------------------------------------------------------------------
    def fit_ensemble(self) -> EnsembleFit:
        """Choose, fit and save the ensemble over every finished stage (``ensemble/ensemble.json``, what
        :class:`pipeline.predict.Predictor` reads); write the nested OOF probabilities and, with a test
        set, the submission."""
        stacker, data = self.config.stacker, self.data
        names = [n for n in self.finished_stages() if n not in stacker.exclude]
        if not names:
            raise RunError(f"{self.dir}: no finished stage to fit an ensemble on; run the stages first")
        with self.timings.step("ensemble"):
            results = {n: self.result(n) for n in names}
            y = label_index_or_missing(data.train)
            chosen, sets = fit_over_coverage(
                names, {n: r.oof_logits for n, r in results.items()}, {n: r.covered for n, r in results.items()},
                data.train, y, y >= 0, data.folds, stacker, self.config.n_folds, self.config.seed)
            record = _record(chosen, sets, results)
            self.warnings += checks.score_warnings(record)
            record = record.model_copy(update={"warnings": list(self.warnings)})
            write_probs(self.dir.oof_probs, data.train["id"].to_numpy()[chosen.rows], chosen.stacked.oof_probs)
            record.save(self.dir.ensemble)
            record_ensemble(self.dir)  # the files it stands on, for the commands that load them
            if data.test is not None:
                missing = [n for n in chosen.names if results[n].test_logits is None]
                if missing:
                    raise RunError(f"stages {missing} have no test logits for {data.test_path}; rerun them with --test")
                meta = meta_features(data.test) if chosen.stacked.meta else None
                probs = chosen.stacked.model.predict_proba([results[n].test_logits for n in chosen.names], meta=meta)
                write_probs(self.dir.submission, data.test["id"], probs)
                log.info("submission: %s (%d rows)", self.dir.submission, len(data.test))
        return EnsembleFit(record, chosen.rows, chosen.stacked.oof_probs)

    def write_report(self, fit: EnsembleFit) -> None:
        from pipeline.report import write_report

        with self.timings.step("report"):
            write_report(self.dir, self.config, self.data, self.results, fit)

    def finish(self) -> None:
        self.timings.write(self.dir.timings)


def _record(chosen: StageSet, sets: list[dict], results: dict[str, StageResult]) -> EnsembleRecord:
    """The ensemble's record from the chosen stage set, the stage-set comparison and the stages' results."""
    names = chosen.names
    return EnsembleRecord.model_validate({
        **chosen.stacked.to_json(names),
        "rows": int(chosen.rows.sum()), "outer_folds": chosen.fold_source, "prior_log_loss": chosen.prior,
        "nested_interval": next(t["interval"] for t in sets if t["chosen"]), "stage_sets": sets,
        "coverage": {n: int(r.covered.sum()) for n, r in results.items()},
        "stages_raw": {n: r.metrics["oof"] for n, r in results.items() if "oof" in r.metrics},
        "stages_calibrated": {t["stage"]: t["calibrated_log_loss"] for t in chosen.selection["stages_against_prior"]},
        "selection": chosen.selection,
        "stage_keys": {n: results[n].key for n in names}, "warnings": [],
    })


def run_all(run: Run, stages: list[str] | None = None) -> EnsembleRecord:
    """The stages (default: every configured stage; ``[]``: none, as ``tune``), then the ensemble over
    every finished stage and the report: the default command, ``train STAGE`` and ``tune``."""
    run.load_data()
    for name in run.config.stages if stages is None else stages:
        run.fit_stage(name)
    fit = run.fit_ensemble()
    run.write_report(fit)
    run.finish()
    record = fit.record
    log.info("run finished in %.0f s: final nested-CV log loss %.4f on %d rows", run.timings.as_dict()["total_seconds"],
             record.nested_scores.log_loss, record.rows)
    return record
