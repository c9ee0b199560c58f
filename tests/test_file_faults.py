"""Files that are not what their name says, and disks that fill up: one clear line each, never a traceback.

Reading: compressed files cut short or damaged, compression the name does not announce, UTF-16/UTF-32
text (with the iconv line for that encoding, not the Latin-1 one), binary data, pipes and devices
(refused unopened: nothing hangs), ids with spaces (kept verbatim through to the submission).

Writing: the atomic writer turns a refused write into one line naming the file, with the temporary file
removed; a full disk says so. The end-to-end case fills a real, small tmpfs when this process may mount
one (root, as in the CI container) and otherwise an injected byte budget at the writer's rename (the
fallback is named in the test id), then frees space and checks that the rerun ends with the same files.
"""
from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import kernel.files as files
import run as cli
from battles.formats import count_rows, file_sha256, iter_frames
from battles.io import read_battles
from battles.stream import iter_battle_chunks
from kernel.errors import BattleDataError
from kernel.files import (
    DiskFullError,
    FileWriteError,
    refused_writes,
    write_atomic,
    write_json,
    write_npy,
    write_npz,
)
from tests.conftest import FAST_LGBM
from tests.cli_helpers import no_hang  # noqa: E402




def _refused(path, match: str) -> BattleDataError:
    """Every reader (whole file, chunks, row count) refuses ``path`` with the same one line naming it."""
    messages = set()
    for read in (read_battles, lambda p: list(iter_battle_chunks(p, rows=7)), count_rows):
        with no_hang(), pytest.raises(BattleDataError, match=match) as info:
            read(path)
        assert str(info.value)[len(str(path)):][:2] in (": ", ", ") and "\n" not in str(info.value)
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    return info.value


@pytest.fixture(scope="module")
def sample_csv(arena_frame) -> bytes:
    return arena_frame.head(40).to_csv(index=False).encode("utf-8")


@pytest.fixture(scope="module")
def sample_jsonl(arena_frame) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in arena_frame.head(40).to_dict("records")).encode()


