"""The typed hand-offs of a run: the ensemble record (old files still load and predict), the frozen run
data, a run that others cannot add attributes to, and short parameter lists in pipeline/."""
from __future__ import annotations

import ast
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from ensemble.calibrators import calibrator_from_json
from ensemble.record import FORMAT_VERSION, EnsembleRecord, EnsembleRecordError, StageSetRow
from pipeline.predict import Predictor
from pipeline.rundir import write_probs
from pipeline.rundata import DataKeys, RunData
from tests.conftest import ROOT

# ensemble.json of a run on the shared sample, written before the record had a model and a version
OLD_RECORD = ROOT / "tests" / "fixtures" / "ensemble_before_format_version.json"


def test_an_old_ensemble_json_loads_as_version_1_with_every_figure():
    raw = json.loads(OLD_RECORD.read_text())
    assert "format_version" not in raw
    record = EnsembleRecord.read(OLD_RECORD)
    assert record.format_version == 1 == FORMAT_VERSION
    assert record.stages == ["length_lr", "lgbm_stats", "lgbm_full"] and record.chosen == raw["chosen"]
    assert record.nested_scores.log_loss == raw["nested_scores"]["log_loss"]
    assert record.nested_scores.per_class("accuracy")["tie"] == raw["nested_scores"]["accuracy_tie"]
    assert [m.method for m in record.methods][-1] == "selected (nested over all)"
    assert record.stage_sets[0].minus_chosen_interval is None  # one stage set: no comparison
    assert record.stages_raw["lgbm_full"].n == record.coverage["lgbm_full"]
    # the saved form is the old file's, key for key, plus the version
    saved = record.as_dict()
    assert saved.pop("format_version") == FORMAT_VERSION
    assert saved == raw


def test_an_old_ensemble_json_predicts_as_its_calibrator_did(tmp_path):
    raw = json.loads(OLD_RECORD.read_text())
    record = EnsembleRecord.read(OLD_RECORD)
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(50, 3)) for _ in record.stages]
    before = calibrator_from_json(raw["model"]).predict_proba(logits)
    probs = record.calibrator().predict_proba(logits)
    np.testing.assert_array_equal(probs, before)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    record.save(tmp_path / "ensemble.json")  # and again after a round trip through the saved form
    again = EnsembleRecord.read(tmp_path / "ensemble.json")
    assert again == record and again.key() == record.key()
    np.testing.assert_array_equal(again.calibrator().predict_proba(logits), before)


