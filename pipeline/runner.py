"""One run, end to end: read data, fix folds, cross-fit every stage, fit the ensemble, report, submit.

The data walks through memory as declared types: :meth:`Run.load_data` builds the run's frozen
:class:`~pipeline.rundata.RunData` once; each stage's :class:`~pipeline.crossfit.StageFit` turns it
into a :class:`~pipeline.crossfit.StageResult`; :meth:`Run.fit_ensemble` turns the results into an
:class:`~pipeline.results.EnsembleFit` (the saved :class:`~ensemble.record.EnsembleRecord` and, for the report, the rows
it stands on and its nested probabilities). Files are read back only to resume (a stage or fold
finished by an earlier command). The run directory's layout and ownership rules are
:mod:`pipeline.rundir`'s; every step is timed into ``timings.json``; warnings about what the data
cannot support are logged and shown in the report.

A command is a transaction on the run directory: every check (the data, the saved folds against
``n_folds``, the checkpoint directories the stages name) runs before a byte is written; the command
holds the run's lock while it writes; on a run that already has a config, ``run.json``,
``config.json`` and the data reports are rewritten, and refitted stages replace the finished ones
(:meth:`pipeline.crossfit.StageFit.commit`), only at :meth:`Run.commit`, once the stages and the
ensemble have been fitted. A failure before that leaves the finished run byte-identical.
"""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from battles.folds import make_folds
from battles.io import read_battles
from battles.labels import hard_mask, label_index_or_missing, label_support_problem
from ensemble.coverage import StageSet, fit_over_coverage
from ensemble.meta import meta_features
from ensemble.record import EnsembleRecord
from kernel.context import StageContext
from kernel.errors import UserError
from kernel.files import jsonable, read_json, write_json
from models.stage import make_stage
from pipeline import checks
from pipeline.config import RunConfig, check_source_paths, path_keys
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

    __slots__ = ("dir", "config", "train_path", "test_path", "context", "timings", "data", "results", "warnings",
                 "_lock", "_fits", "_deferred")

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
        self._lock = None  # the run's writer lock, from load_data to close
        self._fits: list[StageFit] = []  # stages fitted by this command, committed together
        self._deferred: list | None = None  # writes held back until commit (a run that already had a config)

    # -- data and folds -------------------------------------------------------------------------
    def load_data(self, converted: list | None = None, write: bool = True) -> RunData:
        """Read and check the data, claim the run directory (nothing is written before), gather the
        external rows (``converted``: the config's sources, when the caller converted them already),
        fix the folds; keep and return the run's data. ``write=False`` (``tune``: an experiment) reads a
        finished run's data and folds and writes nothing into the run (not its marker, nor its config)."""
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
            problem = label_support_problem(train, self.config.n_folds)
            if problem:
                raise RunError(f"{train_path}: {problem}")
            if test_path is not None:
                test, repairs["test"] = read_battles(test_path, require_labels=False)
        keys = DataKeys.of(train, test)
        RunDir.check_writable(self.dir.path, keys.train)
        saved_folds = self._saved_folds(train)  # a changed n_folds is refused here, before any write
        if not write and saved_folds is None:
            raise RunError(f"{self.dir}: no folds.csv; the run did not get past reading its data")
        self.dir.path.mkdir(parents=True, exist_ok=True)
        self._lock = self.dir.lock()
        if write:
            # a run that has a config already keeps its files until this command's work has succeeded
            self._deferred = [] if self.dir.is_ours() and self.dir.config.exists() else None
            marker = {"train_path": str(Path(train_path).resolve()), "train_hash": keys.train, "n_train": len(train),
                      "test_path": str(Path(test_path).resolve()) if test_path else None, "test_hash": keys.test,
                      "n_test": 0 if test is None else len(test), "python": platform.python_version()}
            self._write(lambda: self.dir.write_marker(marker))
            self._write(lambda: write_json(self.dir.config, self.config.as_dict()))
            report = {part: rep.as_dict() for part, rep in repairs.items()}
            self._write(lambda: write_json(self.dir.data_report, report))
        with self.timings.step("external data"):
            extra = self._external_rows(train, keys.train, converted, write)
            keys = keys.with_extra(extra)
        with self.timings.step("folds"):
            folds = saved_folds if saved_folds is not None else self._new_folds(train, train_path)
        self.data = RunData(train, folds, keys, test, extra, Path(train_path),
                            None if test_path is None else Path(test_path), repairs)
        self.warnings += checks.data_warnings(self.data, self.config.seed)
        return self.data

    def _external_rows(self, train: pd.DataFrame, train_key: str, converted: list | None,
                       write: bool = True) -> pd.DataFrame | None:
        """External sources from the config's ``external`` section: converted, de-duplicated against
        the training data and within themselves, optionally importance-weighted, then added to every
        fold's training part only (never validation, never scored). Reports go to external_report.json."""
        from flywheel.sources import gather_external

        rows, report = gather_external(train, self.config.external, self.config.seed, converted=converted,
                                       progress=self.context.progress)
        if rows is not None:
            if write:
                self._write(lambda: write_json(self.dir.external_report, report))
            self.warnings += checks.pseudo_label_warnings(report, train_key)
        return rows

    def _saved_folds(self, train: pd.DataFrame) -> np.ndarray | None:
        """The run's saved folds when resuming (checked against the data and ``n_folds``), else None."""
        n_folds = self.config.n_folds
        if not (self.dir.is_ours() and self.dir.folds.exists()):
            return None
        saved = read_folds(self.dir.folds)
        if saved["id"].tolist() == train["id"].tolist() and saved["fold"].nunique() == n_folds:
            return saved["fold"].to_numpy()
        raise RunError(f"{self.dir.folds}: the saved folds do not match this training data / n_folds={n_folds} "
                       f"(they have {saved['fold'].nunique()} folds over {len(saved)} rows); nothing was changed. "
                       "Use a new --out directory")

    def _new_folds(self, train: pd.DataFrame, train_path) -> np.ndarray:
        """Grouped folds made for a new run, and saved."""
        n_folds, seed = self.config.n_folds, self.config.seed
        try:
            folds = make_folds(train, n_folds, seed)
        except ValueError as exc:
            raise RunError(f"{train_path}: {exc}") from None
        write_folds(self.dir.folds, train["id"], folds)
        log.info("folds: %d grouped folds by prompt, sizes %s", n_folds, np.bincount(folds).tolist())
        return folds

    # -- stages ---------------------------------------------------------------------------------
    def fit_stage(self, name: str) -> StageResult:
        """Cross-fit the config's stage ``name`` on the run's data (resuming what is done); a finished
        stage refitted with another key replaces the old one at :meth:`commit`."""
        fit = StageFit(self.dir, name, self.config.stages[name], self.data, self.context, self.timings)
        self.results[name] = fit.result(commit=False)
        self._fits.append(fit)
        return self.results[name]

    def check_stage_models(self, names) -> None:
        """The checkpoint directories the stages ``names`` read (any ``model`` in their params, feature
        blocks included) exist and hold a ``config.json``: refused here, before anything is written."""
        from kernel.local_models import check_model_dir

        for name in names:
            stage_spec, stage_dir = self.config.stages[name], self.dir.stage(name)
            spec = stage_spec.as_dict()
            if stage_dir.done.exists() and stage_dir.spec.exists() and read_json(stage_dir.spec) == json.loads(
                    json.dumps(spec, default=jsonable)):
                continue  # finished with these very params: it is reused, its checkpoint is not read
            for key, path in path_keys({"stages": {name: spec}}):
                where = ".".join(str(k) for k in key)
                try:
                    check_model_dir(path, name)
                except (ValueError, OSError) as exc:
                    raise RunError(f"{where}: {exc}; nothing was written") from None
            try:  # the settings against what the stage reads (a deep stage: max_length against its input frame)
                make_stage(stage_spec.type, stage_spec.params, self.context).check_inputs()
            except (UserError, ValueError) as exc:  # ValueError: e.g. a precision this machine cannot run
                raise RunError(f"stages.{name}.params: {exc}; nothing was written") from None

    # -- the transaction ------------------------------------------------------------------------
    def _write(self, write) -> None:
        """Write now (a new run), or at :meth:`commit` (a run that already had a config)."""
        if self._deferred is None:
            write()
        else:
            self._deferred.append(write)

    def commit(self) -> None:
        """This command's work has succeeded: refitted stages replace the finished ones, then the marker,
        config and reports held back are written. Idempotent."""
        for fit in self._fits:
            fit.commit()
        self._fits = []
        for write in self._deferred or ():
            write()
        self._deferred = None

    def close(self) -> None:
        """Give back the run's lock (after success or failure)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def finished_stages(self) -> list[str]:
        return [n for n in self.config.stages if n in self.results or self.dir.stage(n).done.exists()]

    def result(self, name: str) -> StageResult:
        """A stage's result: from this command, else read back from a finished stage (resuming)."""
        if name not in self.results:
            self.results[name] = load_stage_result(self.dir.stage(name), name, self.data)
        return self.results[name]

    # -- ensemble -------------------------------------------------------------------------------
    def fit_ensemble(self, out: RunDir | None = None) -> EnsembleFit:
        """Choose, fit and save the ensemble over every finished stage (``ensemble/ensemble.json``, what
        :class:`pipeline.predict.Predictor` reads); write the nested OOF probabilities and, with a test
        set, the submission: into the run, or into ``out`` (the same layout: ``tune``'s candidate folder)."""
        stacker, data, out = self.config.stacker, self.data, out or self.dir
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
            probs = None
            if data.test is not None:
                missing = [n for n in chosen.names if results[n].test_logits is None]
                if missing:
                    raise RunError(f"stages {missing} have no test logits for {data.test_path}; rerun them with --test")
                meta = meta_features(data.test) if chosen.stacked.meta else None
                probs = chosen.stacked.model.predict_proba([results[n].test_logits for n in chosen.names], meta=meta)
            self.commit()  # everything is fitted: only now are the run's finished files replaced
            write_probs(out.oof_probs, data.train["id"].to_numpy()[chosen.rows], chosen.stacked.oof_probs)
            record.save(out.ensemble)
            if out is self.dir:
                record_ensemble(self.dir)  # the files it stands on, for the commands that load them
            if probs is not None:
                write_probs(out.submission, data.test["id"], probs)
                log.info("submission: %s (%d rows)", out.submission, len(data.test))
        return EnsembleFit(record, chosen.rows, chosen.stacked.oof_probs)

    def write_report(self, fit: EnsembleFit, out: RunDir | None = None) -> None:
        from pipeline.report import write_report

        with self.timings.step("report"):
            write_report(out or self.dir, self.config, self.data, self.results, fit)

    def finish(self, out: RunDir | None = None) -> None:
        self.commit()
        self.timings.write((out or self.dir).timings)
        self.close()


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
    every finished stage and the report: the default command and ``train STAGE``."""
    names = list(run.config.stages if stages is None else stages)
    run.check_stage_models(names)  # before anything is written: the stages' checkpoints,
    check_source_paths(run.config)  # and the external sources' paths
    try:
        run.load_data()
        for name in names:
            run.fit_stage(name)
        fit = run.fit_ensemble()
        run.write_report(fit)
        run.finish()
    finally:
        run.close()
    record = fit.record
    log.info("run finished in %.0f s: final nested-CV log loss %.4f on %d rows", run.timings.as_dict()["total_seconds"],
             record.nested_scores.log_loss, record.rows)
    return record
