"""The battle table: raw records (read by :mod:`battles.formats`) validated, repaired and counted.

The battle table is a pandas DataFrame with ``id``, ``prompt``, ``response_a``, ``response_b`` as
lists of strings (one per turn), optional ``model_a``/``model_b``, the label columns
``winner_model_a/winner_model_b/winner_tie`` when labelled, and ``source``.

Bad input raises :class:`BattleDataError` naming the file, the row (or, for JSONL and encoding
problems, the line) and the column. Ids are text everywhere and kept verbatim: a CSV cell ``NaN``,
``null`` or ``NA`` is the id ``"NaN"``, not a missing value, and ``" 7"`` keeps its space; integer ids
in parquet/JSONL become their decimal text; a missing, empty or all-blank id, or a non-integral
number, is an error. Targets are hard labels (``winner_*``, one 1
per row) or soft labels (``soft_a/soft_b/soft_tie``: finite, >= 0, summing to 1 within 1e-3), per
row; a row may carry both (the soft label is the target). Known quirks of real files are repaired
and counted in a :class:`RepairReport`:

* ``null`` turns (a reply the arena failed to record) become empty strings;
* lone UTF-16 surrogates (half of an escaped emoji pair) become U+FFFD;
* empty replies are kept (an empty reply is a real, usually losing, answer) but counted;
* multi-turn battles are kept whole and counted.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from battles.columns import (
    CONTENT_COLUMNS,
    LABEL_COLUMNS,
    MODEL_COLUMNS,
    REQUIRED_COLUMNS,
    SOFT_COLUMNS,
    TEXT_COLUMNS,
    present,
)
from battles.formats import provenance_of, read_frame
from battles.labels import soft_label_problem
from kernel.errors import BattleDataError


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
    soft_labelled: int = 0
    examples: list = field(default_factory=list)
    provenance: dict | None = None  # a pseudo-label file's provenance line

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


def check_provenance(provenance: dict, path, n_rows: int | None = None) -> None:
    """A pseudo-label file's provenance line: the file is complete exactly when it carries ``n_battles``
    (an unfinished ``pseudo-label`` job writes ``<out>.partial`` without it), and then it must match."""
    if provenance.get("n_battles") is None:
        raise BattleDataError(path, "an unfinished pseudo-label job (its provenance has no n_battles); rerun "
                                    "`run.py pseudo-label` with the same arguments to finish it", line=1)
    if n_rows is not None and provenance["n_battles"] != n_rows:
        raise BattleDataError(path, f"provenance says {provenance['n_battles']} battles, the file has {n_rows}",
                              line=1)


def _id_text(value, path, row: int) -> str:
    """An id cell as text: strings verbatim (spaces included: ``" 7"`` stays ``" 7"``), integers in
    decimal; an empty or all-blank id or any other type is an error."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bool, np.bool_)):
        raise BattleDataError(path, f"id must be text or an integer, got {value!r}", row, "id")
    elif isinstance(value, numbers.Integral):
        text = str(int(value))
    elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        text = str(int(value))  # an integer column that a missing value turned into floats elsewhere
    elif value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        text = ""
    else:
        raise BattleDataError(path, f"id must be text or an integer, got {value!r}", row, "id")
    if not text.strip():
        raise BattleDataError(path, "empty id" if not text else f"empty id (only white space: {text!r})", row, "id")
    return text


def _number(value) -> float:
    """A numeric cell as float; blank text and missing values are NaN, other text raises ValueError."""
    if value is None:
        return float("nan")
    if isinstance(value, str):
        return float("nan") if not value.strip() else float(value)
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(value)
    return float(value)


