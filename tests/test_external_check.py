"""run.py external-check: a verdict per external source, on battles where the truth is planted.

Target battles: the longer reply wins (mostly). Source "same" follows that rule (and carries five
copies of target battles, which de-duplication must drop); source "flipped" says the shorter reply
wins, so training on it must hurt a length model. The stage is the config's length_lr (fast); the
default stage is LightGBM without TF-IDF.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import run as cli
from battles.columns import LABEL_COLUMNS
from battles.io import battles_to_frame, read_battles
from battles.labels import label_index
from ensemble.coverage import bootstrap_interval, row_log_loss
from ensemble.metrics import probs_from_logits
from pipeline.config import load_config
from pipeline.external_check import check_stage, verdict
from pipeline.rundir import read_logits

WORDS = {"target": ["how", "do", "i", "fix", "python", "code", "error"],
         "same": ["recipe", "bake", "bread", "oven", "flour", "sugar"],
         "flipped": ["poem", "moon", "love", "write", "sonnet", "rhyme"]}


def _battles(n: int, source: str, longer_wins: bool, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        la, lb = rng.integers(1, 60, 2)
        winner = (0 if la > lb else 1) if rng.random() < 0.85 else 2
        if not longer_wins and winner < 2:
            winner = 1 - winner
        rows.append({"id": f"{source}{i}", "prompt": [" ".join(rng.choice(WORDS[source], 8)) + f" {source} {i}"],
                     "response_a": [" ".join(["word"] * int(la))], "response_b": [" ".join(["text"] * int(lb))],
                     **{c: int(winner == j) for j, c in enumerate(LABEL_COLUMNS)}})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    root = tmp_path_factory.mktemp("external_check")
    target = _battles(240, "target", True, 0)
    same = pd.concat([_battles(200, "same", True, 1), target.iloc[:5].assign(id=[f"copy{i}" for i in range(5)])])
    battles_to_frame(target).to_csv(root / "train.csv", index=False)
    battles_to_frame(same).to_csv(root / "same.csv", index=False)
    battles_to_frame(_battles(400, "flipped", False, 2)).to_csv(root / "flipped.csv", index=False)
    config = {"n_folds": 3, "stages": {"len": {"type": "length_lr"}},
              "external": {"sources": [{"kind": "competition", "path": str(root / "same.csv"), "source": "same"},
                                       {"kind": "competition", "path": str(root / "flipped.csv"), "source": "flipped"}],
                           "dedup": {"near": False}}}
    (root / "cfg.json").write_text(json.dumps(config))
    code = cli.main(["external-check", "--train", str(root / "train.csv"), "--config", str(root / "cfg.json"),
                     "--out", str(root / "check"), "--stage", "len", "--quiet"])
    assert code == 0
    return root


def test_check_reports_rows_auc_change_and_verdict(check, capsys):
    result = json.loads((check / "check/external_check.json").read_text())
    rows = {r["setting"]: r for r in result["settings"]}
    assert list(rows) == ["none", "+same", "+flipped", "all"]
    assert rows["+same"]["battles"] == 205 and rows["+same"]["rows_kept"] == 200  # planted copies dropped
    assert rows["+flipped"]["rows_kept"] == 400 and rows["all"]["rows_kept"] == 600
    for s in ("+same", "+flipped"):
        assert rows[s]["auc"] > 0.9  # other words than the target's prompts: easy to tell apart
    # the change and its interval are recomputed from the saved OOF logits of each setting
    train, _ = read_battles(check / "train.csv")
    y = label_index(train)

    def losses(stage_dir):
        return row_log_loss(y, probs_from_logits(read_logits(check / "check/stages" / stage_dir / "oof_logits.csv",
                                                             train["id"].tolist())))

    base = losses("none")
    assert rows["none"]["log_loss"] == pytest.approx(base.mean())
    for setting, stage_dir in (("+same", "_same"), ("+flipped", "_flipped"), ("all", "all")):
        mine = losses(stage_dir)
        assert rows[setting]["delta"] == pytest.approx((mine - base).mean())
        assert rows[setting]["interval"] == pytest.approx(bootstrap_interval(mine, result["seed"], paired_with=base))
        assert rows[setting]["verdict"] == verdict(rows[setting]["interval"], rows[setting]["rows_kept"])
    assert rows["+flipped"]["delta"] > 0.05 and rows["+flipped"]["verdict"] == "drop"
    assert rows["+same"]["delta"] < rows["+flipped"]["delta"]
    table = (check / "check/external_check.txt").read_text()
    assert "+flipped" in table and "drop" in table and "rule: keep if" in table


def test_verdict_rule_and_default_stage(check, caplog):
    assert verdict([-0.02, -0.001], 10) == "keep"
    assert verdict([0.001, 0.02], 10) == "drop"
    assert verdict([-0.01, 0.01], 10) == "down-weight"
    assert verdict([-0.02, -0.01], 0) == "drop"
    name, spec = check_stage(load_config(), None)
    assert spec.type == "lgbm" and [b["type"] for b in spec.params["blocks"]] == ["text_stats", "similarity", "word2vec"]
    assert cli.main(["external-check", "--train", str(check / "train.csv"), "--out", str(check / "none"), "--quiet"]) == 2
    assert "lists no sources" in caplog.text and not (check / "none").exists()
