"""Training labels that cannot support a 3-class model are refused before any fitting, in one line a user
understands, leaving nothing behind (issue 21): one outcome only, an outcome missing or nearly missing,
fewer battles of an outcome than folds, fewer battles than folds."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import run as cli
from battles.columns import LABEL_COLUMNS
from battles.labels import label_support_problem

LIGHT = {"n_folds": 3, "stages": {"length_lr": {"type": "length_lr"}}, "stacker": {"C_grid": [0.1]}}


def _labelled(classes, soft=None) -> pd.DataFrame:
    frame = pd.DataFrame(np.eye(3)[classes], columns=LABEL_COLUMNS)
    if soft is not None:
        for c, values in zip(("soft_a", "soft_b", "soft_tie"), np.asarray(soft, dtype=float).T):
            frame[c] = values
    return frame


@pytest.mark.parametrize("classes, n_folds, expected", [
    ([2] * 30, 3, "every labelled battle has the same outcome (winner_tie)"),
    ([0] * 30, 5, "every labelled battle has the same outcome (winner_model_a)"),
    ([0] * 20 + [1] * 10, 3, "no battle has the outcome winner_tie"),
    ([0] * 20 + [1] * 10 + [2], 3, "too few battles have the outcome winner_tie"),
    ([0, 0, 1, 1, 2], 3, "too few battles have the outcome winner_model_a or winner_model_b or winner_tie"),
    ([0] * 4 + [1] * 4 + [2] * 4, 5, "too few battles have the outcome winner_model_a or winner_model_b or winner_tie"),
])
def test_unsupportable_labels_are_named(classes, n_folds, expected):
    problem = label_support_problem(_labelled(classes), n_folds)
    assert problem is not None and expected in problem, problem
    counts = np.bincount(classes, minlength=3)
    assert f"{len(classes)} battles: winner_model_a {counts[0]}, winner_model_b {counts[1]}, winner_tie {counts[2]}" \
        in problem
    assert f"at least n_folds={n_folds} battles" in problem and "\n" not in problem


def test_every_outcome_at_least_n_folds_times_is_enough():
    assert label_support_problem(_labelled([0] * 3 + [1] * 3 + [2] * 3), 3) is None
    assert label_support_problem(_labelled([0] * 50 + [1] * 45 + [2] * 5), 5) is None
    assert label_support_problem(_labelled([0] * 50 + [1] * 45 + [2] * 4), 5) is not None


def test_soft_labels_count_for_the_outcome_they_favour():
    soft = [[np.nan] * 3] * 6 + [[0.2, 0.2, 0.6]] * 3  # three rows whose soft label favours a tie
    frame = _labelled([0] * 3 + [1] * 3 + [0] * 3, soft=soft)
    assert label_support_problem(frame, 3) is None
    soft = [[np.nan] * 3] * 6 + [[0.6, 0.2, 0.2]] * 3
    assert "no battle has the outcome winner_tie" in label_support_problem(_labelled([0] * 3 + [1] * 3 + [2] * 3,
                                                                                     soft=soft), 3)


# -- end to end: refused in one line, exit 2, the run directory never made ---------------------------------
def _outcomes(frame: pd.DataFrame, classes) -> pd.DataFrame:
    out = frame.copy()
    out[LABEL_COLUMNS] = np.eye(3, dtype=int)[classes].astype(str)
    return out


@pytest.mark.parametrize("case, expected", [
    ("all_ties", "every labelled battle has the same outcome (winner_tie)"),
    ("no_ties", "no battle has the outcome winner_tie"),
    ("one_tie", "too few battles have the outcome winner_tie"),
    ("five_rows", "5 battles: "),
])
def test_run_refuses_before_writing(case, expected, arena_frame, tmp_path, caplog):
    rows = arena_frame.iloc[:60]
    y = np.arange(60) % 2
    classes = {"all_ties": np.full(60, 2), "no_ties": y, "one_tie": np.r_[2, y[1:]], "five_rows": [0, 1, 2, 0, 1]}[case]
    train = _outcomes(rows.iloc[:len(classes)], classes)
    train.to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "light.json").write_text(json.dumps(LIGHT))
    out = tmp_path / "run"
    code = cli.main(["--train", str(tmp_path / "train.csv"), "--out", str(out), "--config",
                     str(tmp_path / "light.json"), "--quiet"])
    assert code == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.startswith(f"{tmp_path / 'train.csv'}: the labels cannot support a 3-class model on 3 folds: ")
    assert expected in error, error
    assert not out.exists()
