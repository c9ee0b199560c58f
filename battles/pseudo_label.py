"""Pseudo-labels: score unlabelled battles with a finished model and save soft labels with provenance.

File format (documented contract): JSONL. The first line is a provenance record
``{"provenance": {...}}`` (run dir, stages used, config hash, timestamp, row count, model-free
summary of the predicted class shares); every other line is one battle in the competition layout
(``prompt``/``response_a``/``response_b`` as lists of strings) with ``soft_a``, ``soft_b``,
``soft_tie``, ``weight`` and ``source``. :func:`read_pseudo_labels` gives back the battle table
(with soft labels every stage can train on: :func:`battles.labels.expand_targets` for
LightGBM, KL loss on :func:`battles.labels.label_matrix` for deep stages) and the provenance.

Scoring goes through a plain ``predict_fn(battles) -> (n, 3) probabilities`` in ``[a, b, tie]``
order, so any model can label; loading a finished run's final output as such a function is the
runner's job (``run.py pseudo-label --run ... --data ... --out ...``).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from battles.io import BattleDataError, TEXT_COLUMNS, battles_from_frame
from battles.labels import LABEL_COLUMNS
from battles.labels import SOFT_COLUMNS
from battles.files import write_atomic

log = logging.getLogger(__name__)

PROVENANCE_KEY = "provenance"


def score_battles(battles: pd.DataFrame, predict_fn: Callable[[pd.DataFrame], np.ndarray],
                  batch_size: int = 4096, temperature: float = 1.0) -> np.ndarray:
    """Probabilities ``(n, 3)`` from ``predict_fn`` in batches, checked, optionally sharpened
    (``temperature < 1``) or softened (``> 1``)."""
    from tqdm.auto import tqdm

    parts = []
    for start in tqdm(range(0, len(battles), batch_size), desc="pseudo-labelling", disable=len(battles) <= batch_size):
        chunk = battles.iloc[start:start + batch_size]
        probs = np.asarray(predict_fn(chunk), dtype=np.float64)
        if probs.shape != (len(chunk), 3):
            raise ValueError(f"predict_fn returned shape {probs.shape} for {len(chunk)} battles, expected ({len(chunk)}, 3)")
        parts.append(probs)
    probs = np.concatenate(parts) if parts else np.zeros((0, 3))
    if not np.isfinite(probs).all() or (probs < 0).any() or (np.abs(probs.sum(axis=1) - 1) > 1e-4).any():
        raise ValueError("predict_fn must return finite probabilities >= 0 that sum to 1 per row")
    if temperature != 1.0:
        logits = np.log(np.clip(probs, 1e-12, None)) / temperature
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
    return probs


def write_pseudo_labels(path, battles: pd.DataFrame, probs: np.ndarray, provenance: dict,
                        source: str = "pseudo", weight: float = 1.0, overwrite: bool = False) -> Path:
    """Write the JSONL file (provenance line first) atomically; refuses to replace a file unless
    ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(battles), 3):
        raise ValueError(f"probs shape {probs.shape} does not match {len(battles)} battles")
    header = {PROVENANCE_KEY: {**provenance, "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                               "n_battles": len(battles), "source": source,
                               "mean_probs": dict(zip(SOFT_COLUMNS, probs.mean(axis=0).round(4).tolist()))}}
    keep = ["id", *TEXT_COLUMNS, "model_a", "model_b"]

    def write(tmp):
        with open(tmp, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(json.dumps(header, ensure_ascii=False, sort_keys=True) + "\n")
            for rec, p in zip(battles[[c for c in keep if c in battles.columns]].to_dict("records"), probs):
                rec = {k: (list(v) if k in TEXT_COLUMNS else v) for k, v in rec.items()}
                rec.update({"soft_a": float(p[0]), "soft_b": float(p[1]), "soft_tie": float(p[2]),
                            "weight": float(weight), "source": source})
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    write_atomic(path, write)
    log.info("wrote %d pseudo-labelled battles to %s", len(battles), path)
    return path


def pseudo_label(battles: pd.DataFrame, predict_fn, out_path, provenance: dict, source: str = "pseudo",
                 weight: float = 1.0, temperature: float = 1.0, overwrite: bool = False) -> Path:
    """Score ``battles`` with ``predict_fn`` and write the pseudo-label file (see module docstring)."""
    if out_path is not None and Path(out_path).exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (--overwrite) to replace it")
    probs = score_battles(battles, predict_fn, temperature=temperature)
    return write_pseudo_labels(out_path, battles, probs, {**provenance, "temperature": temperature},
                               source=source, weight=weight, overwrite=overwrite)


def read_pseudo_labels(path) -> tuple[pd.DataFrame, dict]:
    """Battle table with soft labels (no hard label columns) and the provenance record."""
    path = Path(path)
    if not path.exists():
        raise BattleDataError(path, "file not found")
    records, provenance = [], None
    with open(path, encoding="utf-8", errors="surrogatepass") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BattleDataError(path, f"line {line_no} is not JSON ({exc.msg})") from None
            if line_no == 1 and PROVENANCE_KEY in rec:
                provenance = rec[PROVENANCE_KEY]
                continue
            records.append(rec)
    if provenance is None:
        raise BattleDataError(path, "first line must be the provenance record {\"provenance\": {...}}", 1)
    frame = pd.DataFrame(records)
    missing = [c for c in SOFT_COLUMNS if c not in frame.columns]
    if missing:
        raise BattleDataError(path, f"missing soft-label column(s) {missing}")
    frame = frame.drop(columns=[c for c in LABEL_COLUMNS if c in frame.columns])
    battles, _ = battles_from_frame(frame, path, require_labels=True)
    soft = battles[SOFT_COLUMNS].to_numpy(dtype=float)
    bad = np.flatnonzero(np.isnan(soft).any(axis=1) | (np.abs(soft.sum(axis=1) - 1) > 1e-3) | (soft < 0).any(axis=1))
    if len(bad):
        raise BattleDataError(path, f"soft labels must be >= 0 and sum to 1, got {soft[bad[0]].tolist()}",
                              int(bad[0]) + 1, "soft_a")
    if provenance.get("n_battles") not in (None, len(battles)):
        raise BattleDataError(path, f"provenance says {provenance['n_battles']} battles, file has {len(battles)}")
    return battles, provenance
