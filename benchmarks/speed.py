#!/usr/bin/env python
"""Speed benchmark: wall time and peak memory of the full CPU pipeline at 10k and 57k battles.

Battles are made by resampling the real arena sample with small text perturbations of every reply (a
word dropped or two words swapped per turn) so no two battles are identical and no feature cache can
shortcut the work. Prompts are kept, so all copies of a source battle share one fold. A 10% unlabelled test file goes
through the prediction path too. Each size runs ``run.py`` in a fresh subprocess; peak memory is the
subprocess's maximum resident set size.

    python benchmarks/speed.py [--sizes 10000 57477] [--workdir /tmp/arena-speed]
"""
from __future__ import annotations

import argparse
import json
import resource
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 57_477])
    ap.add_argument("--workdir", default="/tmp/arena-speed")
    ap.add_argument("--config", help="config passed to run.py (default: the default config)")
    args = ap.parse_args()
    work = Path(args.workdir)
    results = []
    for n in args.sizes:
        d = work / f"n{n}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        battles = make_battles(Path(args.data), n, seed=n)
        n_test = n // 10
        battles.iloc[n_test:].to_csv(d / "train.csv", index=False)
        battles.iloc[:n_test][["id", "prompt", "response_a", "response_b"]].to_csv(d / "test.csv", index=False)
        cmd = [sys.executable, str(ROOT / "run.py"), "--train", str(d / "train.csv"), "--test", str(d / "test.csv"),
               "--out", str(d / "run"), "--quiet"] + (["--config", args.config] if args.config else [])
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            sys.exit(f"run.py failed at n={n}")
        summary = json.loads((d / "run" / "ensemble" / "ensemble.json").read_text())
        stage_secs = {s: json.loads((d / "run" / "stages" / s / "metrics.json").read_text())["seconds"]
                      for s in summary["stages"]}
        results.append((n, wall, peak_kib / 2**20, summary["nested_scores"]["log_loss"], stage_secs))
        print(f"n={n}: wall {wall:.0f} s, peak RSS {peak_kib / 2**20:.2f} GiB, "
              f"stage seconds {stage_secs}", flush=True)
    print(f"\n{'battles':>8}{'wall (s)':>10}{'peak RSS (GiB)':>16}{'OOF log loss':>14}")
    for n, wall, gib, ll, _ in results:
        print(f"{n:>8}{wall:>10.0f}{gib:>16.2f}{ll:>14.4f}")
    print("(OOF log loss on resampled copies is not a quality figure: ~n/1399 near-copies of each battle)")


if __name__ == "__main__":
    main()
