"""Safe by default: every failure a new user met (issue 11), each through the command line.

A user's mistake ends in one line naming the file/row/column or the config key and where it came
from, exit code 2, and no file of the user's changed; Ctrl-C ends with exit code 130 and a note on
resuming; the data cannot support the score -> a loud warning, in the log and in the report.
"""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from battles.io import BattleDataError, read_battles
from tests.cli_helpers import logged_errors, run_quiet, snapshot  # noqa: E402

LIGHT = {"n_folds": 3, "stages": {"length_lr": {"type": "length_lr"}}, "stacker": {"C_grid": [0.1]}}


@pytest.fixture
def light(slice_files, tmp_path):
    path = tmp_path / "light.json"
    path.write_text(json.dumps(LIGHT))
    return {"train": str(slice_files / "train.csv"), "test": str(slice_files / "test.csv"), "config": str(path)}


_main, _snapshot, _errors = run_quiet, snapshot, logged_errors


# -- data loss ----------------------------------------------------------------------------------
def test_out_holding_a_users_files_is_refused_untouched(light, tmp_path, caplog):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, text in {"submission.csv": "my own", "report.html": "<p>mine</p>", "plot.png": "not a png"}.items():
        (mine / name).write_text(text)
    before = _snapshot(mine)
    assert _main("--train", light["train"], "--out", mine, "--config", light["config"]) == 2
    assert _snapshot(mine) == before
    [error] = _errors(caplog)
    assert "not empty and not a run directory" in error and "nothing was written" in error


def test_folder_with_an_unrelated_folds_csv_is_refused_before_any_write(light, tmp_path, caplog):
    other = tmp_path / "other"
    other.mkdir()
    (other / "folds.csv").write_text("id,fold\nx,0\n")
    assert _main("--train", light["train"], "--out", other, "--config", light["config"]) == 2
    assert sorted(p.name for p in other.iterdir()) == ["folds.csv"]  # no data_report.json, nothing


def test_out_naming_a_file_is_one_line(light, tmp_path, caplog):
    target = tmp_path / "notes.txt"
    target.write_text("keep")
    assert _main("--train", light["train"], "--out", target, "--config", light["config"]) == 2
    assert target.read_text() == "keep"
    assert [e for e in _errors(caplog) if "is a file" in e]


def test_run_of_other_training_data_is_refused(light, arena_frame, tmp_path, caplog):
    out = tmp_path / "run"
    assert _main("--train", light["train"], "--out", out, "--config", light["config"]) == 0
    other = tmp_path / "other.csv"
    arena_frame.iloc[400:700].to_csv(other, index=False)
    before = _snapshot(out)
    assert _main("--train", other, "--out", out, "--config", light["config"]) == 2
    assert "made for different training data" in _errors(caplog)[0]
    assert _snapshot(out) == before


# -- config: typos and wrong types are errors naming where they came from -------------------------
@pytest.mark.parametrize("setting, message", [
    ("n_fold=3", "--set n_fold=3: unknown key 'n_fold'; did you mean 'n_folds'?"),
    ("n_folds=2", "--set n_folds=2: n_folds: Input should be greater than or equal to 3"),
    ("stages.length_lr.params.C=strong", "--set stages.length_lr.params.C=strong: stages.length_lr.params.C: "
                                          "Input should be a valid number"),
    ("stages.lgbm.params.lgb.learnig_rate=0.1", "'learnig_rate' is not a LightGBM parameter; did you mean "
                                                 "'learning_rate'?"),
    ("stages.lenght_lr.params.C=2", "stage 'lenght_lr' has no 'type'; did you mean 'length_lr'?"),
])
def test_set_mistakes_name_the_set(light, slice_files, tmp_path, caplog, setting, message):
    out = tmp_path / "run"
    config = slice_files / "config.json" if "lgbm" in setting else light["config"]
    assert _main("--train", light["train"], "--out", out, "--config", config, "--set", setting) == 2
    [error] = _errors(caplog)
    assert message in error, error
    assert not out.exists()


def test_config_file_mistakes_name_the_file_and_key(light, tmp_path, caplog):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**LIGHT, "stacker": {"C_gird": [1.0]}}))
    assert _main("--train", light["train"], "--out", tmp_path / "run", "--config", bad) == 2
    assert f"{bad}: unknown key 'stacker.C_gird'; did you mean 'C_grid'?" in _errors(caplog)[0]
    bad.write_text('{"n_folds": 3,}')
    assert _main("--train", light["train"], "--out", tmp_path / "run", "--config", bad) == 2
    assert f"{bad}: not valid JSON (line 1" in _errors(caplog)[-1]


