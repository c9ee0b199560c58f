"""Prompt-reply overlap and A-B similarity on word tokens (no fitting needed).

Per side: how much of the prompt's vocabulary the reply reuses (recall), and token Jaccard with the
prompt. Shared: whether the replies are identical (a near-certain tie signal), token Jaccard between
the replies, and the absolute length gap relative to the total.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from battles.text import plain_text, words
from features.base import FeatureBlock, SidedFeatures
from features.parallel import map_battles


def _jaccard(x: set, y: set) -> float:
    union = len(x | y)
    return len(x & y) / union if union else 1.0


class SimilarityBlock(FeatureBlock):
    name = "sim"

    def transform(self, battles: pd.DataFrame) -> SidedFeatures:
        a, b, shared = map_battles(_similarities, battles, (2, 2, 3), "similarities", self.context.progress)
        return SidedFeatures(["prompt_recall", "prompt_jaccard"], a, b,
                             ["identical", "ab_jaccard", "len_gap_rel"], shared, combine=("a", "b", "diff"))


def _similarities(rows: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-side and shared similarity columns of a chunk of ``(prompt, response_a, response_b)`` battles."""
    side_a, side_b, shared = [], [], []
    for prompt, ra, rb in rows:
        p = set(words(plain_text(prompt)))
        ta, tb = plain_text(ra), plain_text(rb)
        a, b = set(words(ta)), set(words(tb))
        for side, toks in ((side_a, a), (side_b, b)):
            side.append([len(p & toks) / len(p) if p else 0.0, _jaccard(p, toks)])
        total = len(ta) + len(tb)
        shared.append([
            float(ta.strip() == tb.strip()),
            _jaccard(a, b),
            abs(len(ta) - len(tb)) / total if total else 0.0,
        ])
    return np.array(side_a), np.array(side_b), np.array(shared)
