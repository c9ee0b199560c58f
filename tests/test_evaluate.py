"""``run.py evaluate`` scores a finished run on a labelled file; the overlap check; ``remove-stage``."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import run as cli
from battles.io import read_battles
from battles.labels import label_index
from ensemble.coverage import row_log_loss
from pipeline.checks import overlapping
from pipeline.predict import Predictor


@pytest.fixture(scope="module")
def holdout(arena_frame, tmp_path_factory):
    """Labelled battles the shared run did not train on (rows 400-519 of the sample; it trained on 0-299)."""
    path = tmp_path_factory.mktemp("holdout") / "holdout.csv"
    arena_frame.iloc[400:520].to_csv(path, index=False)
    return path


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_evaluate_prints_the_figures_and_writes_its_report(run_copy, holdout, capsys):
    report_before = (run_copy / "report.html").read_bytes()
    assert cli.main(["evaluate", "--run", str(run_copy), "--data", str(holdout), "--quiet"]) == 0
    out = capsys.readouterr().out
    folder = run_copy / "evaluations/holdout"
    result = json.loads((folder / "evaluation.json").read_text())
    assert {"report.md", "calibration.png", "subgroups.png", "predictions.csv"} <= {p.name for p in folder.iterdir()}
    assert (run_copy / "report.html").read_bytes() == report_before, "the run's own report is untouched"
    rows = {r["output"]: r for r in result["scores"]}
    # every finished stage alone (length_lr is not in the ensemble), the ensemble and the prior, on all 120 rows
    assert {"length_lr", "lgbm", "ensemble", "class prior (training labels)"} <= set(rows)
    assert all(r["rows"] == 120 for r in rows.values()) and not result["warnings"]
    # the figures are the predictor's: recompute the ensemble's log loss from predict
    battles, _ = read_battles(holdout)
    probs = Predictor.load(run_copy, progress=False).predict_proba(battles)
    y = label_index(battles)
    assert rows["ensemble"]["log_loss"] == pytest.approx(row_log_loss(y, probs).mean(), abs=1e-6)
    lo, hi = rows["ensemble"]["interval"]
    assert lo < rows["ensemble"]["log_loss"] < hi
    assert rows["ensemble"]["accuracy"] == pytest.approx((probs.argmax(1) == y).mean())
    groups = {g["group"] for g in result["subgroups"]}
    assert {"1 turn", "tie", "not tie"} <= groups
    md = (folder / "report.md").read_text()
    assert "| ensemble | 120 |" in md and "![reliability](calibration.png)" in md
    assert "ensemble minus class prior" in out and f"{rows['ensemble']['log_loss']:.4f}" in out


def test_evaluate_warns_when_the_file_repeats_training_battles(run_copy, arena_frame, tmp_path, capsys):
    mixed = pd.concat([arena_frame.iloc[290:300], arena_frame.iloc[400:430]])
    path = tmp_path / "mixed.csv"
    mixed.to_csv(path, index=False)
    assert cli.main(["evaluate", "--run", str(run_copy), "--data", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: --data" in out and "10 of 40 battles" in out
    result = json.loads((run_copy / "evaluations/mixed/evaluation.json").read_text())
    assert [r["rows"] for r in result["scores"] if r["output"] == "ensemble, battles not in training"] == [30]


def test_overlap_is_by_text_and_either_order(arena_battles):
    train = arena_battles.iloc[:50]
    other = arena_battles.iloc[45:55].copy()
    swapped = other.copy()
    swapped["response_a"], swapped["response_b"] = other["response_b"].tolist(), other["response_a"].tolist()
    swapped["id"] = [f"x{i}" for i in range(len(swapped))]  # ids do not matter, text does
    assert overlapping(train, other).tolist() == [True] * 5 + [False] * 5
    assert overlapping(train, swapped).tolist() == [True] * 5 + [False] * 5


def test_evaluate_refuses_an_unlabelled_file(run_copy, slice_files, caplog):
    assert cli.main(["evaluate", "--run", str(run_copy), "--data", str(slice_files / "test.csv"), "--quiet"]) == 2
    assert not (run_copy / "evaluations").exists()


# ----------------------------------------------------------------------------------------------- remove-stage
def test_remove_stage_refuses_a_stage_the_ensemble_uses_then_refits(run_copy, caplog, capsys):
    config_before = (run_copy / "config.json").read_bytes()
    assert cli.main(["remove-stage", "--run", str(run_copy), "lgbm", "--quiet"]) == 2
    assert "uses this stage; pass --refit" in caplog.text
    assert (run_copy / "config.json").read_bytes() == config_before and (run_copy / "stages/lgbm").is_dir()
    assert cli.main(["remove-stage", "--run", str(run_copy), "lgbm", "--refit", "--quiet"]) == 0
    config = json.loads((run_copy / "config.json").read_text())
    assert list(config["stages"]) == ["length_lr"] and not (run_copy / "stages/lgbm").exists()
    assert json.loads((run_copy / "ensemble/ensemble.json").read_text())["stages"] == ["length_lr"]
    assert Predictor.load(run_copy, progress=False).stage_names == ["length_lr"]


def test_remove_stage_not_in_the_ensemble_and_unknown_stage(run_copy, caplog):
    ensemble_before = (run_copy / "ensemble/ensemble.json").read_bytes()
    assert cli.main(["remove-stage", "--run", str(run_copy), "length_lr", "--quiet"]) == 0
    assert list(json.loads((run_copy / "config.json").read_text())["stages"]) == ["lgbm"]
    assert not (run_copy / "stages/length_lr").exists() and not list((run_copy / "stages").glob(".*"))
    assert (run_copy / "ensemble/ensemble.json").read_bytes() == ensemble_before
    assert cli.main(["remove-stage", "--run", str(run_copy), "nope", "--quiet"]) == 2
    assert "not a stage of" in caplog.text
    assert cli.main(["remove-stage", "--run", str(run_copy), "lgbm", "--refit", "--quiet"]) == 2
    assert "only stage" in caplog.text
    assert np.isfinite(Predictor.load(run_copy, progress=False).predict_proba(
        [{"prompt": "hi", "response_a": "hello", "response_b": "bye"}])).all()


def test_predict_warns_when_the_test_file_repeats_training_battles(finished_run, arena_frame, tmp_path, caplog):
    path = tmp_path / "repeats.csv"
    arena_frame.iloc[295:305].to_csv(path, index=False)  # 5 training battles, 5 others
    assert cli.main(["predict", "--run", str(finished_run), "--test", str(path), "--out", str(tmp_path / "p.csv"),
                     "--quiet"]) == 0
    assert "5 of 10 battles (50.0%) repeat a training battle" in caplog.text
