"""run.py score and pipeline.explain: one pair or a JSONL file of battles scored by a finished run with a
deep stage (a tiny random DeBERTa, so truncation happens), and the report's most confident mistakes."""
import json
import os

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import run as cli  # noqa: E402
from battles.labels import label_index_or_missing, swap_columns  # noqa: E402
from pipeline.explain import explain, read_score_file  # noqa: E402
from pipeline.predict import Predictor  # noqa: E402
from pipeline.report import confident_mistakes  # noqa: E402
from tests.tiny_models import build_deberta  # noqa: E402

MAX_LENGTH = 64
LONG = {"prompt": ["first question " * 40, "second question " * 40, "third question?"],
        "response_a": ["short", "reply " * 60, "ok"], "response_b": ["answer " * 50, "b", "fine " * 30]}


@pytest.fixture(scope="module")
def deep_run(arena_frame, tmp_path_factory):
    """A finished CPU run: the length baseline and a tiny encoder (max_length 64), 48 battles, 3 folds."""
    root = tmp_path_factory.mktemp("score")
    model = build_deberta(root / "deberta")
    arena_frame.iloc[:48].to_csv(root / "train.csv", index=False)
    config = {"n_folds": 3, "stacker": {"C_grid": [0.1]}, "stages": {
        "length_lr": {"type": "length_lr"},
        "encoder": {"type": "encoder", "params": {"model": str(model), "max_length": MAX_LENGTH, "max_steps": 2,
                                                   "train_batch_size": 8, "predict_batch_size": 16}}}}
    (root / "config.json").write_text(json.dumps(config))
    out = root / "run"
    assert cli.main(["--train", str(root / "train.csv"), "--out", str(out), "--config", str(root / "config.json"),
                     "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def predictor(deep_run):
    return Predictor.load(deep_run, progress=False)


def battles_of(arena_frame, rows=slice(100, 106)):
    return [{"id": r.id, "prompt": r.prompt, "response_a": r.response_a, "response_b": r.response_b}
            for r in arena_frame.iloc[rows].itertuples()] + [{"id": "long", **LONG}]


def test_explain_equals_predict_proba_and_each_stage_explains_its_part(predictor, arena_frame):
    data = battles_of(arena_frame)
    explanations = explain(predictor, data)
    np.testing.assert_array_equal(np.array([e.probs for e in explanations]), predictor.predict_proba(data))
    assert [e.id for e in explanations] == [str(b["id"]) for b in data]
    logits = dict(zip(predictor.stage_names, predictor.stage_logits(predictor_battles(data))))
    weights = predictor.ensemble.stage_weights
    for i, e in enumerate(explanations):
        assert e.verdict == ("A wins", "B wins", "tie")[int(np.argmax(e.probs))]
        assert [s.name for s in e.stages] == ["length_lr", "encoder"]
        for s in e.stages:
            assert s.share == weights[s.name]
            np.testing.assert_allclose(s.probs, softmax(logits[s.name][i]), atol=1e-12)
            ab, ba = s.orders  # swap TTA: the stage's answer is the average of both orders' log-probabilities
            np.testing.assert_allclose(softmax(0.5 * (np.log(ab) + np.log(ba))), s.probs, atol=1e-7)
        assert e.orders is not None and e.stages[0].truncation is None
    encoder = [e.stages[1] for e in explanations]
    assert any(np.abs(s.orders[0] - s.orders[1]).max() > 1e-6 for s in encoder)  # a random model is order-biased
    long = encoder[-1].truncation  # the long three-turn battle: cut, earlier prompt turns dropped
    assert long.cut["prompt"] and long.turns_dropped["prompt"] >= 1 and long.cut["response_b"]
    assert sum(long.tokens.values()) <= MAX_LENGTH - 4  # [CLS] and three [SEP]


def predictor_battles(data):
    from pipeline.predict import as_battles

    return as_battles(data)


def test_explain_is_swap_equivariant(predictor, arena_frame):
    data = battles_of(arena_frame, slice(110, 113))
    swapped = [{**b, "response_a": b["response_b"], "response_b": b["response_a"]} for b in data]
    straight = np.array([e.probs for e in explain(predictor, data)])
    mirrored = np.array([e.probs for e in explain(predictor, swapped)])
    np.testing.assert_allclose(swap_columns(mirrored), straight, atol=1e-6)


def test_score_one_pair_from_text_and_files(deep_run, predictor, tmp_path, capsys):
    pair = {"prompt": "Name a prime number.", "response_a": "7", "response_b": "Nine is prime."}
    expected = predictor.predict_proba([pair])[0]
    assert cli.main(["score", "--run", str(deep_run), "--prompt", pair["prompt"], "--a", pair["response_a"],
                     "--b", pair["response_b"]]) == 0
    printed = capsys.readouterr().out
    ensemble_line = next(line for line in printed.splitlines() if line.strip().startswith("ensemble"))
    assert [float(v) for v in ensemble_line.split()[1:]] == pytest.approx(expected, abs=5e-5)
    verdict = ("A wins", "B wins", "tie")[int(np.argmax(expected))]
    assert printed.startswith(f"battle pair: {verdict}")
    assert "order B/A (realigned)" in printed and "share" in printed and "kept: prompt" in printed
    for name, text in pair.items():
        (tmp_path / name).write_text(text)
    assert cli.main(["score", "--run", str(deep_run), "--prompt-file", str(tmp_path / "prompt"),
                     "--a-file", str(tmp_path / "response_a"), "--b-file", str(tmp_path / "response_b"), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert [line["probs"][c] for c in ("a", "b", "tie")] == pytest.approx(expected, abs=1e-12)
    assert line["verdict"] == verdict and line["stages"][1]["truncation"]["tokens"]["response_a"] == 1


def test_score_jsonl_writes_one_line_per_battle(deep_run, predictor, arena_frame, tmp_path):
    rows = arena_frame.iloc[120:123]
    lines = [{"id": r.id, "prompt": r.prompt, "response_a": r.response_a, "response_b": r.response_b}  # the CSV's cells
             for r in rows.itertuples()]
    lines += [{"prompt": "plain prompt", "response_a": "plain a", "response_b": "plain b"}, LONG]  # ids: line numbers
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines[:3]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[3:]))
    out = tmp_path / "scored.jsonl"
    assert cli.main(["score", "--run", str(deep_run), "--jsonl", str(src), "--out", str(out), "--quiet"]) == 0
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert [s["id"] for s in scored] == [*map(str, rows["id"]), "5", "6"]  # blank line 4 skipped
    expected = predictor.predict_proba(read_score_file(src))
    np.testing.assert_allclose([[s["probs"][c] for c in ("a", "b", "tie")] for s in scored], expected, atol=1e-12)
    long = scored[-1]["stages"][1]["truncation"]
    assert long["cut"]["prompt"] and long["turns_dropped"]["prompt"] >= 1
    assert set(long["tokens"]) == {"prompt", "response_a", "response_b"}
    assert scored[0]["stages"][0]["orders"]["ba"] and "truncation" not in scored[0]["stages"][0]

    before = out.read_bytes()  # an --out that exists is refused, untouched; --overwrite replaces it
    assert cli.main(["score", "--run", str(deep_run), "--jsonl", str(src), "--out", str(out), "--quiet"]) == 2
    assert out.read_bytes() == before
    assert cli.main(["score", "--run", str(deep_run), "--jsonl", str(src), "--out", str(out), "--quiet",
                     "--overwrite"]) == 0


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "p", "response_a": "a", "response_b": "b"}\n{"prompt": "p", "response_a": "a"}\n',
     "in.jsonl, line 2: missing field(s) ['response_b']"),
    ('{"prompt": "p", "response_a": "a", "response_b": "b"}\n\n{"prompt": "p", "response_a": "a", "response_b": \n',
     "in.jsonl, line 3: not a JSON object"),
    ('["p", "a", "b"]\n', "in.jsonl, line 1: expected a JSON object, got list"),
    ('{"prompt": ["p", "q"], "response_a": "a", "response_b": "b"}\n', "in.jsonl, line 1, column 'prompt': turn counts"),
    ('{"prompt": "p", "response_a": 3, "response_b": "b"}\n', "in.jsonl, line 1, column 'response_a': expected a JSON list"),
])
def test_bad_jsonl_is_one_line_naming_file_and_line(deep_run, tmp_path, caplog, content, message):
    (tmp_path / "in.jsonl").write_text(content)
    out = tmp_path / "out.jsonl"
    assert cli.main(["score", "--run", str(deep_run), "--jsonl", str(tmp_path / "in.jsonl"), "--out", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--prompt", "p", "--a", "a"], "give --b"),
    (["--jsonl", "x.jsonl"], "--out"),
    (["--prompt", "p", "--a", "a", "--b", "b", "--out", "o.jsonl"], "--out goes with --jsonl"),
    (["--prompt", "p", "--a", " ", "--b", "b"], "response_a: empty"),
    (["--prompt", "p", "--a", "a", "--b-file", "no-such-file.txt"], "--b-file no-such-file.txt"),
])
def test_bad_score_arguments(deep_run, caplog, args, message):
    assert cli.main(["score", "--run", str(deep_run), *args]) == 2
    assert message in " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_report_lists_the_most_confident_mistakes(deep_run, arena_frame):
    probs = pd.read_csv(deep_run / "ensemble" / "oof_probs.csv", dtype={"id": str})
    from battles.io import read_battles

    train, _ = read_battles(deep_run.parent / "train.csv")
    train = train.set_index("id").loc[probs["id"]].reset_index()
    y = label_index_or_missing(train)
    p = probs[["winner_model_a", "winner_model_b", "winner_tie"]].to_numpy()
    rows = confident_mistakes(train, y, p, k=3)
    wrong = p.argmax(axis=1) != y
    assert len(rows) == min(3, wrong.sum())
    top = p[wrong].max(axis=1).max()
    assert rows[0]["predicted"].endswith(f"({top:.3f})")
    assert all(len(r["prompt"]) <= 400 + len("... [99999 more characters]") for r in rows)
    page = (deep_run / "report.html").read_text()
    assert 'id="mistakes"' in page and all(f"<td>{r['id']}</td>" in page for r in rows)


def test_confident_mistakes_order_and_cut():
    battles = pd.DataFrame({"id": ["a", "b", "c", "d"], "prompt": [["p" * 500], ["q"], ["r"], ["s"]],
                            "response_a": [["x"]] * 4, "response_b": [["y"]] * 4})
    y = np.array([1, 0, 2, 0])
    probs = np.array([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    rows = confident_mistakes(battles, y, probs)
    assert [r["id"] for r in rows] == ["b", "a"]  # c and d are right
    assert rows[0]["predicted"] == "B wins (0.800)" and rows[0]["true"] == "A wins (0.100)"
    assert rows[1]["prompt"] == "p" * 400 + "... [100 more characters]"
