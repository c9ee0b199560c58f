"""Fold plans (a subset of folds, refit on all rows) and stacking over partial coverage (issue 10).

A costly stage may be fitted on one fold only and/or refitted on every row; the ensemble is then
chosen and scored on the rows every chosen stage covers, and nothing is scored twice or on a row a
stage was trained on. Through run.py, on slices of the real sample.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

import run as cli
from tests.conftest import FAST_LGBM
from tests.test_decoder import gemma_dir  # noqa: F401  (the session-wide tiny Gemma-2 fixture)

STATS = {"type": "lgbm", "params": {**FAST_LGBM, "blocks": [{"type": "text_stats"}, {"type": "similarity"}]}}


def _ids(path) -> list[str]:
    return pd.read_csv(path, dtype={"id": str}, keep_default_na=False)["id"].tolist()


@pytest.fixture(scope="module")
def plan_files(arena_frame, tmp_path_factory):
    root = tmp_path_factory.mktemp("plans")
    arena_frame.iloc[:500].to_csv(root / "train.csv", index=False)
    arena_frame.iloc[500:540][["id", "prompt", "response_a", "response_b"]].to_csv(root / "test.csv", index=False)
    return root


def test_one_fold_stage_beside_a_full_stage(plan_files):
    """length_lr on fold 0 only, LightGBM on all 5 folds: coverage, stage sets, rows scored once."""
    config = {"n_folds": 5, "stages": {"stats": STATS, "length": {"type": "length_lr", "folds": [0]}},
              "stacker": {"C_grid": [0.1]}}
    (plan_files / "one_fold.json").write_text(json.dumps(config))
    out = plan_files / "one_fold"
    assert cli.main(["--train", str(plan_files / "train.csv"), "--test", str(plan_files / "test.csv"),
                     "--out", str(out), "--config", str(plan_files / "one_fold.json"), "--quiet"]) == 0
    folds = pd.read_csv(out / "folds.csv", dtype={"id": str}, keep_default_na=False)
    fold0 = folds.loc[folds["fold"] == 0, "id"].tolist()
    # the one-fold stage: one model (trained on folds 1-4), OOF logits for fold 0's rows only
    assert sorted(_ids(out / "stages/length/oof_logits.csv")) == sorted(fold0)
    assert sorted(p.name for p in (out / "stages/length").glob("fold*")) == ["fold0"]
    metrics = json.loads((out / "stages/length/metrics.json").read_text())
    assert metrics["coverage"] == {"folds": [0], "rows": len(fold0), "of": 500, "refit_full": False}
    assert metrics["oof"]["n"] == len(fold0)
    # the ensemble: both stages on fold 0's rows (nested CV on grouped folds made within them) vs
    # LightGBM alone on every row; compared on fold 0's rows
    summary = json.loads((out / "ensemble/ensemble.json").read_text())
    sets = {tuple(t["stages"]): t for t in summary["stage_sets"]}
    assert set(sets) == {("stats", "length"), ("stats",)}
    both, alone = sets[("stats", "length")], sets[("stats",)]
    assert both["rows"] == len(fold0) and "within these rows" in both["outer_folds"]
    assert alone["rows"] == 500 and alone["outer_folds"] == "run folds"
    for t in (both, alone):
        lo, hi = t["interval"]
        assert lo < t["nested_log_loss"] < hi and t["common_rows"] == len(fold0)
    chosen = [t for t in summary["stage_sets"] if t["chosen"]]
    assert len(chosen) == 1 and summary["rows"] == chosen[0]["rows"]
    # issue 22: the full-coverage stage is the default; the wider set replaces it only on evidence
    assert alone["role"] == "default" and both["compared_with"] == ["stats"]
    assert both["chosen"] == both["replaced_it"] == (both["minus_compared_interval"][1] < 0)
    scored = _ids(out / "ensemble/oof_probs.csv")
    assert len(scored) == len(set(scored)) == summary["rows"]  # no row scored twice
    if chosen[0] is both:
        assert set(scored) == set(fold0)  # only rows the one-fold stage was not trained on
    # the test logits of a one-fold stage come from its one model; the submission covers the test file
    assert _ids(out / "submission.csv") == _ids(plan_files / "test.csv")
    page = (out / "report.html").read_text()
    assert "Stage sets" in page and "90% interval" in page


def test_widening_the_plan_reuses_the_folds_already_fitted(plan_files):
    config = {"n_folds": 5, "stages": {"length": {"type": "length_lr", "folds": [0]}}, "stacker": {"C_grid": [0.1]}}
    (plan_files / "widen.json").write_text(json.dumps(config))
    out = plan_files / "widen"
    args = ["--train", str(plan_files / "train.csv"), "--out", str(out), "--quiet"]
    assert cli.main([*args, "--config", str(plan_files / "widen.json")]) == 0
    done = out / "stages/length/fold0/done.json"
    stamp = os.stat(done).st_mtime_ns
    assert cli.main([*args, "--set", "stages.length.folds=[0, 1, 2]"]) == 0
    assert os.stat(done).st_mtime_ns == stamp  # fold 0 reused: its model does not depend on the plan
    assert sorted(p.name for p in (out / "stages/length").glob("fold*")) == ["fold0", "fold1", "fold2"]
    summary = json.loads((out / "ensemble/ensemble.json").read_text())
    assert summary["rows"] == json.loads((out / "stages/length/metrics.json").read_text())["coverage"]["rows"]
    assert summary["outer_folds"] == "run folds"  # three run folds are enough for the nested CV


def test_a_new_test_file_is_predicted_without_refitting(plan_files, arena_frame):
    config = {"n_folds": 3, "stages": {"length": {"type": "length_lr"}}, "stacker": {"C_grid": [0.1]}}
    (plan_files / "retest.json").write_text(json.dumps(config))
    out = plan_files / "retest"
    args = ["--train", str(plan_files / "train.csv"), "--out", str(out), "--quiet"]
    assert cli.main([*args, "--config", str(plan_files / "retest.json")]) == 0
    stamps = {p: os.stat(p).st_mtime_ns for p in out.glob("stages/length/fold*/model/stage.json")}
    other = plan_files / "other_test.csv"
    arena_frame.iloc[600:620][["id", "prompt", "response_a", "response_b"]].to_csv(other, index=False)
    assert cli.main([*args, "--test", str(other)]) == 0
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # models kept; only test logits computed
    assert _ids(out / "submission.csv") == _ids(other)


def test_tiny_decoder_one_fold_and_refit_beside_five_fold_lightgbm(plan_files, gemma_dir,  # noqa: F811
                                                                   tmp_path, monkeypatch):
    """The issue's done-means on CPU: decoder folds [0] + refit_full next to 5-fold LightGBM; ensemble,
    report with coverage and intervals, submission; predict reproduces it loading one decoder model."""
    from battles.columns import LABEL_COLUMNS
    from models.deep import quantization

    model = gemma_dir  # the session's tiny Gemma-2 (read only here)
    decoder = {"type": "decoder", "folds": [0], "refit_full": True,
               "params": {"model": str(model), "quantization": "4bit", "max_length": 192, "max_steps": 2,
                          "train_batch_size": 4, "grad_accum": 1, "lora_r": 4, "lora_alpha": 8,
                          "gradient_checkpointing": False}}
    config = {"n_folds": 5, "stages": {"stats": STATS, "decoder": decoder}, "stacker": {"C_grid": [0.1]}}
    (tmp_path / "plan.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert cli.main(["--train", str(plan_files / "train.csv"), "--test", str(plan_files / "test.csv"),
                     "--out", str(out), "--config", str(tmp_path / "plan.json"), "--quiet"]) == 0
    stage = out / "stages/decoder"
    assert sorted(p.name for p in stage.iterdir() if p.is_dir()) == ["fold0", "full"]
    assert json.loads((stage / "metrics.json").read_text())["coverage"]["refit_full"] is True
    summary = json.loads((out / "ensemble/ensemble.json").read_text())
    assert summary["coverage"] == {"stats": 500, "decoder": json.loads((stage / "metrics.json").read_text())
                                   ["coverage"]["rows"]}
    assert "Stage sets" in (out / "report.html").read_text()
    loads = []
    real = quantization.load_base_model
    monkeypatch.setattr(quantization, "load_base_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))

    def predict_matches_submission(name):
        assert cli.main(["predict", "--run", str(out), "--test", str(plan_files / "test.csv"),
                         "--out", str(tmp_path / name), "--quiet"]) == 0
        preds, sub = pd.read_csv(tmp_path / name), pd.read_csv(out / "submission.csv")
        np.testing.assert_allclose(preds[LABEL_COLUMNS].to_numpy(), sub[LABEL_COLUMNS].to_numpy(), atol=1e-5)

    predict_matches_submission("preds.csv")
    assert len(loads) == (1 if "decoder" in summary["stages"] else 0)
    # the random tiny decoder may lose to LightGBM; an ensemble of the decoder alone must load it once
    assert cli.main(["tune", "--run", str(out), "--set", 'stacker.exclude=["stats"]', "--apply", "--quiet"]) == 0
    assert json.loads((out / "ensemble/ensemble.json").read_text())["stages"] == ["decoder"]
    loads.clear()
    predict_matches_submission("preds_decoder.csv")
    assert len(loads) == 1  # the refitted model alone, its base loaded once
