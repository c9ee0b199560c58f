"""Soft-labelled rows as training data: folds for mixed files, the pseudo_labels source, the CLI loop.

The loop on a slice of the real sample: a finished run pseudo-labels unlabelled battles
(``run.py pseudo-label``), a new run trains with them as an external source of kind
``pseudo_labels``, and a --train file mixing hard-labelled and soft-only rows trains on every row
while every score stays on the hard-labelled ones.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedGroupKFold

import run as cli
from battles.columns import LABEL_COLUMNS, SOFT_COLUMNS
from battles.folds import make_folds, prompt_groups
from battles.io import BattleDataError, battles_to_frame, read_battles
from battles.labels import label_index
from ensemble.coverage import row_log_loss
from ensemble.metrics import probs_from_logits
from flywheel.converters import from_pseudo_labels
from flywheel.sources import ExternalSource
from pipeline.rundir import read_folds, read_id_table, read_logits


def _table(n: int, soft_from: int, seed: int = 0) -> pd.DataFrame:
    """``n`` battles over ``n // 2`` prompts; rows from ``soft_from`` on have soft labels only."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    rows = []
    for i in range(n):
        row = {"id": f"r{i}", "prompt": [f"question number {i // 2}"], "response_a": ["a"], "response_b": ["b"]}
        if i < soft_from:
            row.update({c: float(labels[i] == j) for j, c in enumerate(LABEL_COLUMNS)})
            row.update({c: np.nan for c in SOFT_COLUMNS})
        else:
            p = rng.dirichlet(np.ones(3))
            row.update({c: np.nan for c in LABEL_COLUMNS})
            row.update(dict(zip(SOFT_COLUMNS, p)))
        rows.append(row)
    return pd.DataFrame(rows)


def test_folds_for_a_mix_of_hard_and_soft_only_rows():
    hard = _table(120, soft_from=120)
    # a hard-labelled file gets the folds it always got: stratified by its labels
    expected = np.full(120, -1)
    splitter = StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=3)
    for k, (_, idx) in enumerate(splitter.split(np.zeros(120), label_index(hard), prompt_groups(hard))):
        expected[idx] = k
    assert make_folds(hard, 4, seed=3).tolist() == expected.tolist()

    mixed = _table(120, soft_from=60)
    folds = make_folds(mixed, 4, seed=3)
    assert sorted(set(folds)) == [0, 1, 2, 3]
    groups = prompt_groups(mixed)
    assert all(len(set(folds[groups == g])) == 1 for g in set(groups))  # a prompt stays in one fold
    soft_rows = np.arange(120) >= 60
    assert all(((folds == k) & soft_rows).any() for k in range(4))  # soft rows spread over the folds

    mixed.loc[70, SOFT_COLUMNS] = np.nan  # neither a hard nor a soft label
    with pytest.raises(ValueError, match=r"1 row\(s\) have neither a hard nor a soft label \(e.g. id 'r70'\)"):
        make_folds(mixed, 4, seed=3)


def _write_pseudo(path, battles, provenance):
    lines = [json.dumps({"provenance": provenance})]
    for rec in battles.to_dict("records"):
        lines.append(json.dumps({k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in rec.items()}))
    path.write_text("\n".join(lines) + "\n")


def test_pseudo_labels_converter_reads_soft_rows_and_provenance(tmp_path):
    soft = _table(10, soft_from=0).drop(columns=LABEL_COLUMNS).assign(weight=0.5)
    good = tmp_path / "pseudo.jsonl"
    _write_pseudo(good, soft, {"run": "runs/t", "n_battles": 10})
    battles, report = from_pseudo_labels(good, source="pl")
    assert battles["id"].tolist() == [f"pl:r{i}" for i in range(10)] and (battles["source"] == "pl").all()
    np.testing.assert_allclose(battles[SOFT_COLUMNS].to_numpy(), soft[SOFT_COLUMNS].to_numpy())
    assert (battles["weight"] == 0.5).all()
    assert report.as_dict()["provenance"] == {"run": "runs/t", "n_battles": 10} and report.kept == 10

    truncated = tmp_path / "truncated.jsonl"
    _write_pseudo(truncated, soft.iloc[:7], {"run": "runs/t", "n_battles": 10})
    with pytest.raises(BattleDataError, match="provenance says 10 battles, the file has 7"):
        from_pseudo_labels(truncated, source="pl")
    unfinished = tmp_path / "unfinished.jsonl"
    _write_pseudo(unfinished, soft, {"run": "runs/t"})
    with pytest.raises(BattleDataError, match="unfinished pseudo-label job"):
        from_pseudo_labels(unfinished, source="pl")
    hard_only = tmp_path / "hard.csv"
    battles_to_frame(_table(10, soft_from=10).drop(columns=SOFT_COLUMNS)).to_csv(hard_only, index=False)
    with pytest.raises(BattleDataError, match="kind 'competition'"):
        from_pseudo_labels(hard_only, source="pl")
    bad = soft.copy()
    bad.loc[3, "soft_a"] = 0.9  # no longer sums to 1
    _write_pseudo(tmp_path / "bad.jsonl", bad, {"n_battles": 10})
    with pytest.raises(BattleDataError, match=r"line 5|row 4"):
        from_pseudo_labels(tmp_path / "bad.jsonl", source="pl")
    with pytest.raises(ValueError, match="not an option of the 'pseudo_labels' converter"):
        ExternalSource(kind="pseudo_labels", path=str(good), source="pl", options={"max_pairs_per_prompt": 3})


