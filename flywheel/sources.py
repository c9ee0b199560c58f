"""External rows join training folds only: conversion, de-duplication, final weights, checked once
before any training (:func:`gather_external`: what a run's config ``external`` section adds).

Validation rows and every reported score stay on target data. External battles carry a ``weight``
= per-source weight (from the config) x optional importance weight (:mod:`flywheel.shift`) x any
weight the file itself carries; target rows keep their own ``weight`` (1 when absent). Stages read
``weight`` as sample weights (:func:`battles.labels.row_weights`).
"""
from __future__ import annotations

import difflib
import inspect
import logging
import typing
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from battles.labels import row_weights
from flywheel.dedup import DedupConfig, deduplicate
from flywheel.shift import ShiftConfig, shift_weights
from kernel.schema import Section, annotation_range, error_message

log = logging.getLogger(__name__)

# Source kinds and their converters (flywheel/converters.py), imported when a source is converted.
SOURCE_KINDS = ("competition", "preference_pairs", "scored_answers", "arena_conversations", "pseudo_labels")


class ExternalSource(Section):
    """One external data set: how to read it, its tag, and how much each of its rows weighs."""

    kind: Literal[SOURCE_KINDS] = "competition"  # type: ignore[valid-type]  # the converter
    path: str  # the file
    source: str  # the tag written on its rows (and prefixed to their ids)
    weight: float = Field(1.0, ge=0)  # per-row training weight; 0 drops the source
    options: dict[str, Any] = Field(default_factory=dict)  # the converter's keyword options

    @model_validator(mode="after")
    def _known_options(self):
        from flywheel.converters import CONVERTERS

        accepted = [n for n in inspect.signature(CONVERTERS[self.kind]).parameters if n not in ("data", "source", "path")]
        for key in self.options:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                raise ValueError(f"options: {key!r} is not an option of the {self.kind!r} converter "
                                 f"(options: {accepted}){f'; did you mean {close[0]!r}?' if close else ''}")
        hints = typing.get_type_hints(CONVERTERS[self.kind], include_extras=True)  # types and ranges of options
        for key, value in self.options.items():
            if key in hints:
                try:
                    TypeAdapter(hints[key], config=ConfigDict(allow_inf_nan=False)).validate_python(value, strict=False)
                except ValidationError as exc:
                    raise ValueError(f"options.{key}: "
                                     f"{error_message(exc.errors()[0], annotation_range(hints[key]))}") from None
        return self


class ExternalConfig(Section):
    """The config's ``external`` section: training-only data, de-duplicated and optionally weighted."""

    sources: list[ExternalSource] = Field(default_factory=list)  # the external data sets (none by default)
    dedup: DedupConfig | Literal[False] = Field(default_factory=DedupConfig)  # false: keep duplicates
    shift_weighting: bool = False  # weight external rows by how much their prompts look like yours
    shift: ShiftConfig = Field(default_factory=ShiftConfig)  # the adversarial classifier behind shift_weighting


def external_weights(external: pd.DataFrame, source_weights: dict, shift_weights=None) -> np.ndarray:
    """Per-row weight of external battles: source weight x importance weight x any existing weight.

    Every source in ``external`` must be named in ``source_weights`` (a typo would otherwise train
    on a source at full weight); a weight of 0 drops that source.
    """
    sources = external["source"].astype(str).to_numpy()
    unknown = sorted(set(sources) - set(source_weights))
    if unknown:
        raise KeyError(f"no weight for external source(s) {unknown}; source_weights has {sorted(source_weights)}")
    w = np.array([float(source_weights[s]) for s in sources]) * row_weights(external)
    if shift_weights is not None:
        shift_weights = np.asarray(shift_weights, dtype=float)
        if shift_weights.shape != (len(external),):
            raise ValueError(f"shift_weights has shape {shift_weights.shape}, expected ({len(external)},)")
        w = w * shift_weights
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("external weights must be finite and non-negative")
    return w


def external_rows(external: pd.DataFrame, source_weights: dict, shift_weights=None,
                  target_ids=None) -> pd.DataFrame:
    """External battles with their final ``weight`` (zero-weight rows left out): the rows the runner
    adds to every fold's training part (never to validation or OOF). Their ids must differ from
    ``target_ids`` (the converters prefix ids with the source), or a row could be trained and scored."""
    ext = external.copy()
    ext["weight"] = external_weights(external, source_weights, shift_weights)
    ext = ext[ext["weight"] > 0].reset_index(drop=True)
    if target_ids is not None:
        clash = set(ext["id"].astype(str)) & set(map(str, target_ids))
        if clash:
            raise ValueError(f"{len(clash)} external ids equal training ids (e.g. {sorted(clash)[:3]}); "
                             "give external rows ids of their own (the converters prefix them with the source)")
    return ext


def convert_sources(sources: list[ExternalSource]) -> list[tuple[pd.DataFrame, dict]]:
    """Each source converted to battles (its converter, options), with its conversion report."""
    from flywheel.converters import convert

    out = []
    for src in sources:
        battles, report = convert(src.kind, src.path, source=src.source, **src.options)
        out.append((battles, report.as_dict()))
    return out


def gather_external(train: pd.DataFrame, spec: ExternalConfig, seed: int,
                    converted: list[tuple[pd.DataFrame, dict]] | None = None,
                    progress: bool = True) -> tuple[pd.DataFrame | None, dict]:
    """The training-only rows that ``spec`` adds to a run on ``train``, and the report.

    Sources converted (or ``converted``: :func:`convert_sources` of ``spec.sources``, done once by a
    caller that builds several subsets), de-duplicated against ``train`` and within themselves (the
    first source listed keeps a shared battle), optionally importance-weighted, then weighted
    (:func:`external_rows`). Report keys: ``conversion``, ``dedup``, ``shift``, ``rows_added``.
    """
    if not spec.sources:
        return None, {}
    converted = convert_sources(spec.sources) if converted is None else converted
    report: dict = {"conversion": [rep for _, rep in converted]}
    external = pd.concat([battles for battles, _ in converted], ignore_index=True, sort=False)
    if spec.dedup is not False:
        external, dedup = deduplicate(train, external, spec.dedup, progress)
        report["dedup"] = dedup.as_dict()
    weights = None
    if spec.shift_weighting and len(external):
        weights, report["shift"] = shift_weights(train, external, spec.shift, seed=seed)
    rows = external_rows(external, {s.source: s.weight for s in spec.sources}, weights, target_ids=train["id"])
    report["rows_added"] = {str(k): int(v) for k, v in rows["source"].value_counts().items()}
    log.info("external data: %d training-only rows from %s", len(rows), report["rows_added"])
    return rows, report
