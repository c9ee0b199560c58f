"""One run, end to end: read data, fix folds, cross-fit every stage, stack, report, write the submission.

The run directory holds everything (see README, "Outputs"). Every step is keyed by what it depends
on, so rerunning the same command after an interruption reuses finished folds and stages.
"""
from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from battles.folds import make_folds
from battles.io import data_hash, read_battles
from battles.labels import LABEL_COLUMNS, label_index
from ensemble.metrics import prior_log_loss, scores
from ensemble.meta import meta_features
from ensemble.metrics import probs_from_logits
from ensemble.stacking import StackerConfig, fit_stacker
from battles.files import read_json, write_atomic, write_json
from pipeline.crossfit import crossfit_stage, load_stage_result

log = logging.getLogger(__name__)
ENSEMBLE_DIR = "ensemble"  # ensemble.json (the chosen ensemble, read by predict) and oof_probs.csv


class RunError(RuntimeError):
    pass


class Run:
    """A run directory and the data it was made for."""

    def __init__(self, out, config: dict, train_path=None, test_path=None):
        self.dir = Path(out)
        self.config = config
        self.train_path, self.test_path = train_path, test_path
        self.train = self.test = None
        self.folds = None
        self.extra_train = None
        self.repairs = {}

    # -- data and folds -------------------------------------------------------------------------
    def load_data(self) -> None:
        saved = read_json(self.dir / "run.json") if (self.dir / "run.json").exists() else {}
        train_path = self.train_path or saved.get("train_path")
        if train_path is None:
            raise RunError(f"{self.dir}: no training file given and none recorded in run.json")
        self.train_path = train_path
        self.train, rep = read_battles(train_path, require_labels=True)
        self.repairs = {"train": rep.as_dict()}
        test_path = self.test_path or saved.get("test_path")
        if test_path is not None:
            self.test_path = test_path
            self.test, rep = read_battles(test_path, require_labels=False)
            self.repairs["test"] = rep.as_dict()
        if saved and saved.get("train_hash") != data_hash(self.train):
            raise RunError(f"{self.dir} was made for different training data ({saved.get('train_path')}); "
                           "use a new --out directory")
        self.extra_train = self._load_external()
        write_json(self.dir / "data_report.json", self.repairs)
        self._fix_folds()
        write_json(self.dir / "run.json", {
            "train_path": str(Path(train_path).resolve()), "test_path": str(Path(test_path).resolve()) if test_path else None,
            "train_hash": data_hash(self.train), "test_hash": data_hash(self.test) if self.test is not None else None,
            "n_train": len(self.train), "n_test": 0 if self.test is None else len(self.test),
            "python": platform.python_version(),
        })
        write_json(self.dir / "config.json", self.config)

    def _load_external(self) -> pd.DataFrame | None:
        """External sources from the config's ``external`` section: converted, de-duplicated against
        the training data and within themselves, optionally importance-weighted, then added to every
        fold's training part only (never validation, never scored). Reports go to external_report.json."""
        spec = self.config.get("external") or {}
        if not spec.get("sources"):
            return None
        from battles.converters import convert
        from battles.dedup import DedupConfig, deduplicate
        from battles.external import external_rows
        from battles.shift import ShiftConfig, shift_weights

        parts, report = [], {"conversion": []}
        for src in spec["sources"]:
            battles, rep = convert(src.get("kind", "competition"), src["path"], source=src["source"],
                                   **src.get("options", {}))
            parts.append(battles)
            report["conversion"].append(rep.as_dict())
        external = pd.concat(parts, ignore_index=True, sort=False)
        if spec.get("dedup", {}) is not False:
            external, dedup = deduplicate(self.train, external, DedupConfig(**(spec.get("dedup") or {})))
            report["dedup"] = dedup.as_dict()
        weights = None
        if spec.get("shift_weighting"):
            weights, report["shift"] = shift_weights(self.train, external,
                                                     ShiftConfig(seed=self.config["seed"], **spec.get("shift", {})))
        source_weights = {s["source"]: s.get("weight", 1.0) for s in spec["sources"]}
        rows = external_rows(external, source_weights, weights, target_ids=self.train["id"])
        report["rows_added"] = {k: int(v) for k, v in rows["source"].value_counts().items()}
        write_json(self.dir / "external_report.json", report)
        log.info("external data: %d training-only rows from %s", len(rows), report["rows_added"])
        return rows

    def _fix_folds(self) -> None:
        path = self.dir / "folds.csv"
        n_folds, seed = self.config["n_folds"], self.config["seed"]
        if path.exists():
            saved = pd.read_csv(path, dtype={"id": str})
            if list(saved["id"]) == self.train["id"].tolist() and saved["fold"].nunique() == n_folds:
                self.folds = saved["fold"].to_numpy()
                return
            raise RunError(f"{path}: saved folds do not match this training data / n_folds; use a new --out")
        self.folds = make_folds(self.train, n_folds, seed)
        frame = pd.DataFrame({"id": self.train["id"], "fold": self.folds})
        write_atomic(path, lambda p: frame.to_csv(p, index=False))
        log.info("folds: %d grouped folds by prompt, sizes %s", n_folds, np.bincount(self.folds).tolist())

    # -- stages ---------------------------------------------------------------------------------
    def run_stage(self, name: str, progress: bool = True):
        spec = self.config["stages"][name]
        return crossfit_stage(self.dir, name, spec, self.train, self.folds, self.test, self.extra_train,
                              seed=self.config["seed"], progress=progress)

    def finished_stages(self) -> list[str]:
        return [n for n in self.config["stages"] if (self.dir / "stages" / n / "done.json").exists()]

    # -- stacking -------------------------------------------------------------------------------
    def stack(self) -> dict:
        """Choose, fit and save the ensemble over every finished stage (``ensemble/ensemble.json``, the
        file :class:`pipeline.predict.Predictor` reads); write the nested OOF probabilities and, with a
        test set, the submission from the saved test logits."""
        opts = StackerConfig.model_validate(self.config.get("stacker", {}))
        names = [n for n in self.finished_stages() if n not in opts.exclude]
        if not names:
            raise RunError(f"{self.dir}: no finished stage to stack; run the stages first")
        results = [load_stage_result(self.dir, n, self.train, self.test) for n in names]
        y = label_index(self.train)
        meta = meta_features(self.train) if opts.meta_features else None
        stacked = fit_stacker(names, [r.oof_logits for r in results], y, self.folds, opts, meta=meta)
        summary = stacked.to_json(names)
        summary["prior_log_loss"] = prior_log_loss(y, self.folds)
        summary["stages_raw"] = {r.name: scores(y, probs_from_logits(r.oof_logits)) for r in results}
        summary["stages_calibrated"] = {row["single_stage"]: row["cv_log_loss"] for row in stacked.table
                                        if row["single_stage"]}
        # the stage fits this ensemble was tuned on: predict refuses stages refitted since
        summary["stage_keys"] = {n: read_json(self.dir / "stages" / n / "done.json")["key"] for n in names}
        out = self.dir / ENSEMBLE_DIR
        write_atomic(out / "oof_probs.csv", lambda p: probs_frame(self.train["id"], stacked.oof_probs).to_csv(
            p, index=False, float_format="%.9g"))
        write_json(out / "ensemble.json", summary)
        if self.test is not None:
            missing = [r.name for r in results if r.test_logits is None]
            if missing:
                raise RunError(f"stages {missing} have no test logits for {self.test_path}; rerun them with --test")
            test_meta = meta_features(self.test) if stacked.meta else None
            self.write_submission(stacked.model.predict_proba([r.test_logits for r in results], meta=test_meta))
        return summary

    def write_submission(self, probs: np.ndarray) -> Path:
        frame = probs_frame(self.test["id"], probs)
        path = self.dir / "submission.csv"
        write_atomic(path, lambda p: frame.to_csv(p, index=False, float_format="%.9g"))
        log.info("submission: %s (%d rows)", path, len(frame))
        return path


def probs_frame(ids, probs: np.ndarray) -> pd.DataFrame:
    """The submission table: ``id`` and the three label columns, rows renormalised to sum to one."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame(probs, columns=LABEL_COLUMNS)
    frame.insert(0, "id", [str(i) for i in ids])
    return frame


def run_all(run: Run, progress: bool = True) -> dict:
    started = time.time()
    run.load_data()
    for name in run.config["stages"]:
        run.run_stage(name, progress=progress)
    summary = run.stack()
    from pipeline.report import write_report

    write_report(run, summary)
    log.info("run finished in %.0f s: final nested-CV log loss %.4f", time.time() - started,
             summary["nested_scores"]["log_loss"])
    return summary
