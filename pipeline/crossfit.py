"""Cross-fitting one stage over the run's folds, with resume.

For every fold the stage is fitted on the other folds (plus any extra training-only rows, such as
external data) with the fold's battles as its validation set, then predicts the fold (out-of-fold
logits) and the test battles. Each finished fold is written to ``stages/<name>/fold<k>/`` with a
``done.json`` holding the resume key (stage config, data, folds); a rerun skips folds whose key
matches. When every fold is done the stage's ``oof_logits.csv``, ``test_logits.csv`` (fold average)
and ``metrics.json`` are written and the stage is marked done.

Stages that can (see :func:`models.stage.predict_with_orders`) also leave their single-order OOF
log-probabilities, before swap TTA: ``oof_logits_straight.csv`` (battles as given) and
``oof_logits_swapped.csv`` (battles with A and B swapped, columns as predicted for the swapped
battle). The report's position-bias check reads them; nothing else does.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from battles.io import data_hash
from battles.labels import LABEL_COLUMNS, has_labels, label_index
from ensemble.metrics import probs_from_logits, scores
from models.stage import StageContext, average_logits, make_stage, predict_with_orders
from battles.files import content_key, read_json, wait_for_everyone, write_json
from pipeline.rundir import read_logits, write_logits

log = logging.getLogger(__name__)


ORDERS = ("straight", "swapped")  # single-order OOF files: oof_logits_straight.csv, oof_logits_swapped.csv


@dataclass
class StageResult:
    name: str
    oof_logits: np.ndarray
    test_logits: np.ndarray | None
    metrics: dict


def _label_free(battles: pd.DataFrame) -> pd.DataFrame:
    return battles.drop(columns=[c for c in [*LABEL_COLUMNS, "soft_a", "soft_b", "soft_tie"] if c in battles.columns])


def _done(path: Path, key: str) -> bool:
    return path.exists() and read_json(path).get("key") == key


def stage_key(spec: dict, train: pd.DataFrame, folds: np.ndarray, test: pd.DataFrame | None,
              extra: pd.DataFrame | None, seed: int) -> str:
    return content_key(spec, data_hash(train), folds.tolist(), data_hash(test) if test is not None else None,
                      data_hash(extra) if extra is not None else None, seed)


def crossfit_stage(run_dir, name: str, spec: dict, train: pd.DataFrame, folds: np.ndarray,
                   test: pd.DataFrame | None = None, extra_train: pd.DataFrame | None = None,
                   seed: int = 42, progress: bool = True) -> StageResult:
    """Fit ``spec`` (``{"type", "params"}``) fold by fold; return OOF and fold-averaged test logits."""
    run_dir = Path(run_dir)
    stage_dir = run_dir / "stages" / name
    key = stage_key(spec, train, folds, test, extra_train, seed)
    ids = train["id"].tolist()
    if _done(stage_dir / "done.json", key):
        log.info("stage %s: finished earlier with the same config and data, reusing it", name)
        return load_stage_result(run_dir, name, train, test)

    context = StageContext(resource_dir=run_dir / "resources", seed=seed, progress=progress)
    stage = make_stage(spec["type"], spec.get("params"), context)
    started = time.time()
    prepared = False
    oof = np.zeros((len(train), 3))
    orders = {o: np.zeros((len(train), 3)) for o in ORDERS}
    have_orders = True
    test_per_fold = []
    fold_ids = sorted(np.unique(folds))
    bar = tqdm(fold_ids, desc=f"{name}", unit="fold", disable=not progress)
    for k in bar:
        fold_dir = stage_dir / f"fold{k}"
        valid_mask = folds == k
        fold_key = content_key(key, int(k))
        if _done(fold_dir / "done.json", fold_key):
            valid_ids = train.loc[valid_mask, "id"].tolist()
            oof[valid_mask] = read_logits(fold_dir / "valid_logits.csv", valid_ids)
            for o in ORDERS:
                have_orders = have_orders and (fold_dir / f"valid_logits_{o}.csv").exists()
                if have_orders:
                    orders[o][valid_mask] = read_logits(fold_dir / f"valid_logits_{o}.csv", valid_ids)
            if test is not None:
                test_per_fold.append(read_logits(fold_dir / "test_logits.csv", test["id"].tolist()))
            bar.set_postfix_str(f"fold {k} reused")
            continue
        if not prepared:
            everything = pd.concat([_label_free(x) for x in (train, test, extra_train) if x is not None],
                                   ignore_index=True)
            stage.prepare(everything)
            prepared = True
        fit_rows = train[~valid_mask]
        if extra_train is not None and len(extra_train):
            fit_rows = pd.concat([fit_rows, extra_train], ignore_index=True)
        valid = train[valid_mask]
        stage.context.work_dir = fold_dir  # the fold's own scratch space (training checkpoints)
        stage.fit(fit_rows, valid)
        oof[valid_mask], straight, swapped = predict_with_orders(stage, valid)
        write_logits(fold_dir / "valid_logits.csv", valid["id"].tolist(), oof[valid_mask])
        if straight is None:
            have_orders = False
        else:
            for o, values in zip(ORDERS, (straight, swapped)):
                orders[o][valid_mask] = values
                write_logits(fold_dir / f"valid_logits_{o}.csv", valid["id"].tolist(), values)
        if test is not None:
            test_per_fold.append(stage.predict_logits(test))
            write_logits(fold_dir / "test_logits.csv", test["id"].tolist(), test_per_fold[-1])
        stage.save(fold_dir / "model")
        write_json(fold_dir / "done.json", {"key": fold_key, "stage": name, "fold": int(k)})

    write_logits(stage_dir / "oof_logits.csv", ids, oof)
    for o in ORDERS:
        if have_orders:
            write_logits(stage_dir / f"oof_logits_{o}.csv", ids, orders[o])
        elif (stage_dir / f"oof_logits_{o}.csv").exists():
            (stage_dir / f"oof_logits_{o}.csv").unlink()
    test_logits = None
    if test is not None:
        test_logits = average_logits(test_per_fold)
        write_logits(stage_dir / "test_logits.csv", test["id"].tolist(), test_logits)
    metrics = {"stage": name, "type": spec["type"], "seconds": round(time.time() - started, 1)}
    if has_labels(train):
        metrics["oof"] = scores(label_index(train), probs_from_logits(oof))
        log.info("stage %s: OOF log loss %.4f, accuracy %.3f", name, metrics["oof"]["log_loss"],
                 metrics["oof"]["accuracy"])
    write_json(stage_dir / "metrics.json", metrics)
    write_json(stage_dir / "spec.json", spec)
    write_json(stage_dir / "done.json", {"key": key, "stage": name, "n_folds": len(fold_ids)})
    wait_for_everyone()  # multi-process launch: the other ranks read what the main process just wrote
    return StageResult(name, oof, test_logits, metrics)


def load_stage_result(run_dir, name: str, train: pd.DataFrame, test: pd.DataFrame | None) -> StageResult:
    stage_dir = Path(run_dir) / "stages" / name
    if not (stage_dir / "done.json").exists():
        raise FileNotFoundError(f"{stage_dir}: stage {name!r} has not finished (no done.json); run it first")
    oof = read_logits(stage_dir / "oof_logits.csv", train["id"].tolist())
    test_logits = None
    if test is not None and (stage_dir / "test_logits.csv").exists():
        test_logits = read_logits(stage_dir / "test_logits.csv", test["id"].tolist())
    return StageResult(name, oof, test_logits, read_json(stage_dir / "metrics.json"))


def load_single_order_oof(run_dir, name: str, train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """A finished stage's OOF log-probabilities before swap TTA, ``(straight, swapped)``, or None."""
    stage_dir = Path(run_dir) / "stages" / name
    paths = [stage_dir / f"oof_logits_{o}.csv" for o in ORDERS]
    if not all(p.exists() for p in paths):
        return None
    return tuple(read_logits(p, train["id"].tolist()) for p in paths)
