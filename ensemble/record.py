"""The ensemble's saved form: ``<run>/ensemble/ensemble.json``, read and written through one model.

:class:`EnsembleRecord` is what fitting the ensemble returns and what every reader takes: the run's
printout and tune table, the report, the score warnings, prediction (``Predictor``: the stages, their
resume keys, the calibrator) and distillation (the teacher's stages and choice). A key renamed here
is renamed for all of them, and an ``ensemble.json`` that does not fit the model is refused with one
line naming the file.

Its parts are typed rows: :class:`CandidateRow` (a stacker candidate), :class:`MethodRow` (a row of
the tune table), :class:`StageSetRow` (a candidate stage set of :mod:`ensemble.coverage`; a new
figure of the stage-set comparison is a new field there), :class:`Selection` (the rule that chose the
stage set and each stage's test against the class prior), :class:`Scores` (:func:`ensemble.metrics.scores`).
The calibrator (``model``) keeps its own JSON form (:func:`ensemble.calibrators.calibrator_from_json`).

Versions: ``format_version`` says which layout a file has; a file written before the field existed
is version 1 (the same keys). A field at its default (``None``: a stage-set comparison with one set,
a class without rows) is left out of the file and reads back as its default, so a file keeps the
layout that readers of the plain JSON know.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError

from battles.labels import CLASS_NAMES
from ensemble.calibrators import calibrator_from_json
from kernel.errors import UserError
from kernel.files import content_key, read_json, write_json
from kernel.schema import Section

FORMAT_VERSION = 1


class EnsembleRecordError(UserError, ValueError):
    """An ``ensemble.json`` this version cannot read; the message names the file and what to do."""


class Scores(Section):
    """Log loss and accuracy on some rows, overall and per true class (:func:`ensemble.metrics.scores`)."""

    log_loss: float
    accuracy: float
    n: int  # rows scored
    log_loss_a: float | None = None  # per true class: None where no scored row has that class
    log_loss_b: float | None = None
    log_loss_tie: float | None = None
    accuracy_a: float | None = None  # recall of the class
    accuracy_b: float | None = None
    accuracy_tie: float | None = None

    def per_class(self, measure: str) -> dict[str, float]:
        """``{class: value}`` of ``measure`` ("log_loss" or "accuracy"); NaN for a class without rows."""
        values = {c: getattr(self, f"{measure}_{c}") for c in CLASS_NAMES}
        return {c: float("nan") if v is None else v for c, v in values.items()}


class CandidateRow(Section):
    """A candidate of the stacker (:mod:`ensemble.stacking`): its CV log loss and how often it was chosen."""

    candidate: str
    method: str  # the tune-table row it belongs to
    cv_log_loss: float
    chosen_in_outer_folds: int
    chosen: bool
    single_stage: str | None  # the stage a one-stage candidate calibrates (None: several stages)


class MethodRow(Section):
    """A row of the tune table: a method scored by nested CV, and its model's stage weights."""

    method: str
    nested_log_loss: float
    nested_accuracy: float
    best_candidate: str
    cv_log_loss: float
    weights: dict[str, float]  # stage -> share in the method's model fitted on all rows
    chosen: bool


class StageSetRow(Section):
    """A candidate stage set (:mod:`ensemble.coverage`): the rows all its stages cover and its nested score;
    with several sets, its comparison with the chosen set on the rows every stage covers."""

    stages: list[str]
    rows: int
    outer_folds: str  # where the nested CV's outer folds came from
    chosen: bool
    method: str  # the candidate chosen within the set
    nested_log_loss: float
    interval: tuple[float, float]  # 90% bootstrap interval of the nested log loss
    prior_log_loss: float
    role: str | None = None  # "default", or what the set adds to the default (ensemble.coverage)
    common_rows: int | None = None
    log_loss_on_common_rows: float | None = None
    minus_chosen_on_common_rows: float | None = None
    minus_chosen_interval: tuple[float, float] | None = None  # paired bootstrap, 90%
    # the selection rule's test of a wider set against the set chosen before it (ensemble.coverage.RULE)
    compared_with: list[str] | None = None
    compared_on_rows: int | None = None
    minus_compared: float | None = None
    minus_compared_interval: tuple[float, float] | None = None  # paired bootstrap over prompt groups, 90%
    replaced_it: bool | None = None


class PriorTest(Section):
    """One stage alone, calibrated by cross-fitting on its own rows, against the class prior on those rows."""

    stage: str
    rows: int
    calibrated_log_loss: float
    prior_log_loss: float
    minus_prior: float
    minus_prior_interval: tuple[float, float]  # paired bootstrap over prompt groups, 90%
    beats_prior: bool


class Selection(Section):
    """How the stage set was chosen: the rule, the one line that says what decided, each stage's test."""

    rule: str
    decided_by: str
    stages_against_prior: list[PriorTest]


class EnsembleRecord(Section):
    """The chosen ensemble, how it was chosen and how it scores (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    format_version: int = FORMAT_VERSION
    # what prediction needs
    stages: list[str]  # the stages whose logits the model reads, in its order
    stage_keys: dict[str, str] = Field(default_factory=dict)  # each stage's resume key when the ensemble was fitted
    chosen: str  # the chosen candidate
    method: str
    model: dict[str, Any]  # the fitted calibrator (its own JSON form)
    meta_features: bool  # whether the model reads the meta features
    # how it scores, and on which rows
    rows: int
    outer_folds: str
    prior_log_loss: float
    nested_scores: Scores
    nested_interval: tuple[float, float]
    stage_weights: dict[str, float]
    carrying_weight: list[str]
    candidates: list[CandidateRow]
    methods: list[MethodRow]
    stage_sets: list[StageSetRow]
    coverage: dict[str, int]  # stage -> rows with out-of-fold logits
    stages_raw: dict[str, Scores]  # stage -> its raw out-of-fold scores
    stages_calibrated: dict[str, float]  # stage -> log loss of the stage alone, calibrated (its own rows)
    selection: Selection | None = None  # how the stage set was chosen (None: a record written before the rule)
    warnings: list[str]  # what the data cannot support (pipeline/checks.py)

    def as_dict(self) -> dict:
        """The saved form: plain JSON values; a field at its default is left out, the version never."""
        return {"format_version": self.format_version, **self.model_dump(mode="json", exclude_defaults=True)}

    def key(self) -> str:
        """A content key of the saved form (provenance of what this ensemble made)."""
        return content_key(self.as_dict())

    def calibrator(self):
        """The fitted calibrator, ready to map the stages' logits to probabilities."""
        return calibrator_from_json(self.model)

    def save(self, path) -> None:
        write_json(path, self.as_dict())

    @classmethod
    def read(cls, path) -> "EnsembleRecord":
        """The record saved at ``path``; :class:`EnsembleRecordError` for a file this version cannot read."""
        path = Path(path)
        try:
            data = read_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EnsembleRecordError(f"{path}: not a JSON ensemble record ({exc}); run `run.py tune --apply` again") from None
        if not isinstance(data, dict):
            raise EnsembleRecordError(f"{path}: not an ensemble record (a JSON object); run `run.py tune --apply` again")
        data.setdefault("format_version", 1)  # written before the field existed: the layout of version 1
        version = data["format_version"]
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise EnsembleRecordError(f"{path}: format version {version} is newer than this arena-stack reads "
                                      f"({FORMAT_VERSION}); use the arena-stack that made the run")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"])
            raise EnsembleRecordError(f"{path}: {where}: {error['msg']}; run `run.py tune --apply` again to rewrite "
                                      "the ensemble") from None
