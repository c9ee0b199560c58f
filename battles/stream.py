"""Battle tables in chunks, both ways: read a large battle file a chunk at a time, write one chunk by chunk.

* :func:`iter_battle_chunks` - the raw chunks of :func:`battles.formats.iter_frames` validated into the
  battle table by :func:`battles.io.battles_from_frame`; errors name the file's row (counted over the
  whole file, as a person counts data rows) and ids must be unique over the whole file.
* :class:`BattleWriter` - battle tables appended chunk by chunk to one parquet or JSONL file.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

import pandas as pd

from battles.columns import TEXT_COLUMNS
from battles.formats import CHUNK_ROWS, iter_frames
from battles.io import battles_from_frame
from kernel.errors import BattleDataError


def _at_file_row(exc: BattleDataError, offset: int) -> BattleDataError:
    """The reader's error for a chunk, re-numbered to the row of the whole file."""
    if exc.row is None:
        return exc
    return BattleDataError(exc.path, exc.message, exc.row + offset, exc.column, exc.line)


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
    The caller makes the file atomic (:func:`kernel.files.write_atomic` around the whole job).
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
