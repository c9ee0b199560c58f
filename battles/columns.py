"""The battle table's one schema: its columns, what each holds, and their order in every file we write.

    id                                          text, unique per file (required)
    prompt, response_a, response_b              lists of strings, one per turn (required)
    model_a, model_b                            text (optional; kept, never a feature)
    winner_model_a, winner_model_b, winner_tie  hard labels, 0/1, one 1 per row (training rows)
    soft_a, soft_b, soft_tie                    soft labels, a distribution (optional; the row's target)
    weight                                      per-row training weight (optional)
    source                                      the file's or external set's tag (always in the table)

Label order is ``[a, b, tie]``; the columns that describe side A and side B come in pairs
(:data:`SIDE_PAIRS`), which the one swap rule (:func:`battles.labels.swap_battles`) exchanges.
Readers and writers name columns through this module only.
"""
from __future__ import annotations

import pandas as pd

ID = "id"
TEXT_COLUMNS = ["prompt", "response_a", "response_b"]
MODEL_COLUMNS = ["model_a", "model_b"]
LABEL_COLUMNS = ["winner_model_a", "winner_model_b", "winner_tie"]
SOFT_COLUMNS = ["soft_a", "soft_b", "soft_tie"]
WEIGHT = "weight"
SOURCE = "source"

REQUIRED_COLUMNS = [ID, *TEXT_COLUMNS]
COLUMNS = [ID, *TEXT_COLUMNS, *MODEL_COLUMNS, *LABEL_COLUMNS, *SOFT_COLUMNS, WEIGHT, SOURCE]  # file order
CONTENT_COLUMNS = [c for c in COLUMNS if c not in MODEL_COLUMNS]  # what a table's content hash covers
SIDE_PAIRS = [("response_a", "response_b"), ("model_a", "model_b"), ("winner_model_a", "winner_model_b"),
              ("soft_a", "soft_b")]


def present(frame: pd.DataFrame, columns=COLUMNS) -> list[str]:
    """The columns among ``columns`` (schema columns by default) that ``frame`` has, in that order."""
    return [c for c in columns if c in frame.columns]
