"""Per-run truncation figures: a deep stage keeps what packing cut of its training battles beside its
saved weights (``inputs.json``), cross-fitting puts them in the stage's ``metrics.json`` (per fitted
model and all folds together), and the run report shows them."""
from __future__ import annotations

import numpy as np
import pandas as pd

from models.decoder import DecoderStage
from models.packing import merge_truncation, summarize_truncation, Truncation
from pipeline.report import truncation_section
from pipeline.results import StageResult
from tests.test_decoder import FAST, QUIET, gemma_dir  # noqa: F401  (the session-wide tiny Gemma-2 fixture)

FIELDS = ("prompt", "response_a", "response_b")


def _record(tokens, cut, dropped) -> Truncation:
    return Truncation(dict(zip(FIELDS, tokens)), dict(zip(FIELDS, cut)), dict(zip(FIELDS, dropped)))


def test_merge_equals_the_summary_of_all_battles():
    a = [_record((5, 10, 20), (False, True, False), (0, 1, 0)), _record((7, 3, 9), (True, False, False), (2, 0, 0))]
    b = [_record((1, 30, 2), (False, True, True), (0, 0, 3))]
    merged, whole = merge_truncation([summarize_truncation(a), summarize_truncation(b)]), summarize_truncation(a + b)
    assert merged.keys() == whole.keys()
    for field in FIELDS:
        for key, value in whole[field].items():
            assert np.isclose(merged[field][key], value), (field, key)


def test_saved_stage_keeps_its_truncation_figures(gemma_dir, tmp_path):  # noqa: F811
    long = "The capital of France is Paris. " * 60
    battles = pd.DataFrame({"id": ["0", "1", "2", "3"], "prompt": [["short?"], ["q?"], ["again?"], ["x?"]],
                            "response_a": [[long], ["ok"], [long], ["fine"]],
                            "response_b": [["no"], ["yes"], ["maybe"], ["sure"]],
                            "winner_model_a": [1, 0, 0, 1], "winner_model_b": [0, 1, 0, 0], "winner_tie": [0, 0, 1, 0]})
    stage = DecoderStage({"model": str(gemma_dir), **FAST, "quantization": "none", "max_steps": 1,
                          "max_length": 192}, QUIET).fit(battles)
    stage.save(tmp_path / "m")
    figures = DecoderStage.saved_figures(tmp_path / "m")
    summary = figures["truncation"]
    assert summary == stage.fit_truncation and summary["battles"] == 4
    assert summary["response_a"]["share_cut"] == 0.5 and summary["response_b"]["share_cut"] == 0.0
    assert DecoderStage.saved_figures(tmp_path) == {}  # no inputs.json: no figures
    result = StageResult("dec", np.zeros((4, 3)), np.ones(4, bool), None,
                         {"truncation": {"per_model": {"fold 0": summary}, "folds": summary}}, None, "k")
    html = truncation_section({"dec": result, "other": StageResult("lgbm", np.zeros((4, 3)), np.ones(4, bool), None,
                                                                    {}, None, "k")})
    assert 'id="truncation"' in html and html.count("<tr>") == 4  # header + one row per field of the one deep stage
    assert "50.0%" in html and "lgbm" not in html
    assert truncation_section({}) == ""


def test_cpu_fit_projects_its_cost_and_warns_above_the_threshold(gemma_dir, caplog, monkeypatch):  # noqa: F811
    import logging

    from models.deep import training

    monkeypatch.setattr(training.CostProjection, "WARN_MINUTES", 0.0)
    battles = pd.DataFrame({"id": [str(i) for i in range(8)], "prompt": [["q?"]] * 8, "response_a": [["a"]] * 8,
                            "response_b": [["b"]] * 8, "winner_model_a": [1, 0] * 4, "winner_model_b": [0, 1] * 4,
                            "winner_tie": [0] * 8})
    with caplog.at_level(logging.INFO, logger="models.deep.training"):
        stage = DecoderStage({"model": str(gemma_dir), **FAST, "quantization": "none", "max_steps": 5,
                              "train_batch_size": 2, "max_length": 192}, QUIET).fit(battles)
    projected = [r.getMessage() for r in caplog.records if "projected" in r.getMessage()]
    assert len(projected) == 1 and "5 optimizer steps" in projected[0] and "on cpu" in projected[0]
    assert 0 < stage.cost.projected_minutes < 30
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "on CPU" in r.getMessage()]
    assert len(warned) == 1 and "lower max_steps" in warned[0].getMessage()


def test_cross_fitting_puts_every_models_figures_in_metrics(tmp_path):
    """``StageFit._truncation``: each fitted model's ``inputs.json`` (as ``DeepStage.save`` writes it) per
    model, and the folds merged; nothing for models without one."""
    import json
    from types import SimpleNamespace

    from pipeline.crossfit import StageFit
    from pipeline.rundir import StageDir

    a = summarize_truncation([_record((5, 10, 20), (False, True, False), (0, 1, 0))])
    b = summarize_truncation([_record((7, 3, 9), (True, False, False), (2, 0, 0))] * 3)
    stage_dir = StageDir(tmp_path / "dec")
    for k, summary in ((0, a), (1, b)):
        model = stage_dir.fold(k).model
        model.mkdir(parents=True)
        (model / "inputs.json").write_text(json.dumps({"max_length": 256, "training_battles": summary}))
    stage_dir.fold(2).model.mkdir(parents=True)  # a model without the file (e.g. saved by an older version)
    fit = SimpleNamespace(spec=SimpleNamespace(type="decoder", refit_full=False), plan=[0, 1, 2], dir=stage_dir)
    figures = StageFit._truncation(fit)
    assert figures["per_model"] == {"fold 0": a, "fold 1": b}
    assert figures["folds"] == merge_truncation([a, b]) and figures["folds"]["battles"] == 4
    assert figures["folds"]["prompt"]["share_cut"] == 0.75
    lgbm = SimpleNamespace(spec=SimpleNamespace(type="lgbm", refit_full=False), plan=[0, 1], dir=stage_dir)
    assert StageFit._truncation(lgbm) == {}  # LightGBM keeps no such figures
