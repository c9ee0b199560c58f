#!/usr/bin/env python
"""Does distillation help, and how optimistic is the student's out-of-fold score? A holdout says.

    python benchmarks/distill_holdout.py [--soft-weights 0.5 1.0] [--out-dir runs/bench-distill]

The shared sample (../shared/data/arena/train_sample.csv) is split by prompt into a development part
(3/4) and a holdout (1/4, labels kept aside). A teacher (the default CPU config) is trained on the
development part; students are distilled from it (``run.py distill``, same config, one per soft
weight). Every run predicts the holdout. Printed per run: the nested-CV OOF log loss on the
development rows (what the run reports) and the log loss on the holdout (rows no model saw), each
with its 90% bootstrap interval, and each student's change against the teacher on both, paired.
OOF gain minus holdout gain is the optimism the leaks of ``pipeline/distill.py`` cause (plus noise).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from battles.columns import LABEL_COLUMNS
from battles.folds import make_folds  # noqa: E402
from battles.io import read_battles  # noqa: E402
from battles.labels import label_index  # noqa: E402
from ensemble.coverage import bootstrap_interval, row_log_loss  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.distill import prepare_student  # noqa: E402
from pipeline.rundir import read_id_table  # noqa: E402
from pipeline.runner import Run, run_all  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "arena" / "train_sample.csv"


def row_losses(run_dir: Path, ids: list[str], y: np.ndarray, table: str) -> np.ndarray:
    probs = read_id_table(run_dir / table).set_index("id").loc[ids, LABEL_COLUMNS].to_numpy(dtype=np.float64)
    return row_log_loss(y, probs)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--soft-weights", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--out-dir", default="runs/bench-distill")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    battles, _ = read_battles(DATA)
    holdout = make_folds(battles, 4, seed=7) == 0
    dev_path, holdout_path = out / "dev.jsonl", out / "holdout.jsonl"
    for part, path in ((battles[~holdout], dev_path), (battles[holdout], holdout_path)):
        part.to_json(path, orient="records", lines=True, force_ascii=False)
    dev_ids, dev_y = battles.loc[~holdout, "id"].tolist(), label_index(battles[~holdout])
    ho_ids, ho_y = battles.loc[holdout, "id"].tolist(), label_index(battles[holdout])

    runs = {"teacher": out / "teacher"}
    run_all(Run(runs["teacher"], load_config(), dev_path, holdout_path, progress=False))
    for w in args.soft_weights:
        runs[f"student W={w:g}"] = out / f"student_w{w:g}"
        student = prepare_student(runs["teacher"], dev_path, runs[f"student W={w:g}"], load_config(), w)
        run_all(student.run(holdout_path, progress=False))

    oof = {name: row_losses(path, dev_ids, dev_y, "ensemble/oof_probs.csv") for name, path in runs.items()}
    held = {name: row_losses(path, ho_ids, ho_y, "submission.csv") for name, path in runs.items()}
    print(f"\ndistillation on the shared sample: {len(dev_ids)} development rows (nested-CV OOF), "
          f"{len(ho_ids)} holdout rows (grouped by prompt); {time.time() - started:.0f} s")
    print(f"{'run':<16}{'OOF LL [90% CI]':>26}{'holdout LL [90% CI]':>26}{'OOF change':>30}{'holdout change':>30}")
    result = {}
    for name in runs:
        row = {"oof": float(oof[name].mean()), "oof_interval": bootstrap_interval(oof[name]),
               "holdout": float(held[name].mean()), "holdout_interval": bootstrap_interval(held[name])}
        line = (f"{name:<16}{row['oof']:>8.4f} [{row['oof_interval'][0]:.4f}, {row['oof_interval'][1]:.4f}]"
                f"{row['holdout']:>8.4f} [{row['holdout_interval'][0]:.4f}, {row['holdout_interval'][1]:.4f}]")
        if name != "teacher":
            for key, losses in (("oof", oof), ("holdout", held)):
                d, ci = (losses[name] - losses["teacher"]).mean(), bootstrap_interval(losses[name], paired_with=losses["teacher"])
                row[f"{key}_change"], row[f"{key}_change_interval"] = float(d), ci
                line += f"{d:>+10.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"
        print(line)
        result[name] = row
    return result


if __name__ == "__main__":
    main()
