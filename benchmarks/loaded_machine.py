#!/usr/bin/env python
"""The main job on an idle and on a loaded machine: wall and CPU time per condition (issue 22).

Runs ``run.py`` (the default main job unless ``--config``) on the arena sample, first with nothing
started by this script ("idle"), then beside N busy-loop processes, each a pure Python ``while True``
pinned to one of the cores this process may use (round-robin): a machine that other work keeps busy,
like a Kaggle notebook that also feeds a GPU or a shared workstation. Each condition runs ``--runs``
times in a fresh subprocess; per run: wall seconds, CPU seconds (user + system of ``run.py`` and its
workers, from ``os.wait4``) and whether every CSV it wrote (logits, probabilities, submission) is
byte-identical to the first run's.

``--wait`` says how OpenMP (LightGBM's threads) waits in ``run.py``: ``passive`` sets nothing, so the
code's default applies (``kernel/threads.py``: ``OMP_WAIT_POLICY=PASSIVE``); ``spin`` sets
``GOMP_SPINCOUNT=300000``, GNU OpenMP's own default and what ran before issue 22; ``active`` sets
``OMP_WAIT_POLICY=ACTIVE``. The load average before the first run is printed: figures taken beside
other people's work are not idle figures.

    python benchmarks/loaded_machine.py [--data CSV] [--test CSV] [--config JSON] [--busy 2] [--runs 3]
        [--wait passive spin] [--workdir /tmp/arena-loaded] [--json results.json]
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "arena" / "train_sample.csv"
WAITS = {"passive": {}, "spin": {"GOMP_SPINCOUNT": "300000"}, "active": {"OMP_WAIT_POLICY": "ACTIVE"}}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BUSY_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no pinning
        return list(range(os.cpu_count() or 1))


def start_busy(n: int, tag: str) -> list[subprocess.Popen]:
    """``n`` busy loops, pinned round-robin to the cores this process may use (``tag``, the workdir, only
    marks their command lines)."""
    mine = cores()
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(mine[i % len(mine)]), tag]) for i in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def csv_files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*.csv"))


def same_outputs(run: Path, reference: Path) -> bool:
    files = csv_files(reference)
    return bool(files) and csv_files(run) == files and all(
        filecmp.cmp(run / f, reference / f, shallow=False) for f in files)


def run_once(args, out: Path, wait: str) -> dict:
    """One main job in a fresh subprocess; its wall and CPU seconds."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    env.update(WAITS[wait])
    cmd = [sys.executable, str(ROOT / "run.py"), "--train", str(args.data), "--out", str(out), "--quiet"]
    cmd += ["--test", str(args.test)] if args.test else []
    cmd += ["--config", str(args.config)] if args.config else []
    started = time.time()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this run's own usage (its workers included)
    wall = time.time() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"run.py failed ({' '.join(cmd)}); see {out.parent / (out.name + '.log')}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}


def measure(args) -> list[dict]:
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    reference = None
    rows = []
    for wait in args.wait:
        for busy in [0, *args.busy]:
            procs = start_busy(busy, str(work))
            try:
                runs = []
                for i in range(args.runs):
                    out = work / f"{wait}-busy{busy}-{i}"
                    runs.append(run_once(args, out, wait))
                    if reference is None:
                        reference, runs[-1]["identical"] = out, True
                    else:
                        runs[-1]["identical"] = same_outputs(out, reference)
                        shutil.rmtree(out)
            finally:
                stop_busy(procs)
            walls, cpus = [r["wall_s"] for r in runs], [r["cpu_s"] for r in runs]
            rows.append({"wait": wait, "busy": busy, "runs": runs, "wall_median_s": statistics.median(walls),
                         "wall_min_s": min(walls), "wall_max_s": max(walls), "cpu_median_s": statistics.median(cpus),
                         "identical": all(r["identical"] for r in runs)})
            print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    condition = "idle" if r["busy"] == 0 else f"{r['busy']} busy loop{'s' * (r['busy'] > 1)}"
    return (f"{r['wait']:<8}{condition:<16}{len(r['runs']):>5}{r['wall_median_s']:>10.1f}"
            f"   {r['wall_min_s']:.1f}-{r['wall_max_s']:.1f}{'':<4}{r['cpu_median_s']:>10.1f}"
            f"{'yes' if r['identical'] else 'NO':>11}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="labelled training battles (default: the arena sample)")
    ap.add_argument("--test", default=None, help="test battles to predict as well")
    ap.add_argument("--config", default=None, help="a run config (default: the default main job)")
    ap.add_argument("--busy", type=int, nargs="+", default=[len(cores())],
                    help="busy-loop processes for each loaded condition (default: one per usable core)")
    ap.add_argument("--runs", type=int, default=3, help="runs per condition")
    ap.add_argument("--wait", nargs="+", choices=list(WAITS), default=["passive"],
                    help="how OpenMP waits in run.py: passive (the default), spin (before issue 22), active")
    ap.add_argument("--workdir", default="/tmp/arena-loaded", help="scratch directory (emptied first)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.runs < 1 or any(b < 1 for b in args.busy):
        ap.error("--runs and --busy take whole numbers, 1 or more")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {len(cores())} usable cores; "
          f"data {args.data}; {args.runs} run(s) per condition")
    print(f"{'wait':<8}{'condition':<16}{'runs':>5}{'wall (s)':>10}   {'min-max':<11}{'CPU (s)':>10}{'identical':>11}")
    rows = measure(args)
    for wait in args.wait:
        idle = next(r for r in rows if r["wait"] == wait and r["busy"] == 0)
        for r in rows:
            if r["wait"] == wait and r["busy"]:
                print(f"{wait}: {r['busy']} busy: wall {r['wall_median_s'] / idle['wall_median_s']:.2f}x idle "
                      f"(median over {len(r['runs'])} runs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"data": str(args.data), "config": args.config, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
