"""Read battle files (competition CSV, parquet, JSONL) into the battle table, validating as we go.

The battle table is a pandas DataFrame with ``id``, ``prompt``, ``response_a``, ``response_b`` as
lists of strings (one per turn), optional ``model_a``/``model_b``, the label columns
``winner_model_a/winner_model_b/winner_tie`` when labelled, and ``source``.

Bad input raises :class:`BattleDataError` naming the file, the row and the column. Known quirks of
real files are repaired and counted in a :class:`RepairReport`:

* ``null`` turns (a reply the arena failed to record) become empty strings;
* lone UTF-16 surrogates (half of an escaped emoji pair) become U+FFFD;
* empty replies are kept (an empty reply is a real, usually losing, answer) but counted;
* multi-turn battles are kept whole and counted.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from battles.labels import LABEL_COLUMNS

TEXT_COLUMNS = ["prompt", "response_a", "response_b"]
REQUIRED_COLUMNS = ["id", *TEXT_COLUMNS]
OPTIONAL_COLUMNS = ["model_a", "model_b", *LABEL_COLUMNS, "source", "soft_a", "soft_b", "soft_tie", "weight"]


class BattleDataError(ValueError):
    """A battle file that cannot be read as the battle table. The message names file, row and column."""

    def __init__(self, path, message: str, row: int | None = None, column: str | None = None):
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {message}")
        self.path, self.row, self.column = str(path), row, column


@dataclass
class RepairReport:
    """What the reader changed or noticed, per file. Shown in every run report."""

    file: str = ""
    rows: int = 0
    null_turns: int = 0
    lone_surrogates: int = 0
    empty_replies: int = 0
    empty_prompts: int = 0
    multi_turn_battles: int = 0
    examples: list = field(default_factory=list)

    def note(self, kind: str, row: int, column: str) -> None:
        if len(self.examples) < 10:
            self.examples.append({"kind": kind, "row": row, "column": column})

    def as_dict(self) -> dict:
        return asdict(self)


def _fix_surrogates(text: str, report: RepairReport, row: int, column: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        fixed = "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in fixed)
        report.lone_surrogates += sum(1 for ch in text if 0xD800 <= ord(ch) <= 0xDFFF) - sum(
            1 for ch in fixed if 0xD800 <= ord(ch) <= 0xDFFF
        )
        report.note("lone_surrogate", row, column)
        return fixed


def parse_turns(value, path, row: int, column: str, report: RepairReport) -> list[str]:
    """Parse one text cell into a list of turn strings (JSON list in files, a list in memory)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        turns = list(value)
    elif isinstance(value, str):
        try:
            turns = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BattleDataError(path, f"not a JSON list of strings ({exc.msg}): {value[:60]!r}", row, column) from None
    else:
        raise BattleDataError(path, f"expected a JSON list of strings, got {type(value).__name__} {value!r}", row, column)
    if isinstance(turns, str):  # JSONL files sometimes hold a bare string for a one-turn prompt
        raise BattleDataError(path, "expected a JSON list of strings, got a single string", row, column)
    if not isinstance(turns, list):
        raise BattleDataError(path, f"expected a JSON list of strings, got {type(turns).__name__}", row, column)
    if len(turns) == 0:
        raise BattleDataError(path, "empty list: a battle needs at least one turn", row, column)
    out = []
    for k, turn in enumerate(turns):
        if turn is None:
            report.null_turns += 1
            report.note("null_turn", row, column)
            out.append("")
        elif isinstance(turn, str):
            out.append(_fix_surrogates(turn, report, row, column))
        else:
            raise BattleDataError(
                path, f"turn {k} is {type(turn).__name__} {turn!r}, expected a string or null", row, column
            )
    return out


def _read_frame(path: Path) -> pd.DataFrame:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if not path.exists():
        raise BattleDataError(path, "file not found")
    if path.stat().st_size == 0:
        raise BattleDataError(path, "empty file: no header and no battles")
    try:
        if suffix in (".csv", ".csv.gz"):
            # Text cells are read as plain strings: 'null', 'NA' or '' must not become NaN silently.
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        elif suffix in (".jsonl", ".jsonl.gz", ".json"):
            frame = pd.read_json(path, lines=suffix != ".json", dtype=False)
        else:
            raise BattleDataError(path, f"unknown file type '{suffix}': use .csv, .parquet or .jsonl")
    except BattleDataError:
        raise
    except pd.errors.EmptyDataError:
        raise BattleDataError(path, "empty file: no header and no battles") from None
    except (ValueError, OSError) as exc:
        raise BattleDataError(path, f"cannot be parsed as {suffix}: {exc}") from None
    if len(frame) == 0:
        raise BattleDataError(path, "empty file: a header but no battles")
    return frame


