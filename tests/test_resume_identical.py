"""An interrupted run, resumed, ends byte-identical to an uninterrupted one (issue 21: one rounding rule
for logits, fresh or read back).

Each run is a real ``run.py`` process on 300 rows, 3 folds, two cheap stages. The interrupted ones are
slowed (a pause after each model's ``done.json``, or after its test logits, through a tiny wrapper),
stopped with SIGINT (Ctrl-C: exit 130) or SIGKILL as soon as the first stage's fold 0 is there, and run
again.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run

from tests.conftest import FAST_LGBM, ROOT

CONFIG = {"n_folds": 3, "stacker": {"C_grid": [0.1]}, "stages": {
    "lgbm_stats": {"type": "lgbm", "params": {**FAST_LGBM, "num_boost_round": 30, "rounds_without_valid": 30,
                                              "blocks": [{"type": "text_stats"}, {"type": "similarity"}]}},
    "length_lr": {"type": "length_lr"}}}

# run.py with a pause after every finished model (PAUSE=model) or after its test logits (PAUSE=test), so the
# test can stop it between two steps
SLOW_RUN = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal, whatever the test process ignores
import pipeline.crossfit as crossfit
import run
name = {"model": "_finish", "test": "_test_logits"}[os.environ["PAUSE"]]
step = getattr(crossfit.StageFit, name)
def slow(self, *args):
    out = step(self, *args)
    time.sleep(2.0)
    return out
setattr(crossfit.StageFit, name, slow)
sys.exit(run.main(sys.argv[1:]))
"""

COMPARED = ["submission.csv", "folds.csv", "ensemble/oof_probs.csv", "stages/*/*.csv", "stages/*/fold*/*.csv"]


def _command(files, out) -> list[str]:
    return ["--train", str(files / "train.csv"), "--test", str(files / "test.csv"), "--out", str(out),
            "--config", str(files / "resume.json"), "--quiet"]


def _run(files, out, pause=None) -> subprocess.Popen:
    code = ["-c", SLOW_RUN] if pause else [str(ROOT / "run.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PAUSE": pause or ""}
    return subprocess.Popen([sys.executable, *code, *_command(files, out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _outputs(run: Path) -> dict[str, bytes]:
    files = {p.relative_to(run).as_posix(): p.read_bytes() for pattern in COMPARED for p in run.glob(pattern)}
    assert "submission.csv" in files and any(k.startswith("stages/lgbm_stats/fold0/") for k in files)
    return files


@pytest.fixture(scope="module")
def files(slice_files):
    (slice_files / "resume.json").write_text(json.dumps(CONFIG))
    return slice_files


@pytest.fixture(scope="module")
def uninterrupted(files):
    out = files / "resume_whole"
    proc = _run(files, out)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    return _outputs(out)


def _fold0(out: Path) -> dict | None:
    done = out / "stages" / "lgbm_stats" / "fold0" / "done.json"
    return json.loads(done.read_text()) if done.exists() else None


# SIGINT once fold 0's model is saved (the resume predicts its test logits from the saved model); SIGKILL once
# its test logits are written too (the resume reads them back: stored values, rounded, meet fresh ones)
@pytest.mark.parametrize("sig, pause", [(signal.SIGINT, "model"), (signal.SIGKILL, "test")], ids=["SIGINT", "SIGKILL"])
def test_interrupted_and_resumed_run_is_byte_identical(files, uninterrupted, sig, pause):
    out = files / f"resume_{sig.name}"
    proc = _run(files, out, pause)
    deadline = time.monotonic() + 300
    while (record := _fold0(out)) is None or (pause == "test" and record["test"] is None):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "fold 0 never finished"
        time.sleep(0.05)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), log
    assert not (out / "submission.csv").exists() and not (out / "stages/lgbm_stats/fold1/done.json").exists()
    assert (_fold0(out)["test"] is None) == (pause == "model")
    if sig == signal.SIGINT:
        assert "lgbm_stats (fold0 done)" in log and "Run the same command again to resume" in log

    resumed = _run(files, out)
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    got = _outputs(out)
    assert sorted(got) == sorted(uninterrupted)
    changed = [name for name in got if got[name] != uninterrupted[name]]
    assert not changed, f"differ from the uninterrupted run: {changed}"
    # and the resumed run's saved models predict its own test file exactly as its submission says
    preds = files / f"preds_{sig.name}.csv"
    assert run.main(["predict", "--run", str(out), "--test", str(files / "test.csv"), "--out", str(preds),
                     "--overwrite", "--quiet"]) == 0
    assert preds.read_bytes() == got["submission.csv"]
