"""External rows in training only, soft-label expansion, shift weights, pseudo-label round trip."""
from __future__ import annotations

import json

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from battles.columns import LABEL_COLUMNS
from battles.folds import make_folds
from battles.io import BattleDataError
from battles.labels import expand_targets, label_matrix, row_weights
from flywheel.pseudo_label import pseudo_label_file, read_pseudo_labels
from flywheel.shift import ShiftConfig, importance_weights, shift_weights
from flywheel.sources import external_rows


def _battles(n, source="target", seed=0, prompt_words=("how", "do", "i")):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    rows = []
    for i in range(n):
        rows.append({"id": f"{source}-{i}", "prompt": [" ".join(rng.choice(prompt_words, 6)) + f" {i}"],
                     "response_a": ["word " * int(rng.integers(1, 50))], "response_b": ["word " * int(rng.integers(1, 50))],
                     "source": source, **{c: int(labels[i] == j) for j, c in enumerate(LABEL_COLUMNS)}})
    return pd.DataFrame(rows)


def test_external_rows_weights_and_id_clash():
    target = _battles(60)
    ext = pd.concat([_battles(10, "pandalm", 1), _battles(5, "hh", 2)], ignore_index=True)
    shift = np.linspace(0.5, 1.5, len(ext))
    rows = external_rows(ext, {"pandalm": 0.5, "hh": 2.0}, shift, target_ids=target["id"])
    np.testing.assert_allclose(rows["weight"].to_numpy(), np.r_[np.full(10, 0.5), np.full(5, 2.0)] * shift)
    with pytest.raises(KeyError, match="no weight for external source"):
        external_rows(ext, {"pandalm": 1.0})
    dropped = external_rows(ext, {"pandalm": 0.0, "hh": 1.0})
    assert not dropped["source"].eq("pandalm").any()
    clash = ext.assign(id=target["id"].iloc[:15].to_numpy())
    with pytest.raises(ValueError, match="external ids equal training ids"):
        external_rows(clash, {"pandalm": 1.0, "hh": 1.0}, target_ids=target["id"])


def _expand(battles):
    """Soft rows -> weighted hard rows, the one expansion (battles.labels.expand_targets)."""
    rows, y, w = expand_targets(label_matrix(battles), row_weights(battles))
    return battles.iloc[rows].reset_index(drop=True).assign(row=rows), y, w


def test_expand_targets_matches_soft_cross_entropy():
    b = _battles(4)
    b["soft_a"] = [0.7, np.nan, 0.0, 1 / 3]
    b["soft_b"] = [0.2, np.nan, 0.5, 1 / 3]
    b["soft_tie"] = [0.1, np.nan, 0.5, 1 / 3]
    b["weight"] = [1.0, 2.0, 1.0, 3.0]
    expanded, y, w = _expand(b)
    assert expanded["row"].tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3]  # zero-probability class left out
    assert y.tolist() == [0, 1, 2, int(np.argmax(b.loc[1, LABEL_COLUMNS])), 1, 2, 0, 1, 2]
    np.testing.assert_allclose(w, [0.7, 0.2, 0.1, 2.0, 0.5, 0.5, 1.0, 1.0, 1.0])
    # weighted log loss on expanded rows == weighted cross-entropy against the soft targets
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=4)
    target = np.vstack([b.loc[0, ["soft_a", "soft_b", "soft_tie"]], np.eye(3)[np.argmax(b.loc[1, LABEL_COLUMNS])],
                        b.loc[2, ["soft_a", "soft_b", "soft_tie"]], b.loc[3, ["soft_a", "soft_b", "soft_tie"]]]).astype(float)
    soft_ce = -(b["weight"].to_numpy()[:, None] * target * np.log(probs)).sum()
    expanded_ce = -(w * np.log(probs[expanded["row"], y])).sum()
    assert expanded_ce == pytest.approx(soft_ce)


def test_shift_weights_separate_sources_and_are_clipped():
    target = _battles(200, prompt_words=("python", "code", "function", "error", "list", "loop"))
    near = _battles(150, "near", 1, prompt_words=("python", "code", "function", "error", "list", "loop"))
    far = _battles(150, "far", 2, prompt_words=("poem", "love", "moon", "sonnet", "rhyme", "heart"))
    weights, report = shift_weights(target, pd.concat([near, far], ignore_index=True), ShiftConfig(n_folds=3))
    assert report["far"]["auc"] > 0.95
    assert report["near"]["auc"] < 0.75
    assert weights.shape == (300,) and weights.min() >= 0.05 and weights.max() <= 5.0
    assert weights[:150].mean() == pytest.approx(1.0, abs=0.2)
    w = importance_weights(np.array([0.5, 0.9, 0.999999, 0.01]), 10, 10, 0.1, 3.0)
    assert w.max() == 3.0 and w.min() == 0.1


