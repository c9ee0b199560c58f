"""The one truncation policy: fit a battle's prompt and two replies into a token budget.

Every deep stage (encoder, decoder) packs battles with :func:`pack_battle`, passing its own
tokenizer's length function, so the rules below hold in that model's real tokens.

Rules
-----
1. **Budget per field.** ``policy.max_tokens`` is the budget for the three fields' *content*
   (the caller subtracts its special tokens / template overhead first). The prompt's share is
   ``prompt_share`` (20%); each reply gets half of the rest (40% each). A field that needs less
   than its share keeps only what it needs and the surplus is handed to the other fields in
   proportion to their shares (water-filling), so no field is cut while another wastes room.
2. **Turn layout.** A field is laid out as :func:`battles.text.labelled_text` does it: a single
   turn as is, several turns labelled ``"Turn k: "`` (k counts from 1 in the original
   conversation) and separated by a blank line.
3. **Most recent turns first.** When a field does not fit, turns are kept from the last one
   backwards; older turns are dropped first and a marker ``"[k earlier turns omitted]"`` opens the
   field saying how many. The turn that does not fit whole keeps its head (beginning), followed by
   ``policy.cut_marker``; an older turn is only cut this way if at least ``policy.min_cut_tokens``
   of it fit, otherwise it is dropped. The most recent turn is always kept (cut if needed).
4. **Markers exactly when cut.** ``PackedBattle.truncation.cut[field]`` is True iff some text of
   that field was dropped, and then (budget permitting) the field carries a marker; a field that
   fits is returned unchanged and unpadded.

Counts are measured on the whole packed field string, so the budget holds in real tokens even
where a tokenizer does not count concatenations additively.

What was kept is recorded per battle (:class:`Truncation`: tokens kept, cut or not, whole turns
dropped, per field) and summarised over many battles by :func:`summarize_truncation` (tokens per
field, share of battles cut per field, turns dropped), so a run can report what its models read.
The policy's two settings have no defaults here: ``max_tokens`` is the caller's budget and
``prompt_share`` comes from the stage's params (:class:`models.deep.params.DeepParams`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from battles.text import FIELDS, TURN_SEPARATOR, labelled_text, turn_label


@dataclass
class PackingPolicy:
    """How to share ``max_tokens`` of content between the prompt and the two replies."""

    max_tokens: int  # budget for the three fields' content (special tokens excluded by the caller)
    prompt_share: float  # the prompt's share; each reply gets half of the rest
    cut_marker: str = " [...] "  # appended to the kept head of a turn that was cut
    min_cut_tokens: int = 16  # an older turn is cut to its head only if at least this many tokens fit

    def __post_init__(self):
        if self.max_tokens < 3:
            raise ValueError(f"PackingPolicy.max_tokens must be at least 3 (one per field), got {self.max_tokens}")
        if not 0.0 < self.prompt_share < 1.0:
            raise ValueError(f"PackingPolicy.prompt_share must be in (0, 1), got {self.prompt_share}")


@dataclass(frozen=True)
class PackedField:
    """One field packed: its text (turns joined, markers inserted), the tokens it takes, whether any of
    its text was dropped, and how many whole turns were."""

    text: str
    tokens: int
    cut: bool
    turns_dropped: int


@dataclass(frozen=True)
class Truncation:
    """What packing kept of one battle, per field (keys: ``prompt``, ``response_a``, ``response_b``):
    tokens kept (as the stage's tokenizer counts the packed field), whether the field was cut, and how
    many of its whole turns were dropped."""

    tokens: dict[str, int]
    cut: dict[str, bool]
    turns_dropped: dict[str, int]


@dataclass(frozen=True)
class PackedBattle:
    """Packed texts of one battle and what was kept of it."""

    prompt: str
    response_a: str
    response_b: str
    truncation: Truncation


def dropped_marker(n_dropped: int) -> str:
    return f"[{n_dropped} earlier turn{'s' if n_dropped != 1 else ''} omitted]"


def allocate_budget(needs: Sequence[int], shares: Sequence[float], total: int) -> list[int]:
    """Water-filling: fields needing less than their share get their need; the rest split the remainder by share."""
    alloc = [0] * len(needs)
    open_fields = set(range(len(needs)))
    left = total
    while open_fields:
        weight = sum(shares[i] for i in open_fields)
        satisfied = [i for i in open_fields if needs[i] <= left * shares[i] / weight]
        if not satisfied:
            for i in open_fields:
                alloc[i] = int(left * shares[i] / weight)
            break
        for i in satisfied:
            alloc[i] = needs[i]
            left -= needs[i]
            open_fields.remove(i)
    return alloc


def _longest_head(text: str, build: Callable[[str], str], budget: int, count_tokens: Callable[[str], int]) -> str | None:
    """Longest prefix ``h`` of ``text`` (by characters) with ``count_tokens(build(h)) <= budget``; None if even '' fails."""
    if count_tokens(build("")) > budget:
        return None
    lo, hi = 0, min(len(text), 64 * max(budget, 1))  # no real token spans 64 characters of prose
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(build(text[:mid].rstrip())) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip()


def pack_field(turns: Sequence[str], budget: int, count_tokens: Callable[[str], int],
               policy: PackingPolicy) -> PackedField:
    """Pack one field's turns into ``budget`` tokens (rules 2-4)."""
    turns = list(turns)
    full = labelled_text(turns)
    need = count_tokens(full)
    if need <= budget:
        return PackedField(full, need, False, 0)
    multi = len(turns) > 1
    label = (lambda k: turn_label(k + 1, turns[k])) if multi else (lambda k: turns[k])

    def compose(n_dropped: int, parts: list[str]) -> str:
        return TURN_SEPARATOR.join(([dropped_marker(n_dropped)] if n_dropped else []) + parts)

    def cut(text: str, n_dropped: int) -> PackedField:
        return PackedField(text, count_tokens(text), True, n_dropped)

    kept: list[str] = []
    for k in range(len(turns) - 1, -1, -1):
        whole = label(k)
        if count_tokens(compose(k, [whole] + kept)) <= budget:
            kept.insert(0, whole)
            continue
        # Turn k does not fit whole: keep its head if it is the most recent turn or enough of it fits.
        head = _longest_head(whole, lambda h: compose(k, [h + policy.cut_marker] + kept), budget, count_tokens)
        if head is not None and (not kept or count_tokens(head) >= policy.min_cut_tokens):
            return cut(compose(k, [head + policy.cut_marker] + kept), k)
        if kept:
            return cut(compose(k + 1, kept), k + 1)
        # Not even the marker fits beside the last turn's head: degrade gracefully, still within budget.
        return cut(_longest_head(whole, lambda h: h, budget, count_tokens) or "", k)
    raise AssertionError("unreachable: the whole field was checked to overflow")


def pack_battle(prompt_turns: Sequence[str], a_turns: Sequence[str], b_turns: Sequence[str],
                count_tokens: Callable[[str], int], policy: PackingPolicy) -> PackedBattle:
    """Pack one battle's three fields into ``policy.max_tokens`` tokens as counted by ``count_tokens``."""
    fields = [list(prompt_turns), list(a_turns), list(b_turns)]
    needs = [count_tokens(labelled_text(f)) for f in fields]
    reply_share = (1.0 - policy.prompt_share) / 2
    budgets = allocate_budget(needs, [policy.prompt_share, reply_share, reply_share], policy.max_tokens)
    packed = dict(zip(FIELDS, (pack_field(turns, budget, count_tokens, policy)
                               for turns, budget in zip(fields, budgets))))
    truncation = Truncation({f: p.tokens for f, p in packed.items()}, {f: p.cut for f, p in packed.items()},
                            {f: p.turns_dropped for f, p in packed.items()})
    return PackedBattle(*(packed[f].text for f in FIELDS), truncation=truncation)


def summarize_truncation(records: Sequence[Truncation]) -> dict:
    """What packing did to many battles, per field: mean and largest tokens kept, the share of battles
    cut, the whole turns dropped (in all) and the share of battles that lost at least one turn."""
    n = len(records)
    summary: dict = {"battles": n}
    for name in FIELDS:
        tokens = [r.tokens[name] for r in records]
        dropped = [r.turns_dropped[name] for r in records]
        summary[name] = {
            "mean_tokens": sum(tokens) / n if n else 0.0, "max_tokens": max(tokens, default=0),
            "share_cut": sum(r.cut[name] for r in records) / n if n else 0.0,
            "turns_dropped": sum(dropped), "share_turns_dropped": sum(d > 0 for d in dropped) / n if n else 0.0,
        }
    return summary


def merge_truncation(summaries: Sequence[dict]) -> dict:
    """One :func:`summarize_truncation` of the battles of several summaries (e.g. every fold's): means and
    shares weighted by battles, the largest of the largest, turns dropped added up."""
    n = sum(s["battles"] for s in summaries)
    merged: dict = {"battles": n}
    for name in FIELDS:
        parts = [(s["battles"], s[name]) for s in summaries]
        mean = {k: sum(b * p[k] for b, p in parts) / n if n else 0.0
                for k in ("mean_tokens", "share_cut", "share_turns_dropped")}
        merged[name] = {**mean, "max_tokens": max((p["max_tokens"] for _, p in parts), default=0),
                        "turns_dropped": sum(p["turns_dropped"] for _, p in parts)}
        merged[name] = {k: merged[name][k] for k in ("mean_tokens", "max_tokens", "share_cut", "turns_dropped",
                                                      "share_turns_dropped")}
    return merged
