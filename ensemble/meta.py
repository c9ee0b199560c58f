"""Cheap meta features the stacker may see beside the stage logits, and how each one swaps.

Computed from the battles alone (no model): the log length difference of the replies (A minus B),
their log total length, and the log turn count. Swapping A and B flips the sign of the difference
and leaves the others alone; :data:`META_SWAP_SIGN` says so, and the stacker's swap augmentation
and swap-averaged prediction multiply by it. This is the only place these features are defined.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from battles.text import plain_text

META_NAMES = ["log_len_diff", "log_len_total", "log_turns"]
META_SWAP_SIGN = np.array([-1.0, 1.0, 1.0])


def meta_features(battles: pd.DataFrame) -> np.ndarray:
    """``(n, 3)`` meta features in :data:`META_NAMES` order."""
    len_a = np.array([len(plain_text(t)) for t in battles["response_a"]], dtype=np.float64)
    len_b = np.array([len(plain_text(t)) for t in battles["response_b"]], dtype=np.float64)
    turns = np.array([len(t) for t in battles["prompt"]], dtype=np.float64)
    return np.column_stack([np.log1p(len_a) - np.log1p(len_b), np.log1p(len_a + len_b), np.log(turns)])


def swap_meta(meta: np.ndarray) -> np.ndarray:
    """The meta features of the swapped battles."""
    return np.asarray(meta, dtype=np.float64) * META_SWAP_SIGN
