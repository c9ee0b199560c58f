"""The run directory: its layout, its tables, and who may write into it.

    <run>/
      run.json                 the marker, written before anything else: tool, version, creation time,
                               training data (path, hash, size), test data; "is this a run of ours?"
      config.json              the resolved config (every default written out)
      data_report.json         counted repairs per input file
      external_report.json     conversion, de-duplication and shift reports (with external data)
      folds.csv                id,fold: grouped by prompt, seeded; every stage uses these
      timings.json             wall time per step of the last command
      .lock                    while a command writes the run: who (pid, host, command, since)
      resources/               label-free caches (Word2Vec vectors, embeddings)
      stages/<name>/           spec.json, done.json, metrics.json, oof_logits.csv, test_logits.csv,
                               oof_logits_straight.csv, oof_logits_swapped.csv (single orders)
        fold<k>/               model/, valid_logits*.csv, test_logits.csv, started.json, done.json
        full/                  model/, test_logits.csv, done.json (a stage refitted on every row)
        fold<k>.partial/       a model being fitted (its checkpoints); renamed to fold<k>/ when done
      stages/<name>.new/       a finished stage being refitted with another key (until the command succeeds)
      ensemble/                ensemble.json (what predict uses), oof_probs.csv (nested-CV probabilities),
                               manifest.json (sizes and SHA-256 of what the ensemble stands on: pipeline/manifests.py)
      report.html (+ PNGs)
      submission.csv           with a test file
      distill_train.jsonl      a distilled student's training file: teacher OOF targets (pipeline/distill.py)
      external_check.json      external-check: per source rows, AUC, OOF log loss change, verdict
      external_check.txt       (pipeline/external_check.py; its settings' stages under stages/)

Transactions: nothing finished is changed until the work replacing it has finished. A model is fitted
in ``fold<k>.partial/`` (``full.partial/``) and renamed to ``fold<k>/`` once its ``done.json`` is written;
a finished stage refitted with another key is fitted in ``stages/<name>.new/`` (its reusable models
hard-linked in) and replaces ``stages/<name>/`` only when the command's new work has succeeded
(:func:`replace_dir`; an interrupted swap is completed by :func:`settle_dir`). A command that writes a
run holds its lock (:meth:`RunDir.lock`, a ``.lock`` file naming the holder); readers take none.

Ownership: ``--out`` may be a new path, an empty directory, or a run directory of ours (its marker
says so) made for the same training data; anything else is refused before a byte is written.
Commands that read a finished run (``tune``, ``predict``, ``pseudo-label``) open it with
:meth:`RunDir.open`, which refuses a directory that is not a run of ours.
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from battles.columns import LABEL_COLUMNS
from kernel.dist import is_main_process, wait_for_everyone
from kernel.errors import UserError
from kernel.files import FLOAT_FORMAT, as_stored, read_json, write_atomic, write_json  # noqa: F401 (as_stored: the tables' rule)
from kernel.lock import LOCK_NAME, DirLock, lock_dir

TOOL = "arena-stack"
LOGIT_COLUMNS = ["logit_a", "logit_b", "logit_tie"]
ORDERS = ("straight", "swapped")  # single-order OOF files: oof_logits_straight.csv, oof_logits_swapped.csv


class RunDirError(UserError, RuntimeError):
    """A directory that cannot be used as (or is not) a run directory; the message says why and what to do."""


def tool_version() -> str:
    try:
        return metadata.version(TOOL)
    except metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------- layout
class _Layout:
    """A directory whose files are named in one table (``FILES``: attribute -> relative path)."""

    FILES: dict[str, str] = {}

    def __init__(self, path):
        self.path = Path(path)

    def __getattr__(self, name: str) -> Path:
        if name in type(self).FILES:
            return self.path / type(self).FILES[name]
        raise AttributeError(f"{type(self).__name__} has no {name!r}")


class FoldDir(_Layout):
    """One fitted model of a stage: fold ``k`` (trained on the other folds) or ``full`` (all rows)."""

    FILES = {"model": "model", "done": "done.json", "started": "started.json", "valid_logits": "valid_logits.csv",
             "test_logits": "test_logits.csv"}

    def valid_order(self, order: str) -> Path:
        return self.path / f"valid_logits_{order}.csv"

    @property
    def partial(self) -> "FoldDir":
        """Where this model is fitted (and its checkpoints kept) until it has finished: ``<name>.partial/``."""
        return FoldDir(self.path.with_name(self.path.name + PARTIAL))

    def promote(self) -> None:
        """The finished :attr:`partial` becomes this model (replacing an older one only now)."""
        if is_main_process():
            replace_dir(self.partial.path, self.path)
        wait_for_everyone()

    def settle(self) -> None:
        if is_main_process():
            settle_dir(self.partial.path, self.path, FoldDir.FILES["done"])
        wait_for_everyone()

    def claim(self, key: str) -> None:
        """Make this fold directory belong to ``key``: leftovers of an interrupted fit with the same key
        (training checkpoints) stay, leftovers of another config or data are removed."""
        if is_main_process():
            started = read_json(self.started).get("key") if self.started.exists() else None
            if started != key and self.path.exists():
                shutil.rmtree(self.path)
            write_json(self.started, {"key": key})
        wait_for_everyone()


class StageDir(_Layout):
    FILES = {"spec": "spec.json", "done": "done.json", "metrics": "metrics.json", "oof_logits": "oof_logits.csv",
             "test_logits": "test_logits.csv"}

    @property
    def full(self) -> FoldDir:
        return FoldDir(self.path / "full")

    def fold(self, k: int) -> FoldDir:
        return FoldDir(self.path / f"fold{int(k)}")

    def oof_order(self, order: str) -> Path:
        return self.path / f"oof_logits_{order}.csv"

    def finished_folds(self) -> list[str]:
        """Names of the fold directories whose model finished (``fold<k>`` with a ``done.json``)."""
        return sorted(p.parent.name for p in self.path.glob(f"fold*/{FoldDir.FILES['done']}")
                      if p.parent.name[4:].isdigit())

    @property
    def staging(self) -> "StageDir":
        """Where a finished stage is refitted with another config or data: ``stages/<name>.new/``."""
        return StageDir(self.path.with_name(self.path.name + STAGING))

    def replace_with(self, staged: "StageDir") -> None:
        """The finished ``staged`` stage becomes this one (the old one is removed only now)."""
        if is_main_process():
            replace_dir(staged.path, self.path)
        wait_for_everyone()

    def settle(self) -> None:
        """Complete a swap an interruption cut between its two renames (see :func:`settle_dir`)."""
        if is_main_process():
            settle_dir(self.staging.path, self.path, self.FILES["done"])
        wait_for_everyone()


class RunDir(_Layout):
    """Paths of one run directory (see the module docstring), and the ownership rules."""

    FILES = {"marker": "run.json", "config": "config.json", "data_report": "data_report.json",
             "external_report": "external_report.json", "folds": "folds.csv", "timings": "timings.json",
             "resources": "resources", "ensemble": "ensemble/ensemble.json",
             "ensemble_manifest": "ensemble/manifest.json",
             "oof_probs": "ensemble/oof_probs.csv", "report": "report.html", "submission": "submission.csv",
             "distill_train": "distill_train.jsonl", "external_check": "external_check.json",
             "external_check_table": "external_check.txt"}

    def __str__(self) -> str:
        return str(self.path)

    def stage(self, name: str) -> StageDir:
        return StageDir(self.path / "stages" / name)

    def figure(self, name: str) -> Path:
        return self.path / f"{name}.png"

    # -- ownership ------------------------------------------------------------------------------
    def is_ours(self) -> bool:
        try:
            return self.marker.is_file() and read_json(self.marker).get("tool") == TOOL
        except (ValueError, OSError):
            return False

    @classmethod
    def open(cls, path) -> "RunDir":
        """An existing run directory of ours (for commands that read a run)."""
        run = cls(path)
        if not run.path.exists():
            raise RunDirError(f"{run.path}: run directory not found")
        if not run.path.is_dir():
            raise RunDirError(f"{run.path}: is a file, not a run directory")
        if not run.is_ours():
            raise RunDirError(f"{run.path}: not a run directory of {TOOL} (no {run.marker.name} written by it); "
                              "pass the --out directory of a finished run")
        return run

    @classmethod
    def check_writable(cls, path, train_hash: str | None) -> "RunDir":
        """Refuse ``path`` as ``--out`` unless it is new, empty, or a run of ours for the same training
        data (``train_hash``; None: any). Writes nothing."""
        run = cls(path)
        p = run.path
        if p.exists() and not p.is_dir():
            raise RunDirError(f"--out {p}: is a file; give a directory for the run (a new path, or an empty directory)")
        if not p.exists() or not any(x.name != LOCK_NAME for x in p.iterdir()):  # a dead writer's lock file: empty
            return run
        if not run.is_ours():
            raise RunDirError(f"--out {p}: the directory is not empty and not a run directory of {TOOL}; refusing "
                              "to write into it (nothing was written). Choose a new path or an empty directory.")
        made_for = read_json(run.marker).get("train_hash")
        if train_hash is not None and made_for not in (None, train_hash):
            raise RunDirError(f"--out {p}: this run was made for different training data "
                              f"({read_json(run.marker).get('train_path')}); use a new --out directory")
        return run

    def write_marker(self, info: dict) -> None:
        """Write (or refresh) the marker: tool, version, first creation time, and ``info`` (data record)."""
        created = read_json(self.marker).get("created") if self.is_ours() else None
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        write_json(self.marker, {"tool": TOOL, "version": tool_version(), "created": created or now,
                                 "updated": now, **info})

    def record(self) -> dict:
        return read_json(self.marker)

    def lock(self) -> DirLock:
        """This run's writer lock (the directory exists); a second writer is refused naming the holder."""
        return lock_dir(self.path, "run directory")


