"""The stage contract (models/contract.py) on every stage type, and on toy stages that break it.

The deep stages run on the tiny random checkpoints of tests/tiny_models.py (the decoder unquantised
and in 4-bit NF4, the real bitsandbytes path on CPU) with two optimizer steps: each stage well under a
minute on CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from battles.labels import label_matrix
from kernel.context import StageContext
from models.contract import CHECKS, StageContractError, check_stage
from models.stage import STAGE_TYPES, Stage, StageFileError
from tests.conftest import FAST_CONFIG
from tests.test_decoder import FAST as DECODER_FAST
from tests.test_decoder import gemma_dir  # noqa: F401  (the session-wide tiny Gemma-2 fixture)
from tests.tiny_models import build_deberta


@pytest.fixture(scope="module")
def battles(arena_battles):
    return arena_battles.iloc[:48].reset_index(drop=True)


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory):
    return build_deberta(tmp_path_factory.mktemp("tiny-deberta"))


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, several times so on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_stage_type_is_covered():
    assert {"lgbm", "length_lr", "encoder", "decoder"} == set(STAGE_TYPES)


@pytest.mark.parametrize("kind", ["length_lr", "lgbm"])
def test_feature_stages_honour_the_contract(kind, battles):
    spec = FAST_CONFIG["stages"][kind]
    assert check_stage(spec["type"], battles, spec.get("params")) == {c: "ok" for c in CHECKS}


def test_encoder_honours_the_contract(battles, deberta_dir, one_thread):
    params = {"model": str(deberta_dir), "max_length": 64, "max_steps": 2, "train_batch_size": 8,
              "predict_batch_size": 8, "eval_steps": 1, "save_steps": 0}
    assert check_stage("encoder", battles.iloc[:16], params) == {c: "ok" for c in CHECKS}


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_decoder_honours_the_contract(quantization, battles, gemma_dir, one_thread):  # noqa: F811
    params = {"model": str(gemma_dir), **DECODER_FAST, "max_length": 192, "max_steps": 2,
              "quantization": quantization}
    assert check_stage("decoder", battles.iloc[:16], params) == {c: "ok" for c in CHECKS}


def test_one_order_deep_stage_skips_only_swap_equivariance(battles, deberta_dir, one_thread):
    params = {"model": str(deberta_dir), "max_length": 64, "max_steps": 1, "swap_tta": False, "save_steps": 0}
    results = check_stage("encoder", battles.iloc[:12], params)
    assert results["swap"].startswith("skipped") and results["orders"].startswith("skipped")
    assert all(results[c] == "ok" for c in CHECKS if c not in ("swap", "orders"))


# ---------------------------------------------------------------------------- toy stages: pass and fail
class PriorStage(Stage):
    """The smallest stage that honours the contract: the training battles' class prior, for every battle."""

    kind = "prior"

    def fit(self, train, valid=None):
        self.prior = label_matrix(train).mean(axis=0)
        return self

    def predict_one_order(self, battles):
        return np.tile(np.log(self.prior), (len(battles), 1))

    def save(self, directory):
        self.write_stage_json(directory, prior=self.prior)

    @classmethod
    def load(cls, directory, context=None):
        meta = cls.read_stage_json(directory)
        stage = cls(meta["params"], context)
        stage.prior = np.array(meta["prior"])
        return stage


class Forgetful(PriorStage):
    @classmethod
    def load(cls, directory, context=None):
        stage = cls(cls.read_stage_json(directory)["params"], context)
        stage.prior = np.full(3, 1 / 3)  # the fitted prior is lost
        return stage


class OwnReader(PriorStage):
    @classmethod
    def load(cls, directory, context=None):
        import json

        meta = json.loads((directory / "stage.json").read_text())  # its own reader, its own error
        stage = cls(meta["params"], context)
        stage.prior = np.array(meta["prior"])
        return stage


class FirstOrderOnly(PriorStage):
    """Answers from the given order only (position bias kept) yet declares nothing: the base default of
    two passes per battle promises swap TTA, which the contract then checks."""

    def predict_logits(self, battles):
        logits = self.predict_one_order(battles)
        logits[:, 0] += 1.0  # favours the first reply
        return logits


def test_minimal_stage_passes_and_its_save_uses_the_one_stage_json(battles, tmp_path):
    results = check_stage(PriorStage, battles.iloc[:12], directory=tmp_path / "prior")
    assert results == {c: "ok" for c in CHECKS}
    assert PriorStage.read_stage_json(tmp_path / "prior")["kind"] == "prior"


@pytest.mark.parametrize("stage, check", [(Forgetful, "save_load"), (OwnReader, "missing"),
                                          (FirstOrderOnly, "swap")])
def test_broken_stages_fail_the_check_that_names_them(stage, check, battles):
    with pytest.raises(StageContractError, match=f"'prior' \\({stage.__name__}\\): {check}:"):
        check_stage(stage, battles.iloc[:12])


def test_stage_json_errors_are_one_clear_kind(tmp_path):
    from models.length_baseline import LengthLogisticStage

    with pytest.raises(StageFileError, match="stage.json: not found; expected a saved 'length_lr' stage"):
        LengthLogisticStage.read_stage_json(tmp_path)
    (tmp_path / "stage.json").write_text("{not json")
    with pytest.raises(StageFileError, match="stage.json: unreadable"):
        LengthLogisticStage.read_stage_json(tmp_path)
    PriorStage({}, StageContext()).write_stage_json(tmp_path)
    with pytest.raises(StageFileError, match="holds a saved 'prior' stage; expected a saved 'length_lr' stage"):
        LengthLogisticStage.load(tmp_path)