# ---------------------------------------------------------------------------------------- compressed files
@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_cut_short_gz_names_the_file_and_how_far_it_got(kind, request, tmp_path):
    data = request.getfixturevalue(f"sample_{kind}")
    packed = gzip.compress(data)
    path = tmp_path / f"battles.{kind}.gz"
    path.write_bytes(packed[: len(packed) * 2 // 3])
    err = _refused(path, "cut short")
    held = int(str(err).split(" bytes hold ")[1].split(" bytes")[0].replace(",", ""))
    assert 0 < held < len(data)  # how far it got: the data before the cut
    assert "gzip -t" in str(err)


def test_damaged_gz_data_and_a_gz_that_is_not_gzip(sample_csv, tmp_path):
    packed = bytearray(gzip.compress(sample_csv))
    packed[len(packed) // 2: len(packed) // 2 + 64] = bytes(64)  # a run of zeros in the middle of the stream
    damaged = tmp_path / "damaged.csv.gz"
    damaged.write_bytes(bytes(packed))
    _refused(damaged, "damaged gzip data after [0-9,]+ bytes of data")

    plain = tmp_path / "plain.csv.gz"
    plain.write_bytes(sample_csv)
    _refused(plain, r"not gzip data although its name ends in '\.gz' \(it starts like plain text: drop '\.gz'")


def test_compression_the_name_does_not_announce(sample_csv, tmp_path):
    gz = tmp_path / "battles.csv"
    gz.write_bytes(gzip.compress(sample_csv))
    _refused(gz, r"gzip-compressed data but its name does not end in '\.gz'; name it 'battles\.csv\.gz'")
    zipped = tmp_path / "zipped.jsonl"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("battles.jsonl", sample_csv)
    _refused(zipped, "holds a zip archive, not jsonl text; unzip it first")


def test_a_gz_file_reads_like_the_plain_file(sample_csv, sample_jsonl, tmp_path):
    for kind, data in (("csv", sample_csv), ("jsonl", sample_jsonl)):
        (tmp_path / f"b.{kind}").write_bytes(data)
        (tmp_path / f"b.{kind}.gz").write_bytes(gzip.compress(data))
        plain, _ = read_battles(tmp_path / f"b.{kind}")
        packed, _ = read_battles(tmp_path / f"b.{kind}.gz")
        pd.testing.assert_frame_equal(plain, packed)
        assert count_rows(tmp_path / f"b.{kind}.gz") == 40


# ---------------------------------------------------------------------------------------- text encodings
@pytest.mark.parametrize("encoding, iconv, described", [
    ("utf-16", "UTF-16", r"UTF-16 text \(little-endian, with a byte-order mark\)"),
    ("utf-16-le", "UTF-16LE", r"UTF-16 text \(little-endian\)"),
    ("utf-16-be", "UTF-16BE", r"UTF-16 text \(big-endian\)"),
    ("utf-32", "UTF-32", r"UTF-32 text \(little-endian, with a byte-order mark\)"),
    ("utf-32-be", "UTF-32BE", r"UTF-32 text \(big-endian\)"),
])
def test_utf16_and_utf32_get_their_own_reencoding_hint(sample_csv, sample_jsonl, tmp_path, encoding, iconv, described):
    for name, data in (("wide.csv", sample_csv), ("wide.jsonl", sample_jsonl)):
        path = tmp_path / name
        path.write_bytes(data.decode("utf-8").encode(encoding))
        err = _refused(path, described)
        assert f"`iconv -f {iconv} -t utf-8 '{name}' > fixed{path.suffix}`" in str(err)
        assert "latin1" not in str(err)
    packed = tmp_path / "wide.csv.gz"
    packed.write_bytes(gzip.compress(sample_csv.decode("utf-8").encode(encoding)))
    err = _refused(packed, described)
    assert f"`gzip -dc 'wide.csv.gz' | iconv -f {iconv} -t utf-8 | gzip > fixed.csv.gz`" in str(err)


def test_the_wide_hint_really_fixes_the_file(sample_csv, tmp_path):
    """The suggested lines (iconv; gzip around it for a .gz) turn the UTF-16 file back into the original."""
    wide = sample_csv.decode("utf-8").encode("utf-16")
    (tmp_path / "wide.csv").write_bytes(wide)
    (tmp_path / "wide.csv.gz").write_bytes(gzip.compress(wide))
    for name in ("wide.csv", "wide.csv.gz"):
        command = str(_refused(tmp_path / name, "UTF-16")).split("`")[1]
        subprocess.run(command, shell=True, cwd=tmp_path, check=True)
    assert (tmp_path / "fixed.csv").read_bytes() == sample_csv
    assert gzip.decompress((tmp_path / "fixed.csv.gz").read_bytes()) == sample_csv
    read_battles(tmp_path / "fixed.csv.gz")


def test_latin1_keeps_the_latin1_hint_and_a_bom_is_read_past(arena_frame, sample_csv, sample_jsonl, tmp_path):
    latin = arena_frame.head(5).copy()
    latin.loc[3, "response_a"] = '["caf\u00e9"]'
    path = tmp_path / "latin.csv.gz"
    path.write_bytes(gzip.compress(latin.to_csv(index=False).encode("latin-1")))
    err = _refused(path, "row 4, column 'response_a': the cell is not UTF-8 text")
    assert "`gzip -dc 'latin.csv.gz' | iconv -f latin1 -t utf-8 | gzip > fixed.csv.gz`" in str(err)
    for name, data in (("bom.csv", sample_csv), ("bom.jsonl", sample_jsonl)):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + data)
        battles, _ = read_battles(tmp_path / name)
        assert list(battles.columns[:2]) == ["id", "prompt"] and len(battles) == 40


def test_binary_data_in_a_text_file(tmp_path):
    path = tmp_path / "zeros.csv"
    path.write_bytes(bytes(5000))
    _refused(path, "holds NUL bytes: binary data, not csv text")


def test_multi_line_library_messages_become_one_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text('id,prompt,response_a,response_b\n1,"[""a""]","[""b""]","[""c""]"\n2,x,y,z,w,v\n')
    with pytest.raises(BattleDataError, match="cannot be parsed as CSV: Error tokenizing data") as info:
        read_battles(path)  # pandas' message ends in a newline
    assert "\n" not in str(info.value)


def test_a_cut_short_or_damaged_parquet_file(arena_frame, tmp_path):
    path = tmp_path / "b.parquet"
    arena_frame.head(40).to_parquet(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    _refused(path, "cannot be read as parquet")
    damaged = bytearray(whole)  # zeros in the data pages: pyarrow may notice, or read different text
    damaged[len(whole) // 3: len(whole) // 3 + 200] = bytes(200)
    path.write_bytes(bytes(damaged))
    try:
        with no_hang():
            read_battles(path)
    except BattleDataError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)


# ---------------------------------------------------------------------------------------- pipes and devices
def test_a_named_pipe_is_refused_unopened(tmp_path):
    fifo = tmp_path / "battles.csv"
    os.mkfifo(fifo)  # no writer: opening it would wait forever
    _refused(fifo, "is a named pipe, not a regular file")
    with no_hang(), pytest.raises(BattleDataError, match="named pipe"):
        file_sha256(fifo)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_is_not_an_empty_file(device, tmp_path):
    _refused(device, "is a character device, not a regular file")
    link = tmp_path / "battles.jsonl"
    link.symlink_to(device)
    err = _refused(link, "is a character device")
    assert "empty file" not in str(err)


def test_the_command_line_refuses_a_pipe_in_one_line(tmp_path, caplog):
    fifo = tmp_path / "train.csv"
    os.mkfifo(fifo)
    with no_hang(60):
        code = cli.main(["--train", str(fifo), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"{fifo}: is a named pipe, not a regular file: battle files are read more than once "
                      "(counted, hashed, read); save the data to a file and pass that"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- ids
@pytest.mark.parametrize("kind", ["csv", "csv.gz", "parquet", "jsonl"])
def test_ids_are_kept_verbatim(arena_frame, tmp_path, kind):
    frame = arena_frame.head(6).copy()
    frame["id"] = [" 7", "7", "7 ", "\t7", "a  b", "NaN"]
    path = tmp_path / f"ids.{kind}"
    if kind == "parquet":
        frame.to_parquet(path)
    elif kind == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False)
    battles, _ = read_battles(path)
    assert battles["id"].tolist() == [" 7", "7", "7 ", "\t7", "a  b", "NaN"]
    assert [i for _, chunk in iter_frames(path, rows=4) for i in chunk["id"]] == battles["id"].tolist()


def test_a_blank_id_is_refused(arena_frame, tmp_path):
    frame = arena_frame.head(4).copy()
    frame.loc[2, "id"] = "   "
    frame.to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(BattleDataError, match=r"row 3, column 'id': empty id \(only white space: '   '\)"):
        read_battles(tmp_path / "blank.csv")


def test_an_id_with_spaces_comes_back_verbatim_in_the_submission(arena_frame, tmp_path):
    train = arena_frame.iloc[:90].copy()
    train.loc[0, "id"] = " 1"
    test = arena_frame.iloc[90:100][["id", "prompt", "response_a", "response_b"]].copy()
    test["id"] = [" 7", "7", "7 ", "x  y", *test["id"].iloc[4:]]
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "light.json").write_text(json.dumps(
        {"n_folds": 3, "stages": {"length_lr": {"type": "length_lr"}}, "stacker": {"C_grid": [0.1]}}))
    out = tmp_path / "run"
    args = ["--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv"), "--out", str(out),
            "--config", str(tmp_path / "light.json"), "--quiet"]
    assert cli.main(args) == 0
    submission = pd.read_csv(out / "submission.csv", dtype={"id": str}, keep_default_na=False)
    assert submission["id"].tolist() == test["id"].tolist()
    folds = pd.read_csv(out / "folds.csv", dtype={"id": str}, keep_default_na=False)
    assert folds["id"].tolist()[0] == " 1"
    before = (out / "submission.csv").read_bytes()
    assert cli.main(args) == 0  # the resumed run reads the ids back from its tables: the same file
    assert (out / "submission.csv").read_bytes() == before


# ---------------------------------------------------------------------------------------- the atomic writer
def _failing_writer(error: OSError, written: bytes = b"x" * 5000):
    """A writer that puts part of the file down, then is refused by the system."""
    def write(tmp):
        Path(tmp).write_bytes(written)
        raise error

    return write


@pytest.mark.parametrize("code, message, kind", [
    (errno.ENOSPC, "the disk is full; free some space and run the same command again", DiskFullError),
    (errno.EDQUOT, "the disk quota is exceeded; free some space", DiskFullError),
    (errno.EROFS, "cannot be written: Read-only file system", FileWriteError),
])
def test_a_refused_write_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path, code, message, kind):
    path = tmp_path / "stage" / "state.npy"
    write_npy(path, np.arange(3.0))
    with pytest.raises(kind) as info:
        write_atomic(path, _failing_writer(OSError(code, os.strerror(code))))
    assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value)
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.npy"]  # no temporary file left
    np.testing.assert_array_equal(np.load(path), np.arange(3.0))