@pytest.fixture(scope="module")
def pseudo_file(finished_run, slice_files):
    """``run.py pseudo-label``: the finished run's soft labels for the slice's 60 unlabelled battles."""
    out = slice_files / "pseudo.jsonl"
    if not out.exists():
        assert cli.main(["pseudo-label", "--run", str(finished_run), "--data", str(slice_files / "test.csv"),
                         "--out", str(out), "--weight", "0.5", "--quiet"]) == 0
    return out


def test_pseudo_labels_source_trains_on_them_and_scores_on_target(pseudo_file, slice_files, tmp_path):
    config = {"n_folds": 3, "stages": {"len": {"type": "length_lr"}}, "stacker": {"C_grid": [0.1]},
              "external": {"sources": [{"kind": "pseudo_labels", "path": str(pseudo_file), "source": "pl",
                                        "weight": 0.8}]}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert cli.main(["--train", str(slice_files / "train.csv"), "--config", str(tmp_path / "cfg.json"),
                     "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "external_report.json").read_text())
    assert report["rows_added"] == {"pl": 60}
    assert report["conversion"][0]["provenance"]["run"] == str(slice_files / "run")
    assert report["conversion"][0]["provenance"]["n_battles"] == 60
    train_ids = pd.read_csv(slice_files / "train.csv", dtype=str)["id"].tolist()
    assert read_id_table(out / "stages/len/oof_logits.csv")["id"].tolist() == train_ids  # scored: target only
    assert sorted(read_id_table(out / "ensemble/oof_probs.csv")["id"]) == sorted(train_ids)
    # the labelling run was trained on this very data: its pseudo-labels saw every fold's validation rows
    warnings = json.loads((out / "ensemble/ensemble.json").read_text())["warnings"]
    assert any("'pl': its pseudo-labels come from the run" in w and "optimistic" in w for w in warnings)


def test_train_file_mixing_hard_and_soft_only_rows(pseudo_file, slice_files, tmp_path, caplog):
    """Folds for every row, stages fitted and predicting on every row, every score on hard labels."""
    hard, _ = read_battles(slice_files / "train.csv")
    soft, _ = read_battles(pseudo_file)
    mixed = pd.concat([hard, soft.drop(columns=["weight"])], ignore_index=True)
    battles_to_frame(mixed).to_csv(tmp_path / "mixed.csv", index=False)
    config = {"n_folds": 3, "stages": {"len": {"type": "length_lr"}}, "stacker": {"C_grid": [0.1]}}
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    assert cli.main(["--train", str(tmp_path / "mixed.csv"), "--config", str(tmp_path / "cfg.json"),
                     "--out", str(out), "--quiet"]) == 0
    ids = mixed["id"].tolist()
    n_hard = len(hard)
    folds = read_folds(out / "folds.csv")
    assert folds["id"].tolist() == ids and sorted(folds["fold"].unique()) == [0, 1, 2]
    oof = read_logits(out / "stages/len/oof_logits.csv", ids)  # OOF logits for soft rows too
    metrics = json.loads((out / "stages/len/metrics.json").read_text())
    assert metrics["oof"]["n"] == n_hard
    y = label_index(hard)
    assert metrics["oof"]["log_loss"] == pytest.approx(row_log_loss(y, probs_from_logits(oof[:n_hard])).mean())
    summary = json.loads((out / "ensemble/ensemble.json").read_text())
    assert summary["rows"] == n_hard
    assert sorted(read_id_table(out / "ensemble/oof_probs.csv")["id"]) == sorted(ids[:n_hard])

    soft_only = tmp_path / "soft_only.jsonl"
    soft_only.write_text(pseudo_file.read_text())
    assert cli.main(["--train", str(soft_only), "--out", str(tmp_path / "refused"), "--quiet"]) == 2
    assert "no battle has a hard label" in caplog.text and "kind 'pseudo_labels'" in caplog.text


def test_convert_command_writes_a_battle_file(tmp_path, caplog):
    from tests.conftest import shared_file

    pandalm = shared_file("external/pandalm_testset_v1.csv")
    out = tmp_path / "pandalm.jsonl"
    assert cli.main(["convert", "--kind", "competition", "--data", str(pandalm), "--source", "pandalm",
                     "--out", str(out), "--quiet"]) == 0
    battles, _ = read_battles(out)
    assert len(battles) == 999 and battles["id"].str.startswith("pandalm:").all()
    assert (battles[LABEL_COLUMNS].sum(axis=1) == 1).all()
    assert cli.main(["convert", "--kind", "competition", "--data", str(pandalm), "--source", "pandalm",
                     "--out", str(out), "--quiet"]) == 2
    assert "exists; pass --overwrite" in caplog.text
    assert cli.main(["convert", "--kind", "scored_answers", "--data", str(pandalm), "--source", "x",
                     "--option", "max_pairs=3", "--out", str(tmp_path / "x.jsonl"), "--quiet"]) == 2
    assert "'max_pairs' is not an option of the 'scored_answers' converter" in caplog.text
