"""Raw records from the files battles come in: CSV, parquet, JSONL (``.gz`` too) and JSON arrays.

The one place that knows file formats. :func:`iter_frames` hands a file out ``rows`` records at a
time (parquet row batches, JSONL lines, CSV chunks), so a million-row input costs one chunk of
memory; :func:`read_frame` is the whole file at once. Cells come as stored: JSON strings in CSV
(every CSV cell is text: ``NaN``, ``null`` or ``NA`` stay text), lists in parquet and JSONL.

Problems name the file and, where one place is at fault, the line, row and column: a cell that is
not UTF-8 (with how to re-encode), a JSONL line that is not a JSON object, a directory, a missing
or empty file, an unknown extension, an unfinished pseudo-label job's ``.partial`` file. A
pseudo-label file's first JSONL line ``{"provenance": {...}}`` is not a record: :func:`provenance_of`
returns it, and every reader here skips it.

A record is a data row: a CSV row, a non-blank JSONL line (the provenance line aside), a parquet row.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path
from typing import Iterator

import pandas as pd

from kernel.errors import BattleDataError

CHUNK_ROWS = 4096
FILE_TYPES = ".csv, .csv.gz, .parquet, .jsonl or .jsonl.gz"
PROVENANCE_KEY = "provenance"  # first JSONL line of a pseudo-label file: {"provenance": {...}}
_SUFFIXES = {".csv": "csv", ".csv.gz": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
             ".jsonl.gz": "jsonl", ".ndjson": "jsonl", ".json": "json"}


def file_type(path) -> str:
    """``csv``, ``parquet``, ``jsonl`` or ``json`` from the file name, or a clear error."""
    path = Path(path)
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if suffixes[-1:] == [".partial"]:  # what an interrupted `run.py pseudo-label` leaves (flywheel/pseudo_label.py)
        raise BattleDataError(path, "an unfinished pseudo-label job; rerun `run.py pseudo-label` with the same "
                                    "arguments to finish it, then use the finished file")
    suffix = "".join(suffixes) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])
    if suffix not in _SUFFIXES:
        what = f"unknown file type '{suffix}'" if suffix else "no file extension"
        raise BattleDataError(path, f"{what}: battle files are {FILE_TYPES}")
    return _SUFFIXES[suffix]


def check_readable(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise BattleDataError(path, "file not found")
    if path.is_dir():
        raise BattleDataError(path, f"is a directory; expected a battle file ({FILE_TYPES})")
    file_type(path)
    if path.stat().st_size == 0:
        raise BattleDataError(path, "empty file: no header and no battles")
    return path


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def not_utf8(path: Path, what: str, **where) -> BattleDataError:
    return BattleDataError(path, f"{what} is not UTF-8 text; re-encode the file as UTF-8 (e.g. "
                                 f"`iconv -f latin1 -t utf-8 '{path.name}' > fixed{''.join(path.suffixes)}`, "
                                 "or re-save it as 'CSV UTF-8' / UTF-8)", **where)


def _locate_bad_bytes(path: Path) -> BattleDataError:
    """The first CSV row (and column) holding bytes that are not UTF-8."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if any(_has_escaped_bytes(h) for h in header):
            return not_utf8(path, "the header")
        for row, cells in enumerate(reader, start=1):
            for col, cell in zip(header, cells):
                if _has_escaped_bytes(cell):
                    return not_utf8(path, "the cell", row=row, column=col, line=reader.line_num)
    return not_utf8(path, "the file")


