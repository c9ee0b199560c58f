#!/usr/bin/env python
"""What verification costs: hashing a finished run's files as ``predict`` checks them, and raw SHA-256 speed.

For a finished run (e.g. the 57,477-battle run of ``benchmarks/speed.py``, whose directory is
``<workdir>/n57477/run``), times

- *verify for predict*: the checks :meth:`pipeline.predict.Predictor.load` makes before loading (the
  ensemble's manifest, every ensemble stage's and model's ``done.json`` manifest);
- *verify everything*: every manifest of the run (every stage, fold and the ensemble), as resuming does;
- *export + verify bundle*: ``run.py export`` (which verifies the run, copies and hashes the copies) and
  the bundle check of ``Predictor.load``;
- *raw hashing*: SHA-256 of a file of ``--raw-mb`` random bytes (the rate a deep stage's weights hash at:
  a Gemma-2-9B r=64 adapter is ~0.2-0.4 GB per fold, a fine-tuned DeBERTa-v3-large ~1.7 GB per fold).

    python benchmarks/speed.py --rows 57477 --workdir /tmp/arena-speed     # makes the run (~4 min)
    python benchmarks/manifest_speed.py --run /tmp/arena-speed/n57477/run [--raw-mb 1024]

Times are best of ``--repeat`` (the page cache is warm after the first: as on a machine that just
copied or trained the run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernel.files import read_json  # noqa: E402
from kernel.manifest import sha256_file, total_size  # noqa: E402
from pipeline.bundle import BUNDLE_FILE, open_bundle  # noqa: E402
from pipeline.export import export_run  # noqa: E402
from pipeline.manifests import FILES_KEY, check_done, check_ensemble  # noqa: E402
from pipeline.predict import check_complete, stage_models  # noqa: E402
from pipeline.rundir import FoldDir, RunDir  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def _mb(n: int) -> float:
    return n / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run directory")
    ap.add_argument("--raw-mb", type=int, default=512, help="size of the random file hashed for the raw rate")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    run = RunDir.open(args.run)

    ensemble, config, folds = check_complete(run)
    for_predict = [p for n in ensemble.stages for p in (run.stage(n), *stage_models(run, n, config.stages[n], folds))]
    every = sorted({d.parent for d in run.path.glob("stages/**/done.json")})
    manifests = [read_json(p / "done.json").get(FILES_KEY, {}) for p in every]
    ensemble_files = read_json(run.ensemble_manifest)[FILES_KEY]
    predict_bytes = total_size(ensemble_files) + sum(total_size(read_json(p.done).get(FILES_KEY, {}))
                                                     for p in for_predict)
    all_bytes = total_size(ensemble_files) + sum(total_size(m) for m in manifests)

    def verify_predict():
        check_ensemble(run)
        for place in for_predict:
            check_done(place)

    def verify_all():
        check_ensemble(run)
        for place in every:
            check_done(FoldDir(place))  # a fold's or a stage's folder: both keep done.json

    rows = [("verify for predict", predict_bytes, best(verify_predict, args.repeat)),
            ("verify every manifest", all_bytes, best(verify_all, args.repeat))]
    with tempfile.TemporaryDirectory(prefix="manifest-speed-") as tmp:
        out = Path(tmp) / "bundle"
        started = time.perf_counter()
        summary = export_run(run.path, out)
        rows.append(("export (verify run, copy, hash)", summary.size, time.perf_counter() - started))
        rows.append(("verify the bundle", summary.size, best(lambda: open_bundle(RunDir(out)), args.repeat)))
        raw = Path(tmp) / "raw.bin"
        with open(raw, "wb") as fh:
            for _ in range(args.raw_mb):
                fh.write(os.urandom(2**20))
        rows.append((f"raw SHA-256 of one {args.raw_mb} MB file", raw.stat().st_size,
                     best(lambda: sha256_file(raw), args.repeat)))
        bundle_files = len(read_json(out / BUNDLE_FILE)["files"])
        shutil.rmtree(out)

    n_train = run.record().get("n_train")
    print(f"run {run.path}: {n_train} training battles, {len(every)} manifests, bundle of {bundle_files} files")
    print(f"{'what':<40}{'MB':>10}{'seconds':>10}{'MB/s':>10}")
    for what, size, seconds in rows:
        print(f"{what:<40}{_mb(size):>10.1f}{seconds:>10.3f}{_mb(size) / max(seconds, 1e-9):>10.0f}")


if __name__ == "__main__":
    main()
