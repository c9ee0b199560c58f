"""run.py distill: the fold bookkeeping of a student trained on its teacher's out-of-fold probabilities.

The teacher is the suite's finished run on a slice of the real sample (length_lr + LightGBM, 3 folds).
A copy of it with part of its ensemble's OOF probabilities removed stands for a teacher whose
ensemble covers only some rows (a costly stage fitted on a subset of folds).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import run as cli
from battles.columns import LABEL_COLUMNS, SOFT_COLUMNS
from battles.io import read_battles
from battles.labels import label_index
from ensemble.coverage import row_log_loss
from ensemble.metrics import probs_from_logits
from pipeline.manifests import record_ensemble
from pipeline.rundir import RunDir, read_folds, read_id_table, read_logits

W = 0.7
STUDENT = {"stages": {"len": {"type": "length_lr"}}, "stacker": {"C_grid": [0.1]}}


@pytest.fixture(scope="module")
def teacher(finished_run, tmp_path_factory):
    """A copy of the finished run whose ensemble has OOF probabilities for all rows but 40."""
    path = tmp_path_factory.mktemp("distill") / "teacher"
    shutil.copytree(finished_run, path)
    probs = read_id_table(path / "ensemble/oof_probs.csv")
    probs.iloc[40:].to_csv(path / "ensemble/oof_probs.csv", index=False, float_format="%.9g")
    record_ensemble(RunDir(path))  # as if the teacher had written it so (its manifest records the file)
    return path


@pytest.fixture(scope="module")
def student(teacher, slice_files):
    out = teacher.parent / "student"
    (teacher.parent / "student.json").write_text(json.dumps({**STUDENT, "n_folds": 5}))  # the teacher's 3 win
    code = cli.main(["distill", "--teacher", str(teacher), "--train", str(slice_files / "train.csv"), "--out", str(out),
                     "--config", str(teacher.parent / "student.json"), "--soft-weight", str(W), "--quiet"])
    assert code == 0
    return out


def test_student_folds_and_targets_come_from_the_teacher_out_of_fold(teacher, student, slice_files):
    train, _ = read_battles(slice_files / "train.csv")
    ids = train["id"].tolist()
    teacher_folds, student_folds = read_folds(teacher / "folds.csv"), read_folds(student / "folds.csv")
    assert student_folds.equals(teacher_folds)
    assert json.loads((student / "config.json").read_text())["n_folds"] == 3
    folds = student_folds["fold"].to_numpy()

    lines = (student / "distill_train.jsonl").read_text().splitlines()
    provenance = json.loads(lines[0])["provenance"]
    assert provenance["soft_weight"] == W and provenance["rows_with_teacher_targets"] == len(ids) - 40
    rows = pd.DataFrame([json.loads(x) for x in lines[1:]])
    assert rows["id"].tolist() == ids
    assert rows[LABEL_COLUMNS].to_numpy().tolist() == train[LABEL_COLUMNS].to_numpy().tolist()  # hard labels kept

    q = read_id_table(teacher / "ensemble/oof_probs.csv").set_index("id")[LABEL_COLUMNS]
    onehot = np.eye(3)[label_index(train)]
    soft = rows[SOFT_COLUMNS].to_numpy(dtype=float)
    covered = np.isin(ids, q.index)
    assert covered.sum() == len(ids) - 40
    np.testing.assert_allclose(soft[covered], W * q.loc[np.array(ids)[covered]].to_numpy() + (1 - W) * onehot[covered],
                               atol=1e-12)
    assert np.isnan(soft[~covered]).all()  # no teacher probability: the row keeps its hard label

    # each row's teacher probability came from the teacher's models of that row's fold: every teacher
    # stage's fold-k model validated (was not trained) on exactly the student's fold-k rows
    for stage in ("length_lr", "lgbm"):
        for k in range(3):
            valid = read_id_table(teacher / f"stages/{stage}/fold{k}/valid_logits.csv")["id"]
            assert sorted(valid) == sorted(np.array(ids)[folds == k])


def test_student_scores_use_hard_labels(student, slice_files):
    train, _ = read_battles(slice_files / "train.csv")
    ids, y = train["id"].tolist(), label_index(train)
    oof = read_logits(student / "stages/len/oof_logits.csv", ids)
    metrics = json.loads((student / "stages/len/metrics.json").read_text())["oof"]
    hard_loss = row_log_loss(y, probs_from_logits(oof)).mean()
    assert metrics["n"] == len(ids) and metrics["log_loss"] == pytest.approx(hard_loss)
    student_train, _ = read_battles(student / "distill_train.jsonl")
    soft_targets = np.nan_to_num(student_train[SOFT_COLUMNS].to_numpy(dtype=float), nan=0.0)
    soft_loss = -(soft_targets * np.log(probs_from_logits(oof))).sum(axis=1)[~np.isnan(
        student_train["soft_a"].to_numpy(dtype=float))].mean()
    assert abs(metrics["log_loss"] - soft_loss) > 1e-6  # not scored against the soft targets
    summary = json.loads((student / "ensemble/ensemble.json").read_text())
    assert summary["rows"] == len(ids)
    probs = read_id_table(student / "ensemble/oof_probs.csv").set_index("id").loc[ids, LABEL_COLUMNS].to_numpy()
    assert summary["nested_scores"]["log_loss"] == pytest.approx(row_log_loss(y, probs).mean(), abs=1e-6)
    report = json.loads((student / "data_report.json").read_text())
    assert report["train"]["provenance"]["distilled_from"].endswith("teacher")
    assert any(w.startswith("distilled student of the run") for w in summary["warnings"])  # optimism said aloud


def test_distill_refusals_and_resume(teacher, student, slice_files, tmp_path, caplog):
    base = ["distill", "--teacher", str(teacher), "--quiet"]
    other = tmp_path / "other.csv"
    pd.read_csv(slice_files / "train.csv", dtype=str, keep_default_na=False).iloc[:250].to_csv(other, index=False)
    assert cli.main([*base, "--train", str(other), "--out", str(tmp_path / "s1")]) == 2
    assert "is not the training data of the teacher" in caplog.text and not (tmp_path / "s1").exists()
    assert cli.main([*base, "--train", str(slice_files / "train.csv"), "--out", str(tmp_path / "s2"),
                     "--soft-weight", "1.5"]) == 2
    assert "--soft-weight must be between 0 and 1" in caplog.text and not (tmp_path / "s2").exists()
    assert cli.main([*base, "--train", str(slice_files / "train.csv"), "--out", str(student), "--soft-weight", "0.2"]) == 2
    assert f"soft_weight {W} -> 0.2" in caplog.text
    assert cli.main(["distill", "--teacher", str(slice_files / "test.csv"), "--train", str(slice_files / "train.csv"),
                     "--out", str(tmp_path / "s3"), "--quiet"]) == 2
    # the same command again resumes; tune works on the student as on any run
    stamp = (student / "stages/len/fold0/done.json").stat().st_mtime_ns
    assert cli.main([*base, "--train", str(slice_files / "train.csv"), "--out", str(student),
                     "--soft-weight", str(W)]) == 0
    assert (student / "stages/len/fold0/done.json").stat().st_mtime_ns == stamp
    assert cli.main(["tune", "--run", str(student), "--quiet"]) == 0