def test_saved_config_records_every_default(light, tmp_path):
    out = tmp_path / "run"
    assert _main("--train", light["train"], "--out", out, "--config", light["config"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["stages"]["length_lr"]["params"] == {"C": 1.0}  # the resolved default, not {}
    assert saved["seed"] == 42 and saved["external"]["dedup"]["threshold"] == 0.8



def test_default_config_resolves_stage_params_without_any_layer():
    """The bare defaults (no file, no --set) resolve every stage's params too, so a plain run hashes
    them into its resume keys exactly like a run given the same values explicitly."""
    from pipeline.config import load_config

    bare, explicit = load_config(), load_config(sets=["seed=42"])
    assert bare.as_dict() == explicit.as_dict()
    assert bare.stages["lgbm_full"].params["blocks"][2]["params"]["svd_components"] == 32


# -- ids are text -------------------------------------------------------------------------------
def test_ids_that_look_missing_are_text(arena_frame, tmp_path):
    train = arena_frame.iloc[:240].copy()
    train.loc[3, "id"], train.loc[7, "id"] = "NaN", "null"
    test = arena_frame.iloc[240:250][["id", "prompt", "response_a", "response_b"]].copy()
    test["id"] = ["NA", "None", "nan", "N/A", "x1", "x2", "x3", "x4", "x5", "x6"]
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "light.json").write_text(json.dumps(LIGHT))
    assert _main("--train", tmp_path / "train.csv", "--test", tmp_path / "test.csv", "--out", tmp_path / "run",
                 "--config", tmp_path / "light.json") == 0
    sub = pd.read_csv(tmp_path / "run" / "submission.csv", dtype=str, keep_default_na=False)
    assert sub["id"].tolist() == test["id"].tolist()
    folds = pd.read_csv(tmp_path / "run" / "folds.csv", dtype=str, keep_default_na=False)
    assert {"NaN", "null"} <= set(folds["id"])


def test_id_problems_are_caught_before_training(arena_frame, tmp_path):
    frame = arena_frame.head(10).copy()
    frame.loc[4, "id"] = "  "
    frame.to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(BattleDataError, match=r"blank.csv, row 5, column 'id': empty id"):
        read_battles(tmp_path / "blank.csv")
    records = [json.loads(r) for r in arena_frame.head(3).to_json(orient="records", lines=True).splitlines()]
    records[1]["id"] = None
    records[2]["id"] = 7.5
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n")
    with pytest.raises(BattleDataError, match=r"row 2, column 'id': empty id"):
        read_battles(tmp_path / "ids.jsonl")
    (tmp_path / "ids.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps(records[2]) + "\n")
    with pytest.raises(BattleDataError, match=r"row 2, column 'id': id must be text or an integer, got 7.5"):
        read_battles(tmp_path / "ids.jsonl")
    parquet = arena_frame.head(4).copy()
    parquet["id"] = [10, 11, 12, 13]
    parquet.to_parquet(tmp_path / "ints.parquet")
    assert read_battles(tmp_path / "ints.parquet")[0]["id"].tolist() == ["10", "11", "12", "13"]


# -- messages that help -------------------------------------------------------------------------
def test_latin1_csv_names_the_row_and_how_to_reencode(arena_frame, tmp_path, caplog):
    frame = arena_frame.head(12).copy()
    frame.loc[8, "response_a"] = json.dumps(["Un café, s'il vous plaît"], ensure_ascii=False)
    path = tmp_path / "latin.csv"
    frame.to_csv(path, index=False, encoding="latin-1")
    with pytest.raises(BattleDataError, match=r"latin.csv, line \d+, row 9, column 'response_a': the cell is not UTF-8"):
        read_battles(path)
    assert _main("--train", path, "--out", tmp_path / "run") == 2
    assert "iconv -f latin1 -t utf-8" in _errors(caplog)[0]


def test_jsonl_error_names_the_line(arena_frame, tmp_path):
    lines = arena_frame.head(5).to_json(orient="records", lines=True).splitlines()
    lines[2] = lines[2][:-5]  # a cut line
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BattleDataError, match=r"cut.jsonl, line 3: not a JSON object"):
        read_battles(path)


def test_directory_and_extensionless_inputs(tmp_path, caplog):
    assert _main("--train", tmp_path, "--out", tmp_path / "run") == 2
    assert f"{tmp_path}: is a directory; expected a battle file" in _errors(caplog)[0]
    (tmp_path / "train").write_text("id\n1\n")
    with pytest.raises(BattleDataError, match="no file extension: battle files are"):
        read_battles(tmp_path / "train")


def test_predict_out_naming_a_directory_with_overwrite(finished_run, slice_files, tmp_path, caplog):
    folder = tmp_path / "preds"
    folder.mkdir()
    assert _main("predict", "--run", finished_run, "--test", slice_files / "test.csv", "--out", folder,
                 "--overwrite") == 2
    assert f"{folder}: is a directory" in _errors(caplog)[0]
    assert _main("predict", "--run", tmp_path, "--test", slice_files / "test.csv", "--out", tmp_path / "p.csv") == 2
    assert "not a run directory" in _errors(caplog)[-1]


# -- Ctrl-C -------------------------------------------------------------------------------------
def test_interrupt_says_what_finished_and_the_rerun_resumes(light, tmp_path, caplog, monkeypatch):
    from models.length_baseline import LengthLogisticStage

    fit, calls = LengthLogisticStage.fit, []

    def interrupted_fit(self, train, valid=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(self, train, valid)

    monkeypatch.setattr(LengthLogisticStage, "fit", interrupted_fit)
    out = tmp_path / "run"
    assert _main("--train", light["train"], "--out", out, "--config", light["config"]) == 130
    [error] = _errors(caplog)
    assert "interrupted" in error and "length_lr (fold0 done)" in error
    assert "Run the same command again to resume" in error
    done = out / "stages" / "length_lr" / "fold0" / "done.json"
    stamp = os.stat(done).st_mtime_ns
    monkeypatch.setattr(LengthLogisticStage, "fit", fit)
    assert _main("--train", light["train"], "--out", out, "--config", light["config"]) == 0
    assert os.stat(done).st_mtime_ns == stamp  # fold 0 reused, not refitted
    assert (out / "ensemble" / "ensemble.json").exists()


# -- warnings when the data cannot support the score -----------------------------------------------
def test_empty_prompts_give_lopsided_folds_and_loud_warnings(arena_frame, tmp_path, caplog):
    frame = arena_frame.iloc[:300].copy()
    frame.loc[frame.index[:200], "prompt"] = [json.dumps([""] * len(json.loads(p))) for p in frame["prompt"].iloc[:200]]
    frame.to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "light.json").write_text(json.dumps(LIGHT))
    assert _main("--train", tmp_path / "train.csv", "--out", tmp_path / "run", "--config", tmp_path / "light.json") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("lopsided folds" in w for w in warnings)
    assert any("have an empty prompt" in w for w in warnings)
    summary = json.loads((tmp_path / "run" / "ensemble" / "ensemble.json").read_text())
    assert any("lopsided folds" in w for w in summary["warnings"])
    page = (tmp_path / "run" / "report.html").read_text()
    assert '<div class="warnings">' in page and "lopsided folds" in page


def test_score_warnings_name_the_stage_and_the_prior():
    from ensemble.record import EnsembleRecord
    from pipeline.checks import score_warnings
    from tests.conftest import ROOT

    saved = EnsembleRecord.read(ROOT / "tests/fixtures/ensemble_before_format_version.json").as_dict()
    record = EnsembleRecord.model_validate({
        **saved, "prior_log_loss": 1.09, "rows": 300, "nested_scores": {"log_loss": 1.12, "accuracy": 0.4, "n": 300},
        "stages_raw": {"good": {"log_loss": 1.03, "accuracy": 0.5, "n": 300},
                       "bad": {"log_loss": 1.15, "accuracy": 0.3, "n": 100}}})
    warnings = score_warnings(record)
    assert len(warnings) == 2
    assert "final ensemble (1.1200" in warnings[0] and "stage bad (1.1500" in warnings[1]


def test_test_file_unlike_training_is_flagged():
    from flywheel.converters import convert
    from pipeline.checks import SHIFT_AUC, prompt_shift_auc
    from tests.conftest import shared_file

    arena, _ = read_battles(shared_file("arena/train_sample.csv"))
    hh, _ = convert("competition", shared_file("external/hh_rlhf_harmless_base_test.csv"), source="hh")
    assert prompt_shift_auc(arena.iloc[:600], hh.iloc[:600], seed=0) > SHIFT_AUC
    assert prompt_shift_auc(arena.iloc[:600], arena.iloc[600:1200], seed=0) < 0.65
