"""The run directory's manifests: where a finished step records the files it wrote, and the checks
before a later command loads them (:mod:`kernel.manifest` holds the hashing and the check itself).

- A fold's or refitted model's ``done.json`` and a stage's ``done.json`` carry ``files``: the size and
  SHA-256 of every file of that place (its own files and its ``model/`` folder; the fold folders under
  a stage have their own). :func:`mark_done` is the one writer of a ``done.json``.
- The ensemble's ``ensemble/manifest.json`` (written by :func:`record_ensemble` right after
  ``ensemble.json``) covers ``ensemble.json``, ``oof_probs.csv``, ``folds.csv`` and the run's
  label-free state that models reference (``resources/`` without its caches, e.g. Word2Vec vectors).
- ``predict``, ``pseudo-label`` (:class:`pipeline.predict.Predictor`), ``tune`` and resuming
  (:mod:`pipeline.crossfit`) and ``distill`` (the teacher's outputs) check what they load: a changed,
  missing or truncated file is refused in one line naming it (exit 2).

A run written before manifests existed (no ``files`` in its ``done.json``, no ``ensemble/manifest.json``)
still loads; a note says once per run that its files are loaded unverified.
"""
from __future__ import annotations

import logging
from pathlib import Path

from kernel.dist import is_main_process
from kernel.files import read_json, write_json
from kernel.manifest import ManifestError, describe, describe_folder, files_under, verify
from pipeline.rundir import FoldDir, RunDir, StageDir

log = logging.getLogger(__name__)

FILES_KEY = "files"
MODEL_FOLDER = "model"
NOT_RECORDED = ("done.json", "started.json")  # the marker itself; the claim of a fold being fitted
RESOURCE_CACHES = ("features", "embeddings")  # recomputed on demand (features/cache.py, features/embeddings.py)
_noted: set[str] = set()


def _run_root(path: Path) -> Path:
    for place in (path, *path.parents):
        if (place / RunDir.FILES["marker"]).is_file():
            return place
    return path


def _note_unverified(place: Path, what: str) -> None:
    root = str(_run_root(place))
    if root not in _noted:
        _noted.add(root)
        log.info("%s: written before file manifests (%s has none): its files are loaded unverified", root, what)


# ----------------------------------------------------------------------------------------------- stages
def place_files(place: FoldDir | StageDir) -> dict:
    """The manifest of a fold's or stage's own files and its ``model/`` folder."""
    path = place.path
    skip = [*NOT_RECORDED, *(p.name for p in path.iterdir() if p.is_dir() and p.name != MODEL_FOLDER)]
    return describe_folder(path, skip)


def mark_done(place: FoldDir | StageDir, record: dict) -> dict:
    """Write ``place``'s ``done.json`` after everything else it wrote: ``record`` and the manifest of its
    files. Return what was written."""
    if not is_main_process():  # one writer (kernel.files.write_atomic); the others must not read half-written files
        return record
    record = {**record, FILES_KEY: place_files(place)}
    write_json(place.done, record)
    return record


def check_done(place: FoldDir | StageDir, record: dict | None = None) -> None:
    """Refuse a file of ``place`` that changed since its ``done.json`` was written (``record``: that
    file's content, when the caller has read it)."""
    record = read_json(place.done) if record is None else record
    files = record.get(FILES_KEY)
    if files is None:
        _note_unverified(place.path, str(place.done))
        return
    verify(place.path, files, place.done, "the run's files must stay as the run wrote them: restore the file or "
                                          "rerun the stage")


# ----------------------------------------------------------------------------------------------- ensemble
def ensemble_files(run: RunDir) -> dict:
    """The manifest of what the ensemble stands on, relative to the run directory."""
    relative = [p.relative_to(run.path).as_posix() for p in (run.ensemble, run.oof_probs, run.folds) if p.exists()]
    if run.resources.is_dir():
        relative += [f"{run.resources.name}/{r}" for r in resource_files(run.resources)]
    return describe(run.path, relative)


def resource_files(resources: Path) -> list[str]:
    """The run's label-free state that saved models reference (``resources/`` less its caches)."""
    return files_under(resources, RESOURCE_CACHES)


def record_ensemble(run: RunDir) -> None:
    """Write ``ensemble/manifest.json`` (after ``ensemble.json`` and ``oof_probs.csv``)."""
    if is_main_process():
        write_json(run.ensemble_manifest, {FILES_KEY: ensemble_files(run)})


def check_ensemble(run: RunDir) -> None:
    """Refuse a changed, missing or truncated file that the ensemble stands on (see the module docstring)."""
    if not run.ensemble_manifest.exists():
        if run.ensemble.exists():
            _note_unverified(run.path, str(run.ensemble_manifest.relative_to(run.path)))
        return
    try:
        files = read_json(run.ensemble_manifest)[FILES_KEY]
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{run.ensemble_manifest}: unreadable ({exc}); rerun `run.py tune --run {run}`") from None
    verify(run.path, files, run.ensemble_manifest,
           f"the run's files must stay as the run wrote them: restore the file or rerun `run.py tune --run {run}`")
