"""Threads that do not spin (issue 22): the cores a process may use, OpenMP waiting passively, a
LightGBM model that does not depend on its thread count, and a progress bar with the early-stopping
horizon."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from kernel import threads
from kernel.context import StageContext
from models.lgbm import DEFAULT_LGB, RoundsBar
from models.stage import make_stage
from tests.conftest import FAST_CONFIG

REPO = Path(__file__).resolve().parents[1]


def test_usable_cores_follow_the_affinity_mask_and_the_cap(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.delenv(threads.THREADS_VARIABLE, raising=False)
    assert threads.usable_cores() == 3  # the cores this process may run on, not the machine's count
    monkeypatch.setenv(threads.THREADS_VARIABLE, "2")
    assert threads.usable_cores() == 2
    monkeypatch.setenv(threads.THREADS_VARIABLE, "16")
    assert threads.usable_cores() == 3
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv(threads.THREADS_VARIABLE, bad)
        with pytest.raises(threads.ThreadSettingError, match=f"{threads.THREADS_VARIABLE}='{bad}'"):
            threads.usable_cores()


def _openmp_settings(env_changes: dict) -> tuple[str, str]:
    """In a fresh interpreter: import the LightGBM stage, then ask the OpenMP library LightGBM loaded
    (``libgomp.so.1``) for its settings. Returns (OMP_WAIT_POLICY as the process sees it, libgomp's
    verbose display: its ``GOMP_SPINCOUNT`` is how long a waiting thread spins, 0 when passive)."""
    env = {k: v for k, v in os.environ.items() if k not in threads.USER_WAIT_VARIABLES}
    env.update(env_changes, PYTHONPATH=str(REPO))
    code = ("import ctypes, os, sys; import models.lgbm; print(os.environ.get('OMP_WAIT_POLICY')); sys.stdout.flush(); "
            "ctypes.CDLL('libgomp.so.1').omp_display_env(1)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr


def test_lightgbm_threads_wait_passively_unless_the_user_chose():
    seen, display = _openmp_settings({})
    assert seen == "PASSIVE" and "GOMP_SPINCOUNT = '0'" in display  # LightGBM's OpenMP read it: no spinning
    seen, display = _openmp_settings({"OMP_WAIT_POLICY": "active"})
    assert seen == "active" and "OMP_WAIT_POLICY = 'ACTIVE'" in display and "GOMP_SPINCOUNT = '0'" not in display
    seen, display = _openmp_settings({"GOMP_SPINCOUNT": "300000"})  # GNU OpenMP's own default, chosen
    assert seen == "None" and "GOMP_SPINCOUNT = '300000'" in display


def test_the_lightgbm_model_does_not_depend_on_its_thread_count(arena_battles, tmp_path, monkeypatch):
    """num_threads stays out of the saved config and resume keys because the model is the same for any
    thread count; the default is the cores this process may use."""
    assert "num_threads" not in DEFAULT_LGB
    train, valid = arena_battles.iloc[:400], arena_battles.iloc[400:500]
    params = FAST_CONFIG["stages"]["lgbm"]["params"]
    monkeypatch.setattr("models.lgbm.usable_cores", lambda: 3)
    stage = make_stage("lgbm", params, StageContext(resource_dir=tmp_path, progress=False))
    assert stage.lgb_params["num_threads"] == 3 and "num_threads" not in stage.params.lgb
    logits = {}
    for n in (1, 2, 3):
        stage = make_stage("lgbm", {**params, "lgb": {**params["lgb"], "num_threads": n}},
                           StageContext(resource_dir=tmp_path, progress=False))
        assert stage.lgb_params["num_threads"] == n  # the user's setting stands
        stage.prepare(arena_battles.iloc[:500])
        logits[n] = stage.fit(train, valid).predict_logits(valid)
    np.testing.assert_array_equal(logits[1], logits[2])
    np.testing.assert_array_equal(logits[1], logits[3])


def test_the_progress_bar_shows_the_early_stopping_horizon():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5))
    y = (x[:, 0] + rng.normal(0, 1.0, 600) > 0).astype(int) + (rng.random(600) < 0.3)
    train, valid = lgb.Dataset(x[:400], y[:400]), lgb.Dataset(x[400:], y[400:])
    params = {**DEFAULT_LGB, "learning_rate": 0.1, "num_threads": 1, "seed": 0}
    totals = []
    bar = RoundsBar(1000, 10, progress=True)  # a disabled tqdm bar does not count
    record = lambda env: totals.append(bar.bar.total)  # noqa: E731
    booster = lgb.train(params, train, 1000, valid_sets=[valid],
                        callbacks=[bar, record, lgb.early_stopping(10, verbose=False)])
    bar.close()
    assert 5 < booster.best_iteration < 990  # it stopped early: the cap of 1000 was never the horizon
    assert bar.bar.total == booster.best_iteration + 10 == bar.bar.n
    assert totals[0] == 11 and max(totals) == booster.best_iteration + 10 and totals == sorted(totals)
    plain = RoundsBar(300, None, progress=False)  # no validation battles: the fixed number of rounds
    assert plain.bar.total == 300
