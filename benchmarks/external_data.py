"""Does external data help? De-duplication report, adversarial AUC per source, target OOF log loss.

    python benchmarks/external_data.py [--max-pairs-per-prompt 10] [--out report.json]

Target: ../shared/data/arena/train_sample.csv. External sources: the three files in
../shared/data/external (PandaLM via the competition converter, HH-RLHF harmless-base as a
competition file, arena-bench GPT-4 ratings paired per prompt). External rows join the training
part of every fold only; log loss is on target out-of-fold rows only.

Model: until the lead's cross-fitting runner and LightGBM stage land on main, this measures with a
small LightGBM on cheap length/structure features (both sides and their differences) over
``battles.make_folds`` folds, trained with ``weight`` as sample weight. Swap that for the runner
once it exists; the data path (convert -> dedup -> shift weights -> training_rows) stays.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.metrics import log_loss

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from battles.converters import from_competition, from_scored_answers  # noqa: E402
from battles.dedup import DedupConfig, deduplicate  # noqa: E402
from battles.external import training_rows  # noqa: E402
from battles.folds import make_folds  # noqa: E402
from battles.io import read_battles  # noqa: E402
from battles.labels import label_index  # noqa: E402
from battles.shift import ShiftConfig, shift_weights  # noqa: E402

DATA = ROOT / ".." / "shared" / "data"
log = logging.getLogger("benchmarks.external_data")


def _side_stats(turns) -> list[float]:
    text = "\n".join(turns)
    return [len(text), len(text.split()), text.count("\n"), len(re.findall(r"^\s*(?:[-*]|\d+\.)\s", text, re.M)),
            text.count("```"), len(re.findall(r"^#+\s", text, re.M)), float(not text.strip())]


def cheap_features(battles: pd.DataFrame) -> np.ndarray:
    a = np.array([_side_stats(t) for t in battles["response_a"]])
    b = np.array([_side_stats(t) for t in battles["response_b"]])
    p = np.array([[len("\n".join(t)), len(t)] for t in battles["prompt"]], dtype=float)
    return np.hstack([a, b, a - b, np.log1p(a) - np.log1p(b), p])


def oof_log_loss(target, folds, external=None, source_weights=None, shift=None, seed=0) -> float:
    y = label_index(target)
    oof = np.zeros((len(target), 3))
    params = dict(n_estimators=200, learning_rate=0.03, num_leaves=15, min_child_samples=20, subsample=0.8,
                  subsample_freq=1, colsample_bytree=0.8, reg_lambda=1.0, verbose=-1, n_jobs=2, random_state=seed)
    x_target = cheap_features(target)
    x_ext = cheap_features(external) if external is not None and len(external) else None
    for k in np.unique(folds):
        train = training_rows(target[folds != k], external, source_weights or {}, shift)
        n_t = int((folds != k).sum())
        x = x_target[folds != k] if x_ext is None else np.vstack([x_target[folds != k], x_ext[train["id"].iloc[n_t:].map(
            dict(zip(external["id"], range(len(external))))).to_numpy()]])
        model = lgb.LGBMClassifier(**params).fit(x, label_index(train), sample_weight=train["weight"].to_numpy())
        oof[folds == k] = model.predict_proba(x_target[folds == k])
    return float(log_loss(y, oof, labels=[0, 1, 2]))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-pairs-per-prompt", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--seeds", type=int, default=3, help="fold seeds to average over")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.out and args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it")
    t0 = time.time()
    target, _ = read_battles(DATA / "arena" / "train_sample.csv", source="target", require_labels=True)
    parts = [
        from_competition(DATA / "external" / "pandalm_testset_v1.csv", source="pandalm"),
        from_competition(DATA / "external" / "hh_rlhf_harmless_base_test.csv", source="hh_rlhf"),
        from_scored_answers(DATA / "external" / "arena_bench_v1_gpt4_scores.csv", source="arena_bench", seed=0,
                            max_pairs_per_prompt=args.max_pairs_per_prompt),
    ]
    for _, report in parts:
        print(report.summary())
    external = pd.concat([b for b, _ in parts], ignore_index=True)

    external, dedup = deduplicate(target, external, DedupConfig(threshold=args.threshold))
    print("\n" + dedup.summary())

    weights, shift = shift_weights(target, external, ShiftConfig())
    print("\nadversarial validation (target prompts vs source prompts, OOF ROC AUC; 0.5 = indistinguishable)")
    for source, r in shift.items():
        print(f"  {source:12s} AUC {r['auc']:.3f}  ({r['n_source_prompts']} prompts, {r['n_battles']} battles; "
              f"weights median {r['weight_median']:.2f}, max {r['weight_max']:.2f})")

    sources = sorted(external["source"].unique())
    ones = {s: 1.0 for s in sources}
    settings = {"target only": dict(external=None),
                "+ all external": dict(external=external, source_weights=ones),
                "+ all external, shift-weighted": dict(external=external, source_weights=ones, shift=weights)}
    for s in sources:
        only = external["source"].to_numpy() == s
        settings[f"+ {s} only"] = dict(external=external[only].reset_index(drop=True), source_weights={s: 1.0})
        settings[f"+ {s} only, shift-weighted"] = dict(external=external[only].reset_index(drop=True),
                                                      source_weights={s: 1.0}, shift=weights[only])
    results = {}
    print(f"\ntarget OOF log loss, small LightGBM on cheap length features, 5 grouped folds, mean over {args.seeds} fold seeds")
    for name, kw in settings.items():
        losses = [oof_log_loss(target, make_folds(target, 5, seed=seed), seed=seed, **kw) for seed in range(args.seeds)]
        results[name] = {"log_loss": float(np.mean(losses)), "per_seed": losses,
                         "n_external": 0 if kw["external"] is None else len(kw["external"])}
        print(f"  {name:40s} {np.mean(losses):.4f}  (seeds {' '.join(f'{x:.4f}' for x in losses)}; "
              f"{results[name]['n_external']} external rows)")
    print(f"\n(uniform prior log loss: {log_loss(label_index(target), np.tile(np.bincount(label_index(target)) / len(target), (len(target), 1))):.4f}; "
          f"took {time.time() - t0:.0f}s)")
    figures = {"dedup": dedup.as_dict(), "shift": shift, "oof_log_loss": results,
               "conversion": [r.as_dict() for _, r in parts]}
    if args.out:
        from pipeline.artifacts import write_json
        write_json(args.out, figures)
    return figures


if __name__ == "__main__":
    main()
