"""How chat messages become a battle's turns: the one place that reads ``{role, content}`` lists,
ShareGPT ``{from, value}`` lists and ``Human:/Assistant:`` transcripts, and turns them into user turns
and one reply per user turn. Used by the external-data converters and the chat-log pairing.
"""
from __future__ import annotations

import json
import re

import numpy as np

from kernel.errors import BattleDataError

_ROLE = {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system"}


class Unusable(Exception):
    """A row that is understood but cannot become a battle; the message is the drop reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def is_transcript(text: str) -> bool:
    return isinstance(text, str) and bool(re.search(r"(?:^|\n\n)Human:", text)) and "Assistant:" in text


def split_transcript(text: str) -> list[tuple[str, str]]:
    """Split an Anthropic-style ``Human: ... Assistant: ...`` transcript into ``(role, text)`` turns.

    Roles are ``user``/``assistant``. Only markers at the start or after a blank line count, so a
    reply that mentions "Human:" mid-sentence is not split. Text before the first marker is dropped.
    """
    marks = [m for m in re.finditer(r"(?:^|\n\n)(Human|Assistant):", text)]
    turns = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        turns.append((_ROLE[m.group(1).lower()], text[m.end():end].strip()))
    return turns


def parse_messages(value, path, row: int, column: str) -> list[tuple[str, str]] | None:
    """A cell as ``(role, text)`` messages, or None when it is plain text (one turn).

    Understood: a ``Human:/Assistant:`` transcript, a list (or JSON list) of ``{role, content}``
    (or ShareGPT ``{from, value}``) messages, or a list of strings (turns of this column's role).
    """
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError:
                return None  # a plain reply that happens to start with "["
        elif is_transcript(value):
            return split_transcript(value)
        else:
            return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list):
        raise BattleDataError(path, f"expected text, a transcript or a list of messages, got {type(value).__name__}",
                              row, column)
    if value and all(isinstance(m, str) for m in value):
        role = "user" if column == "prompt" else "assistant"
        return [(role, m) for m in value]
    out = []
    for k, msg in enumerate(value):
        if not (isinstance(msg, dict) and ("content" in msg or "value" in msg)):
            raise BattleDataError(path, f"message {k} is not a {{role, content}} object: {str(msg)[:60]!r}", row, column)
        role = str(msg.get("role", msg.get("from", ""))).lower()
        if role not in _ROLE:
            raise BattleDataError(path, f"message {k} has unknown role {role!r}", row, column)
        content = msg.get("content", msg.get("value"))
        out.append((_ROLE[role], "" if content is None else str(content)))
    return out


def _merge_same_role(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop system messages; join consecutive messages of one role (a person sending two messages)."""
    out: list[tuple[str, str]] = []
    for role, text in turns:
        if role == "system":
            continue
        if out and out[-1][0] == role:
            out[-1] = (role, out[-1][1] + "\n\n" + text)
        else:
            out.append((role, text))
    return out


def conversation_to_turns(turns: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """``(role, text)`` messages -> (user turns, assistant turns), one reply per user turn."""
    turns = _merge_same_role(turns)
    if not turns:
        raise Unusable("empty_conversation")
    if turns[0][0] != "user":
        raise Unusable("starts_with_assistant")
    if turns[-1][0] != "assistant":
        raise Unusable("no_final_reply")
    users = [t for r, t in turns if r == "user"]
    replies = [t for r, t in turns if r == "assistant"]
    return users, replies


def is_missing(value) -> bool:
    """A cell with no value at all (None or NaN), as opposed to an empty text."""
    return value is None or (isinstance(value, float) and np.isnan(value))


def conversation_turns(value, path, row: int, column: str) -> tuple[list[str], list[str]]:
    """A cell holding one whole conversation (``{role, content}`` messages) as (user turns, replies);
    a missing cell or plain text is a :class:`BattleDataError` naming file, row and column."""
    if is_missing(value):
        raise BattleDataError(path, "missing value", row, column)
    messages = parse_messages(value, path, row, column)
    if messages is None:
        raise BattleDataError(path, "expected a list of {role, content} messages", row, column)
    return conversation_to_turns(messages)
