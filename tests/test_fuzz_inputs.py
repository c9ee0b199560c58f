"""Property-based: malformed battle files end in a counted repair or a clear error, never a traceback.

Hypothesis writes battle files (CSV in UTF-8 or Latin-1, parquet, JSONL) with broken JSON, odd types,
odd ids, every label combination, huge and empty fields, missing and extra columns. The reader must
either return a valid battle table or raise BattleDataError naming the file (and the row or line
when one row is at fault); run.py must exit 0 with a finished run or exit 2 with one line, and never
leave a run directory that looks finished.

At the byte level, a real sample file (CSV, JSONL, their ``.gz``, parquet) is cut short, re-encoded,
overwritten in places or replaced by arbitrary bytes, inside or outside its compression: every reader
(whole file, chunks, row count) reads it or refuses it in one line naming the file, never another
exception and never a hang.
"""
from __future__ import annotations

import functools
import gzip
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import run as cli
from battles.columns import LABEL_COLUMNS, SOFT_COLUMNS
from battles.formats import count_rows
from battles.io import BattleDataError, read_battles
from battles.stream import iter_battle_chunks
from tests.conftest import shared_file
from tests.cli_helpers import no_hang  # noqa: E402

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
WORDS = st.lists(st.sampled_from(["why", "sky", "blue", "café", "write", "poem", "code", "π", "ok"]), min_size=1,
                 max_size=6).map(" ".join)
BAD_TURNS = st.one_of(
    TEXT,  # plain text, broken JSON
    st.lists(st.one_of(st.integers(), st.just({"role": "user"})), min_size=1, max_size=2).map(json.dumps),
    st.sampled_from(['["half a list"', '{"role": "user"}', "null", '"a bare string"', "[]", "42"]),
)
REPAIRABLE_TURNS = st.sampled_from(['[null]', '["\\ud83d"]', '[""]'])  # null turn, lone surrogate, empty reply
HUGE_TURNS = st.integers(1000, 20000).map(lambda n: json.dumps(["word " * n]))
ID = st.one_of(st.text(max_size=6), st.integers(-5, 10**6), st.sampled_from(["NaN", "null", "NA", "None", "", "  "]),
               st.floats(allow_nan=True, allow_infinity=False), st.none())
LABEL = st.one_of(st.sampled_from([0, 1]), st.sampled_from(["0", "1", "", "yes", "2", "1.0", "0.5"]), st.none())
SOFT = st.one_of(st.floats(-0.5, 1.5), st.just(1 / 3), st.none(), st.just("x"))
MUTATIONS = ["bad_turns", "repairable_turns", "huge_turns", "id", "label", "soft", "weight", "drop_column",
             "extra_column", "turn_count"]


@st.composite
def battle_rows(draw):
    """A valid battle file of 3-40 rows, then 0-3 mutations from MUTATIONS."""
    n = draw(st.integers(3, 40))
    rows = []
    for i in range(n):
        turns = draw(st.integers(1, 2))
        k = draw(st.integers(0, 2))
        rows.append({"id": f"b{i}", **{c: json.dumps([draw(WORDS) for _ in range(turns)])
                                       for c in ("prompt", "response_a", "response_b")},
                     **{c: int(j == k) for j, c in enumerate(LABEL_COLUMNS)}})
    frame = pd.DataFrame(rows)
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), max_size=3))
    for mutation in sorted(mutations, key=lambda m: m == "drop_column"):  # a dropped column stays dropped
        i = draw(st.integers(0, n - 1))
        column = draw(st.sampled_from(["prompt", "response_a", "response_b"]))
        if mutation == "bad_turns":
            frame.loc[i, column] = draw(BAD_TURNS)
        elif mutation == "repairable_turns":
            frame.loc[i, column] = draw(REPAIRABLE_TURNS)
            frame.loc[i, [c for c in ("prompt", "response_a", "response_b") if c != column]] = '["x"]'
        elif mutation == "huge_turns":
            frame.loc[i, column] = draw(HUGE_TURNS)
        elif mutation == "turn_count":
            frame.loc[i, column] = json.dumps(["a", "b", "c"])
        elif mutation == "id":
            frame["id"] = frame["id"].astype(object)
            frame.loc[i, "id"] = draw(ID)
        elif mutation == "label":
            frame[LABEL_COLUMNS] = frame[LABEL_COLUMNS].astype(object)
            frame.loc[i, draw(st.sampled_from(LABEL_COLUMNS))] = draw(LABEL)
        elif mutation == "soft":
            for c in SOFT_COLUMNS:
                frame[c] = frame.get(c, pd.Series([None] * n, dtype=object)).astype(object)
                frame.loc[i, c] = draw(SOFT)
        elif mutation == "weight":
            frame["weight"] = frame.get("weight", pd.Series([1.0] * n)).astype(object)
            frame.loc[i, "weight"] = draw(st.one_of(st.floats(-1, 3), st.just("heavy"), st.none()))
        elif mutation == "drop_column":
            frame = frame.drop(columns=[draw(st.sampled_from(list(frame.columns)))])
        else:
            frame["extra_column"] = "x"
    return frame


def _write(frame: pd.DataFrame, folder: Path, kind: str) -> Path | None:
    path = folder / f"battles.{kind}"
    try:
        if kind == "csv":
            frame.to_csv(path, index=False, encoding="utf-8")
        elif kind == "latin1.csv":
            frame.to_csv(path, index=False, encoding="latin-1", errors="replace")
        elif kind == "parquet":
            frame.to_parquet(path)
        else:
            path.write_text("".join(json.dumps(r, default=str) + "\n" for r in frame.to_dict("records")))
    except Exception as exc:  # pyarrow refuses mixed-type columns; Latin-1 cannot hold every character
        if type(exc).__module__.startswith(("pyarrow", "builtins")):
            return None
        raise
    return path


