"""Raw records from the files battles come in: CSV, parquet, JSONL (``.gz`` too) and JSON arrays.

The one place that knows file formats. :func:`iter_frames` hands a file out ``rows`` records at a
time (parquet row batches, JSONL lines, CSV chunks), so a million-row input costs one chunk of
memory; :func:`read_frame` is the whole file at once. Cells come as stored: JSON strings in CSV
(every CSV cell is text: ``NaN``, ``null`` or ``NA`` stay text), lists in parquet and JSONL.

Problems name the file and, where one place is at fault, the line, row and column: a cell that is
not UTF-8 (with how to re-encode), a UTF-16 or UTF-32 file (found by its byte-order mark or its
pattern of NUL bytes, with the ``iconv`` line for that encoding), binary data in a text file, a JSONL
line that is not a JSON object, a directory, a named pipe or device (refused before it is opened, so
nothing waits on a pipe), a missing or empty file, an unknown extension, compressed data that does
not match the name (a ``.gz`` that is not gzip, gzip or zip data named ``.csv``), a ``.gz`` file that
is cut short or damaged (with how much data it held), an unfinished pseudo-label job's ``.partial``
file. A UTF-8 byte-order mark is read past. A pseudo-label file's first JSONL line
``{"provenance": {...}}`` is not a record: :func:`provenance_of` returns it, and every reader here
skips it.

A record is a data row: a CSV row, a non-blank JSONL line (the provenance line aside), a parquet row.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import stat
import zlib
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


def _not_regular(mode: int) -> str | None:
    """What a path that is not a regular file is (a pipe, a device), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "a special file"


def check_regular_file(path) -> Path:
    """``path`` as a regular file that exists, or a clear error; pipes and devices are refused unopened
    (reading a pipe would wait for a writer, ``/dev/zero`` never ends)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BattleDataError(path, "file not found") from None
    except OSError as exc:
        raise BattleDataError(path, f"cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise BattleDataError(path, f"is a directory; expected a battle file ({FILE_TYPES})")
    what = _not_regular(mode)
    if what:
        raise BattleDataError(path, f"is {what}, not a regular file: battle files are read more than once (counted, "
                                    "hashed, read); save the data to a file and pass that")
    return path


def check_readable(path) -> Path:
    """A battle file that exists, is a regular file of a known type, holds data, and is not in a
    compression or text encoding that the readers would misread (see the module doc)."""
    path = check_regular_file(path)
    kind = file_type(path)
    if path.stat().st_size == 0:
        raise BattleDataError(path, "empty file: no header and no battles")
    if kind != "parquet":
        with _reading(path):
            _check_text_start(path, kind)
    return path


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if _is_gz(path) else open(path, "rb")


_GZIP_MAGIC = b"\x1f\x8b"
_OTHER_DATA = (  # what a text battle file may turn out to hold, by its first bytes, and what to do
    (b"PK\x03\x04", "a zip archive", "unzip it first"),
    (b"BZh", "bzip2-compressed data", "decompress it first (`bunzip2`)"),  # + a level digit and the block magic
    (b"\xfd7zXZ\x00", "xz-compressed data", "decompress it first (`unxz`)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "decompress it first (`zstd -d`)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it first"),
    (b"PAR1", "parquet data", "name it '.parquet'"),
)
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32", "little-endian"), (b"\x00\x00\xfe\xff", "UTF-32", "big-endian"),
         (b"\xff\xfe", "UTF-16", "little-endian"), (b"\xfe\xff", "UTF-16", "big-endian"))


def _other_data(head: bytes) -> tuple[str, str] | None:
    for magic, what, fix in _OTHER_DATA:
        bzip2 = head[3:4].isdigit() and head[4:10] == b"\x31\x41\x59\x26\x53\x59"  # a level, then the block magic
        if head.startswith(magic) and (magic != b"BZh" or bzip2):
            return what, fix
    return None


def _wide_encoding(head: bytes) -> tuple[str, str, bool] | None:
    """``(UTF-16 or UTF-32, byte order, has a byte-order mark)`` when the text's first bytes are in a wide
    encoding: by its byte-order mark, or by the NUL bytes that ASCII characters carry in it."""
    for bom, name, order in _BOMS:
        if head.startswith(bom):
            return name, order, True
    if b"\x00" not in head:
        return None
    quads = [head[i:i + 4] for i in range(0, len(head) - 3, 4)]
    pairs = [head[i:i + 2] for i in range(0, len(head) - 1, 2)]
    for units, name, little, big in (
            (quads, "UTF-32", lambda u: u[0] != 0 and not any(u[1:]), lambda u: u[3] != 0 and not any(u[:3])),
            (pairs, "UTF-16", lambda u: u[0] != 0 and u[1] == 0, lambda u: u[1] != 0 and u[0] == 0)):
        if units:
            n_little, n_big = sum(map(little, units)), sum(map(big, units))
            if max(n_little, n_big) > len(units) / 4:
                return name, "little-endian" if n_little >= n_big else "big-endian", False
    return None


def _reencode_hint(path: Path, source: str) -> str:
    """The shell line that re-encodes ``path`` from ``source`` to UTF-8 (through gzip for a ``.gz``)."""
    fixed = f"fixed{''.join(path.suffixes[-2:] if _is_gz(path) else path.suffixes[-1:])}"
    if _is_gz(path):
        return f"`gzip -dc '{path.name}' | iconv -f {source} -t utf-8 | gzip > {fixed}`"
    return f"`iconv -f {source} -t utf-8 '{path.name}' > {fixed}`"


def _check_text_start(path: Path, kind: str) -> None:
    """Refuse a CSV/JSONL/JSON file whose first bytes show it is compressed, binary or not UTF-8-like."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if _is_gz(path):
        if not head.startswith(_GZIP_MAGIC):
            raise BattleDataError(path, _not_gzip(head))
        with gzip.open(path, "rb") as f:
            head = f.read(4096)
    elif head.startswith(_GZIP_MAGIC):
        raise BattleDataError(path, f"holds gzip-compressed data but its name does not end in '.gz'; name it "
                                    f"'{path.name}.gz' (or decompress it: `gzip -dc`)")
    other = _other_data(head)
    if other:
        raise BattleDataError(path, f"holds {other[0]}, not {kind} text; {other[1]}")
    wide = _wide_encoding(head)
    if wide:
        name, order, bom = wide
        source = name if bom else f"{name}{'LE' if order == 'little-endian' else 'BE'}"
        raise BattleDataError(path, f"is {name} text ({order}{', with a byte-order mark' if bom else ''}), not UTF-8; "
                                    f"re-encode it: {_reencode_hint(path, source)} (or re-save it as UTF-8)")
    if b"\x00" in head:
        raise BattleDataError(path, f"holds NUL bytes: binary data, not {kind} text")


