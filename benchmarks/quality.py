#!/usr/bin/env python
"""Quality benchmark: grouped 5-fold OOF log loss on the real arena sample, in one run.

Prints the class prior, the length-only logistic regression (the baseline users compare against),
every configured stage (raw and temperature-calibrated) and the final stacked output (nested CV).

    python benchmarks/quality.py [--data ../shared/data/arena/train_sample.csv] [--config cfg.json] [--out runs/bench-quality]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.runner import Run, run_all  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arena" / "train_sample.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--config")
    ap.add_argument("--out", default="runs/bench-quality")
    ap.add_argument("--fresh", action="store_true", help="refuse to reuse an existing run directory")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.fresh and Path(args.out).exists():
        sys.exit(f"{args.out} exists; remove it or drop --fresh")
    cfg = load_config(args.config, overrides={"n_folds": 5})
    started = time.time()
    record = run_all(Run(args.out, cfg, args.data, progress=True))
    print(f"\ngrouped 5-fold OOF log loss on {args.data}, {record.rows} rows ({time.time() - started:.0f} s wall)")
    print(f"{'model':<32}{'raw':>8}{'calibrated':>12}{'accuracy':>10}")
    print(f"{'class prior':<32}{record.prior_log_loss:>8.4f}")
    for name, s in record.stages_raw.items():
        label = name + (" (length-only baseline)" if name == "length_lr" else "")
        print(f"{label:<32}{s.log_loss:>8.4f}{record.stages_calibrated.get(name, float('nan')):>12.4f}"
              f"{s.accuracy:>10.3f}")
    f = record.nested_scores
    lo, hi = record.nested_interval
    print(f"{'final ' + record.chosen + ' (nested)':<32}{f.log_loss:>8.4f}{'':>12}{f.accuracy:>10.3f}"
          f"   90% interval {lo:.4f}-{hi:.4f}")


if __name__ == "__main__":
    main()