def _parse_label(value, path, row: int, column: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BattleDataError(path, f"label must be 0 or 1, got {value!r}", row, column) from None
    if number not in (0.0, 1.0):
        raise BattleDataError(path, f"label must be 0 or 1, got {value!r}", row, column)
    return int(number)


def battles_from_frame(frame: pd.DataFrame, path="<DataFrame>", source: str | None = None,
                       require_labels: bool | None = None) -> tuple[pd.DataFrame, RepairReport]:
    """Validate and normalise a raw frame (text cells as JSON strings or lists) into the battle table.

    ``require_labels``: True demands the three label columns, False ignores them, None takes them
    when all three are present. Rows are numbered from 1 in errors, as a person counts data rows.
    """
    report = RepairReport(file=str(path), rows=len(frame))
    if len(frame) == 0:
        raise BattleDataError(path, "no battles")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise BattleDataError(path, f"missing column(s) {missing}; found {list(frame.columns)}")
    present_labels = [c for c in LABEL_COLUMNS if c in frame.columns]
    if require_labels and len(present_labels) < 3:
        raise BattleDataError(path, f"missing label column(s) {[c for c in LABEL_COLUMNS if c not in present_labels]}")
    if require_labels is None and 0 < len(present_labels) < 3:
        raise BattleDataError(
            path, f"has label column(s) {present_labels} but not {[c for c in LABEL_COLUMNS if c not in present_labels]}"
        )
    labelled = len(present_labels) == 3 and require_labels is not False

    ids = frame["id"].astype(str).str.strip()
    blank = np.flatnonzero((ids == "") | frame["id"].isna().to_numpy())
    if len(blank):
        raise BattleDataError(path, "empty id", int(blank[0]) + 1, "id")
    dup = ids.duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())[:2] + 1
        raise BattleDataError(path, f"duplicate id {ids.iloc[rows[0] - 1]!r} (also at row {rows[1]})", int(rows[0]), "id")

    out = pd.DataFrame({"id": ids.to_numpy()})
    columns = {c: frame[c].tolist() for c in TEXT_COLUMNS}
    parsed = {c: [] for c in TEXT_COLUMNS}
    for i in range(len(frame)):
        row = i + 1
        for c in TEXT_COLUMNS:
            parsed[c].append(parse_turns(columns[c][i], path, row, c, report))
        n_p, n_a, n_b = (len(parsed[c][-1]) for c in TEXT_COLUMNS)
        if not (n_p == n_a == n_b):
            # The arena records one reply per user turn; a mismatch means the row was cut or merged.
            raise BattleDataError(
                path, f"turn counts differ: prompt {n_p}, response_a {n_a}, response_b {n_b}", row, "prompt"
            )
        if n_p > 1:
            report.multi_turn_battles += 1
        if all(not t.strip() for t in parsed["prompt"][-1]):
            report.empty_prompts += 1
            report.note("empty_prompt", row, "prompt")
        for c in ("response_a", "response_b"):
            if all(not t.strip() for t in parsed[c][-1]):
                report.empty_replies += 1
                report.note("empty_reply", row, c)
    for c in TEXT_COLUMNS:
        out[c] = parsed[c]
    for c in ("model_a", "model_b"):
        if c in frame.columns:
            out[c] = frame[c].astype(str).to_numpy()
    if labelled:
        labels = np.zeros((len(frame), 3), dtype=np.int64)
        for j, c in enumerate(LABEL_COLUMNS):
            values = frame[c].tolist()
            for i, v in enumerate(values):
                labels[i, j] = _parse_label(v, path, i + 1, c)
        bad = np.flatnonzero(labels.sum(axis=1) != 1)
        if len(bad):
            r = int(bad[0])
            raise BattleDataError(
                path,
                f"a labelled battle needs exactly one winner, got {dict(zip(LABEL_COLUMNS, labels[r].tolist()))}",
                r + 1,
                "winner_model_a",
            )
        for j, c in enumerate(LABEL_COLUMNS):
            out[c] = labels[:, j]
    for c in ("soft_a", "soft_b", "soft_tie", "weight"):
        if c in frame.columns:
            out[c] = pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=float)
    if "source" in frame.columns:
        out["source"] = frame["source"].astype(str).to_numpy()
    else:
        out["source"] = source or "target"
    if source is not None:
        out["source"] = source
    return out, report


def read_battles(path, source: str | None = None, require_labels: bool | None = None) -> tuple[pd.DataFrame, RepairReport]:
    """Read a battle file (.csv, .parquet, .jsonl) into the validated battle table and its repair report."""
    path = Path(path)
    return battles_from_frame(_read_frame(path), path, source=source, require_labels=require_labels)


def battles_to_frame(battles: pd.DataFrame) -> pd.DataFrame:
    """The inverse of reading: text lists back to JSON strings, as in the competition CSV."""
    out = battles.copy()
    for c in TEXT_COLUMNS:
        out[c] = [json.dumps(list(v), ensure_ascii=False) for v in out[c]]
    return out


def data_hash(battles: pd.DataFrame) -> str:
    """A stable fingerprint of a battle table's content (ids, texts, labels), for resume keys."""
    h = hashlib.sha256()
    cols = [c for c in ["id", *TEXT_COLUMNS, *LABEL_COLUMNS, "soft_a", "soft_b", "soft_tie", "weight", "source"]
            if c in battles.columns]
    for c in cols:
        h.update(c.encode())
        for v in battles[c].tolist():
            h.update(json.dumps(list(v) if isinstance(v, (list, np.ndarray)) else v, ensure_ascii=False,
                                default=str).encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
    return h.hexdigest()[:16]
