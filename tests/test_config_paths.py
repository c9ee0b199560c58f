"""Paths in a config file resolve from the file's folder; a missing one is refused naming its key."""
from __future__ import annotations

import json

import pytest

import run as cli
from pipeline.config import ConfigError, check_source_paths, load_config


def _config(folder, model="ckpt", source="extra.csv"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.json"
    path.write_text(json.dumps({
        "n_folds": 3,
        "stages": {"length_lr": {"type": "length_lr"}, "enc": {"type": "encoder", "params": {"model": model}}},
        "external": {"sources": [{"kind": "competition", "path": source, "source": "x"}]}}))
    return path


def test_relative_paths_resolve_from_the_config_folder(tmp_path, monkeypatch):
    path = _config(tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    config = load_config(str(path.relative_to(tmp_path)))
    assert config.stages["enc"].params["model"] == str(tmp_path / "configs/ckpt")
    assert config.external.sources[0].path == str(tmp_path / "configs/extra.csv")
    absolute = load_config(str(_config(tmp_path / "b", model="/models/x")))
    assert absolute.stages["enc"].params["model"] == "/models/x"
    # --set values are the command line's: they stay as given (the working directory's)
    assert load_config(str(path), ["stages.enc.params.model=here"]).stages["enc"].params["model"] == "here"


def test_a_missing_path_names_its_key(tmp_path):
    from pipeline.runner import Run, RunError

    config = load_config(str(_config(tmp_path)))
    with pytest.raises(RunError, match=r"^stages\.enc\.params\.model: .*directory not found: .*ckpt; nothing was written"):
        Run(tmp_path / "run", config).check_stage_models(["enc"])
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConfigError, match=r"^external\.sources\.0\.path: .*extra\.csv does not exist"):
        check_source_paths(config)  # the sources always; the stages' checkpoints only for the stages to fit


def test_run_refuses_before_writing(tmp_path, slice_files, caplog):
    path = _config(tmp_path / "cfg")
    out = tmp_path / "run"
    assert cli.main(["--train", str(slice_files / "train.csv"), "--out", str(out), "--config", str(path), "--quiet"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith("stages.enc.params.model: ") and not out.exists()


def test_every_recipe_keeps_the_cpu_stages():
    """README: each recipe in configs/ keeps the CPU stages (the defaults) beside its deep one."""
    from pathlib import Path

    from pipeline.config import DEFAULT_STAGES

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json")):
        stages = load_config(str(path)).stages
        for name, spec in DEFAULT_STAGES.items():
            assert name in stages and stages[name].type == spec["type"], (path.name, name)