def _not_gzip(head: bytes) -> str:
    if _looks_like_text(head):
        return "not gzip data although its name ends in '.gz' (it starts like plain text: drop '.gz' from the name)"
    return "not gzip data although its name ends in '.gz'; pass a gzip file (`gzip -t` checks one)"


def _looks_like_text(head: bytes) -> bool:
    try:
        head[:512].decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.reason == "unexpected end of data"  # a character cut at the end of the sample
    return b"\x00" not in head


def _gzip_damage(path: Path) -> str | None:
    """What is wrong with a ``.gz`` file that could not be read to its end, with how much data it gave."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.startswith(_GZIP_MAGIC):
        return _not_gzip(head)
    size, n = path.stat().st_size, 0
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read1(1 << 16):
                n += len(block)
    except EOFError:
        return (f"the compressed file is cut short: its {size:,} bytes hold {n:,} bytes of data, then end before "
                "gzip's end-of-stream marker (an interrupted download or copy?); get the whole file again "
                "(`gzip -t` checks one)")
    except (gzip.BadGzipFile, zlib.error) as exc:
        return (f"damaged gzip data after {n:,} bytes of data ({exc}); get the file again or re-compress it "
                "(`gzip -t` checks one)")
    return None


@contextlib.contextmanager
def _reading(path: Path):
    """Failures of reading the file itself (not its content) as one line naming it: damaged or cut-short
    compressed data, an unreadable file."""
    try:
        yield
    except BattleDataError:
        damage = _is_gz(path) and _gzip_damage(path)  # garbage from damaged data may fail the parser first
        if damage:
            raise BattleDataError(path, damage) from None
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BattleDataError(path, (_is_gz(path) and _gzip_damage(path)) or f"cannot be read: {exc}") from None
    except OSError as exc:
        raise BattleDataError(path, f"cannot be read: {exc.strerror or exc}") from None


def not_utf8(path: Path, what: str, **where) -> BattleDataError:
    return BattleDataError(path, f"{what} is not UTF-8 text; re-encode the file as UTF-8 (e.g. "
                                 f"{_reencode_hint(path, 'latin1')}, or re-save it as 'CSV UTF-8' / UTF-8)", **where)


def _locate_bad_bytes(path: Path) -> BattleDataError:
    """The first CSV row (and column) holding bytes that are not UTF-8."""
    opener = gzip.open if _is_gz(path) else open
    with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
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


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` per non-blank line of a JSONL file (gzip too), the provenance line skipped;
    a line that is not UTF-8 or not a JSON object is one error naming the file and line."""
    first = True
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
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
    with _reading(check_regular_file(path)), _open_binary(path) as f:
        for raw in f:
            if raw.strip():
                try:
                    record = json.loads(raw.decode("utf-8-sig"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return None  # the readers name the problem
                return record[PROVENANCE_KEY] if isinstance(record, dict) and set(record) == {PROVENANCE_KEY} else None
    return None


def _jsonl_frames(path: Path, rows: int, start: int, columns) -> Iterator[tuple[int, pd.DataFrame]]:
    records, first, index = [], start, 0
    for _, record in jsonl_records(path):
        index += 1
        if index <= start:
            continue
        records.append({k: record[k] for k in columns if k in record} if columns else record)
        if len(records) == rows:
            yield first, pd.DataFrame.from_records(records)
            first, records = first + len(records), []
    if records:
        yield first, pd.DataFrame.from_records(records)


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise BattleDataError(path, f"cannot be read as parquet: {exc}") from None


def _parquet_frames(path: Path, rows: int, start: int, columns) -> Iterator[tuple[int, pd.DataFrame]]:
    pf = _parquet_file(path)
    if columns:
        columns = [c for c in columns if c in pf.schema_arrow.names]
    position = 0
    try:
        for batch in pf.iter_batches(batch_size=rows, columns=columns or None):
            batch.validate(full=True)  # text that is not UTF-8 would fail later, deep in pandas
            end = position + batch.num_rows
            if end > start:
                if position < start:
                    batch = batch.slice(start - position)
                yield max(position, start), batch.to_pandas()
            position = end
    except Exception as exc:  # damaged pages or metadata: pyarrow and its pandas conversion raise many types
        raise BattleDataError(path, f"cannot be read as parquet after {position:,} rows: {exc}") from None


def _csv_chunks(path: Path, rows: int, usecols=None) -> Iterator[pd.DataFrame]:
    """The CSV in frames of ``rows`` rows, every cell as text; parser errors as one line."""
    try:
        # Every cell is read as text: 'NaN', 'null', 'NA' or '' must not become missing values; ids and
        # cells keep their spaces. A UTF-8 byte-order mark (Excel's 'CSV UTF-8') is read past.
        yield from pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8-sig",
                               chunksize=rows, usecols=usecols)
    except UnicodeDecodeError:
        raise _locate_bad_bytes(path) from None
    except pd.errors.EmptyDataError:
        raise BattleDataError(path, "empty file: no header and no battles") from None
    except (ValueError, pd.errors.ParserError) as exc:
        raise BattleDataError(path, f"cannot be parsed as CSV: {exc}") from None


def _csv_frames(path: Path, rows: int, start: int, columns) -> Iterator[tuple[int, pd.DataFrame]]:
    position = 0
    for frame in _csv_chunks(path, rows, (lambda c: c in columns) if columns else None):
        end = position + len(frame)
        if end > start:
            yield max(position, start), frame.iloc[max(0, start - position):].reset_index(drop=True)
        position = end


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
    with _reading(path):
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
    with _reading(path):
        if kind == "parquet":
            return _parquet_file(path).metadata.num_rows
        if kind == "jsonl":
            return sum(1 for _ in jsonl_records(path))
        if kind == "json":
            return sum(len(frame) for _, frame in _json_frames(path, 1 << 16, 0, None))
        # quoted CSV cells may hold newlines: the CSV parser counts rows, reading one column
        return sum(len(c) for c in _csv_chunks(path, 1 << 16, usecols=[0]))


def file_sha256(path, block: int = 1 << 20) -> str:
    """The SHA-256 of the file's bytes, read in 1 MiB blocks (a pipe or device is refused unopened)."""
    path = check_regular_file(path)
    h = hashlib.sha256()
    with _reading(path), open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
