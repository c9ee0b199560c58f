"""Shared fixtures: paths to the real data in ../shared, and small slices of it.

Outside CI a missing ../shared skips the tests that need it, with the reason; under CI (CI=true)
a missing file is a failure, so nothing is skipped silently where it matters.
"""
from __future__ import annotations

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
