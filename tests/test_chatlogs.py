"""Chat logs -> unlabelled battles: pairing rules, counts, seeded sides, formats, de-duplication, errors."""
from __future__ import annotations

import gzip
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from battles.io import BattleDataError, battles_to_frame, read_battles
from flywheel.chatlogs import NoPairsError, pair_chatlogs


def _conv(*texts) -> list[dict]:
    """Alternating user / assistant messages."""
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]


def _row(cid, model, conversation, language="English") -> dict:
    return {"conversation_id": cid, "model": model, "conversation": conversation, "language": language}


RULES_ROWS = [
    _row("c01", "m1", _conv("Hi there", "Hello from m1")),
    _row("c02", "m2", _conv("hi  THERE", "Hello from m2")),  # same prompt after normalising
    _row("c03", "m3", _conv("Hi there", "Hello from m3")),
    _row("c04", "m1", _conv("Hi there", "another m1 reply")),  # same_model_repeat
    _row("c05", "m1", _conv("solo prompt", "x")),  # single_model_prompt
    _row("c06", "m1", []),  # empty_conversation
    _row("c07", "m2", _conv("no reply")),  # no_final_reply
    _row("c08", "m1", _conv("multi", "a1", "second", "b1")),
    _row("c09", "m2", _conv("multi", "a2", "second", "b2")),
    _row("c10", "m3", _conv("multi", "a3", "other", "b3")),  # user_turns_differ
    _row("c11", "m1", _conv("same answer", "Sure.")),
    _row("c12", "m2", _conv("same answer", " sure. ")),  # identical_replies (normalised)
    _row("c13", "m2", _conv("   ", "reply")),  # empty_prompt
    _row("c14", "m3", _conv("Hi there", "   ")),  # empty_final_reply
    _row("c15", "m1", [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"},
                       {"role": "assistant", "content": "y"}]),  # starts_with_assistant
    _row("c16", "m4", _conv("Hi there", "Hola"), language="Spanish"),  # language_filtered
    _row("c17", "m2", [{"role": "system", "content": "be brief"}, *_conv("solo prompt", "y")]),  # system dropped
]


