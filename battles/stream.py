"""Reading (and writing) large row files in chunks: parquet row batches, JSONL and CSV (``.gz`` too), never whole.

Where :mod:`battles.io` reads a file into one table, this module hands it out ``rows`` at a time,
so a million-row input costs one chunk of memory:

* :func:`iter_frames` - raw pandas frames (cells as stored: JSON strings in CSV, lists in parquet and
  JSONL) with the 0-based index of each chunk's first record; can start at record ``start``.
* :func:`iter_battle_chunks` - the same chunks validated into the battle table by
  :func:`battles.io.battles_from_frame`; errors name the file's row (counted over the whole file,
  as a person counts data rows) and ids must be unique over the whole file.
* :func:`count_rows` (for progress bars with an ETA) and :func:`file_sha256` (what a resume key
  holds to know that a data file did not change);
* :class:`BattleWriter` - the other direction: battle tables appended chunk by chunk to one parquet
  or JSONL file.

A record is a data row: a CSV row, a non-blank JSONL line, a parquet row.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Iterator

import pandas as pd

from battles.io import TEXT_COLUMNS, BattleDataError, battles_from_frame

CHUNK_ROWS = 4096


def file_kind(path) -> str:
    """``parquet``, ``jsonl`` or ``csv`` from the name (``.gz`` allowed for JSONL and CSV)."""
    path = Path(path)
    name = path.name.lower()
    for kind, suffixes in (("parquet", (".parquet", ".pq")), ("jsonl", (".jsonl", ".jsonl.gz", ".ndjson")),
                           ("csv", (".csv", ".csv.gz"))):
        if name.endswith(suffixes):
            return kind
    raise BattleDataError(path, f"unknown file type '{''.join(path.suffixes)}': use .parquet, .jsonl(.gz) or .csv(.gz)")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise BattleDataError(path, "file not found")
    if path.stat().st_size == 0:
        raise BattleDataError(path, "empty file: no rows")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def count_rows(path) -> int:
    """Records in the file (parquet metadata; one streamed pass over JSONL or CSV)."""
    path = Path(path)
    kind = file_kind(path)
    _check_exists(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if kind == "jsonl":
        with _open_binary(path) as f:
            return sum(1 for line in f if line.strip())
    # quoted cells may hold newlines: the CSV parser counts rows, keeping one column
    return sum(len(c) for c in pd.read_csv(path, usecols=[0], dtype=str, keep_default_na=False, chunksize=1 << 16))


def file_sha256(path, block: int = 1 << 20) -> str:
    """The SHA-256 of the file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _jsonl_frames(path: Path, rows: int, start: int, columns) -> Iterator[tuple[int, pd.DataFrame]]:
    records, first, index = [], start, 0
    with _open_binary(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            index += 1
            if index <= start:
                continue  # skipped records are not parsed
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BattleDataError(path, f"line {line_no} is not a JSON object ({exc})") from None
            if not isinstance(rec, dict):
                raise BattleDataError(path, f"line {line_no} is a JSON {type(rec).__name__}, expected an object")
            records.append({k: rec[k] for k in columns if k in rec} if columns else rec)
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
        # Cells as plain strings: 'null', 'NA' or '' must not become NaN silently (as battles.io reads).
        reader = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], chunksize=rows,
                             usecols=(lambda c: c in columns) if columns else None)
        for frame in reader:
            end = position + len(frame)
            if end > start:
                yield max(position, start), frame.iloc[max(0, start - position):].reset_index(drop=True)
            position = end
    except pd.errors.EmptyDataError:
        raise BattleDataError(path, "empty file: no header and no rows") from None
    except (ValueError, pd.errors.ParserError) as exc:
        raise BattleDataError(path, f"cannot be parsed as CSV: {exc}") from None


def iter_frames(path, rows: int = CHUNK_ROWS, start: int = 0,
                columns: list[str] | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(index of the chunk's first record, raw frame of up to ``rows`` records)`` from record
    ``start`` on. ``columns``: read only these (where present; parquet and CSV skip the others)."""
    path = Path(path)
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    kind = file_kind(path)
    _check_exists(path)
    readers = {"parquet": _parquet_frames, "jsonl": _jsonl_frames, "csv": _csv_frames}
    yield from readers[kind](path, rows, start, columns)


def _at_file_row(exc: BattleDataError, offset: int) -> BattleDataError:
    """The reader's error for a chunk, re-numbered to the row of the whole file."""
    if exc.row is None:
        return exc
    where = exc.path + f", row {exc.row}" + (f", column '{exc.column}'" if exc.column is not None else "")
    message = str(exc)[len(where) + 2:]
    return BattleDataError(exc.path, message, exc.row + offset, exc.column)


def iter_battle_chunks(path, rows: int = CHUNK_ROWS, start: int = 0, seen_ids: set | None = None,
                       source: str | None = None) -> Iterator[tuple[int, pd.DataFrame]]:
    """``(index of the first record, battle table)`` per chunk, labels ignored (unlabelled reading).

    ``seen_ids`` (updated in place) holds the ids met so far, so a duplicate id in a later chunk is
    an error naming its row; a resumed job passes the ids of the rows it already wrote.
    """
    seen_ids = set() if seen_ids is None else seen_ids
    for first, frame in iter_frames(path, rows, start):
        try:
            battles, _ = battles_from_frame(frame, path, source=source, require_labels=False)
        except BattleDataError as exc:
            raise _at_file_row(exc, first) from None
        for k, bid in enumerate(battles["id"]):
            if bid in seen_ids:
                raise BattleDataError(path, f"duplicate id {bid!r} (seen in an earlier row)", first + k + 1, "id")
            seen_ids.add(bid)
        yield first, battles


class BattleWriter:
    """Appends battle tables to one parquet file (a row group each) or JSONL file (``.gz`` too).

    ``columns``: what is written, in order; the turn columns as lists of strings, the others as text.
    The caller makes the file atomic (:func:`battles.files.write_atomic` around the whole job).
    """

    def __init__(self, path, kind: str, columns: list[str]):
        self.path, self.kind, self.columns, self.n = Path(path), kind, list(columns), 0
        self._parquet = self._text = None

    def write(self, battles: pd.DataFrame) -> None:
        frame = battles[self.columns]
        if self.kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([(c, pa.list_(pa.string()) if c in TEXT_COLUMNS else pa.string()) for c in self.columns])
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.path, schema)
            self._parquet.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False))
        else:
            if self._text is None:
                opener = gzip.open if self.path.name.endswith(".gz") else open
                self._text = opener(self.path, "wt", encoding="utf-8")
            self._text.write("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in frame.to_dict("records")))
        self.n += len(frame)

    def close(self) -> None:
        for handle in (self._parquet, self._text):
            if handle is not None:
                handle.close()
