"""Feature blocks: the pieces LightGBM feature sets are made of.

A block turns battles into :class:`SidedFeatures`: one matrix for response A, one for response B
(same columns, computed the same way), and ``shared`` columns that do not change when A and B trade
places (prompt figures, A-B similarities). Because sides are kept apart, the swapped battle's
features are just ``a`` and ``b`` exchanged: training on swapped copies and swap test-time
augmentation cost no second feature pass.

``combine`` says which per-side views a block contributes to the model matrix: ``"a"``, ``"b"``
(raw per-side values), ``"diff"`` (A minus B) and ``"ratio"`` (log of (A+1)/(B+1), for counts).

Parameters are declared per block as a ``Params`` section (:mod:`kernel.schema`): unknown keys
and wrong types are errors, and the defaults live there and nowhere else.

Lifecycle (all optional but ``transform``): ``prepare`` on every text of the run without labels
(Word2Vec, embedding caches), ``fit`` on one fold's training battles (TF-IDF vocabularies),
``save``/``load`` in plain files (JSON, .npy, gensim's native format; never pickles).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from kernel.context import StageContext
from kernel.schema import Section, validated


@dataclass
class SidedFeatures:
    names: list[str]  # per-side column names (shared by a and b)
    a: np.ndarray  # (n, len(names))
    b: np.ndarray
    shared_names: list[str] = field(default_factory=list)
    shared: np.ndarray | None = None  # (n, len(shared_names)), swap-invariant
    combine: tuple[str, ...] = ("a", "b", "diff", "ratio")

    def __post_init__(self):
        n = self.a.shape[0]
        if self.a.shape != self.b.shape or self.a.shape[1] != len(self.names):
            raise ValueError(f"side matrices {self.a.shape}/{self.b.shape} do not match {len(self.names)} names")
        if self.shared is None:
            self.shared = np.zeros((n, 0))
        if self.shared.shape != (n, len(self.shared_names)):
            raise ValueError(f"shared matrix {self.shared.shape} does not match {len(self.shared_names)} names")

    def swapped(self) -> "SidedFeatures":
        return SidedFeatures(self.names, self.b, self.a, self.shared_names, self.shared, self.combine)

    def matrix(self, prefix: str = "") -> tuple[np.ndarray, list[str]]:
        """The model matrix of this block, columns in a fixed order, and their names."""
        parts, names = [], []
        views = {
            "a": lambda: self.a,
            "b": lambda: self.b,
            "diff": lambda: self.a - self.b,
            "ratio": lambda: np.log1p(np.clip(self.a, 0, None)) - np.log1p(np.clip(self.b, 0, None)),
        }
        for view in self.combine:
            parts.append(views[view]())
            names += [f"{prefix}{n}_{view}" for n in self.names]
        parts.append(self.shared)
        names += [f"{prefix}{n}" for n in self.shared_names]
        return np.hstack([p.astype(np.float32) for p in parts]), names


class FeatureBlock:
    """Base class for a feature block. ``name`` prefixes its columns in the model matrix; ``Params``
    declares its parameters (none by default); the capabilities below are declared with their
    defaults and a block overrides what differs."""

    name = "block"
    Params: type[Section] = Section

    fold_dependent: bool = False
    """``fit`` learns from the fold's training battles (TF-IDF's vocabulary): the block is recomputed
    after every fit, never served by the run-level feature cache (:mod:`features.assemble`)."""

    trains_outside_gil: bool = False
    """``prepare`` spends its time outside Python's GIL (gensim trains Word2Vec in its own thread): a
    stage may prepare it in the background while the other blocks prepare (:mod:`models.lgbm`)."""

    def __init__(self, params=None, context: StageContext | None = None):
        self.params = validated(self.Params, params)
        self.context = context or StageContext()

    def prepare(self, battles: pd.DataFrame) -> None:
        """Label-free fitting on every text of the run. Default: nothing."""

    def fit(self, train: pd.DataFrame) -> None:
        """Fitting inside one fold's training battles (no validation rows). Default: nothing."""

    def transform(self, battles: pd.DataFrame) -> SidedFeatures:
        raise NotImplementedError

    def state_key(self):
        """What the output depends on besides params and battles (JSON-able; part of the run-level
        feature cache key, :mod:`features.cache`). Default: nothing."""
        return None

    def save(self, directory: Path) -> None:
        """Write what ``fit``/``prepare`` learned. Default: nothing to write."""

    def load(self, directory: Path) -> None:
        """Read what ``save`` wrote (the block is already constructed with its params)."""


def row_cosine(x, y, unit_rows: bool = False) -> np.ndarray:
    """Cosine similarity of matching rows of ``x`` and ``y`` (dense arrays or scipy sparse matrices);
    0 where either row is all zeros. ``unit_rows``: the rows are already L2-normalised, so the
    cosine is their dot product."""
    if sp.issparse(x) or sp.issparse(y):
        if not unit_rows:
            raise ValueError("row_cosine on sparse rows expects L2-normalised rows (unit_rows=True)")
        return np.asarray(x.multiply(y).sum(axis=1)).ravel()
    dot = (x * y).sum(axis=1)
    if unit_rows:
        return dot
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    return np.where((nx > 0) & (ny > 0), dot / np.maximum(nx * ny, 1e-12), 0.0)
