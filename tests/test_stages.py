"""LightGBM and length-baseline stages: swap equivariance, save/load, soft labels and weights."""
from __future__ import annotations

import numpy as np
import pytest

from battles.labels import swap_battles, swap_columns
from models.stage import StageContext, make_stage, stage_class
from tests.conftest import FAST_CONFIG


@pytest.fixture(scope="module")
def split(arena_battles):
    return arena_battles.iloc[:240], arena_battles.iloc[240:320]


@pytest.mark.parametrize("name", ["lgbm", "length_lr"])
def test_stage_contract(name, split, tmp_path):
    spec = FAST_CONFIG["stages"][name]
    train, valid = split
    ctx = StageContext(resource_dir=tmp_path / "res")
    stage = make_stage(spec["type"], spec.get("params"), ctx)
    stage.prepare(train.drop(columns=["winner_model_a", "winner_model_b", "winner_tie"]))
    stage.fit(train, valid)
    logits = stage.predict_logits(valid)
    assert logits.shape == (len(valid), 3) and np.isfinite(logits).all()
    # exactly swap-equivariant thanks to swap TTA
    np.testing.assert_allclose(stage.predict_logits(swap_battles(valid)), swap_columns(logits), atol=1e-9)
    stage.save(tmp_path / "model")
    again = stage_class(spec["type"]).load(tmp_path / "model", ctx)
    np.testing.assert_allclose(again.predict_logits(valid), logits, atol=1e-9)


def test_lgbm_learns_from_soft_labels_and_weights(split, tmp_path):
    train, valid = split
    params = FAST_CONFIG["stages"]["lgbm"]["params"] | {"blocks": [{"type": "text_stats"}]}
    hard = make_stage("lgbm", params, StageContext(resource_dir=tmp_path)).fit(train, valid)
    soft = train.copy()
    # a teacher that calls most battles a tie (swap-invariant, so TTA keeps it): the student follows
    soft["soft_a"], soft["soft_b"], soft["soft_tie"] = 0.1, 0.1, 0.8
    student = make_stage("lgbm", params | {"swap_augment": False}, StageContext(resource_dir=tmp_path)).fit(soft, None)
    assert np.exp(student.predict_logits(valid))[:, 2].mean() > 0.6
    assert np.exp(hard.predict_logits(valid))[:, 2].mean() < 0.45
    zero = train.copy()
    zero["weight"] = np.where(train["winner_tie"] == 1, 0.0, 1.0)  # weight 0 on every tie
    no_tie = make_stage("lgbm", params, StageContext(resource_dir=tmp_path)).fit(zero, None)
    assert np.exp(no_tie.predict_logits(valid))[:, 2].mean() < 0.1


def test_single_order_predictions_only_where_the_stage_gives_them(arena_battles):
    from models.stage import Stage, combine_orders, predict_with_orders

    battles = arena_battles.head(12)
    length = battles["response_a"].map(lambda t: len(t[0])).to_numpy(dtype=float)

    class OneOrder(Stage):  # a position-biased toy: always favours the first reply
        def predict_one_order(self, b):
            return np.column_stack([np.ones(len(b)), np.zeros(len(b)), 0.5 * (length[: len(b)] % 2)])

    class OwnTTA(OneOrder):  # a stage that writes its own predict_logits (e.g. a deep stage)
        def predict_logits(self, b):
            return combine_orders(self.predict_one_order(b), self.predict_one_order(swap_battles(b)))

    logits, straight, swapped = predict_with_orders(OneOrder(), battles)
    one = OneOrder()
    np.testing.assert_allclose(logits, combine_orders(one.predict_one_order(battles),
                                                      one.predict_one_order(swap_battles(battles))))
    assert (straight.argmax(axis=1) == 0).all() and (swapped.argmax(axis=1) == 0).all()  # biased before TTA
    own, s2, w2 = predict_with_orders(OwnTTA(), battles)
    assert s2 is None and w2 is None
    np.testing.assert_allclose(own, logits)


def test_length_stage_without_ties_in_training_still_gives_three_classes(arena_battles, tmp_path):
    """A fold whose training rows hold no tie (small data, tie-free external sets): three columns, the
    unseen class small but not impossible (found by the fuzz test of run.py)."""
    from battles.labels import LABEL_COLUMNS
    from kernel.context import StageContext
    from models.length_baseline import UNSEEN_CLASS_PROB
    from models.stage import make_stage

    no_tie = arena_battles[arena_battles["winner_tie"] == 0].iloc[:80]
    stage = make_stage("length_lr", None, StageContext(resource_dir=tmp_path)).fit(no_tie)
    logits = stage.predict_logits(arena_battles.iloc[:10])
    assert logits.shape == (10, 3) and np.isfinite(logits).all()
    probs = np.exp(logits)
    assert np.allclose(probs.sum(axis=1), 1.0) and (probs[:, 2] < 10 * UNSEEN_CLASS_PROB).all()
    assert list(LABEL_COLUMNS)[2] == "winner_tie"
