"""The data layer on real files: every malformed case named in the issue, and the counted repairs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from battles.io import BattleDataError, battles_to_frame, read_battles


def _write(frame: pd.DataFrame, path) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def _raises(path, match, **kwargs):
    with pytest.raises(BattleDataError, match=match) as info:
        read_battles(path, **kwargs)
    return info.value


def test_reads_real_sample_and_counts_repairs(arena_sample_path):
    battles, report = read_battles(arena_sample_path)
    assert len(battles) == 1399
    assert battles[["winner_model_a", "winner_model_b", "winner_tie"]].sum().tolist() == [467, 504, 428]
    assert all(isinstance(t, str) for turns in battles["response_a"] for t in turns)
    assert report.null_turns == 8 and report.multi_turn_battles == 177 and report.empty_replies == 6
    kinds = {e["kind"] for e in report.examples}
    assert {"null_turn", "empty_reply"} <= kinds


def test_missing_column_names_file_and_column(arena_frame, tmp_path):
    path = _write(arena_frame.drop(columns=["response_b"]).head(5), tmp_path / "no_b.csv")
    err = _raises(path, r"missing column\(s\) \['response_b'\]")
    assert "no_b.csv" in str(err)


def test_label_row_with_two_winners(arena_frame, tmp_path):
    bad = arena_frame.head(6).copy()
    bad.loc[3, ["winner_model_a", "winner_model_b", "winner_tie"]] = ["1", "1", "0"]
    err = _raises(_write(bad, tmp_path / "two.csv"), "exactly one winner")
    assert err.row == 4 and "row 4" in str(err)


def test_label_row_with_no_winner_or_bad_value(arena_frame, tmp_path):
    bad = arena_frame.head(6).copy()
    bad.loc[1, ["winner_model_a", "winner_model_b", "winner_tie"]] = ["0", "0", "0"]
    assert _raises(_write(bad, tmp_path / "none.csv"), "exactly one winner").row == 2
    bad = arena_frame.head(6).copy()
    bad.loc[2, "winner_tie"] = "yes"
    err = _raises(_write(bad, tmp_path / "word.csv"), "label must be 0 or 1")
    assert (err.row, err.column) == (3, "winner_tie")


def test_duplicate_ids(arena_frame, tmp_path):
    bad = arena_frame.head(8).copy()
    bad.loc[6, "id"] = bad.loc[2, "id"]
    err = _raises(_write(bad, tmp_path / "dup.csv"), "duplicate id")
    assert err.row == 3 and err.column == "id" and "row 7" in str(err)


@pytest.mark.parametrize("value, message", [
    ("just some text", "not a JSON list of strings"),
    ('{"turn": "hi"}', "expected a JSON list of strings, got dict"),
    ('"a bare string"', "got a single string"),
    ('["fine", 3]', "turn 1 is int"),
    ("[]", "empty list"),
])
def test_field_not_a_json_list_of_strings(arena_frame, tmp_path, value, message):
    bad = arena_frame.head(5).copy()
    bad.loc[4, "response_a"] = value
    err = _raises(_write(bad, tmp_path / "field.csv"), message)
    assert (err.row, err.column) == (5, "response_a")


def test_turn_count_mismatch(arena_frame, tmp_path):
    bad = arena_frame.head(5).copy()
    bad.loc[0, "response_b"] = json.dumps(json.loads(bad.loc[0, "response_b"]) + ["extra"])
    assert _raises(_write(bad, tmp_path / "turns.csv"), "turn counts differ").row == 1


def test_empty_file_and_header_only(arena_frame, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _raises(empty, "empty file")
    header = tmp_path / "header.csv"
    header.write_text(",".join(arena_frame.columns) + "\n")
    _raises(header, "a header but no battles")


def test_unknown_type_and_missing_file(tmp_path):
    odd = tmp_path / "battles.xlsx"
    odd.write_text("x")
    _raises(odd, "unknown file type")
    _raises(tmp_path / "nope.csv", "file not found")


def test_null_turns_and_lone_surrogates_are_repaired_and_counted(arena_frame, tmp_path):
    fixed = arena_frame.head(4).copy()
    fixed.loc[0, "response_a"] = '["first", null]'
    fixed.loc[0, "response_b"] = '["x", "y"]'
    fixed.loc[0, "prompt"] = '["p1", "p2"]'
    fixed.loc[1, "response_b"] = '["half an emoji \\ud83d here, a full one \\ud83d\\ude00"]'
    battles, report = read_battles(_write(fixed, tmp_path / "repair.csv"))
    assert battles.loc[0, "response_a"] == ["first", ""]
    assert report.null_turns == 1 and report.lone_surrogates == 1
    assert battles.loc[1, "response_b"] == ["half an emoji \ufffd here, a full one \U0001F600"]


def test_test_file_has_no_labels_or_model_names(arena_frame, tmp_path):
    test = arena_frame.head(5)[["id", "prompt", "response_a", "response_b"]]
    battles, _ = read_battles(_write(test, tmp_path / "test.csv"))
    assert "winner_model_a" not in battles.columns and "model_a" not in battles.columns
    _raises(tmp_path / "test.csv", "missing label column", require_labels=True)


def test_parquet_and_jsonl_read_the_same(arena_sample_path, tmp_path):
    csv_battles, _ = read_battles(arena_sample_path)
    raw = pd.read_csv(arena_sample_path, dtype=str, keep_default_na=False).head(50)
    raw.to_parquet(tmp_path / "b.parquet")
    with open(tmp_path / "b.jsonl", "w") as fh:
        for rec in raw.to_dict("records"):
            rec = {**rec, **{c: json.loads(rec[c]) for c in ("prompt", "response_a", "response_b")}}
            fh.write(json.dumps(rec) + "\n")
    for name in ("b.parquet", "b.jsonl"):
        other, _ = read_battles(tmp_path / name)
        assert other["id"].tolist() == csv_battles["id"].head(50).tolist()
        assert other["response_b"].tolist() == csv_battles["response_b"].head(50).tolist()
        np.testing.assert_array_equal(other["winner_tie"], csv_battles["winner_tie"].head(50))


def test_round_trip_to_competition_format(arena_battles, tmp_path):
    path = tmp_path / "again.csv"
    battles_to_frame(arena_battles.head(30)).to_csv(path, index=False)
    again, _ = read_battles(path)
    assert again["prompt"].tolist() == arena_battles["prompt"].head(30).tolist()
