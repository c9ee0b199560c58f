"""What a run's steps hand on in memory: a stage's result and the ensemble just fitted.

:class:`StageResult` goes from a stage's fit (:class:`pipeline.crossfit.StageFit`, or read back when
resuming) to the ensemble and the report; :class:`EnsembleFit` from :meth:`pipeline.runner.Run.fit_ensemble`
to the report. Both are frozen; what is saved of them is in the run directory (:mod:`pipeline.rundir`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ensemble.record import EnsembleRecord


@dataclass(frozen=True)
class StageResult:
    """A finished stage: OOF logits where it has them (NaN rows elsewhere), test logits, metrics."""

    name: str
    oof_logits: np.ndarray  # (n_train, 3); NaN on rows the plan does not cover
    covered: np.ndarray  # (n_train,) bool: rows with OOF logits
    test_logits: np.ndarray | None
    metrics: dict
    orders: tuple[np.ndarray, np.ndarray] | None = None  # single-order OOF log-probs (straight, swapped)
    key: str = ""  # the stage's resume key (what the ensemble was fitted on; predict checks it)


@dataclass(frozen=True)
class EnsembleFit:
    """The ensemble a command just fitted: its saved record, and what only this command holds in memory
    for the report (the training rows it stands on, its nested-CV probabilities on them)."""

    record: EnsembleRecord
    rows: np.ndarray  # (n_train,) bool
    oof_probs: np.ndarray  # (rows.sum(), 3)
