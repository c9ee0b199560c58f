"""Prediction choices and checks of the decoder: an 8-bit base at prediction after training at 4 bits
(``predict_quantization``), and the finite check on every predicted logit."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.decoder import DecoderStage
from models.deep import quantization
from models.deep.stage import NonFiniteLogitsError, check_finite
from tests.test_decoder import FAST, QUIET, gemma_dir, toy_battles  # noqa: F401  (session-wide tiny Gemma-2)


def _load_as(directory, predict_quantization):
    meta = json.loads((directory / "stage.json").read_text())
    meta["params"]["predict_quantization"] = predict_quantization
    (directory / "stage.json").write_text(json.dumps(meta))
    return DecoderStage.load(directory, QUIET)


def test_trained_at_4bit_predicts_from_an_8bit_base(gemma_dir, tmp_path):  # noqa: F811
    battles = toy_battles(8)
    stage = DecoderStage({"model": str(gemma_dir), **FAST, "quantization": "4bit", "predict_quantization": "8bit",
                          "max_steps": 3, "max_length": 192}, QUIET).fit(battles)
    base = stage.model.get_base_model()
    assert quantization.quantized_layers(base) == {"Linear8bitLt": 14}  # 7 projections x 2 layers, now 8-bit
    eight = stage.predict_logits(battles)
    assert np.isfinite(eight).all()
    stage.save(tmp_path / "s")
    reloaded = DecoderStage.load(tmp_path / "s", QUIET)
    assert quantization.quantized_layers(reloaded.model.get_base_model()) == {"Linear8bitLt": 14}
    np.testing.assert_allclose(reloaded.predict_logits(battles), eight, atol=1e-4)
    # the same adapter on the unquantised base and on the 4-bit one: 8 bits are the closer to full precision
    full = _load_as(tmp_path / "s", "none").predict_logits(battles)
    four = _load_as(tmp_path / "s", "4bit").predict_logits(battles)
    assert np.abs(eight - full).mean() < np.abs(four - full).mean()
    # a next fold (refit on the same object) trains again and again predicts from an 8-bit base
    stage.fit(battles)
    assert quantization.quantized_layers(stage.model.get_base_model()) == {"Linear8bitLt": 14}


def test_non_finite_logits_are_one_line_naming_the_stage_and_the_fp16_rule(gemma_dir):  # noqa: F811
    with pytest.raises(NonFiniteLogitsError, match=r"^decoder: 1 of 3 battles got NaN/inf logits at precision fp16 "
                                                   r"\(first row 1\); .*The fp16 rule"):
        check_finite(np.array([[0.0, 1, 2], [np.nan, 0, 0], [1, 2, 3]]), "decoder", "fp16")
    check_finite(np.zeros((2, 3)), "decoder", "fp16")
    stage = DecoderStage({"model": str(gemma_dir), **FAST, "quantization": "none", "max_steps": 1,
                          "max_length": 192}, QUIET).fit(toy_battles(4))
    with torch.no_grad():
        for name, p in stage.model.named_parameters():
            if "modules_to_save" in name and name.endswith("weight"):
                p.fill_(float("inf"))
    with pytest.raises(NonFiniteLogitsError, match=r"^decoder: 4 of 4 battles got NaN/inf logits at precision fp32"):
        stage.predict_logits(toy_battles(4))