def _has_escaped_bytes(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` per non-blank line, the provenance line skipped; errors name the line."""
    first = True
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise not_utf8(path, "the line", line=line_no) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BattleDataError(path, f"not a JSON object ({exc.msg} at character {exc.colno})",
                                      line=line_no) from None
            if not isinstance(record, dict):
                raise BattleDataError(path, f"expected a JSON object, got {type(record).__name__}", line=line_no)
            if first and set(record) == {PROVENANCE_KEY}:
                first = False
                continue
            first = False
            yield line_no, record


def provenance_line(provenance: dict) -> str:
    """The first line of a JSONL file with provenance (what :func:`provenance_of` reads back), no newline."""
    return json.dumps({PROVENANCE_KEY: provenance}, ensure_ascii=False, sort_keys=True)


def provenance_of(path) -> dict | None:
    """A JSONL file's provenance record (its first line ``{"provenance": {...}}``), or None."""
    path = Path(path)
    if file_type(path) != "jsonl":
        return None
    with _open_binary(path) as f:
        for raw in f:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return None  # the readers name the problem
                return record[PROVENANCE_KEY] if isinstance(record, dict) and set(record) == {PROVENANCE_KEY} else None
    return None


def _jsonl_frames(path: Path, rows: int, start: int, columns) -> Iterator[tuple[int, pd.DataFrame]]:
    records, first, index = [], start, 0
    for _, record in _jsonl_records(path):
        index += 1
        if index <= start:
            continue
        records.append({k: record[k] for k in columns if k in record} if columns else record)
        if len(records) == rows:
            yield first, pd.DataFrame.from_records(records)
            first, records = first + len(records), []
    if records:
        yield first, pd.DataFrame.from_records(records)


def _parquet_frames(path: Path, rows: int, start: int, columns) -> Iterator[tuple[int, pd.DataFrame]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise BattleDataError(path, f"cannot be read as parquet: {exc}") from None
    if columns:
        columns = [c for c in columns if c in pf.schema_arrow.names]
    position = 0
    for batch in pf.iter_batches(batch_size=rows, columns=columns or None):
        end = position + batch.num_rows
        if end > start:
            if position < start:
                batch = batch.slice(start - position)
            yield max(position, start), batch.to_pandas()
        position = end


def _csv_frames(path: Path, rows: int, start: int, columns) -> Iterator[tuple[int, pd.DataFrame]]:
    position = 0
    try:
        # Every cell is read as text: 'NaN', 'null', 'NA' or '' must not become missing values.
        reader = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8", chunksize=rows,
                             usecols=(lambda c: c in columns) if columns else None)
        for frame in reader:
            end = position + len(frame)
            if end > start:
                yield max(position, start), frame.iloc[max(0, start - position):].reset_index(drop=True)
            position = end
    except UnicodeDecodeError:
        raise _locate_bad_bytes(path) from None
    except pd.errors.EmptyDataError:
        raise BattleDataError(path, "empty file: no header and no battles") from None
    except (ValueError, pd.errors.ParserError) as exc:
        raise BattleDataError(path, f"cannot be parsed as CSV: {exc}") from None


def _json_frames(path: Path, rows: int, start: int, columns) -> Iterator[tuple[int, pd.DataFrame]]:
    try:
        frame = pd.read_json(path, dtype=False)
    except UnicodeDecodeError:
        raise not_utf8(path, "the file") from None
    except ValueError as exc:
        raise BattleDataError(path, f"cannot be parsed as a JSON array of objects: {exc}") from None
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]]
    for first in range(start, len(frame), rows):
        yield first, frame.iloc[first:first + rows].reset_index(drop=True)


def iter_frames(path, rows: int = CHUNK_ROWS, start: int = 0,
                columns: list[str] | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(index of the chunk's first record, raw frame of up to rows records)`` from record ``start``
    on. ``columns``: read only these (where present)."""
    path = check_readable(path)
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    readers = {"parquet": _parquet_frames, "jsonl": _jsonl_frames, "csv": _csv_frames, "json": _json_frames}
    yield from readers[file_type(path)](path, rows, start, columns)


def read_frame(path) -> pd.DataFrame:
    """The whole file as one raw frame; a file without records is an error."""
    path = check_readable(path)
    parts = [frame for _, frame in iter_frames(path, rows=1 << 16)]
    if not parts or sum(map(len, parts)) == 0:
        raise BattleDataError(path, "empty file: a header but no battles" if file_type(path) == "csv" else "no battles")
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


def count_rows(path) -> int:
    """Records in the file (parquet metadata; one streamed pass over JSONL or CSV)."""
    path = check_readable(path)
    kind = file_type(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if kind == "jsonl":
        return sum(1 for _ in _jsonl_records(path))
    if kind == "json":
        return sum(len(frame) for _, frame in _json_frames(path, 1 << 16, 0, None))
    try:  # quoted CSV cells may hold newlines: the CSV parser counts rows, reading one column
        return sum(len(c) for c in pd.read_csv(path, usecols=[0], dtype=str, keep_default_na=False,
                                               encoding="utf-8", chunksize=1 << 16))
    except UnicodeDecodeError:
        raise _locate_bad_bytes(path) from None


def file_sha256(path, block: int = 1 << 20) -> str:
    """The SHA-256 of the file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
