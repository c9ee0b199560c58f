"""Per-reply surface statistics: length, markdown structure, refusals, per-turn figures.

These are the features that carried most of the signal in the competition's classic models: people
prefer longer, structured answers and dislike refusals. Each reply is measured as a whole (all
turns) and by turn (mean, max, last turn); the prompt's own figures go into the swap-invariant
``shared`` columns.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from battles.text import plain_text, words
from features.base import FeatureBlock, SidedFeatures
from features.parallel import map_battles

REFUSAL_PATTERNS = [
    r"\bas an ai\b", r"\bas a language model\b", r"\bi(?: a|')m (?:just )?an ai\b", r"\bi cannot\b",
    r"\bi can(?:'|no)t\b", r"\bi(?: a|')m (?:not able|unable) to\b", r"\bi am sorry\b", r"\bi'm sorry\b",
    r"\bi apologi[sz]e\b", r"\bmy apologies\b", r"\bi do(?:n't| not) have (?:access|the ability|personal)\b",
    r"\bi won(?:'|no)t be able\b", r"\bnot appropriate\b", r"\bi must decline\b", r"\bunfortunately\b",
    r"\bopenai\b", r"\bknowledge cutoff\b",
]
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)

# name -> compiled pattern counted in the text (multiline patterns count lines).
_PATTERNS = {
    "headers": re.compile(r"^\s{0,3}#{1,6}\s", re.MULTILINE),
    "list_items": re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+", re.MULTILINE),
    "numbered_items": re.compile(r"^\s*\d+[.)]\s+", re.MULTILINE),
    "bold": re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__"),
    "code_fences": re.compile(r"^\s*```", re.MULTILINE),
    "inline_code": re.compile(r"(?<!`)`[^`\n]+`(?!`)"),
    "table_rows": re.compile(r"^\s*\|.*\|\s*$", re.MULTILINE),
    "links": re.compile(r"\[[^\]]+\]\([^)]+\)|https?://\S+"),
    "digits": re.compile(r"\d"),
    "question_marks": re.compile(r"\?"),
    "exclamations": re.compile(r"!"),
    "uppercase": re.compile(r"[A-Z]"),
    "non_ascii": re.compile(r"[^\x00-\x7f]"),
    "paragraphs": re.compile(r"\n\s*\n"),
}

SIDE_NAMES = (
    ["chars", "words", "lines", "unique_words", "unique_ratio", "mean_word_len"]
    + list(_PATTERNS)
    + ["code_blocks", "refusals", "empty", "turn_chars_mean", "turn_chars_max", "last_turn_chars",
       "first_turn_chars", "empty_turns"]
)
SHARED_NAMES = ["prompt_chars", "prompt_words", "n_turns", "prompt_last_chars", "prompt_questions"]


def reply_stats(turns: list[str]) -> list[float]:
    text = plain_text(turns)
    toks = words(text)
    n_words = len(toks)
    unique = len(set(toks))
    row = [
        len(text), n_words, text.count("\n") + 1 if text else 0, unique,
        unique / n_words if n_words else 0.0,
        sum(map(len, toks)) / n_words if n_words else 0.0,
    ]
    row += [len(p.findall(text)) for p in _PATTERNS.values()]
    turn_chars = [len(t) for t in turns]
    row += [
        row[6 + list(_PATTERNS).index("code_fences")] // 2,
        len(_REFUSAL.findall(text)),
        float(not text.strip()),
        float(np.mean(turn_chars)), float(max(turn_chars)), turn_chars[-1], turn_chars[0],
        sum(1 for t in turns if not t.strip()),
    ]
    return row


def prompt_stats(turns: list[str]) -> list[float]:
    text = plain_text(turns)
    return [len(text), len(words(text)), len(turns), len(turns[-1]), text.count("?")]


class TextStatsBlock(FeatureBlock):
    """Length, structure and refusal counts per reply; A-B differences and log ratios come from ``combine``."""

    name = "stats"

    def transform(self, battles: pd.DataFrame) -> SidedFeatures:
        a, b, shared = map_battles(_battle_stats, battles, (len(SIDE_NAMES), len(SIDE_NAMES), len(SHARED_NAMES)),
                                   "text statistics", self.context.progress)
        return SidedFeatures(SIDE_NAMES, a, b, SHARED_NAMES, shared)


def _battle_stats(rows: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reply A, reply B and prompt statistics of a chunk of ``(prompt, response_a, response_b)`` battles."""
    return (np.array([reply_stats(a) for _, a, _ in rows], dtype=np.float64),
            np.array([reply_stats(b) for _, _, b in rows], dtype=np.float64),
            np.array([prompt_stats(p) for p, _, _ in rows], dtype=np.float64))
