"""Stacking layer: honest nested CV, JSON round trip, swap equivariance."""
from __future__ import annotations

import numpy as np

from battles.labels import swap_columns
from ensemble.calibrators import LogisticStacker, TemperatureCalibrator, WeightedAverage, calibrator_from_json
from ensemble.meta import swap_meta
from ensemble.stacking import StackerConfig, fit_stacker


def _synthetic(n=900, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    signal = np.eye(3)[y] * 1.2
    good = signal + rng.normal(0, 1.0, (n, 3))
    noise = rng.normal(0, 1.0, (n, 3))
    overconfident = 4 * (signal + rng.normal(0, 1.2, (n, 3)))
    folds = rng.integers(0, 5, n)
    return y, [good, noise, overconfident], folds


def test_stacker_prefers_informative_stages_and_reports_nested_score():
    y, logits, folds = _synthetic()
    result = fit_stacker(["good", "noise", "overconfident"], logits, y, folds)
    table = {r["candidate"]: r["cv_log_loss"] for r in result.table}
    assert table["temperature(noise)"] > table["temperature(good)"]
    assert result.nested["log_loss"] < table["temperature(noise)"]
    assert sum(r["chosen_in_outer_folds"] for r in result.table) == 5
    # nested score is of the selection procedure: never better than the best candidate by much
    assert result.nested["log_loss"] >= min(table.values()) - 0.02
    np.testing.assert_allclose(result.oof_probs.sum(axis=1), 1.0)


def test_calibrators_round_trip_and_are_swap_equivariant():
    y, logits, _ = _synthetic(300)
    meta = np.random.default_rng(1).normal(size=(300, 3))
    for cal in (TemperatureCalibrator(None), WeightedAverage(), LogisticStacker(0.5), LogisticStacker(0.5, meta=True)):
        cal.fit(logits, y, meta=meta)
        again = calibrator_from_json(cal.to_json())
        np.testing.assert_allclose(again.predict_proba(logits, meta=meta), cal.predict_proba(logits, meta=meta))
        swapped = [swap_columns(x) for x in logits]
        np.testing.assert_allclose(cal.predict_proba(swapped, meta=swap_meta(meta)),
                                   swap_columns(cal.predict_proba(logits, meta=meta)), atol=1e-12)


def test_temperature_fixes_overconfidence():
    y, logits, _ = _synthetic(600)
    cal = TemperatureCalibrator([2]).fit(logits, y)
    assert cal.temperature > 2


def test_weights_and_meta_features_are_found_and_scored_by_nested_cv():
    y, logits, folds = _synthetic()
    rng = np.random.default_rng(5)
    # a meta feature that flips sign under swap and carries signal the stages lack (like a length gap)
    gap = np.where(y == 0, 1.0, np.where(y == 1, -1.0, 0.0)) + rng.normal(0, 0.7, len(y))
    meta = np.column_stack([gap, rng.normal(size=len(y)), rng.normal(size=len(y))])
    result = fit_stacker(["good", "noise", "overconfident"], logits, y, folds, StackerConfig(C_grid=[0.1]), meta=meta)
    methods = {m["method"]: m for m in result.methods}
    assert set(methods) >= {"single: good", "average", "weighted", "logistic", "logistic+meta", "selected (nested over all)"}
    assert methods["weighted"]["weights"]["noise"] < 0.1 < methods["weighted"]["weights"]["good"]
    assert methods["logistic+meta"]["nested_log_loss"] < methods["logistic"]["nested_log_loss"] - 0.02
    assert result.chosen.meta and result.stage_weights["noise"] < 0.1 < result.stage_weights["good"]


def test_pick_prefers_the_simplest_candidate_within_tolerance():
    from ensemble.stacking import pick

    losses = {"simple": 1.0405, "middle": 1.0401, "complex": 1.0390}
    order = ["simple", "middle", "complex"]
    assert pick(order, losses) == "complex"
    assert pick(order, losses, tolerance=0.0012) == "middle"
    assert pick(order, losses, tolerance=0.002) == "simple"


def test_candidates_cross_fitted_in_worker_processes_give_the_same_grid(monkeypatch):
    import ensemble.stacking as stacking

    y, logits, folds = _synthetic(600)
    meta = np.random.default_rng(2).normal(size=(600, 3))
    candidates = stacking.default_candidates(3, StackerConfig(C_grid=[0.1]), meta=True)
    one = stacking.cross_fit_grid(candidates, logits, y, folds, meta)
    monkeypatch.setattr(stacking, "PARALLEL_MIN_ROWS", 0)
    monkeypatch.setattr(stacking, "usable_cores", lambda: 2)
    parallel = stacking.cross_fit_grid(candidates, logits, y, folds, meta)
    for c in candidates:
        np.testing.assert_array_equal(parallel.outer[c], one.outer[c])
        assert [parallel.inner[k][c] for k in sorted(one.inner)] == [one.inner[k][c] for k in sorted(one.inner)]


def test_logistic_stacker_on_both_orders_without_building_the_swapped_rows():
    """The swap-symmetric Newton fit equals a plain fit on the rows plus their swapped copies."""
    from battles.labels import SWAP_PERMUTATION
    from ensemble.calibrators import _multinomial_lr

    y, logits, _ = _synthetic(400)
    meta = np.random.default_rng(3).normal(size=(400, 3))
    weight = np.random.default_rng(4).uniform(0.5, 2.0, 400)
    stacker = LogisticStacker(0.3, meta=True).fit(logits, y, weight=weight, meta=meta)
    x, xs = stacker._features(logits, meta)
    coef, intercept = _multinomial_lr(np.vstack([x, xs]), np.concatenate([y, np.array(SWAP_PERMUTATION)[y]]),
                                      np.concatenate([weight, weight]), 0.3)
    np.testing.assert_allclose(stacker.coef_, coef, atol=1e-9)
    np.testing.assert_allclose(stacker.intercept_ - stacker.intercept_.mean(), intercept - intercept.mean(), atol=1e-9)


def test_newton_solver_reaches_scikit_learns_optimum():
    from sklearn.linear_model import LogisticRegression

    from ensemble.calibrators import _multinomial_lr

    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 6))
    y = (x[:, :3] + rng.normal(size=(500, 3))).argmax(axis=1)
    w = rng.uniform(0.5, 2.0, 500)
    for C in (0.01, 1.0):
        coef, _ = _multinomial_lr(x, y, w, C)
        reference = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(x, y, sample_weight=w)
        np.testing.assert_allclose(coef, reference.coef_, atol=1e-6)