def test_a_short_write_without_errno_on_a_nearly_full_disk(tmp_path, monkeypatch):
    """numpy's ``tofile`` says only '262144 requested and 191456 written': the free space tells."""
    path = tmp_path / "a.npy"
    short = OSError("262144 requested and 191456 written")
    with pytest.raises(OSError, match="requested") as info:  # with room on the disk it is not a full disk
        write_atomic(path, _failing_writer(short))
    assert not isinstance(info.value, DiskFullError)
    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(DiskFullError, match=f"^{path}: the disk is full"):
        write_atomic(path, _failing_writer(short))
    assert list(tmp_path.iterdir()) == []


def test_errors_of_the_code_keep_their_type(tmp_path):
    with pytest.raises(ZeroDivisionError):
        write_atomic(tmp_path / "x.json", lambda tmp: 1 / 0)
    with pytest.raises(FileNotFoundError):  # a writer's own mistake, not the system refusing the write
        write_atomic(tmp_path / "x.json", _failing_writer(FileNotFoundError(errno.ENOENT, "gone")))
    assert list(tmp_path.iterdir()) == []


def test_npy_and_npz_writers_round_trip(tmp_path):
    write_npy(tmp_path / "a.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    write_npz(tmp_path / "b.npz", keys=np.array(["k1", "k2"]), vectors=np.eye(2))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(6, dtype=np.float32).reshape(2, 3))
    with np.load(tmp_path / "b.npz", allow_pickle=False) as data:
        assert data["keys"].tolist() == ["k1", "k2"]
    with pytest.raises(ValueError):  # no pickles
        write_npy(tmp_path / "c.npy", np.array([{"a": 1}], dtype=object))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npz"]


# ---------------------------------------------------------------------------------------- a full disk, end to end
PAGE = 4096


def _pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


class _Tmpfs:
    """A real tmpfs of a chosen size (mount needs root); ``resize`` is ``mount -o remount,size=``."""

    name = "tmpfs"

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        self.resize(64 << 20)

    def resize(self, size: int) -> None:
        options = f"size={_pages(size) // 1024}k"
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.folder)]
        if os.path.ismount(self.folder):
            command = ["mount", "-o", f"remount,{options}", str(self.folder)]
        subprocess.run(command, check=True, capture_output=True)

    def close(self) -> None:
        subprocess.run(["umount", str(self.folder)], check=False, capture_output=True)


