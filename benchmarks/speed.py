#!/usr/bin/env python
"""Speed benchmark: wall time, CPU time, peak memory and per-step times of the full CPU pipeline.

Battles are made by resampling the real arena sample with small text perturbations of every reply (a
word dropped or two words swapped per turn) so no two battles are identical and no feature cache can
shortcut the work. Prompts are kept, so all copies of a source battle share one fold. A 10% unlabelled test file goes
through the prediction path too. Each size runs ``run.py`` in a fresh subprocess; peak memory is the
largest resident set size of that subprocess and its workers, CPU time their user + system seconds.

Per-step wall times (reading, folds, each stage's features and folds, ensemble, report) come from the
run's ``timings.json``.

    python benchmarks/speed.py [--rows 57477 500000] [--workdir /tmp/arena-speed]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "arena" / "train_sample.csv"


def _perturb(text_json: str, rng: np.random.Generator) -> str:
    turns = json.loads(text_json)
    out = []
    for t in turns:
        if t is None:
            out.append(None)
            continue
        words = t.split(" ")
        if len(words) > 3:
            i = int(rng.integers(0, len(words) - 1))
            if rng.random() < 0.5:
                del words[i]
            else:
                words[i], words[i + 1] = words[i + 1], words[i]
        out.append(" ".join(words))
    return json.dumps(out, ensure_ascii=False)


def make_battles(source: Path, n: int, seed: int) -> pd.DataFrame:
    raw = pd.read_csv(source, dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(raw), n)
    rows = raw.iloc[idx].reset_index(drop=True).copy()
    # Replies are perturbed per copy; the prompt is not, so every copy of a source battle stays in one
    # prompt group, hence one fold: no copy of a validation battle is ever trained on, and early
    # stopping sees the same generalisation problem as on real data.
    rows["response_a"] = [_perturb(t, rng) for t in rows["response_a"]]
    rows["response_b"] = [_perturb(t, rng) for t in rows["response_b"]]
    rows["id"] = np.arange(n) + 10_000_000
    return rows


def run_size(n: int, args, work: Path) -> dict:
    d = work / f"n{n}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    battles = make_battles(Path(args.data), n, seed=n)
    n_test = n // 10
    battles.iloc[n_test:].to_csv(d / "train.csv", index=False)
    battles.iloc[:n_test][["id", "prompt", "response_a", "response_b"]].to_csv(d / "test.csv", index=False)
    del battles
    cmd = [sys.executable, str(ROOT / "run.py"), "--train", str(d / "train.csv"), "--test", str(d / "test.csv"),
           "--out", str(d / "run"), "--quiet"] + (["--config", args.config] if args.config else [])
    started = time.time()
    with open(d / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this run's own usage (its workers included)
    wall = time.time() - started
    if os.waitstatus_to_exitcode(status) != 0:
        print((d / "run.log").read_text()[-3000:])
        sys.exit(f"run.py failed at n={n} (log: {d / 'run.log'})")
    run = d / "run"
    steps = json.loads((run / "timings.json").read_text())["steps"]
    summary = json.loads((run / "ensemble" / "ensemble.json").read_text())
    return {"n": n, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_gib": usage.ru_maxrss / 2**20,
            "log_loss": summary["nested_scores"]["log_loss"], "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--rows", "--sizes", dest="rows", type=int, nargs="+", default=[57_477],
                    help="battle counts to run, each in a fresh run (10%% of them are the test file)")
    ap.add_argument("--workdir", default="/tmp/arena-speed")
    ap.add_argument("--config", help="config passed to run.py (default: the default config)")
    args = ap.parse_args()
    work = Path(args.workdir)
    results = []
    for n in args.rows:
        r = run_size(n, args, work)
        results.append(r)
        print(f"\nn={n}: wall {r['wall']:.0f} s, CPU {r['cpu']:.0f} s, peak RSS {r['peak_gib']:.2f} GiB")
        print(f"{'step':<40}{'wall (s)':>10}")
        for step in r["steps"]:
            print(f"{step['step']:<40}{step['seconds']:>10.1f}")
        print(flush=True)
    print(f"{'battles':>8}{'wall (s)':>10}{'CPU (s)':>10}{'peak RSS (GiB)':>16}{'OOF log loss':>14}")
    for r in results:
        print(f"{r['n']:>8}{r['wall']:>10.0f}{r['cpu']:>10.0f}{r['peak_gib']:>16.2f}{r['log_loss']:>14.4f}")
    print("(OOF log loss on resampled copies is not a quality figure: ~n/1399 near-copies of each battle)")


if __name__ == "__main__":
    main()
