#!/usr/bin/env python
"""Does external data help? De-duplication report, adversarial AUC per source, target OOF log loss.

    python benchmarks/external_data.py [--max-pairs-per-prompt 10] [--out-dir runs/bench-external]
    python benchmarks/external_data.py --write-config external.json   # the sources as a config, for
    python run.py external-check --train ../shared/data/arena/train_sample.csv --config external.json --out runs/check

Target: ../shared/data/arena/train_sample.csv. External sources: the three files in
../shared/data/external (PandaLM via the competition converter, HH-RLHF harmless-base as a
competition file, arena-bench GPT-4 ratings paired per prompt). Three runs of the full CPU pipeline
(default config, 5 grouped folds) through the same runner users call: target only, + external
data, + external data with adversarial importance weights. External rows join every fold's training
part only; every log loss below is on target out-of-fold rows (the final row is nested CV).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernel.files import check_output_file, write_json  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.runner import Run, run_all  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def external_section(max_pairs: int, threshold: float, shift: bool) -> dict:
    ext = DATA / "external"
    return {
        "sources": [
            {"kind": "competition", "path": str(ext / "pandalm_testset_v1.csv"), "source": "pandalm"},
            {"kind": "competition", "path": str(ext / "hh_rlhf_harmless_base_test.csv"), "source": "hh_rlhf"},
            {"kind": "scored_answers", "path": str(ext / "arena_bench_v1_gpt4_scores.csv"), "source": "arena_bench",
             "options": {"seed": 0, "max_pairs_per_prompt": max_pairs}},
        ],
        "dedup": {"threshold": threshold},
        "shift_weighting": shift,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-pairs-per-prompt", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--out-dir", default="runs/bench-external")
    ap.add_argument("--write-config", metavar="PATH", help="only write the three sources as a config file and stop")
    args = ap.parse_args(argv)
    if args.write_config:
        config = {"external": external_section(args.max_pairs_per_prompt, args.threshold, shift=False)}
        write_json(check_output_file(args.write_config), config)
        print(f"wrote {args.write_config}")
        return config
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    target = DATA / "arena" / "train_sample.csv"
    settings = {
        "target only": {},
        "+ external": external_section(args.max_pairs_per_prompt, args.threshold, shift=False),
        "+ external, shift-weighted": external_section(args.max_pairs_per_prompt, args.threshold, shift=True),
    }
    results = {}
    for i, (name, external) in enumerate(settings.items()):
        out = Path(args.out_dir) / f"setting{i}"
        results[name] = run_all(Run(out, load_config(None, overrides={"external": external}), target))
        report_path = out / "external_report.json"
        if report_path.exists() and i == len(settings) - 1:
            report = json.loads(report_path.read_text())
            print("\nconversion")
            for rep in report["conversion"]:
                print(f"  {rep['source']:12s} read {rep['rows_read']}, kept {rep['kept']}, dropped {rep['dropped']}")
            dedup = report["dedup"]
            print(f"\nde-duplication against the target and within external data: kept {dedup['kept']} of {dedup['n_external']}")
            for reason, n in dedup["dropped"].items():
                print(f"  dropped {n:5d}  {reason}")
            for reason, n in dedup.get("flagged", {}).items():
                print(f"  flagged {n:5d}  {reason} (kept)")
            print("\nadversarial validation: target prompts vs source prompts, OOF ROC AUC (0.5 = looks like the target)")
            for source, r in report["shift"].items():
                print(f"  {source:12s} AUC {r['auc']:.3f}  ({r['n_source_prompts']} prompts; importance weights "
                      f"median {r['weight_median']:.2f}, max {r['weight_max']:.2f})")
            print(f"\nrows added to every fold's training part: {report['rows_added']}")
    stages = list(next(iter(results.values())).stages_raw)
    print(f"\ntarget OOF log loss, grouped 5-fold ({time.time() - t0:.0f} s in all)")
    print(f"{'setting':<30}" + "".join(f"{s:>14}" for s in stages) + f"{'final (nested)':>16}")
    for name, record in results.items():
        print(f"{name:<30}" + "".join(f"{record.stages_raw[s].log_loss:>14.4f}" for s in stages)
              + f"{record.nested_scores.log_loss:>16.4f}")
    return results


if __name__ == "__main__":
    main()