def test_unreadable_ensemble_json_is_one_line_naming_the_file(tmp_path):
    raw = json.loads(OLD_RECORD.read_text())
    path = tmp_path / "ensemble.json"
    path.write_text(json.dumps({**raw, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(EnsembleRecordError, match=rf"{path}: format version {FORMAT_VERSION + 1} is newer"):
        EnsembleRecord.read(path)
    renamed = {("nested_score" if k == "nested_scores" else k): v for k, v in raw.items()}
    path.write_text(json.dumps(renamed))
    with pytest.raises(EnsembleRecordError, match=rf"{path}: nested_score"):
        EnsembleRecord.read(path)
    path.write_text("{not json")
    with pytest.raises(EnsembleRecordError, match="not a JSON ensemble record"):
        EnsembleRecord.read(path)


def test_stage_set_rows_are_typed_and_closed():
    row = EnsembleRecord.read(OLD_RECORD).stage_sets[0].as_dict()
    assert StageSetRow.model_validate({**row, "common_rows": 10}).common_rows == 10
    with pytest.raises(ValueError, match="extra"):  # a new figure is declared on StageSetRow, not slipped in
        StageSetRow.model_validate({**row, "undeclared_figure": 1.0})


def test_a_run_directory_with_an_old_ensemble_json_predicts_its_submission(slice_files, tmp_path):
    """A run whose ensemble.json has the layout of before the version field: it loads, and predicting the
    run's own test file reproduces its submission byte for byte (a run that fitted its test logits in one
    command: stage logits are held as the run stores them)."""
    import run as cli

    old = tmp_path / "old"
    (tmp_path / "cfg.json").write_text(json.dumps({"n_folds": 3, "stages": {"len": {"type": "length_lr"}},
                                                   "stacker": {"C_grid": [0.1]}}))
    assert cli.main(["--train", str(slice_files / "train.csv"), "--test", str(slice_files / "test.csv"),
                     "--out", str(old), "--config", str(tmp_path / "cfg.json"), "--quiet"]) == 0
    saved = json.loads((old / "ensemble/ensemble.json").read_text())
    del saved["format_version"]  # the layout before the field
    (old / "ensemble/ensemble.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    (old / "ensemble/manifest.json").unlink()  # nor the file manifest (pipeline/manifests.py) of later runs
    predictor = Predictor.load(old, progress=False)
    assert predictor.ensemble.format_version == 1
    test = pd.read_csv(slice_files / "test.csv", dtype={"id": str})
    write_probs(tmp_path / "pred.csv", test["id"], predictor.predict_proba(test))
    assert (tmp_path / "pred.csv").read_bytes() == (old / "submission.csv").read_bytes()


def test_run_data_is_frozen_and_keys_follow_the_tables(arena_battles):
    train = arena_battles.iloc[:40].reset_index(drop=True)
    extra = arena_battles.iloc[40:50].reset_index(drop=True)
    folds = np.arange(40) % 3
    data = RunData(train, folds, DataKeys.of(train, extra=extra), extra=extra)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.folds = folds
    with pytest.raises(ValueError):
        data.folds[0] = 2  # the folds are fixed once
    folds[0] = 2
    assert data.folds[0] == 0  # an own copy
    assert data.keys.test is None and data.keys.extra is not None
    same = data.training_only(extra)
    assert same.keys == data.keys and same.test is None
    other = data.training_only(arena_battles.iloc[50:60])
    assert other.keys.train == data.keys.train and other.keys.extra not in (None, data.keys.extra)
    assert data.training_only(None).keys == DataKeys(data.keys.train)


def test_a_run_is_not_a_bag_of_attributes(tmp_path):
    from pipeline.config import load_config
    from pipeline.runner import Run

    run = Run(tmp_path / "run", load_config(), progress=False)
    with pytest.raises(AttributeError):
        run.converted_sources = []  # what a run holds is declared on it


def _parameters(function: ast.FunctionDef, method: bool) -> int:
    args = function.args
    n = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + (args.vararg is not None) + \
        (args.kwarg is not None)
    return n - 1 if method and not any(getattr(d, "id", None) == "staticmethod" for d in function.decorator_list) else n


def test_no_pipeline_function_takes_more_than_six_parameters():
    """What a caller passes (self and cls aside, keyword-only ones counted): more than six says a
    hand-off wants a type of its own (RunData, StageFit, EnsembleRecord)."""
    long = []
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if _parameters(node, id(node) in methods) > 6:
                    long.append(f"{path.name}:{node.lineno} {node.name}")
    assert not long, long


def test_the_report_lists_every_repair_counter():
    from battles.io import RepairReport
    from pipeline.report import repair_rows

    @dataclasses.dataclass
    class WithNewCounter(RepairReport):
        new_counter: int = 0

    [today] = repair_rows({"train": RepairReport(file="t.csv", rows=3, null_turns=1, soft_labelled=2)})
    assert today == {"file": "train: t.csv", "rows": 3, "null_turns": 1, "lone_surrogates": 0, "empty_replies": 0,
                     "empty_prompts": 0, "multi_turn_battles": 0, "soft_labelled": 2}
    [grown] = repair_rows({"test": WithNewCounter(file="x.csv", new_counter=5)})
    assert grown["new_counter"] == 5  # a counter added to the reader reaches the report by itself
