"""Content keys of battles: what identifies a battle by its texts (the turns of prompt, reply A and
reply B), exactly, and one digest of a table's texts. The feature-block cache matches battles and keys
its files by them; the deep stages' prediction path keys its kept encodings by the digest."""
from __future__ import annotations

import hashlib

import pandas as pd

BattleKey = tuple  # (prompt turns, reply A turns, reply B turns), each a tuple of strings


def battle_keys(battles: pd.DataFrame) -> list[BattleKey]:
    """Content keys of battles: exact (compared by value, not by a digest), cheap (string hashes are cached)."""
    return [(tuple(p), tuple(a), tuple(b))
            for p, a, b in zip(battles["prompt"], battles["response_a"], battles["response_b"])]


def texts_digest(keys: list[BattleKey]) -> str:
    """A stable digest of the battles' texts, in order (the on-disk cache key's data part)."""
    h = hashlib.blake2b(digest_size=16)
    for battle in keys:
        for turns in battle:
            h.update(len(turns).to_bytes(4, "little"))
            for t in turns:
                data = t.encode("utf-8", "surrogatepass")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
    return h.hexdigest()
