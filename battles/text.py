"""The text of a battle: how a conversation becomes one string, for each purpose.

A field of the battle table (``prompt``, ``response_a``, ``response_b``) is a list of turns, one
per user turn. Every module that needs a field as one string takes it from here:

* :func:`plain_text` - turns joined by a blank line. Where only the words count: hand-made
  features, TF-IDF, Word2Vec, the stacker's meta features, de-duplication, adversarial validation,
  the report's prompt-length groups.
* :func:`labelled_text` - what a neural model reads: one turn as is; several turns labelled
  ``"Turn k: "`` (k counts from 1) and separated by a blank line, so the model sees where each turn
  starts. The truncation policy (:mod:`models.packing`) and the frozen-encoder embeddings use it.
* :func:`normalised` - case- and whitespace-folded text for exact matching (prompt groups of the
  folds, de-duplication keys).
* :func:`words` - lower-cased word tokens, the one tokeniser of the word-level features.
"""
from __future__ import annotations

import re
from typing import Sequence

TURN_SEPARATOR = "\n\n"
FIELDS = ("prompt", "response_a", "response_b")
_WORD = re.compile(r"\w+", re.UNICODE)


def plain_text(turns: Sequence[str]) -> str:
    """All turns of one field as one text, separated by a blank line."""
    return TURN_SEPARATOR.join(turns)


def turn_label(k: int, text: str) -> str:
    """Turn ``k`` (counting from 1 in the original conversation) with its label."""
    return f"Turn {k}: {text}"


def labelled_text(turns: Sequence[str]) -> str:
    """A field as a model reads it whole: one turn as is, several turns labelled and separated."""
    if len(turns) == 1:
        return turns[0]
    return TURN_SEPARATOR.join(turn_label(k + 1, t) for k, t in enumerate(turns))


def normalised(text: str) -> str:
    """Lower case, whitespace runs folded to one space: the key of exact matching."""
    return " ".join(text.lower().split())


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore runs)."""
    return _WORD.findall(text.lower())
