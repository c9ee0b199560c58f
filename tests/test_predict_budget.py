"""run.py predict --budget: a finished CPU run (the length baseline beside a tiny random DeBERTa) predicts
within a budget of seconds. The encoder is slowed down (a sleep per battle and A/B order, through the real
prediction code) so the full plan cannot fit and the plan must degrade; a generous budget changes nothing."""
import json
import os
import time

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import run as cli  # noqa: E402
from battles.columns import LABEL_COLUMNS  # noqa: E402
from models.encoder import EncoderStage  # noqa: E402
from pipeline.predict import Predictor  # noqa: E402
from pipeline.budget import Costs, choose, chunk_starts, parse_duration, treatment_path  # noqa: E402
from tests.tiny_models import build_deberta  # noqa: E402

SLOW = 0.1  # seconds per battle and A/B order added to the encoder's forward passes
N_TEST = 64


@pytest.fixture(scope="module")
def budget_run(arena_frame, tmp_path_factory):
    """A finished run (length_lr + a tiny encoder, 48 battles, 3 folds) and a test file of N_TEST battles."""
    root = tmp_path_factory.mktemp("budget")
    model = build_deberta(root / "deberta")
    arena_frame.iloc[:48].to_csv(root / "train.csv", index=False)
    arena_frame.iloc[100:100 + N_TEST][["id", "prompt", "response_a", "response_b"]].to_csv(root / "test.csv",
                                                                                            index=False)
    config = {"n_folds": 3, "stacker": {"C_grid": [0.1]}, "stages": {
        "length_lr": {"type": "length_lr"},
        "encoder": {"type": "encoder", "params": {"model": str(model), "max_length": 64, "max_steps": 2,
                                                   "train_batch_size": 8, "predict_batch_size": 16}}}}
    (root / "config.json").write_text(json.dumps(config))
    assert cli.main(["--train", str(root / "train.csv"), "--out", str(root / "run"), "--config",
                     str(root / "config.json"), "--quiet"]) == 0
    return root


@pytest.fixture
def slow_encoder(monkeypatch):
    real = EncoderStage.predict_one_order

    def slow(self, battles):
        time.sleep(SLOW * len(battles))
        return real(self, battles)

    monkeypatch.setattr(EncoderStage, "predict_one_order", slow)


@pytest.fixture(scope="module")
def plain(budget_run):
    """The submission without a budget, and the seconds loading the run's models takes."""
    out = budget_run / "plain.csv"
    assert predict(budget_run, out)[0] == 0
    started = time.monotonic()
    Predictor.load(budget_run / "run", progress=False)
    return out, time.monotonic() - started


def predict(root, out, *extra):
    started = time.monotonic()
    code = cli.main(["predict", "--run", str(root / "run"), "--test", str(root / "test.csv"), "--out", str(out),
                     "--quiet", *extra])
    return code, time.monotonic() - started


def check_submission(path, ids):
    frame = pd.read_csv(path, dtype={"id": str})
    assert frame["id"].tolist() == ids
    probs = frame[LABEL_COLUMNS].to_numpy()
    assert np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    return probs


def test_a_budget_too_small_degrades_and_finishes_inside_it(budget_run, plain, tmp_path, slow_encoder, capsys):
    ids = pd.read_csv(budget_run / "test.csv", dtype={"id": str})["id"].tolist()
    plain_file, load_seconds = plain
    # the full plan sleeps 3 folds x 2 orders x SLOW per battle (38 s), one order on all half that: more than
    # the budget's 10 s after loading. Sleeping (not computing) dominates, so a busy machine changes little.
    budget = max(12.0, load_seconds + 10.0)
    assert 3 * SLOW * N_TEST > 1.5 * (budget - load_seconds)
    capsys.readouterr()
    code, seconds = predict(budget_run, tmp_path / "sub.csv", "--budget", f"{budget:.2f}s")
    printed = capsys.readouterr().out
    assert code == 0
    assert seconds < budget + 0.5, (seconds, budget)
    probs = check_submission(tmp_path / "sub.csv", ids)
    treatment = pd.read_csv(treatment_path(tmp_path / "sub.csv"), dtype={"id": str})
    assert treatment["id"].tolist() == ids
    kinds = set(";".join(treatment["treatment"]).split(";"))
    assert kinds <= {"full", "one_order", "fallback:length_lr", "prior"}
    assert "one_order" in kinds  # step 1 in full: the encoder's rows before it was dropped have one A/B order
    # step 3: the encoder dropped on the rows it did not reach (they get the fallback over length_lr, or the
    # prior where a late encoder chunk left no time for length_lr either: timing on a busy machine)
    assert kinds & {"fallback:length_lr", "prior"}
    assert "degraded" in printed and "one_order" in printed
    # the rows that kept both orders and every stage have the plain submission's answer
    full = (treatment["treatment"] == "full").to_numpy()
    assert full.any()
    np.testing.assert_allclose(probs[full], check_submission(plain_file, ids)[full], atol=1e-6)