def _write_jsonl(path, rows) -> None:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _write_parquet(path, rows) -> None:
    schema = pa.schema([("conversation_id", pa.string()), ("model", pa.string()),
                        ("conversation", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                        ("language", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _pairs(path) -> pd.DataFrame:
    battles, _ = read_battles(path, require_labels=False)
    return battles.sort_values("id").reset_index(drop=True)


def test_pairing_rules_and_report_counts(tmp_path):
    data, out = tmp_path / "chat.jsonl", tmp_path / "pairs.parquet"
    _write_jsonl(data, RULES_ROWS)
    report = pair_chatlogs(data, out, params={"max_pairs_per_prompt": 2, "languages": ["English"]}, progress=False)
    assert report.dropped == {"same_model_repeat": 1, "empty_conversation": 1, "no_final_reply": 1,
                              "user_turns_differ": 1, "empty_prompt": 1, "empty_final_reply": 1,
                              "starts_with_assistant": 1, "language_filtered": 1}
    # "Hi there": m1/m2/m3 -> 3 candidates, cap 2; "multi" (both turns): m1/m2; "same answer": identical;
    # "solo prompt": m1 and m2 (the system message is dropped)
    assert report.pairs_considered == 3 + 1 + 1 + 1
    assert report.dropped_pairs == {"over_pair_cap": 1, "identical_replies": 1}
    assert report.kept == 4 and report.prompts_paired == 4
    assert report.rows_read == len(RULES_ROWS) == sum(report.dropped.values()) + report.conversations_paired
    assert report.pairs_considered == sum(report.dropped_pairs.values()) + report.kept
    assert report.repairs["multi_turn_battles"] == 1
    pairs = _pairs(out)
    assert len(pairs) == 4 and set(pairs["source"]) == {"chatlog"}
    assert "winner_model_a" not in pairs.columns
    for _, b in pairs.iterrows():
        _, ca, cb = b["id"].split(":")
        a, c = (next(r for r in RULES_ROWS if r["conversation_id"] == x) for x in (ca, cb))
        assert (b["model_a"], b["model_b"]) == (a["model"], c["model"])
        assert b["response_a"] == [m["content"] for m in a["conversation"] if m["role"] == "assistant"]
        assert b["response_b"] == [m["content"] for m in c["conversation"] if m["role"] == "assistant"]
    multi = pairs[pairs["prompt"].map(len) == 2]
    assert len(multi) == 1 and multi["prompt"].iat[0] == ["multi", "second"]
    m1_hi = {c for i in pairs["id"] for c in i.split(":")[1:]} & {"c01", "c04"}
    assert len(m1_hi) == 1, "one of m1's two answers to 'Hi there' is kept, by the seeded pick"
    saved = json.loads((tmp_path / "pairs.parquet.report.json").read_text())
    assert saved["kept"] == 4 and saved["dropped"] == report.dropped and saved["params"]["max_pairs_per_prompt"] == 2


def test_formats_batches_and_shards_give_the_same_pairs(tmp_path):
    rows = [r for r in RULES_ROWS if r["conversation"] and r["conversation"][0]["role"] != "system"]
    _write_parquet(tmp_path / "chat.parquet", rows)
    _write_jsonl(tmp_path / "chat.jsonl.gz", rows)
    runs = [("chat.parquet", {}), ("chat.jsonl.gz", {}), ("chat.parquet", {"n_shards": 1, "batch_rows": 2}),
            ("chat.jsonl.gz", {"n_shards": 7, "batch_rows": 3})]
    results = []
    for k, (name, params) in enumerate(runs):
        out = tmp_path / f"pairs{k}.{'jsonl' if k % 2 else 'parquet'}"
        pair_chatlogs(tmp_path / name, out, params=params, progress=False)
        results.append(battles_to_frame(_pairs(out)))
    for other in results[1:]:
        pd.testing.assert_frame_equal(results[0], other)


def _many_prompts(n_prompts: int, models=("m1", "m2")) -> list[dict]:
    return [_row(f"p{i}-{m}", m, _conv(f"question {i}", f"{m} answers {i}")) for i in range(n_prompts) for m in models]


def test_sides_are_seeded_and_balanced(tmp_path):
    _write_jsonl(tmp_path / "chat.jsonl", _many_prompts(200))

    def sides(seed, name):
        pair_chatlogs(tmp_path / "chat.jsonl", tmp_path / name, params={"seed": seed}, progress=False)
        pairs = _pairs(tmp_path / name)
        return dict(zip(pairs["prompt"].map(tuple), pairs["model_a"]))

    first, again, other = sides(1, "a.parquet"), sides(1, "b.parquet"), sides(2, "c.parquet")
    assert len(first) == 200 and first == again
    assert 70 < sum(m == "m1" for m in first.values()) < 130  # a fair coin per pair
    assert 60 < sum(first[k] != other[k] for k in first) < 140  # another seed, other sides


def test_pair_cap_per_prompt(tmp_path):
    models = [f"m{k}" for k in range(6)]
    _write_jsonl(tmp_path / "chat.jsonl", _many_prompts(3, models))
    capped = pair_chatlogs(tmp_path / "chat.jsonl", tmp_path / "capped.parquet", params={"max_pairs_per_prompt": 4},
                           progress=False)
    assert capped.kept == 3 * 4 and capped.dropped_pairs == {"over_pair_cap": 3 * 11}
    full = pair_chatlogs(tmp_path / "chat.jsonl", tmp_path / "full.parquet", params={"max_pairs_per_prompt": None},
                         progress=False)
    assert full.kept == 3 * 15 and full.dropped_pairs == {}
    pairs = _pairs(tmp_path / "capped.parquet")
    assert pairs.groupby(pairs["prompt"].map(tuple)).size().tolist() == [4, 4, 4]
    assert set(pairs["id"]) <= set(_pairs(tmp_path / "full.parquet")["id"])


def test_deduplicated_against_training(tmp_path):
    rows = _many_prompts(4) + [_row("q-m3", "m3", _conv("question 3", "m3 answers 3"))]
    _write_jsonl(tmp_path / "chat.jsonl", rows)
    train = pd.DataFrame({"id": ["t1", "t2"], "prompt": [["Question 0"], ["question 1"]],
                          "response_a": [["other"], ["m2 answers 1"]], "response_b": [["reply"], ["m1 answers 1"]],
                          "winner_model_a": [1, 0], "winner_model_b": [0, 1], "winner_tie": [0, 0]})
    battles_to_frame(train).to_csv(tmp_path / "train.csv", index=False)
    report = pair_chatlogs(tmp_path / "chat.jsonl", tmp_path / "pairs.parquet", train=tmp_path / "train.csv",
                           progress=False)
    # question 0: the training prompt; question 1: the same battle (sides swapped) as training row t2
    assert report.dropped_pairs == {"exact_prompt_in_target": 1, "exact_battle_in_target": 1}
    assert report.n_target == 2 and report.kept == 1 + 3  # question 2, and question 3 with three models
    kept = pair_chatlogs(tmp_path / "chat.jsonl", tmp_path / "kept.parquet", train=tmp_path / "train.csv",
                         params={"drop_prompt_matches": False}, progress=False)
    assert kept.dropped_pairs == {"exact_battle_in_target": 1} and kept.kept == 5
    prompts = {p[0] for p in _pairs(tmp_path / "pairs.parquet")["prompt"]}
    assert prompts == {"question 2", "question 3"}


def test_bad_input_is_named_and_outputs_are_guarded(tmp_path):
    data = tmp_path / "chat.jsonl"
    _write_jsonl(data, [{"conversation_id": "c1", "conversation": _conv("a", "b")}])
    with pytest.raises(BattleDataError, match=r"chat.jsonl: missing column\(s\) \['model'\] \(rows 1-1\)"):
        pair_chatlogs(data, tmp_path / "o.parquet", progress=False)
    _write_jsonl(data, [_row("c1", "m1", _conv("a", "b")), _row("c2", None, _conv("a", "c"))])
    with pytest.raises(BattleDataError, match=r"chat.jsonl, row 2, column 'model': missing value"):
        pair_chatlogs(data, tmp_path / "o.parquet", progress=False)
    with pytest.raises(BattleDataError, match="a language filter needs a 'language' column"):
        _write_jsonl(data, [{k: v for k, v in _row("c1", "m1", _conv("a", "b")).items() if k != "language"}])
        pair_chatlogs(data, tmp_path / "o.parquet", params={"languages": ["English"]}, progress=False)
    data.write_text(json.dumps(_row("c1", "m1", _conv("a", "b"))) + "\n{not json\n")
    with pytest.raises(BattleDataError, match="line 2: not a JSON object"):
        pair_chatlogs(data, tmp_path / "o.parquet", progress=False)
    _write_jsonl(data, [_row("c1", "m1", _conv("a", "b")), _row("c2", "m2", _conv("a", "c")),
                        _row("c1", "m3", _conv("z", "d"))])
    with pytest.raises(BattleDataError, match=r"row 3, column 'conversation_id': duplicate conversation_id "
                                              r"\(also at .*chat.jsonl row 1\)"):
        pair_chatlogs(data, tmp_path / "o.parquet", progress=False)
    _write_jsonl(data, [_row("c1", "m1", [{"role": "robot", "content": "x"}])])
    with pytest.raises(BattleDataError, match=r"row 1, column 'conversation': message 0 has unknown role 'robot'"):
        pair_chatlogs(data, tmp_path / "o.parquet", progress=False)
    with pytest.raises(BattleDataError, match=r"\.parquet or \.jsonl"):
        pair_chatlogs(tmp_path / "chat.csv", tmp_path / "o.parquet", progress=False)
    # nothing pairable: an error, no battle file, and the report says why
    _write_jsonl(data, _many_prompts(3, models=("m1",)))
    with pytest.raises(NoPairsError, match="no usable pairs"):
        pair_chatlogs(data, tmp_path / "o.parquet", progress=False)
    assert not (tmp_path / "o.parquet").exists()
    assert json.loads((tmp_path / "o.parquet.report.json").read_text())["dropped"] == {"single_model_prompt": 3}
    # an existing output is never replaced without overwrite, and no shard directory is left behind
    _write_jsonl(data, _many_prompts(3))
    (tmp_path / "o.parquet").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        pair_chatlogs(data, tmp_path / "o.parquet", progress=False)
    assert (tmp_path / "o.parquet").read_text() == "keep me"
    pair_chatlogs(data, tmp_path / "o.parquet", overwrite=True, progress=False)
    assert len(_pairs(tmp_path / "o.parquet")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "o.parquet", "o.parquet.report.json"]


def test_cli_pairs_then_pseudo_labels(finished_run, slice_files, tmp_path, capsys):
    """run.py pair-chatlogs, then run.py pseudo-label on its output: the flywheel's first two steps."""
    import run as cli
    from flywheel.pseudo_label import read_pseudo_labels

    _write_jsonl(tmp_path / "chat.jsonl", _many_prompts(20, ("m1", "m2", "m3")))
    pairs = tmp_path / "pairs.parquet"
    args = ["pair-chatlogs", "--data", str(tmp_path / "chat.jsonl"), "--out", str(pairs), "--train",
            str(slice_files / "train.csv"), "--max-pairs-per-prompt", "2", "--quiet"]
    assert cli.main(args) == 0
    assert "60 conversations read, 60 paired" in capsys.readouterr().out
    assert cli.main(args) == 2  # refuses to overwrite
    assert cli.main([*args, "--overwrite", "--seed", "7"]) == 0
    battles = _pairs(pairs)
    assert len(battles) == 40 and json.loads((tmp_path / "pairs.parquet.report.json").read_text())["params"]["seed"] == 7
    out = tmp_path / "pseudo.jsonl"
    assert cli.main(["pseudo-label", "--run", str(finished_run), "--data", str(pairs), "--out", str(out),
                     "--chunk-rows", "16", "--quiet"]) == 0
    labelled, provenance = read_pseudo_labels(out)
    assert sorted(labelled["id"]) == battles["id"].tolist() and provenance["n_battles"] == 40
    assert (labelled["source"] == "pseudo").all() and labelled["model_a"].isin(["m1", "m2", "m3"]).all()
