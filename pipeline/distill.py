"""Distillation: a student run trained on a finished teacher run's out-of-fold probabilities.

    python run.py distill --teacher runs/teacher --train train.csv --out runs/student \\
        [--config cfg.json] [--set ...] [--soft-weight W] [--test test.csv]

The student is an ordinary run (its own config, stages, ensemble, report) with two differences:

* its folds are the teacher's (``folds.csv`` copied; ``n_folds`` comes from the teacher);
* each training row's target is ``W * q + (1 - W) * t``: ``q`` the teacher's nested-CV ensemble
  probability for the row (``ensemble/oof_probs.csv``), ``t`` the row's own target (its hard label;
  its soft label where the training file gives one), ``W`` the soft weight (``--soft-weight``). Rows
  the teacher has no out-of-fold probability for (its ensemble covers only some rows:
  ``ensemble/coverage.py``) keep ``t``. Every score (stage OOF metrics, stacker, report) stays on the hard labels.

The training file must be the teacher's training data (same content hash). The student's targets
are written, with a provenance line, to ``<student>/distill_train.jsonl``, which the student run
reads as its ``--train`` (so ``tune``/resume work on it as on any run).

What the bookkeeping guarantees, and what can still leak
--------------------------------------------------------
No row's target comes from a teacher model that trained on that row: ``q`` for a row of fold k was
predicted by each teacher stage's fold-k model (trained on the other folds) and mapped by the
stacker of the row's outer fold (fitted on other rows). The student validates fold k on the same
rows. Still, the student's fold-k score is somewhat optimistic, because:

1. the fold-k student model trains on rows of the other folds j, whose targets ``q_j`` came from
   teacher models trained on folds that include fold k: the student imitates models that saw its
   validation labels (classic stacking has the same leak; it grows with how much the teacher
   memorises: a deep teacher trained to near-zero training loss leaks more than LightGBM);
2. the teacher's stacker for fold j was chosen and fitted on the other folds' labels, fold k's
   among them (and, when the teacher's stages covered fewer than three folds, on new grouped folds
   inside the covered rows: see ``outer_folds`` in the provenance);
3. early stopping: teacher stages that stop on their fold's validation rows (LightGBM, encoder,
   decoder) chose the length of training with those rows' labels, so ``q`` of a fold-k row saw
   fold-k labels that way (the same mild optimism as every OOF score); the student's fold-k model
   stops on fold-k rows' mixed targets, as any run stops on its validation labels;
4. choices made on the teacher's full report (its config, the stacker method, a person's tuning)
   saw every row; label-free resources (TF-IDF vocabulary, Word2Vec) see every text in any run.

A clean estimate needs a holdout the teacher never touched (a separate test file with labels).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from battles.columns import COLUMNS, LABEL_COLUMNS, SOFT_COLUMNS, present
from battles.formats import provenance_line, provenance_of
from battles.io import battles_from_frame, data_hash, read_battles
from battles.labels import hard_mask, label_matrix
from ensemble.record import EnsembleRecord
from kernel.errors import UserError
from kernel.files import write_text
from pipeline.config import ConfigError, RunConfig
from pipeline.rundir import RunDir, read_folds, read_id_table, write_folds
from pipeline.manifests import check_ensemble
from pipeline.runner import Run

log = logging.getLogger(__name__)


class DistillError(UserError, ValueError):
    """A teacher and training file that cannot make a student; the message says which and why."""


def teacher_outputs(teacher: RunDir, train: pd.DataFrame, train_path) -> tuple[np.ndarray, np.ndarray, EnsembleRecord]:
    """The teacher's folds for ``train`` (checked to be its training data), its OOF ensemble
    probabilities ``(n, 3)`` (NaN rows where it has none) and its ensemble summary."""
    record = teacher.record()
    if record.get("train_hash") != data_hash(train):
        raise DistillError(f"--train {train_path} is not the training data of the teacher {teacher} (made from "
                           f"{record.get('train_path')}); a student is trained on its teacher's training data, so the "
                           "teacher's out-of-fold probabilities and folds line up with its rows")
    for need in (teacher.folds, teacher.oof_probs, teacher.ensemble):
        if not need.exists():
            raise DistillError(f"{teacher}: the teacher has no {need.relative_to(teacher.path)}; finish the run first "
                               f"(python run.py tune --run {teacher} --apply)")
    check_ensemble(teacher)  # the teacher's folds, OOF probabilities and ensemble as it wrote them
    ids = train["id"].astype(str).tolist()
    saved = read_folds(teacher.folds)
    if saved["id"].tolist() != ids:
        raise DistillError(f"{teacher.folds}: the teacher's folds are for other rows than {train_path}")
    probs_table = read_id_table(teacher.oof_probs)
    position = pd.Series(np.arange(len(ids)), index=ids)
    unknown = sorted(set(probs_table["id"]) - set(ids))
    if unknown:
        raise DistillError(f"{teacher.oof_probs}: ids not in {train_path} (e.g. {unknown[:3]})")
    probs = np.full((len(ids), 3), np.nan)
    probs[position.loc[probs_table["id"]].to_numpy()] = probs_table[LABEL_COLUMNS].to_numpy(dtype=np.float64)
    return saved["fold"].to_numpy(dtype=np.int64), probs, EnsembleRecord.read(teacher.ensemble)


def student_targets(train: pd.DataFrame, teacher_probs: np.ndarray, soft_weight: float) -> np.ndarray:
    """``W * q + (1 - W) * t`` per row where the teacher has a probability ``q``; NaN rows elsewhere
    (those keep their own target). ``t`` is the row's own target (:func:`battles.labels.label_matrix`)."""
    if not 0.0 <= soft_weight <= 1.0 or math.isnan(soft_weight):
        raise DistillError(f"--soft-weight must be between 0 and 1, got {soft_weight}")
    own = label_matrix(train)
    have = ~np.isnan(teacher_probs).any(axis=1)
    out = np.full_like(own, np.nan)
    out[have] = soft_weight * teacher_probs[have] + (1.0 - soft_weight) * own[have]
    return out