def _parse_label(value, path, row: int, column: str) -> float:
    """A hard-label cell: 0 or 1 (NaN when blank)."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    try:
        number = _number(value)
    except (TypeError, ValueError):
        raise BattleDataError(path, f"label must be 0 or 1, got {value!r}", row, column) from None
    if not (math.isnan(number) or number in (0.0, 1.0)):
        raise BattleDataError(path, f"label must be 0 or 1, got {value!r}", row, column)
    return number


def _read_targets(frame: pd.DataFrame, out: pd.DataFrame, path, present_labels, present_soft,
                  report: RepairReport) -> None:
    """Hard labels into ``winner_*`` (int 0/1, or float with NaN where a soft-labelled row has none)
    and soft labels into ``soft_*`` (NaN where a row has none). Every row gets a target."""
    n = len(frame)
    soft = np.full((n, 3), np.nan)
    if present_soft:
        for j, c in enumerate(SOFT_COLUMNS):
            for i, v in enumerate(frame[c].tolist()):
                try:
                    soft[i, j] = _number(v)
                except (TypeError, ValueError):
                    raise BattleDataError(path, f"soft label must be a number, got {v!r}", i + 1, c) from None
        for i in range(n):
            problem = soft_label_problem(soft[i])
            if problem:
                raise BattleDataError(path, f"{problem}: {dict(zip(SOFT_COLUMNS, soft[i].tolist()))}", i + 1,
                                      SOFT_COLUMNS[0])
    has_soft = ~np.isnan(soft).any(axis=1)
    report.soft_labelled = int(has_soft.sum())
    hard = np.full((n, 3), np.nan)
    if present_labels:
        for j, c in enumerate(LABEL_COLUMNS):
            for i, v in enumerate(frame[c].tolist()):
                hard[i, j] = _parse_label(v, path, i + 1, c)
    blank = np.isnan(hard).all(axis=1)
    for i in range(n):
        if blank[i] and not has_soft[i]:
            raise BattleDataError(path, f"no target: a training battle needs {LABEL_COLUMNS} (exactly one 1) or "
                                        f"{SOFT_COLUMNS}", i + 1, LABEL_COLUMNS[0])
        if not blank[i] and (np.isnan(hard[i]).any() or hard[i].sum() != 1):
            got = dict(zip(LABEL_COLUMNS, [None if math.isnan(x) else int(x) for x in hard[i]]))
            raise BattleDataError(path, f"a labelled battle needs exactly one winner, got {got}", i + 1,
                                  LABEL_COLUMNS[0])
    if present_labels:
        for j, c in enumerate(LABEL_COLUMNS):
            out[c] = hard[:, j].astype(np.int64) if not blank.any() else hard[:, j]
    if present_soft:
        for j, c in enumerate(SOFT_COLUMNS):
            out[c] = soft[:, j]


def _read_weights(values, path) -> np.ndarray:
    """Row weights: finite and >= 0; a blank cell is weight 1 (as :func:`battles.labels.row_weights` reads it)."""
    w = np.empty(len(values))
    for i, v in enumerate(values):
        try:
            w[i] = _number(v)
        except (TypeError, ValueError):
            raise BattleDataError(path, f"weight must be a number, got {v!r}", i + 1, "weight") from None
        if math.isinf(w[i]) or w[i] < 0:
            raise BattleDataError(path, f"weight must be finite and >= 0, got {v!r}", i + 1, "weight")
    return w


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
    present_soft = [c for c in SOFT_COLUMNS if c in frame.columns]
    for present, names, what in ((present_labels, LABEL_COLUMNS, "label"), (present_soft, SOFT_COLUMNS, "soft-label")):
        if 0 < len(present) < 3 and require_labels is not False:
            raise BattleDataError(path, f"has {what} column(s) {present} but not {[c for c in names if c not in present]}")
    labelled = require_labels is not False and (len(present_labels) == 3 or len(present_soft) == 3)
    if require_labels and not labelled:
        raise BattleDataError(path, f"missing label columns: a training file needs {LABEL_COLUMNS} (hard labels) "
                                    f"or {SOFT_COLUMNS} (soft labels)")

    ids = pd.Series([_id_text(v, path, i + 1) for i, v in enumerate(frame["id"].tolist())], dtype=object)
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
    for c in MODEL_COLUMNS:
        if c in frame.columns:
            out[c] = frame[c].astype(str).to_numpy()
    if labelled:
        _read_targets(frame, out, path, present_labels, present_soft, report)
    if "weight" in frame.columns:
        out["weight"] = _read_weights(frame["weight"].tolist(), path)
    if "source" in frame.columns:
        out["source"] = frame["source"].astype(str).to_numpy()
    else:
        out["source"] = source or "target"
    if source is not None:
        out["source"] = source
    return out, report


def read_battles(path, source: str | None = None, require_labels: bool | None = None) -> tuple[pd.DataFrame, RepairReport]:
    """Read a battle file (.csv, .parquet, .jsonl) into the validated battle table and its repair report.

    ``require_labels``: True demands a target per row (hard or soft labels), False ignores labels,
    None takes them when present. A pseudo-label file's provenance line lands in the report."""
    path = Path(path)
    frame = read_frame(path)
    provenance = provenance_of(path)
    if provenance is not None:
        check_provenance(provenance, path, len(frame))
    battles, report = battles_from_frame(frame, path, source=source, require_labels=require_labels)
    report.provenance = provenance
    return battles, report


def battles_to_frame(battles: pd.DataFrame) -> pd.DataFrame:
    """The inverse of reading: text lists back to JSON strings, as in the competition CSV."""
    out = battles.copy()
    for c in TEXT_COLUMNS:
        out[c] = [json.dumps(list(v), ensure_ascii=False) for v in out[c]]
    return out


def data_hash(battles: pd.DataFrame) -> str:
    """A stable fingerprint of a battle table's content (ids, texts, labels), for resume keys."""
    h = hashlib.sha256()
    for c in present(battles, CONTENT_COLUMNS):
        h.update(c.encode())
        for v in battles[c].tolist():
            h.update(json.dumps(list(v) if isinstance(v, (list, np.ndarray)) else v, ensure_ascii=False,
                                default=str).encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
    return h.hexdigest()[:16]
