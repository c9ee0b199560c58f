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
    packed = pack_battle(*fields_of(multi), count_tokens, PackingPolicy(max_tokens=100_000))
    assert packed.truncated == {f: False for f in FIELDS}
    for name in FIELDS:
        assert getattr(packed, name) == join_turns(multi[name])
        assert " [...] " not in getattr(packed, name) and "omitted]" not in getattr(packed, name)
    assert packed.prompt.startswith("Turn 1: ") and f"Turn {len(multi['prompt'])}: " in packed.prompt


def test_long_multi_turn_battle_keeps_last_turn_within_budget(battles, count_tokens):
    lengths = battles["prompt"].map(len)
    row = battles[lengths == lengths.max()].iloc[0]  # the longest conversation in the sample (15 turns)
    n = len(row["prompt"])
    policy = PackingPolicy(max_tokens=512)
    packed = pack_battle(*fields_of(row), count_tokens, policy)
    needs = [count_tokens(join_turns(row[f])) for f in FIELDS]
    budgets = allocate_budget(needs, [0.2, 0.4, 0.4], 512)
    assert sum(needs) > 512 and all(packed.truncated.values())
    for name, budget in zip(FIELDS, budgets):
        text = getattr(packed, name)
        assert count_tokens(text) <= budget
        last = f"Turn {n}: " + row[name][-1]
        # the most recent turn is kept: whole, or its head followed by the cut marker
        assert last in text or (text.endswith(policy.cut_marker) and f"Turn {n}: " in text)
        assert text.startswith("[") and "earlier turn" in text  # older turns were dropped and counted
        assert "Turn 1: " not in text
    # the counted number of dropped turns is right
    first_kept = int(packed.prompt.split("Turn ")[1].split(":")[0])
    assert packed.prompt.startswith(dropped_marker(first_kept - 1))


def test_whole_sample_budget_and_markers(battles, count_tokens):
    """Every sample battle at a 256-token budget: per-field budgets hold, markers iff cut, no waste."""
    policy = PackingPolicy(max_tokens=256)
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
            if packed.truncated[name]:
                assert policy.cut_marker in text or "earlier turn" in text, (row["id"], name)
            else:
                assert text == join_turns(row[name]), (row["id"], name)  # unchanged, not padded
        if any(packed.truncated.values()):
            n_cut += 1
            # cut fields use the room: at most a few tokens per field are left idle
            assert used >= 256 - 3 * 8, (row["id"], used)
        else:
            assert sum(needs) <= 256
    assert n_cut > 50  # the sample has plenty of long battles; this test must exercise cutting


def test_single_turn_cut_keeps_head(count_tokens):
    text = " ".join(f"word{i}" for i in range(400))
    packed, cut = pack_field([text], 40, count_tokens, PackingPolicy())
    assert cut and packed.endswith(" [...] ") and packed.startswith("word0 word1")
    assert count_tokens(packed) <= 40 and count_tokens(packed) >= 30


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="prompt_share"):
        PackingPolicy(prompt_share=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        PackingPolicy(max_tokens=0)
