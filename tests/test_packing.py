"""The shared truncation policy, pinned on real battles from the sample in real MiniLM tokens."""
import os

import pytest

from battles.text import FIELDS
from battles.text import labelled_text as join_turns
from models.packing import (
    PackingPolicy,
    allocate_budget,
    dropped_marker,
    pack_battle,
    pack_field,
    summarize_truncation,
)


@pytest.fixture(scope="module")
def battles(arena_battles):
    return arena_battles


@pytest.fixture(scope="module")
def count_tokens(minilm_dir):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def fields_of(row):
    return row["prompt"], row["response_a"], row["response_b"]


def test_allocate_budget_shares_and_hands_on_surplus():
    assert allocate_budget([1000, 1000, 1000], [0.2, 0.4, 0.4], 100) == [20, 40, 40]
    # a short prompt keeps its need; the replies split what it leaves
    assert allocate_budget([5, 1000, 1000], [0.2, 0.4, 0.4], 100) == [5, 47, 47]
    # a short reply too: the other reply gets everything left
    assert allocate_budget([5, 10, 1000], [0.2, 0.4, 0.4], 100) == [5, 10, 85]
    # a long prompt may use what short replies leave
    assert allocate_budget([1000, 10, 10], [0.2, 0.4, 0.4], 100) == [80, 10, 10]


def test_nothing_cut_when_it_all_fits(battles, count_tokens):
    multi = battles[battles["prompt"].map(len) >= 3].iloc[0]
    packed = pack_battle(*fields_of(multi), count_tokens, PackingPolicy(max_tokens=100_000, prompt_share=0.2))
    assert packed.truncation.cut == {f: False for f in FIELDS}
    assert packed.truncation.turns_dropped == {f: 0 for f in FIELDS}
    for name in FIELDS:
        assert getattr(packed, name) == join_turns(multi[name])
        assert " [...] " not in getattr(packed, name) and "omitted]" not in getattr(packed, name)
    assert packed.prompt.startswith("Turn 1: ") and f"Turn {len(multi['prompt'])}: " in packed.prompt


def test_long_multi_turn_battle_keeps_last_turn_within_budget(battles, count_tokens):
    lengths = battles["prompt"].map(len)
    row = battles[lengths == lengths.max()].iloc[0]  # the longest conversation in the sample (15 turns)
    n = len(row["prompt"])
    policy = PackingPolicy(max_tokens=512, prompt_share=0.2)
    packed = pack_battle(*fields_of(row), count_tokens, policy)
    needs = [count_tokens(join_turns(row[f])) for f in FIELDS]
    budgets = allocate_budget(needs, [0.2, 0.4, 0.4], 512)
    assert sum(needs) > 512 and all(packed.truncation.cut.values())
    for name, budget in zip(FIELDS, budgets):
        text = getattr(packed, name)
        assert count_tokens(text) <= budget and packed.truncation.tokens[name] == count_tokens(text)
        last = f"Turn {n}: " + row[name][-1]
        # the most recent turn is kept: whole, or its head followed by the cut marker
        assert last in text or (text.endswith(policy.cut_marker) and f"Turn {n}: " in text)
        assert text.startswith("[") and "earlier turn" in text  # older turns were dropped and counted
        assert "Turn 1: " not in text
    # the counted number of dropped turns is right
    first_kept = int(packed.prompt.split("Turn ")[1].split(":")[0])
    assert packed.prompt.startswith(dropped_marker(first_kept - 1))
    assert packed.truncation.turns_dropped["prompt"] == first_kept - 1  # the record counts what the marker says


def test_whole_sample_budget_and_markers(battles, count_tokens):
    """Every sample battle at a 256-token budget: per-field budgets hold, markers iff cut, no waste."""
    policy = PackingPolicy(max_tokens=256, prompt_share=0.2)
    n_cut = 0
    for _, row in battles.iloc[::4].iterrows():
        packed = pack_battle(*fields_of(row), count_tokens, policy)
        needs = [count_tokens(join_turns(row[f])) for f in FIELDS]
        budgets = allocate_budget(needs, [0.2, 0.4, 0.4], 256)
        used = 0
        for name, budget in zip(FIELDS, budgets):
            text = getattr(packed, name)
            used += count_tokens(text)
            assert count_tokens(text) <= budget, (row["id"], name)
            assert packed.truncation.tokens[name] == count_tokens(text)
            if packed.truncation.cut[name]:
                assert policy.cut_marker in text or "earlier turn" in text, (row["id"], name)
            else:
                assert text == join_turns(row[name]), (row["id"], name)  # unchanged, not padded
        if any(packed.truncation.cut.values()):
            n_cut += 1
            # cut fields use the room: at most a few tokens per field are left idle
            assert used >= 256 - 3 * 8, (row["id"], used)
        else:
            assert sum(needs) <= 256
    assert n_cut > 50  # the sample has plenty of long battles; this test must exercise cutting


def test_single_turn_cut_keeps_head(count_tokens):
    text = " ".join(f"word{i}" for i in range(400))
    field = pack_field([text], 40, count_tokens, PackingPolicy(max_tokens=40, prompt_share=0.2))
    assert field.cut and field.turns_dropped == 0
    assert field.text.endswith(" [...] ") and field.text.startswith("word0 word1")
    assert field.tokens == count_tokens(field.text) and 30 <= field.tokens <= 40


def test_truncation_summary_counts_fields_cut_and_turns_dropped(battles, count_tokens):
    policy = PackingPolicy(max_tokens=128, prompt_share=0.2)
    records = [pack_battle(*fields_of(row), count_tokens, policy).truncation for _, row in battles.iloc[:60].iterrows()]
    summary = summarize_truncation(records)
    assert summary["battles"] == 60
    for name in FIELDS:
        assert summary[name]["share_cut"] == sum(r.cut[name] for r in records) / 60
        assert summary[name]["turns_dropped"] == sum(r.turns_dropped[name] for r in records)
        assert summary[name]["max_tokens"] <= 128
    assert summary["response_a"]["share_cut"] > 0.3  # most replies exceed 51 tokens
    assert summarize_truncation([])["prompt"] == {"mean_tokens": 0.0, "max_tokens": 0, "share_cut": 0.0,
                                                  "turns_dropped": 0, "share_turns_dropped": 0.0}


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="prompt_share"):
        PackingPolicy(max_tokens=512, prompt_share=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        PackingPolicy(max_tokens=0, prompt_share=0.2)