def test_a_generous_budget_gives_the_same_file_as_no_budget(budget_run, plain, tmp_path, capsys):
    assert predict(budget_run, tmp_path / "budget.csv", "--budget", "1h")[0] == 0
    assert plain[0].read_bytes() == (tmp_path / "budget.csv").read_bytes()
    treatment = pd.read_csv(treatment_path(tmp_path / "budget.csv"))
    assert set(treatment["treatment"]) == {"full"}
    assert f"all {N_TEST} battles predicted in full" in capsys.readouterr().out


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("45m", 2700), ("8h30m", 30600), ("1.5h", 5400),
                                          ("1h2m3s", 3723), (" 2M ", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "90", "-5m", "1d", "h", "1.5.5h", "nan", "0h0m"])
def test_a_bad_budget_is_one_line_naming_the_option(budget_run, tmp_path, text, caplog):
    code, seconds = predict(budget_run, tmp_path / "x.csv", f"--budget={text}")
    assert code == cli.EXIT_USER_ERROR
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"--budget {text!r}: ") and "\n" not in errors[0]
    assert not (tmp_path / "x.csv").exists() and seconds < 5  # refused before reading or loading anything


def test_the_plan_degrades_in_order():
    costs = Costs()
    costs.add("cheap", 1.0, 100)  # 0.01 s per battle
    costs.add("deep", 10.0, 100)  # 0.1 s per battle and order
    args = (["cheap", "deep"], {"deep"}, 100, 10)
    assert choose(costs, *args, available=100.0) == (1.0, ["cheap", "deep"])  # 21 s needed: fits
    fraction, active = choose(costs, *args, available=16.0)  # 11 s with one order, 21 with both
    assert active == ["cheap", "deep"] and fraction == pytest.approx(0.5)
    fraction, active = choose(costs, *args, available=5.0)  # one order does not fit: drop deep later
    assert (fraction, active) == (0.0, ["cheap", "deep"])  # this chunk can still have it (1.1 + 0.9 s)
    assert choose(costs, *args, available=1.0) == (0.0, ["cheap"])
    assert choose(costs, *args, available=0.5) == (0.0, ["cheap"])  # the rest would get the prior
    assert choose(costs, *args, available=0.05) == (0.0, [])


def test_the_fallback_keeps_the_saved_ensembles_method():
    from types import SimpleNamespace

    from ensemble.stacking import Candidate
    from pipeline.budget import Fallbacks

    def fallback(model, stages=("a", "b", "c")):
        return Fallbacks(SimpleNamespace(ensemble=SimpleNamespace(model=model, stages=list(stages))))

    logistic = fallback({"kind": "logistic", "C": 0.1, "meta": True})
    assert logistic.candidate(["a", "b"]) == Candidate("logistic", None, 0.1, True)
    assert fallback({"kind": "weighted"}).candidate(["a", "b"]) == Candidate("weighted")
    assert fallback({"kind": "weighted"}).candidate(["a"]) == Candidate("temperature", None)  # one stage
    picked = fallback({"kind": "temperature", "stages": [1, 2]})  # the average of b and c
    assert picked.candidate(["a", "c"]) == Candidate("temperature", (1,))
    assert picked.candidate(["a"]) == Candidate("temperature", None)