class _Budget:
    """Where mounting is not allowed: a byte budget checked as the atomic writer renames a finished
    temporary file into place (pages in use under the folder, as a file system counts them); over the
    budget, the temporary file is cut to what fits and the rename fails with ENOSPC."""

    name = "injected-enospc"

    def __init__(self, folder: Path, monkeypatch):
        self.folder, self.size = folder, 64 << 20
        folder.mkdir()
        real = os.replace

        def replace(src, dst):
            src = Path(src)
            if str(src).startswith(str(self.folder)):
                used = sum(_pages(p.stat().st_size) for p in self.folder.rglob("*") if p.is_file() and p != src)
                if used + _pages(src.stat().st_size) > self.size:
                    with open(src, "r+b") as fh:
                        fh.truncate(max(0, self.size - used))
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
            return real(src, dst)

        monkeypatch.setattr(files.os, "replace", replace)

    def resize(self, size: int) -> None:
        self.size = size

    def close(self) -> None:
        pass


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(f"/tmp/mount-probe-{uuid.uuid4().hex}")
    probe.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if ok.returncode == 0:
            subprocess.run(["umount", str(probe)], check=True)
        return ok.returncode == 0
    finally:
        probe.rmdir()


SMALL_RUN = {"n_folds": 3, "stacker": {"C_grid": [0.1]}, "stages": {
    "length_lr": {"type": "length_lr"},
    "lgbm": {"type": "lgbm", "params": {**FAST_LGBM, "num_boost_round": 20, "rounds_without_valid": 20, "blocks": [
        {"type": "text_stats"},
        {"type": "tfidf", "params": {"svd_components": 4, "char_ngrams": [3, 3], "n_features": 4096}}]}}}}
