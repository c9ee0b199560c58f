"""``tune`` is an experiment: the candidate goes beside the saved ensemble; only ``--apply`` replaces it."""
from __future__ import annotations

import json
import shutil

import pytest

import run as cli

KEPT = ("config.json", "ensemble/ensemble.json", "ensemble/oof_probs.csv", "submission.csv", "report.html", "run.json")


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the shared run (tune writes into the run it is given)."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _bytes(run_dir) -> dict:
    return {name: (run_dir / name).read_bytes() for name in KEPT}


def test_tune_without_apply_changes_nothing_of_the_run(run_copy, capsys):
    before = _bytes(run_copy)
    assert cli.main(["tune", "--run", str(run_copy), "--set", "stacker.C_grid=[3.0]", "--name", "c3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert _bytes(run_copy) == before, "config, ensemble, submission, report and marker stay byte-identical"
    cand = run_copy / "tune/c3"
    assert json.loads((cand / "config.json").read_text())["stacker"]["C_grid"] == [3.0]
    record = json.loads((cand / "ensemble/ensemble.json").read_text())
    assert any("C=3" in c["candidate"] for c in record["candidates"])
    assert (cand / "submission.csv").exists() and (cand / "report.html").exists()
    comparison = json.loads((cand / "comparison.json").read_text())
    assert comparison["config_changes"] == ["stacker.C_grid: [0.1] -> [3.0]"]
    lo, hi = comparison["minus_saved_interval"]
    assert lo <= comparison["minus_saved"] <= hi and comparison["rows"] == record["rows"]
    assert "candidate minus saved ensemble" in out and "not applied" in out
    assert not list((run_copy / "tune").glob(".*partial")), "no unfinished folder is left"


def test_unchanged_tune_matches_the_saved_ensemble(run_copy):
    assert cli.main(["tune", "--run", str(run_copy), "--name", "same", "--quiet"]) == 0
    comparison = json.loads((run_copy / "tune/same/comparison.json").read_text())
    assert comparison["minus_saved"] == pytest.approx(0, abs=1e-9) and not comparison["better"]
    assert comparison["config_changes"] == []
    assert (run_copy / "tune/same/ensemble/ensemble.json").read_bytes() == (run_copy / "ensemble/ensemble.json").read_bytes()


def test_apply_makes_the_candidate_the_runs(run_copy, capsys):
    before = _bytes(run_copy)
    assert cli.main(["tune", "--run", str(run_copy), "--set", "stacker.C_grid=[3.0]", "--name", "c3", "--apply",
                     "--quiet"]) == 0
    assert "applied:" in capsys.readouterr().out
    cand = run_copy / "tune/c3"
    for name in ("config.json", "ensemble/ensemble.json", "ensemble/oof_probs.csv", "submission.csv"):
        assert (run_copy / name).read_bytes() == (cand / name).read_bytes(), name
    assert (run_copy / "ensemble/ensemble.json").read_bytes() != before["ensemble/ensemble.json"]
    assert json.loads((run_copy / "config.json").read_text())["stacker"]["C_grid"] == [3.0]
    assert (run_copy / "run.json").read_bytes() == before["run.json"]
    # predict reads the applied ensemble
    from pipeline.predict import Predictor

    assert Predictor.load(run_copy, progress=False).ensemble.chosen == json.loads(
        (cand / "ensemble/ensemble.json").read_text())["chosen"]


def test_a_failed_candidate_leaves_the_run_and_no_folder(run_copy, caplog):
    before = _bytes(run_copy)
    code = cli.main(["tune", "--run", str(run_copy), "--set", 'stacker.exclude=["lgbm","length_lr"]', "--name", "none",
                     "--apply", "--quiet"])
    assert code == 2 and "no finished stage" in caplog.text
    assert _bytes(run_copy) == before
    assert not (run_copy / "tune/none").exists() and not list((run_copy / "tune").glob(".*"))


def test_a_used_name_is_refused(run_copy, caplog):
    assert cli.main(["tune", "--run", str(run_copy), "--name", "a", "--quiet"]) == 0
    assert cli.main(["tune", "--run", str(run_copy), "--name", "a", "--quiet"]) == 2
    assert "exists already" in caplog.text
    assert cli.main(["tune", "--run", str(run_copy), "--name", "../escape", "--quiet"]) == 2


def test_tune_refuses_changes_outside_the_stacker(run_copy, caplog):
    before = _bytes(run_copy)
    assert cli.main(["tune", "--run", str(run_copy), "--set", "n_folds=4", "--quiet"]) == 2
    assert "tune --set n_folds: tune refits only the ensemble" in caplog.text
    assert cli.main(["tune", "--run", str(run_copy), "--set", "stages.lgbm.params.num_boost_round=5", "--quiet"]) == 2
    assert _bytes(run_copy) == before and not (run_copy / "tune").exists()
