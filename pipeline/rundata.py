"""The run's data, read once and frozen: what every step of a run is handed.

:class:`RunData` is built by :meth:`pipeline.runner.Run.load_data` (read, checked, repaired, the
external rows gathered, the folds fixed) and handed to whoever needs it: each stage's fit
(:class:`pipeline.crossfit.StageFit`), the warnings, the ensemble, the report. Nobody changes it; a
step that needs other data (external-check's settings) makes a new one (:meth:`RunData.training_only`).

:class:`DataKeys` are the content keys of the run's tables, part of every resume key. The rule is
written here once (:func:`table_key`): a table's key is :func:`battles.io.data_hash` of its content,
None for a table the run does not have. Hashing 500k battles takes seconds, so each key is computed
once per run.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from battles.io import RepairReport, data_hash


def table_key(table: pd.DataFrame | None) -> str | None:
    """The content key of a table; None for a table the run does not have."""
    return None if table is None else data_hash(table)


@dataclass(frozen=True)
class DataKeys:
    """Content keys of a run's tables: the training battles, the test battles, the training-only rows."""

    train: str
    test: str | None = None
    extra: str | None = None

    @classmethod
    def of(cls, train: pd.DataFrame, test: pd.DataFrame | None = None, extra: pd.DataFrame | None = None) -> "DataKeys":
        return cls(table_key(train), table_key(test), table_key(extra))

    def with_extra(self, extra: pd.DataFrame | None) -> "DataKeys":
        return replace(self, extra=table_key(extra))


@dataclass(frozen=True)
class RunData:
    """The battles a run works on, their folds and content keys, and where they came from."""

    train: pd.DataFrame  # the training battles (the battle table, battles/columns.py)
    folds: np.ndarray  # (n_train,) fold index per training battle, fixed once per run (read-only)
    keys: DataKeys
    test: pd.DataFrame | None = None  # battles to predict
    extra: pd.DataFrame | None = None  # training-only rows (external data): never validated on, never scored
    train_path: Path | None = None
    test_path: Path | None = None
    repairs: dict[str, RepairReport] = field(default_factory=dict)  # the reader's counted repairs per input

    def __post_init__(self):
        folds = np.array(self.folds, dtype=np.int64)  # an own copy, read-only: the folds are fixed
        folds.flags.writeable = False
        object.__setattr__(self, "folds", folds)

    def training_only(self, extra: pd.DataFrame | None) -> "RunData":
        """The same training battles and folds with ``extra`` as the training-only rows and no test set
        (a side experiment, such as one setting of external-check)."""
        keys = DataKeys(self.keys.train, None, self.keys.extra if extra is self.extra else table_key(extra))
        return replace(self, test=None, test_path=None, extra=extra, keys=keys)