def _check_table(battles: pd.DataFrame) -> None:
    assert battles["id"].map(lambda x: isinstance(x, str) and x.strip() != "").all()
    assert battles["id"].is_unique
    for c in ("prompt", "response_a", "response_b"):
        assert battles[c].map(lambda turns: len(turns) > 0 and all(isinstance(t, str) for t in turns)).all()
    if all(c in battles.columns for c in LABEL_COLUMNS):
        labels = battles[LABEL_COLUMNS].to_numpy(dtype=float)
        hard = ~np.isnan(labels).any(axis=1)
        assert (labels[hard].sum(axis=1) == 1).all()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=battle_rows(), kind=st.sampled_from(["csv", "latin1.csv", "parquet", "jsonl"]))
def test_reader_repairs_or_names_the_problem(frame, kind):
    with tempfile.TemporaryDirectory() as folder:
        path = _write(frame, Path(folder), kind)
        assume(path is not None)
        try:
            battles, report = read_battles(path, require_labels=True)
        except BattleDataError as exc:
            assert str(exc).startswith(str(path)), exc
            assert exc.row is not None or exc.line is not None or "column" in str(exc) or "file" in str(exc) \
                or "battles" in str(exc), exc
        else:
            _check_table(battles)
            assert report.rows == len(battles)


LIGHT = {"n_folds": 3, "stages": {"length_lr": {"type": "length_lr"}}, "stacker": {"C_grid": [0.1]}}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=battle_rows(), kind=st.sampled_from(["csv", "parquet", "jsonl"]))
def test_run_exits_cleanly_and_never_leaves_a_run_that_looks_finished(frame, kind):
    """Through the whole command: files that pass the reader reach the folds, the stage and the ensemble;
    every example must end in exit 0 with a finished run or exit 2 with one line."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        path = _write(frame, folder, kind)
        assume(path is not None)
        (folder / "light.json").write_text(json.dumps(LIGHT))
        out = folder / "run"
        code = cli.main(["--train", str(path), "--out", str(out), "--config", str(folder / "light.json"), "--quiet"])
        assert code in (0, 2)
        finished = [out / "ensemble" / "ensemble.json", out / "report.html"]
        if code == 0:
            assert all(p.exists() for p in finished)
        else:
            assert not any(p.exists() for p in finished)


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl"])
def test_fuzz_writer_round_trips_a_valid_file(arena_frame, tmp_path, kind):
    """The generator's writer itself is sound: a valid slice written each way reads back whole."""
    path = _write(arena_frame.head(20), tmp_path, kind)
    battles, _ = read_battles(path)
    assert len(battles) == 20


# ---------------------------------------------------------------------------------------- damaged bytes
ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be", "latin-1", "cp1252", "utf-8-sig", "shift_jis"]


@functools.cache
def sample_bytes() -> dict[str, bytes]:
    """A real sample file in every format, as bytes (12 rows: CSV, JSONL, parquet)."""
    frame = pd.read_csv(shared_file("arena/train_sample.csv"), dtype=str, keep_default_na=False).head(12)
    parquet = io.BytesIO()
    frame.to_parquet(parquet)
    return {"csv": frame.to_csv(index=False).encode(), "parquet": parquet.getvalue(),
            "jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in frame.to_dict("records")).encode()}


@st.composite
def damage(draw, data: bytes, text: bool) -> bytes:
    """One change to the bytes: cut short, re-encoded (text only), overwritten in places, NULs put in, or
    replaced by arbitrary bytes."""
    how = draw(st.sampled_from(["cut", "reencode" if text else "cut", "overwrite", "nuls", "arbitrary"]))
    if how == "cut":
        return data[:draw(st.integers(0, len(data)))]
    if how == "reencode":
        return data.decode("utf-8").encode(draw(st.sampled_from(ENCODINGS)), errors="replace")
    if how == "arbitrary":
        return draw(st.binary(max_size=3000))
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        patch = bytes(draw(st.integers(1, 64))) if how == "nuls" else draw(st.binary(min_size=1, max_size=64))
        data[at:at + len(patch)] = patch
    return bytes(data)




@settings(max_examples=300, deadline=5000)
@given(data=st.data(), kind=st.sampled_from(["csv", "csv.gz", "jsonl", "jsonl.gz", "parquet"]),
       inside=st.booleans())
def test_damaged_bytes_are_read_or_refused_in_one_line(data, kind, inside):
    """``inside``: a ``.gz`` file's content is damaged before compressing (else its compressed bytes)."""
    raw = sample_bytes()[kind.split(".")[0]]
    compressed = kind.endswith(".gz")
    if compressed and inside:
        raw = gzip.compress(data.draw(damage(raw, text=True)), mtime=0)
    elif compressed:
        raw = data.draw(damage(gzip.compress(raw, mtime=0), text=False))
    else:
        raw = data.draw(damage(raw, text=kind != "parquet"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"battles.{kind}"
        path.write_bytes(raw)
        for read in (read_battles, lambda p: list(iter_battle_chunks(p, rows=5)), count_rows):
            try:
                with no_hang():
                    result = read(path)
            except BattleDataError as exc:
                message = str(exc)
                assert message.startswith(str(path)) and message[len(str(path))] in ":," and "\n" not in message
                event(f"refused: {exc.message.split(';')[0].split(':')[0][:40]}")
            else:
                if read is read_battles:
                    _check_table(result[0])