# ----------------------------------------------------------------------------------------------- swaps
PARTIAL, STAGING, OLD = ".partial", ".new", ".old"


def replace_dir(new: Path, final: Path) -> None:
    """Put the finished directory ``new`` in place of ``final`` (which may not exist): ``final`` moves
    aside to ``<final>.old``, ``new`` is renamed to ``final``, the old one is removed. Until the second
    rename ``final`` is untouched apart from its name; :func:`settle_dir` completes a cut swap."""
    old = final.with_name(final.name + OLD)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def settle_dir(new: Path, final: Path, done: str) -> None:
    """After an interruption inside :func:`replace_dir`: with ``final`` gone, the finished ``new`` (it
    holds ``done``) takes its place, else the old one returns; a leftover ``<final>.old`` is removed."""
    old = final.with_name(final.name + OLD)
    if not old.exists():
        return
    if not final.exists():
        os.rename(new if (new / done).exists() else old, final)
    shutil.rmtree(old, ignore_errors=True)


def link_tree(src: Path, dst: Path) -> None:
    """A copy of the finished directory ``src`` at ``dst`` made of hard links (files of ours are only ever
    replaced by rename, never changed in place, so the two stay independent); plain copies where the
    file system has no links."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=link)


# ----------------------------------------------------------------------------------------------- tables
def write_logits(path, ids, logits: np.ndarray) -> None:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape != (len(ids), 3):
        raise ValueError(f"logits shape {logits.shape} does not match {len(ids)} ids x 3 classes")
    frame = pd.DataFrame(logits, columns=LOGIT_COLUMNS)
    frame.insert(0, "id", [str(i) for i in ids])
    write_atomic(path, lambda p: frame.to_csv(p, index=False, float_format=FLOAT_FORMAT))


def read_logits(path, ids=None) -> np.ndarray:
    """Read a logits table; with ``ids``, check and return rows in that order."""
    frame = read_id_table(path)
    if ids is not None:
        ids = [str(i) for i in ids]
        if len(frame) != len(ids) or set(frame["id"]) != set(ids):
            raise ValueError(f"{path}: logits are for different battles than expected ({len(frame)} vs {len(ids)} rows)")
        frame = frame.set_index("id").loc[ids].reset_index()
    return frame[LOGIT_COLUMNS].to_numpy(dtype=np.float64)


def read_id_table(path) -> pd.DataFrame:
    """A table of ours keyed by ``id``: ids stay text (``NaN`` is an id, not a missing value)."""
    return pd.read_csv(path, dtype={"id": str}, keep_default_na=False, na_values=[])  # pandas 3 parses floats exactly (round trip)


def probs_frame(ids, probs: np.ndarray) -> pd.DataFrame:
    """The submission table: ``id`` and the three label columns, rows renormalised to sum to one."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)
    frame = pd.DataFrame(probs, columns=LABEL_COLUMNS)
    frame.insert(0, "id", [str(i) for i in ids])
    return frame


def write_probs(path, ids, probs: np.ndarray) -> None:
    frame = probs_frame(ids, probs)
    write_atomic(path, lambda p: frame.to_csv(p, index=False, float_format=FLOAT_FORMAT))


def write_folds(path, ids, folds: np.ndarray) -> None:
    frame = pd.DataFrame({"id": [str(i) for i in ids], "fold": np.asarray(folds, dtype=np.int64)})
    write_atomic(path, lambda p: frame.to_csv(p, index=False))


def read_folds(path) -> pd.DataFrame:
    return read_id_table(path)
