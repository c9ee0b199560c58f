"""Text helpers shared by the feature blocks: one tokeniser, one way to flatten turns."""
from __future__ import annotations

import re

_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, underscore runs). Used by every word-level feature."""
    return _TOKEN.findall(text.lower())


def join_turns(turns) -> str:
    """All turns of one field as one text, turns separated by a blank line."""
    return "\n\n".join(turns)