# Where the disk fills, in the order a run writes them: the feature cache of the text statistics (numpy),
# a LightGBM fold's TF-IDF state (numpy), the report.
FILL_AT = ["resources/features/stats-*/a.npy", "stages/lgbm/fold0/model/block1_tfidf/svd_components.npy",
           "report.html"]


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    folder = tmp_path / "disk"
    disk = _Tmpfs(folder) if _can_mount() else _Budget(folder, monkeypatch)
    try:
        yield disk
    finally:
        disk.close()


def test_a_full_disk_stops_in_one_line_and_the_rerun_after_freeing_space_ends_the_same(
        arena_frame, tmp_path, small_disk, caplog):
    """A clean run, then the same run on a disk that fills at each of FILL_AT in turn: every attempt
    stops with one line naming the file that did not fit and saying the disk is full, leaves no
    temporary file, and the next attempt (with room for one more step) resumes; the last one finishes
    with every table byte-identical to the clean run's."""
    arena_frame.iloc[:120].to_csv(tmp_path / "train.csv", index=False)
    arena_frame.iloc[120:140][["id", "prompt", "response_a", "response_b"]].to_csv(tmp_path / "test.csv", index=False)
    (tmp_path / "config.json").write_text(json.dumps(SMALL_RUN))

    def run(out: Path) -> int:
        return cli.main(["--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv"),
                         "--out", str(out), "--config", str(tmp_path / "config.json"), "--quiet"])

    clean = tmp_path / "clean"
    assert run(clean) == 0
    written = sorted((p for p in clean.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    out = small_disk.folder / "run"
    for pattern in FILL_AT:
        target = next(p for p in written if p.match(f"{clean}/{pattern}"))
        before = sum(_pages(p.stat().st_size) for p in written[:written.index(target)])
        small_disk.resize(before + _pages(target.stat().st_size) // 2)  # room for all before it, half of it
        caplog.clear()
        assert run(out) == 2, f"{small_disk.name}: the run did not stop at {pattern}"
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        # a model's files are written in its fold<k>.partial/ until it is done (pipeline.rundir: transactions)
        expected = out / str(target.relative_to(clean)).replace("/fold0/model/", "/fold0.partial/model/")
        assert len(errors) == 1 and errors[0].startswith(f"{expected}: the disk is full; free some space"), errors
        assert not [p for p in out.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"
    small_disk.resize(64 << 20)
    assert run(out) == 0
    tables = sorted(p.relative_to(clean) for p in clean.rglob("*.csv"))
    assert tables == sorted(p.relative_to(out) for p in out.rglob("*.csv")) and len(tables) > 30
    for table in tables:
        assert (out / table).read_bytes() == (clean / table).read_bytes(), table
    for state in clean.rglob("*.npy"):
        assert (out / state.relative_to(clean)).read_bytes() == state.read_bytes(), state


def test_an_appended_file_reports_a_full_disk_the_same_way(tmp_path):
    """A resumable job's ``.partial`` is appended to on purpose; ``refused_writes`` gives it the same line."""
    path = tmp_path / "out.jsonl.partial"
    with pytest.raises(DiskFullError, match=f"^{path}: the disk is full"):
        with refused_writes(path), open(path, "a") as f:
            f.write("{}\n")
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KeyError):
        with refused_writes(path):
            raise KeyError("not the system's")


def test_written_json_is_whole_after_a_failed_rewrite(tmp_path):
    """A file of ours being replaced keeps its old content when the new one cannot be written."""
    path = tmp_path / "done.json"
    write_json(path, {"fold": 1})
    with pytest.raises(DiskFullError):
        write_atomic(path, _failing_writer(OSError(errno.ENOSPC, "No space left on device"), b'{"fo'))
    assert json.loads(path.read_text()) == {"fold": 1}