def test_chunks_grow_from_a_probe_and_cover_every_row():
    assert chunk_starts(64) == [0, 2, 6, 14, 22, 30, 38, 46, 54, 62]  # 2, 4, 8, then chunks of 8
    assert chunk_starts(1) == [0] and chunk_starts(0) == []
    starts = chunk_starts(100_000)
    assert starts[:4] == [0, 2, 6, 14] and np.diff(starts).max() == 2048 and starts[-1] < 100_000


def test_step_1_keeps_both_orders_only_on_the_least_confident(budget_run, plain):
    """One A/B order on a stage's folds: all battles with the second order is the stage's answer; none is the
    given order's average; in between, exactly the smallest-margin battles get the second order."""
    from battles.io import read_battles
    from pipeline.budget import one_order_logits

    models = Predictor.load(budget_run / "run", progress=False).stage_models["encoder"]
    battles = read_battles(budget_run / "test.csv", require_labels=False)[0].iloc[:12]
    both, second = one_order_logits(models, battles, 1.0)
    assert second.all()
    np.testing.assert_allclose(both, models.predict_logits(battles), atol=1e-6)
    straight, second = one_order_logits(models, battles, 0.0)
    assert not second.any()
    half, second = one_order_logits(models, battles, 0.5)
    assert second.sum() == 6
    np.testing.assert_allclose(half[~second], straight[~second], atol=1e-12)
    np.testing.assert_allclose(half[second], both[second], atol=1e-6)
    probs = np.sort(np.exp(straight - straight.max(axis=1, keepdims=True)), axis=1)
    probs /= probs.sum(axis=1, keepdims=True)
    margin = probs[:, -1] - probs[:, -2]
    assert margin[second].max() <= margin[~second].min()


def test_without_the_training_file_or_oof_files_the_rows_get_the_prior(budget_run, tmp_path):
    """A run whose out-of-fold tables are gone after it was loaded (its manifest refuses loading without them)
    still writes a complete submission: the rows without every stage get the prior, said in the log."""
    import shutil

    from pipeline.budget import Budget, Fallbacks
    from pipeline.rundir import RunDir

    moved = tmp_path / "run"
    shutil.copytree(budget_run / "run", moved)
    predictor = Predictor.load(moved, progress=False)
    for path in [*moved.glob("stages/*/oof_logits.csv"), moved / "ensemble" / "oof_probs.csv"]:
        path.unlink()
    fallbacks = Fallbacks(predictor)
    with pytest.raises(Exception, match="out-of-fold logits are needed"):
        fallbacks.model(["length_lr"])
    np.testing.assert_array_equal(fallbacks.prior(), np.full(3, 1 / 3))
    assert RunDir(moved).record()["train_path"]  # the training file is still there: the OOF tables are not
    battles = pd.read_csv(budget_run / "test.csv", dtype=str).iloc[:6]
    result = predictor.predict_within(battles, Budget(1e-3))  # spent at once: no stage runs
    assert np.isfinite(result.probs).all() and np.allclose(result.probs, 1 / 3)
    assert set(result.treatment) == {"prior"} and "degraded 6 of 6 battles (6 prior)" in result.summary