def test_pseudo_label_round_trip_trains_lightgbm(tmp_path):
    unlabelled = _battles(120, "chatlog", 3).drop(columns=LABEL_COLUMNS)

    def predict_fn(b):  # a "model": longer reply wins
        d = np.array([len(a[0]) - len(c[0]) for a, c in zip(b["response_a"], b["response_b"])], dtype=float)
        logits = np.c_[d / 20, -d / 20, np.zeros(len(b))]
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    data, out = tmp_path / "unlabelled.jsonl", tmp_path / "pseudo.jsonl"
    unlabelled.to_json(data, orient="records", lines=True, force_ascii=False)
    provenance = {"run": "runs/x", "stages": ["lgbm"], "config_hash": "abc123"}
    pseudo_label_file(data, predict_fn, out, provenance, weight=0.5, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        pseudo_label_file(data, predict_fn, out, provenance, progress=False)
    header = json.loads(out.read_text().splitlines()[0])["provenance"]
    assert header["stages"] == ["lgbm"] and header["n_battles"] == 120 and "written_at" in header
    battles, prov = read_pseudo_labels(out)
    assert prov["config_hash"] == "abc123" and len(battles) == 120
    np.testing.assert_allclose(battles[["soft_a", "soft_b", "soft_tie"]].to_numpy(), predict_fn(unlabelled), atol=1e-12)
    assert battles["response_a"].tolist() == unlabelled["response_a"].tolist()
    assert (battles["weight"] == 0.5).all() and (battles["source"] == "pseudo").all()
    expanded, y, w = _expand(battles)
    x = np.array([[len(a[0]), len(c[0])] for a, c in zip(expanded["response_a"], expanded["response_b"])], dtype=float)
    model = lgb.LGBMClassifier(n_estimators=30, min_child_samples=5, verbose=-1, n_jobs=1).fit(x, y, sample_weight=w)
    probe = np.array([[200.0, 5.0], [5.0, 200.0]])
    p = model.predict_proba(probe)
    assert p[0, 0] > p[0, 1] and p[1, 1] > p[1, 0]  # learnt "longer wins" from soft labels alone
    # a corrupted file names the problem
    lines = out.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(BattleDataError, match="provenance"):
        read_pseudo_labels(bad)


def test_crossfit_hook_external_rows_train_only(tmp_path):
    from flywheel.sources import external_rows
    from kernel.context import StageContext
    from pipeline.config import StageSpec
    from pipeline.crossfit import StageFit
    from pipeline.rundata import DataKeys, RunData
    from pipeline.rundir import RunDir, read_logits
    from pipeline.timings import Timings

    target = _battles(60)
    ext = external_rows(_battles(30, "pandalm", 1), {"pandalm": 0.5})
    folds = make_folds(target, n_folds=3, seed=0)
    data = RunData(target, folds, DataKeys.of(target, extra=ext), extra=ext)
    result = StageFit(RunDir(tmp_path), "len", StageSpec(type="length_lr"), data, StageContext(progress=False),
                      Timings()).result()
    assert result.oof_logits.shape == (60, 3)
    oof_ids = pd.read_csv(tmp_path / "stages" / "len" / "oof_logits.csv", dtype={"id": str})["id"]
    assert sorted(oof_ids) == sorted(target["id"])  # OOF rows = target rows only
    for k in range(3):
        valid_ids = set(pd.read_csv(tmp_path / "stages" / "len" / f"fold{k}" / "valid_logits.csv", dtype={"id": str})["id"])
        assert not valid_ids & set(ext["id"])
    read_logits(tmp_path / "stages" / "len" / "oof_logits.csv", target["id"].tolist())


def test_config_external_section_adds_training_only_rows(tmp_path):
    """A run whose config names an external file: converted, de-duplicated, training-only, reported."""
    from battles.io import battles_to_frame
    from pipeline.config import load_config
    from pipeline.runner import Run

    target = _battles(90)
    ext = _battles(40, "other", 5, prompt_words=("write", "a", "poem"))
    planted = target.iloc[:5].copy()  # the same battles as target rows: must be removed by dedup
    planted["id"] = [f"dup-{i}" for i in range(5)]
    battles_to_frame(target.drop(columns=["source"])).to_csv(tmp_path / "train.csv", index=False)
    battles_to_frame(pd.concat([ext, planted]).drop(columns=["source"])).to_csv(tmp_path / "ext.csv", index=False)
    cfg = load_config(None, overrides={"n_folds": 3, "stages": {"len": {"type": "length_lr"}},
                             "external": {"sources": [{"kind": "competition", "path": str(tmp_path / "ext.csv"),
                                                       "source": "other", "weight": 0.5}],
                                          "shift_weighting": True}})
    run = Run(tmp_path / "run", cfg, tmp_path / "train.csv", progress=False)
    data = run.load_data()
    report = json.loads((tmp_path / "run" / "external_report.json").read_text())
    assert report["rows_added"] == {"other": 40}
    assert "other" in report["shift"] and 0.0 <= report["shift"]["other"]["auc"] <= 1.0
    assert not set(data.extra["id"]) & set(target["id"])
    assert (data.extra["weight"] > 0).all()
    run.fit_stage("len")
    oof_ids = pd.read_csv(tmp_path / "run" / "stages" / "len" / "oof_logits.csv", dtype={"id": str})["id"]
    assert sorted(oof_ids) == sorted(target["id"])
