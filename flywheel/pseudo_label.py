"""Pseudo-labels: score unlabelled battles with a finished model and save soft labels with provenance.

File format (documented contract): JSONL. The first line is a provenance record
``{"provenance": {...}}`` (run dir, stages used, config hash, data file, temperature, timestamps,
row count ``n_battles``, model-free summary of the predicted class shares); every other line is one
battle in the competition layout (``prompt``/``response_a``/``response_b`` as lists of strings) with
``soft_a``, ``soft_b``, ``soft_tie``, ``weight`` and ``source``. :func:`read_pseudo_labels` gives
back the battle table (with soft labels every stage can train on: :func:`battles.labels.expand_targets`
for LightGBM, KL loss on :func:`battles.labels.label_matrix` for deep stages) and the provenance.
A file is complete exactly when its provenance carries ``n_battles`` (:func:`battles.io.check_provenance`).

Scoring goes through a plain ``predict_fn(battles) -> (n, 3) probabilities`` in ``[a, b, tie]``
order, so any model can label; loading a finished run's final output as such a function is the
runner's job (``run.py pseudo-label --run ... --data ... --out ...``).

:func:`pseudo_label_file` streams a battle file and resumes an interrupted job:

* the input is read ``chunk_rows`` battles at a time (:func:`battles.stream.iter_battle_chunks`),
  scored, and each finished chunk is appended to ``<out>.partial`` and flushed to disk; a progress
  bar counts battles over the whole file (with the ETA), resumed rows included;
* ``<out>.partial`` starts with the job's provenance *without* ``n_battles``: the run's identity
  (caller's fields: run dir, stages, ensemble, config hash), the data file (resolved path, size,
  SHA-256), ``temperature``, ``weight``, ``source`` and ``format``. It never looks complete: its
  name says so and :func:`read_pseudo_labels` refuses it;
* a rerun of the same command finds the partial file, checks that every identity field matches
  (otherwise it refuses, naming the fields that differ, unless ``overwrite``), cuts a torn last
  line, and continues with the first input battle not yet written. Predictions are per battle, so
  a resumed job writes exactly the rows and probabilities an uninterrupted one writes;
* at the end the final file is written atomically: the provenance with ``n_battles``,
  ``mean_probs`` and ``written_at``, then the rows copied from the partial file, which is removed.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from battles.columns import ID, LABEL_COLUMNS, MODEL_COLUMNS, SOFT_COLUMNS, TEXT_COLUMNS, present
from battles.formats import CHUNK_ROWS, PROVENANCE_KEY, check_readable, count_rows, file_sha256, provenance_line
from battles.io import BattleDataError, read_battles
from battles.labels import soft_mask
from battles.stream import iter_battle_chunks
from kernel.files import OutputExistsError, check_output_file, refused_writes, write_atomic, write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
# Provenance fields that describe the writing, not the job: ignored when a rerun decides to resume.
_NOT_IDENTITY = ("started_at", "written_at", "n_battles", "mean_probs")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_probs(probs, n: int, where: str = "predict_fn") -> np.ndarray:
    """``probs`` as an ``(n, 3)`` float array of finite probabilities >= 0 summing to 1 per row."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (n, 3):
        raise ValueError(f"{where} returned shape {probs.shape} for {n} battles, expected ({n}, 3)")
    if not np.isfinite(probs).all() or (probs < 0).any() or (np.abs(probs.sum(axis=1) - 1) > 1e-4).any():
        raise ValueError(f"{where} must return finite probabilities >= 0 that sum to 1 per row")
    return probs


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Sharpen (``temperature < 1``) or soften (``> 1``) probabilities; 1 leaves them as they are."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(probs, 1e-12, None)) / temperature
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def _header_line(provenance: dict) -> str:
    return provenance_line(provenance) + "\n"


def _complete(provenance: dict, probs: np.ndarray) -> dict:
    """The provenance of a finished file: row count, class shares, time written."""
    return {**provenance, "written_at": _now(), "n_battles": len(probs),
            "mean_probs": dict(zip(SOFT_COLUMNS, probs.mean(axis=0).round(4).tolist() if len(probs) else [None] * 3))}


def _battle_lines(battles: pd.DataFrame, probs: np.ndarray, source: str, weight: float) -> str:
    """The row lines of the file (one battle each), in the order of ``battles``."""
    keep = present(battles, [ID, *TEXT_COLUMNS, *MODEL_COLUMNS])
    lines = []
    for rec, p in zip(battles[keep].to_dict("records"), probs):
        rec = {k: (list(v) if k in TEXT_COLUMNS else v) for k, v in rec.items()}
        rec.update({"soft_a": float(p[0]), "soft_b": float(p[1]), "soft_tie": float(p[2]),
                    "weight": float(weight), "source": source})
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    return "".join(lines)


# --------------------------------------------------------------------------------------------
# streamed, resumable job


