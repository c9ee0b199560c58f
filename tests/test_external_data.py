"""External data: converters on real files and real-shaped synthetic files, de-duplication."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from battles.columns import LABEL_COLUMNS
from battles.io import BattleDataError, read_battles
from battles.labels import label_index
from flywheel.converters import (
    from_arena_conversations,
    from_competition,
    from_preference_pairs,
    from_scored_answers,
)
from flywheel.dedup import DedupConfig, deduplicate, find_duplicates
from flywheel.messages import split_transcript
from tests.conftest import shared_file

# ------------------------------------------------------------------ converters on the real files


def test_pandalm_through_competition_converter():
    battles, report = from_competition(shared_file("external/pandalm_testset_v1.csv"), source="pandalm")
    assert len(battles) == 999 and report.rows_read == 999 and report.kept == 999
    assert set(battles["source"]) == {"pandalm"}
    assert battles["id"].str.startswith("pandalm:").all()
    # six replies are JSON `true` in the file: kept as text and counted, not a crash
    assert report.repairs["scalar_turns_as_text"] == 6
    assert all(isinstance(t, str) for turns in battles["response_a"] for t in turns)
    assert (battles[LABEL_COLUMNS].sum(axis=1) == 1).all()


def test_hh_rlhf_competition_file_drops_broken_rows_with_reason():
    path = shared_file("external/hh_rlhf_harmless_base_test.csv")
    battles, report = from_competition(path, source="hh_rlhf")
    assert report.dropped == {"invalid_turn_counts_differ": 9}
    assert report.kept == 2312 - 9 == len(battles)
    assert report.examples[0]["row"] == 668  # file row numbers survive the drops
    assert battles["winner_tie"].sum() == 0
    multi = battles[battles["prompt"].map(len) > 1].iloc[0]
    # shared earlier assistant turns on both sides, the last one differs
    assert multi["response_a"][:-1] == multi["response_b"][:-1]
    assert multi["response_a"][-1] != multi["response_b"][-1]
    with pytest.raises(BattleDataError, match=r"row 668, column 'prompt': turn counts differ"):
        from_competition(path, source="hh_rlhf", invalid_rows="raise")


def test_arena_bench_scores_to_pairs():
    path = shared_file("external/arena_bench_v1_gpt4_scores.csv")
    raw = pd.read_csv(path)
    battles, report = from_scored_answers(path, source="arena_bench", seed=3)
    sizes = raw.groupby("question_id").size()
    assert report.kept + report.dropped.get("identical_replies", 0) == int((sizes * (sizes - 1) // 2).sum())
    assert battles["id"].is_unique
    # labels follow the scores: look two battles up in the raw file
    score = raw.set_index(["question_id", "model"])["gpt4_score"]
    for _, row in battles.sample(50, random_state=0).iterrows():
        qid = row["id"].split(":")[1]
        sa, sb = score[(qid, row["model_a"])], score[(qid, row["model_b"])]
        expected = 2 if sa == sb else (0 if sa > sb else 1)
        assert label_index(row.to_frame().T)[0] == expected
    # A/B are balanced by the seeded coin, ties exist
    counts = battles[LABEL_COLUMNS].sum()
    assert abs(counts["winner_model_a"] - counts["winner_model_b"]) < 0.05 * len(battles)
    assert counts["winner_tie"] > 0
    # capped and tie-free: stable ids, a subset of the full conversion
    capped, rep2 = from_scored_answers(path, source="arena_bench", seed=3, max_pairs_per_prompt=5, keep_ties=False)
    assert capped.groupby(capped["id"].str.split(":").str[1]).size().max() <= 5
    assert capped["winner_tie"].sum() == 0 and rep2.dropped["tie_dropped"] > 0
    assert set(capped["id"]) <= set(battles["id"])
    again, _ = from_scored_answers(path, source="arena_bench", seed=3, max_pairs_per_prompt=5, keep_ties=False)
    assert again["id"].tolist() == capped["id"].tolist()


# ------------------------------------------------------------------ synthetic, real-shaped files

HH_CHOSEN = ("\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt."
             "\n\nHuman: How long do I knead it?\n\nAssistant: About ten minutes, until it is smooth.")
HH_REJECTED = ("\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt."
               "\n\nHuman: How long do I knead it?\n\nAssistant: Buy bread instead.")


def test_split_transcript():
    turns = split_transcript(HH_CHOSEN)
    assert [r for r, _ in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[3][1] == "About ten minutes, until it is smooth."
    # "Human:" inside a sentence is not a turn boundary
    assert len(split_transcript("\n\nHuman: say Human: twice\n\nAssistant: Human: ok")) == 2


def test_preference_pairs_transcripts_jsonl(tmp_path):
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_REJECTED},
        {"chosen": "\n\nHuman: hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: hi\n\nAssistant: Hello!"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"},
        {"chosen": "\n\nHuman: q\n\nAssistant: x\n\nHuman: more?", "rejected": "\n\nHuman: q\n\nAssistant: y"},
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    battles, report = from_preference_pairs(path, source="hh", seed=0)
    assert report.rows_read == 4 and report.kept == 1
    assert report.dropped == {"identical_replies": 1, "prompt_mismatch": 1, "no_final_reply": 1}
    b = battles.iloc[0]
    assert b["prompt"] == ["How do I bake bread?", "How long do I knead it?"]
    assert b["response_a"][0] == b["response_b"][0] == "Mix flour, water, yeast and salt."
    chosen_side = "response_a" if b["winner_model_a"] else "response_b"
    assert b[chosen_side][-1] == "About ten minutes, until it is smooth."
    assert b["source"] == "hh" and b["id"] == "hh:0"


def test_preference_pairs_coin_is_seeded_and_balanced(tmp_path):
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(400)], "prompt": [f"question {i}" for i in range(400)],
                          "chosen": [f"good answer {i}" for i in range(400)],
                          "rejected": [f"bad answer {i}" for i in range(400)]})
    path = tmp_path / "pairs.csv"
    frame.to_csv(path, index=False)
    b1, _ = from_preference_pairs(path, source="p", seed=1)
    b2, _ = from_preference_pairs(path, source="p", seed=1)
    b3, _ = from_preference_pairs(path, source="p", seed=2)
    assert b1.equals(b2)
    assert not np.array_equal(label_index(b1), label_index(b3))
    assert 150 < b1["winner_model_a"].sum() < 250 and b1["winner_tie"].sum() == 0
    won = np.where(b1["winner_model_a"] == 1, b1["response_a"].str[0], b1["response_b"].str[0])
    assert all(w.startswith("good") for w in won)


def test_preference_pairs_prompt_transcript_plus_bare_replies_and_messages(tmp_path):
    frame = pd.DataFrame({
        "prompt": ["\n\nHuman: Name a colour.\n\nAssistant:",
                   json.dumps([{"role": "user", "content": "2+2?"}])],
        "chosen": [" Blue.", json.dumps([{"role": "assistant", "content": "4"}])],
        "rejected": [" Seven.", json.dumps([{"role": "assistant", "content": "5"}])],
    })
    battles, report = from_preference_pairs(frame, source="mix", seed=0)
    assert report.kept == 2
    assert battles["prompt"].tolist() == [["Name a colour."], ["2+2?"]]
    assert sorted(battles.iloc[1][["response_a", "response_b"]].str[0]) == ["4", "5"]


def test_preference_pairs_bad_input_names_row_and_column(tmp_path):
    frame = pd.DataFrame({"prompt": ["x", "y"], "chosen": ["a", json.dumps([{"role": "wizard", "content": "z"}])],
                          "rejected": ["b", json.dumps([{"role": "assistant", "content": "w"}])]})
    with pytest.raises(BattleDataError, match=r"row 2, column 'chosen'.*unknown role 'wizard'"):
        from_preference_pairs(frame, source="bad")
    with pytest.raises(BattleDataError, match="missing column 'rejected'"):
        from_preference_pairs(frame.drop(columns="rejected"), source="bad")


def test_arena_conversation_logs(tmp_path):
    def conv(*pairs):
        out = []
        for u, a in pairs:
            out += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return out

    rows = [
        {"question_id": "q1", "model_a": "m1", "model_b": "m2", "winner": "model_b",
         "conversation_a": conv(("hi", "hello")), "conversation_b": conv(("hi", "hey there"))},
        {"question_id": "q2", "model_a": "m1", "model_b": "m3", "winner": "tie (bothbad)",
         "conversation_a": conv(("1", "a"), ("2", "b")), "conversation_b": conv(("1", "c"), ("2", "d"))},
        {"question_id": "q3", "model_a": "m1", "model_b": "m3", "winner": "tie",
         "conversation_a": conv(("x", "a")), "conversation_b": conv(("y", "c"))},
    ]
    path = tmp_path / "arena.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    battles, report = from_arena_conversations(path, source="arena33k")
    assert report.kept == 2 and report.dropped == {"prompt_mismatch": 1}
    assert label_index(battles).tolist() == [1, 2]
    assert battles.iloc[1]["prompt"] == ["1", "2"] and battles.iloc[1]["response_b"] == ["c", "d"]
    assert battles["id"].tolist() == ["arena33k:q1", "arena33k:q2"]
    rows[0]["winner"] = "model_c"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BattleDataError, match=r"row 1, column 'winner'"):
        from_arena_conversations(path, source="arena33k")


# ------------------------------------------------------------------ de-duplication

LONG = ("Write a short story about a lighthouse keeper who discovers that the light has been signalling "
        "to ships that do not exist, and who must decide whether to keep the lamp burning through the "
        "winter storms while the village below forgets that the lighthouse was ever there at all, "
        "told in the first person with a calm and slightly sad voice")


def _battle(i, prompt, a, b, source="target"):
    return {"id": f"{source}{i}", "prompt": [prompt], "response_a": [a], "response_b": [b],
            "winner_model_a": 1, "winner_model_b": 0, "winner_tie": 0, "source": source}


def _frame(rows):
    return pd.DataFrame(rows)


def test_dedup_planted_duplicates():
    target = _frame([_battle(i, f"Distinct target prompt number {i} about topic {i * 7} with enough words here",
                             f"reply a {i}", f"reply b {i}") for i in range(20)]
                    + [_battle(99, LONG, "The keeper climbed the stairs.", "Once upon a time.")])
    edited = LONG.replace("lighthouse keeper", "lighthouse warden").replace("calm", "quiet")
    ext = _frame([
        _battle(0, "DISTINCT target   prompt number 3 about topic 21 with enough words here", "x", "y", "ext"),
        _battle(1, edited, "other", "replies", "ext"),
        _battle(2, "Distinct target prompt number 5 about topic 35 with enough words here", "reply b 5", "reply a 5", "ext"),
        _battle(3, "A completely new question about gardening tomatoes in pots on a balcony", "p", "q", "ext"),
        _battle(4, "a completely new question about gardening tomatoes in pots on a BALCONY", "P", "q ", "ext"),
        _battle(5, "Something unrelated: how do magnets work, explain simply for a child please", "r", "s", "ext"),
        _battle(6, "Another unrelated thing: what is the capital of Australia and why not Sydney", "reply a 7", "t", "ext"),
    ])
    reasons, report = find_duplicates(target, ext, DedupConfig())
    assert reasons.tolist() == ["exact_prompt_in_target", "near_prompt_in_target", "exact_battle_in_target", "",
                                "exact_within_external", "", ""]
    assert report.flagged == {"exact_reply_in_target": 1}
    assert report.examples["near_prompt_in_target"][0]["match_id"] == "target99"
    kept, _ = deduplicate(target, ext)
    assert kept["id"].tolist() == ["ext3", "ext5", "ext6"]
    # prompt matches kept on request; the same-battle row still goes
    reasons2, _ = find_duplicates(target, ext, DedupConfig(drop_prompt_matches=False))
    assert reasons2.tolist()[:3] == ["", "", "exact_battle_in_target"]
    # exact-only mode misses the edited prompt
    reasons3, _ = find_duplicates(target, ext, DedupConfig(near=False))
    assert reasons3[1] == ""


def test_dedup_near_within_external_and_distinct_kept():
    target = _frame([_battle(i, f"target prompt {i} " + "word " * 10, "a", "b") for i in range(3)])
    r1 = LONG + " and more text about the sea"
    ext = _frame([
        _battle(0, LONG, r1, "A reply that is long enough to be compared by shingles, with many words in it.", "e"),
        _battle(1, LONG.replace("winter", "autumn"), r1.replace("sad", "sombre"),
                "A reply that is long enough to be compared by shingles, with many words in it!", "e"),
        _battle(2, LONG, r1, "A totally different second answer, written by another model entirely, no overlap.", "e"),
    ])
    reasons, report = find_duplicates(target, ext)
    assert reasons.tolist() == ["", "near_within_external", ""]
    assert report.kept == 2 and report.kept_per_source == {"e": 2}


def test_dedup_real_files_find_known_overlap():
    target, _ = read_battles(shared_file("arena/train_sample.csv"))
    bench, _ = from_scored_answers(shared_file("external/arena_bench_v1_gpt4_scores.csv"), source="arena_bench",
                                   max_pairs_per_prompt=3)
    reasons, report = find_duplicates(target, bench)
    # arena-bench prompts were drawn from arena traffic: some equal a target prompt
    assert report.dropped.get("exact_prompt_in_target", 0) >= 1
    # the hit is real: the normalised prompt text is equal
    ex = report.examples["exact_prompt_in_target"][0]
    assert " ".join(ex["external_text"].lower().split()) == " ".join(ex["match_text"].lower().split())


def test_near_duplicate_progress_bar_follows_the_progress_switch(capsys):
    """A long near-duplicate search shows a bar, unless the caller (``--quiet``) turned progress off."""
    words = [f"w{k}" for k in range(60)]
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(words, 10)) for _ in range(5200)]
    target = _frame([_battle(0, "a target prompt of its own with enough words to shingle", "x", "y")])
    ext = _frame([_battle(i, p, "a", "b", "ext") for i, p in enumerate(prompts)])
    config = DedupConfig(drop_prompt_matches=False)
    for progress in (False, True):
        find_duplicates(target, ext, config, progress=progress)
        assert ("near-duplicate prompts" in capsys.readouterr().err) == progress