def _json_value(v):
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(t) for t in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    return v


def student_lines(train: pd.DataFrame, targets: np.ndarray, provenance: dict) -> list[str]:
    """The student's training file as JSONL lines: the provenance first, then every training row with
    its hard label (null where it has none) and its target as ``soft_*`` (null: the row keeps its own)."""
    own_soft = train[SOFT_COLUMNS].to_numpy(dtype=np.float64) if all(c in train.columns for c in SOFT_COLUMNS) \
        else np.full((len(train), 3), np.nan)
    soft = np.where(np.isnan(targets).any(axis=1)[:, None], own_soft, targets)
    keep = present(train, [c for c in COLUMNS if c not in SOFT_COLUMNS])
    lines = [provenance_line(provenance)]
    for rec, s in zip(train[keep].to_dict("records"), soft):
        row = {k: _json_value(v) for k, v in rec.items()}
        row.update({c: _json_value(x) for c, x in zip(SOFT_COLUMNS, s)})
        lines.append(json.dumps(row, ensure_ascii=False))
    return lines


def _student_config(config: RunConfig, n_folds: int) -> RunConfig:
    """The student's config with the teacher's ``n_folds`` (its folds are the teacher's)."""
    if config.n_folds == n_folds:
        return config
    log.info("n_folds: the student uses the teacher's %d folds (its config said %d)", n_folds, config.n_folds)
    try:
        return RunConfig.model_validate({**config.as_dict(), "n_folds": n_folds})
    except ValueError as exc:
        raise ConfigError(f"the student's config with the teacher's n_folds={n_folds}: {exc}") from None


def _check_same_settings(student: RunDir, provenance: dict) -> None:
    """Refuse to resume a student made from another teacher, training file or soft weight."""
    if not (student.is_ours() and student.distill_train.exists()):
        return
    before = provenance_of(student.distill_train) or {}
    changed = [f"{k} {before.get(k)} -> {provenance[k]}" for k in ("distilled_from", "train", "soft_weight")
               if before.get(k) != provenance[k]]
    if changed:
        raise DistillError(f"--out {student}: this student was distilled with other settings ({'; '.join(changed)}); "
                           "use a new --out directory")


@dataclass(frozen=True)
class Student:
    """A prepared student: its directory, its training file (the teacher's targets) and its config."""

    out: Path
    train_path: Path
    config: RunConfig

    def run(self, test_path=None, progress: bool = True) -> Run:
        """The student's :class:`~pipeline.runner.Run` (not yet run)."""
        return Run(self.out, self.config, self.train_path, test_path, progress=progress)


def prepare_student(teacher_path, train_path, out, config: RunConfig, soft_weight: float) -> Student:
    """Check teacher and training file, claim ``out``, write the student's training file and the
    teacher's folds into it; return the prepared :class:`Student`."""
    teacher = RunDir.open(teacher_path)
    train, _ = read_battles(train_path, require_labels=True)
    folds, probs, ensemble = teacher_outputs(teacher, train, train_path)
    targets = student_targets(train, probs, soft_weight)
    with_teacher = ~np.isnan(targets).any(axis=1)
    n_folds = len(np.unique(folds))
    provenance = {"distilled_from": str(teacher.path.resolve()), "train": str(Path(train_path).resolve()),
                  "teacher_train_hash": teacher.record().get("train_hash"), "soft_weight": soft_weight,
                  "teacher_stages": ensemble.stages, "teacher_ensemble": ensemble.chosen,
                  "teacher_outer_folds": ensemble.outer_folds, "n_folds": n_folds,
                  "rows": len(train), "rows_with_teacher_targets": int(with_teacher.sum()),
                  "rows_with_hard_labels": int(hard_mask(train).sum()), "n_battles": len(train)}
    lines = student_lines(train, targets, provenance)
    student = RunDir(out)
    # The hash of the table exactly as the student run will read it back (the reader's JSONL path).
    table, _ = battles_from_frame(pd.DataFrame.from_records([json.loads(x) for x in lines[1:]]), student.distill_train)
    student_hash = data_hash(table)
    _check_same_settings(student, provenance)
    RunDir.check_writable(student.path, student_hash)
    student.path.mkdir(parents=True, exist_ok=True)
    if not student.is_ours():  # claim the directory before writing into it (Run.load_data completes the marker)
        student.write_marker({"train_path": str(student.distill_train.resolve()), "train_hash": student_hash,
                              "distilled_from": provenance["distilled_from"]})
    write_text(student.distill_train, "\n".join(lines) + "\n")
    if not student.folds.exists():
        write_folds(student.folds, train["id"], folds)
    log.info("distill: %d of %d rows get the teacher's OOF probabilities (soft weight %.2f); %d keep their own "
             "target; folds from %s", int(with_teacher.sum()), len(train), soft_weight,
             int((~with_teacher).sum()), teacher.folds)
    return Student(student.path, student.distill_train, _student_config(config, n_folds))