def test_a_bundle_fits_the_same_fallback_as_its_run(budget_run, tmp_path, monkeypatch):
    """An exported bundle keeps what the fallback ensemble fits on (each stage's out-of-fold logits and the
    training rows' labels, no text): moved away from the run and its training file, its fallback rows and
    prior are the run's, to 1e-9; with an ensemble on meta features too (their values round-trip exactly)."""
    import shutil
    from types import SimpleNamespace

    from battles.io import read_battles
    from ensemble.meta import META_NAMES, meta_features
    from pipeline.budget import FALLBACK_TRAIN, Fallbacks, Scored, combine, write_fallback_train
    from pipeline.rundir import RunDir

    run = budget_run / "run"
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "bundle"), "--quiet"]) == 0
    bundle = tmp_path / "elsewhere"
    shutil.move(tmp_path / "bundle", bundle)
    record = json.loads((bundle / "bundle.json").read_text())
    for name in ("stages/length_lr/oof_logits.csv", "stages/encoder/oof_logits.csv", FALLBACK_TRAIN):
        assert name in record["files"]  # listed with its hash: verified when the bundle is loaded
    table = pd.read_csv(bundle / FALLBACK_TRAIN, dtype={"id": str})
    assert {"prompt", "response_a", "response_b"}.isdisjoint(table.columns)
    train = pd.read_csv(budget_run / "train.csv", dtype={"id": str})
    assert set(table["id"]) <= set(train["id"]) and len(table) > 0

    from_run = Predictor.load(run, progress=False)
    from_bundle = Predictor.load(bundle, progress=False)
    assert from_bundle.bundle is not None

    def unreachable(_run):  # the bundle must not need the run's training file
        raise AssertionError("the training file was read")

    battles = read_battles(budget_run / "test.csv", require_labels=False)[0].iloc[:10]
    out = {n: from_run.stage_models[n].predict_logits(battles) for n in ("length_lr", "encoder")}
    names = list(from_run.ensemble.stages)
    have = {n: np.ones(len(battles), bool) for n in names}
    have["encoder"][5:] = False  # the encoder dropped on the last five rows: they get the fallback
    results = []
    for predictor in (from_run, from_bundle):
        with monkeypatch.context() as patch:
            if predictor is from_bundle:
                patch.setattr(Fallbacks, "read_training", staticmethod(unreachable))
            results.append(combine(predictor, battles, Scored(names, out, have, np.zeros(len(battles), bool)),
                                   Fallbacks(predictor)))
    (run_probs, run_treatment), (bundle_probs, bundle_treatment) = results
    assert run_treatment == bundle_treatment and bundle_treatment[5:] == ["fallback:length_lr"] * 5
    np.testing.assert_allclose(bundle_probs, run_probs, rtol=0, atol=1e-9)
    prior = Fallbacks(from_bundle).prior()  # the bundle keeps the ensemble's out-of-fold probabilities too
    np.testing.assert_allclose(prior, Fallbacks(from_run).prior(), rtol=0, atol=1e-12)
    assert not np.allclose(prior, 1 / 3)

    # a saved ensemble on meta features: the bundle's table carries their values and fits the same model
    meta_record = SimpleNamespace(model={"kind": "logistic", "C": 0.1, "meta": True}, stages=names)
    assert write_fallback_train(RunDir(run), meta_record, bundle)
    assert set(META_NAMES) <= set(pd.read_csv(bundle / FALLBACK_TRAIN).columns)
    models = []
    for path in (run, bundle):
        with monkeypatch.context() as patch:
            if path == bundle:
                patch.setattr(Fallbacks, "read_training", staticmethod(unreachable))
            fallbacks = Fallbacks(SimpleNamespace(run=RunDir(path), ensemble=meta_record))
            models.append(fallbacks.model(["length_lr"]))
    assert all(m.meta for m in models)
    meta = meta_features(battles)
    np.testing.assert_allclose(models[1].predict_proba([out["length_lr"]], meta=meta),
                               models[0].predict_proba([out["length_lr"]], meta=meta), rtol=0, atol=1e-9)


def test_an_export_without_the_training_file_warns_and_its_fallback_is_the_prior(budget_run, tmp_path, monkeypatch,
                                                                                  caplog):
    from pipeline.budget import FALLBACK_TRAIN, BudgetError, Fallbacks

    def gone(run):
        raise BudgetError(f"{run}: no training file recorded; a fallback ensemble needs its labels")

    monkeypatch.setattr(Fallbacks, "read_training", staticmethod(gone))
    assert cli.main(["export", "--run", str(budget_run / "run"), "--out", str(tmp_path / "bundle"), "--quiet"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "fallback" in r.getMessage()]
    assert len(warned) == 1 and warned[0].endswith("without every stage the prior") and "\n" not in warned[0]
    assert not (tmp_path / "bundle" / FALLBACK_TRAIN).exists()
    fallbacks = Fallbacks(Predictor.load(tmp_path / "bundle", progress=False))
    with pytest.raises(BudgetError, match="no training file recorded"):
        fallbacks.model(["length_lr"])