def partial_path(out) -> Path:
    """Where an unfinished job writes (``<out>.partial``)."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def _read_header(path: Path) -> dict | None:
    """The provenance of a pseudo-label file (partial or not), None when the first line is not one."""
    with open(path, "rb") as f:
        first = f.readline()
    try:
        record = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record.get(PROVENANCE_KEY) if isinstance(record, dict) else None


def _differences(saved: dict, job: dict) -> list[str]:
    keys = sorted((set(saved) | set(job)) - set(_NOT_IDENTITY))
    return [f"{k}: {saved.get(k)!r} then, {job.get(k)!r} now" for k in keys if saved.get(k) != job.get(k)]


def _resume_state(partial: Path, seen_ids: set) -> np.ndarray:
    """Probabilities of the rows already written (ids into ``seen_ids``); a torn last line is cut."""
    probs, good_end = [], 0
    with open(partial, "r+b") as f:
        f.readline()
        good_end = f.tell()
        for line_no, line in enumerate(f, start=2):
            if not line.endswith(b"\n"):
                break  # the job stopped while writing this line
            try:
                rec = json.loads(line)
                probs.append([rec[c] for c in SOFT_COLUMNS])
                seen_ids.add(rec["id"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise BattleDataError(partial, f"line {line_no} is not a pseudo-labelled battle ({exc}); "
                                               "the partial file is damaged: pass --overwrite to start afresh") from None
            good_end += len(line)
        if f.seek(0, os.SEEK_END) != good_end:
            log.warning("%s: cutting a torn last line (%d bytes)", partial, f.tell() - good_end)
            f.truncate(good_end)
    return np.asarray(probs, dtype=np.float64).reshape(-1, 3)


def pseudo_label_file(data, predict_fn: Callable[[pd.DataFrame], np.ndarray], out, provenance: dict,
                      source: str = "pseudo", weight: float = 1.0, temperature: float = 1.0,
                      chunk_rows: int = CHUNK_ROWS, overwrite: bool = False, progress: bool = True) -> int:
    """Score the battle file ``data`` chunk by chunk into the pseudo-label file ``out``, resuming an
    interrupted job for the same run and data (see the module docstring). Returns the row count."""
    data, out = check_readable(data), check_output_file(out, overwrite)  # before hashing the data
    partial = partial_path(out)
    job = json.loads(json.dumps({**provenance, "data": str(data.resolve()), "data_bytes": data.stat().st_size,
                                 "data_sha256": file_sha256(data), "temperature": float(temperature),
                                 "weight": float(weight), "source": source, "format": FORMAT_VERSION}))
    seen_ids: set = set()
    done: list[np.ndarray] = []
    if partial.exists():
        saved = _read_header(partial)
        if saved is None:
            raise OutputExistsError(f"{partial} exists but is not an unfinished pseudo-label file; move it away")
        differences = _differences(saved, job)
        if overwrite:
            partial.unlink()
        elif differences:
            raise OutputExistsError(f"{partial} is an unfinished job with other inputs ({'; '.join(differences)}); "
                                  "rerun with the same arguments to resume it, or pass --overwrite to start afresh")
        else:
            done = [_resume_state(partial, seen_ids)]
            job = {**job, "started_at": saved.get("started_at")}
            log.info("resuming %s after %d battles", partial, len(done[0]))
    if not partial.exists():
        job["started_at"] = _now()
        write_text(partial, _header_line(job))
    start = sum(len(p) for p in done)
    with refused_writes(partial), open(partial, "a", encoding="utf-8", errors="surrogatepass") as f, \
            tqdm(total=count_rows(data) if progress else None, initial=start, desc="pseudo-labelling", unit="battle",
                 disable=not progress, smoothing=0.1) as bar:
        for first, chunk in iter_battle_chunks(data, chunk_rows, start=start, seen_ids=seen_ids):
            probs = apply_temperature(check_probs(predict_fn(chunk), len(chunk),
                                                  f"predict_fn (battles {first + 1}-{first + len(chunk)})"), temperature)
            f.write(_battle_lines(chunk, probs, source, weight))
            f.flush()
            os.fsync(f.fileno())
            done.append(probs)
            bar.update(len(chunk))
    probs = np.concatenate(done) if done else np.zeros((0, 3))
    if len(probs) == 0:
        raise BattleDataError(data, "no battles to pseudo-label")

    def write(tmp):
        with open(tmp, "wb") as f, open(partial, "rb") as rows:
            f.write(_header_line(_complete(job, probs)).encode("utf-8"))
            rows.readline()
            shutil.copyfileobj(rows, f, 1 << 20)

    write_atomic(out, write)
    partial.unlink()
    log.info("wrote %d pseudo-labelled battles to %s", len(probs), out)
    return len(probs)


# --------------------------------------------------------------------------------------------
# reading


def read_pseudo_labels(path) -> tuple[pd.DataFrame, dict]:
    """Battle table with soft labels (hard label columns, if any, dropped) and the provenance record.
    The reader checks the provenance line (:func:`battles.io.check_provenance`): an unfinished job's file
    is refused."""
    path = Path(path)
    battles, report = read_battles(path, require_labels=True)
    if report.provenance is None:
        raise BattleDataError(path, "first line must be the provenance record {\"provenance\": {...}}", line=1)
    if not soft_mask(battles).all():
        raise BattleDataError(path, f"every row of a pseudo-label file needs soft labels {SOFT_COLUMNS}")
    return battles.drop(columns=[c for c in LABEL_COLUMNS if c in battles.columns]), report.provenance
