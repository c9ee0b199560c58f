"""run.py end to end on a slice of the real sample: outputs, submission contract, resume, sub-commands."""
from __future__ import annotations

import json
import shutil
import os

import numpy as np
import pandas as pd

import run as cli


def test_submission_contract(finished_run, slice_files):
    sub = pd.read_csv(finished_run / "submission.csv", dtype={"id": str})
    test = pd.read_csv(slice_files / "test.csv", dtype={"id": str})
    assert list(sub.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert sub["id"].tolist() == test["id"].tolist()  # same ids, same order
    assert sub.shape == (60, 4)
    probs = sub[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert (probs > 0).all() and (probs < 1).all()


def test_run_directory_holds_every_artifact(finished_run):
    for rel in ["config.json", "folds.csv", "data_report.json", "report.html", "calibration.png", "stage_scores.png",
                "confusion.png", "position_bias.png", "subgroups.png", "ensemble/ensemble.json", "ensemble/oof_probs.csv"]:
        assert (finished_run / rel).exists(), rel
    for stage in ("length_lr", "lgbm"):
        d = finished_run / "stages" / stage
        for rel in ["oof_logits.csv", "oof_logits_straight.csv", "oof_logits_swapped.csv", "test_logits.csv",
                    "metrics.json", "fold0/model/stage.json"]:
            assert (d / rel).exists(), f"{stage}/{rel}"
    assert (finished_run / "stages/lgbm/fold2/model/model.txt").read_text().startswith("tree")
    folds = pd.read_csv(finished_run / "folds.csv")
    assert len(folds) == 300 and folds["fold"].nunique() == 3
    summary = json.loads((finished_run / "ensemble/ensemble.json").read_text())
    assert set(summary["stages_raw"]) == {"length_lr", "lgbm"}
    assert summary["nested_scores"]["log_loss"] < summary["prior_log_loss"] + 0.05
    assert "Data repairs" in (finished_run / "report.html").read_text()


def test_rerun_resumes_without_refitting(finished_run, slice_files, monkeypatch):
    stamp = {p: os.stat(p).st_mtime_ns for p in finished_run.glob("stages/*/fold*/done.json")}
    # drop one fold's result, as an interrupted run would leave it: only that fold is recomputed
    lost = finished_run / "stages/lgbm/fold1/done.json"
    lost.unlink()
    (finished_run / "stages/lgbm/done.json").unlink()
    code = cli.main(["--train", str(slice_files / "train.csv"), "--test", str(slice_files / "test.csv"),
                     "--out", str(finished_run), "--quiet"])
    assert code == 0
    for path, mtime in stamp.items():
        if path != lost:
            assert os.stat(path).st_mtime_ns == mtime, f"{path} was recomputed"
    assert lost.exists()


def test_train_one_stage_and_restack(finished_run, slice_files, tmp_path):
    out = slice_files / "single"
    code = cli.main(["train", "length_lr", "--train", str(slice_files / "train.csv"), "--out", str(out),
                     "--config", str(slice_files / "config.json"), "--quiet"])
    assert code == 0
    assert (out / "stages/length_lr/done.json").exists() and not (out / "stages/lgbm").exists()
    run = tmp_path / "run"  # tune writes its candidate into the run: a copy, the shared run stays as it was
    shutil.copytree(finished_run, run)
    assert cli.main(["tune", "--run", str(run), "--quiet"]) == 0
    summary = json.loads((run / "ensemble/ensemble.json").read_text())
    assert set(summary["stages_raw"]) == {"length_lr", "lgbm"}


def test_bad_input_gives_a_clear_error(arena_frame, tmp_path, caplog):
    bad = arena_frame.head(20).copy()
    bad.loc[5, "response_b"] = "not json"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    code = cli.main(["--train", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    assert "bad.csv, row 6, column 'response_b'" in caplog.text
