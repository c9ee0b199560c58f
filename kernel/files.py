"""Writing files safely, for every layer: atomic writes (text, JSON, numpy arrays), and content keys.

Every floor of the house writes through these helpers, so a crash never leaves half a file and a
multi-process launch never has two writers (:mod:`kernel.dist` says who the main process is). Nothing
here knows what a run directory looks like (that is :mod:`pipeline.rundir`).

A write that the system refuses ends in one line naming the file (:class:`FileWriteError`): a full disk
or an exceeded quota says so (:class:`DiskFullError`), and the half-written temporary file is removed, so
a rerun after freeing space resumes from the files that were finished.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from kernel.dist import is_main_process
from kernel.errors import UserError

_DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}
# Refusals by the system that the user fixes (a read-only or protected --out, a file too large for the
# file system, a failing disk); other OSErrors are errors of the code and keep their traceback.
_CANNOT_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG, errno.EIO, errno.ENAMETOOLONG}
# Writers that use C stdio (numpy's ``tofile``, LightGBM) report a short write without an errno
# ("262144 requested and 191456 written"); a failure with less than this left on the disk is a full disk.
_NEARLY_FULL = 1 << 20


class FileWriteError(UserError, OSError):
    """The system refused to write a file (permissions, a read-only disk, a full disk); the message names it."""


class DiskFullError(FileWriteError):
    """The disk (or the quota) filled while a file was written; finished files are kept, so a rerun resumes."""


def _free_bytes(folder: Path) -> int | None:
    for place in (folder, *folder.parents):  # the nearest folder that exists (mkdir itself may have failed)
        if place.exists():
            try:
                return shutil.disk_usage(place).free
            except OSError:
                return None
    return None


def _write_error(path: Path, exc: Exception) -> FileWriteError | None:
    """The one-line error for a failed write of ``path``, or None when the failure is not the system's."""
    if isinstance(exc, UserError):
        return None  # already says what is wrong (a nested write, a bad input met while writing)
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code in _DISK_FULL:
        reason = _DISK_FULL[code]
    elif (free := _free_bytes(path.parent)) is not None and free < _NEARLY_FULL:
        reason = "the disk is full"
    elif code in _CANNOT_WRITE:
        return FileWriteError(f"{path}: cannot be written: {exc.strerror or os.strerror(code)}")
    else:
        return None
    return DiskFullError(f"{path}: {reason}; free some space and run the same command again (finished work is "
                         "reused)")


@contextlib.contextmanager
def refused_writes(path):
    """Inside the block, a write of ``path`` that the system refuses (a full disk, a quota, a read-only
    folder) raises :class:`FileWriteError` naming ``path``; any other error passes unchanged. For files
    that are appended to on purpose (a resumable job's ``.partial``); :func:`write_atomic` uses it."""
    try:
        yield
    except Exception as exc:
        error = _write_error(Path(path), exc)
        if error is None:
            raise
        raise error from exc


def write_atomic(path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves half a file.

    Under a multi-process launch only the main process writes: every rank computes the same run
    files, and one writer keeps them whole. A refused write (a full disk, a read-only folder) raises
    :class:`FileWriteError` naming ``path``, with the temporary file removed.
    """
    if not is_main_process():
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with refused_writes(path):  # judged before the temporary file goes: it holds the space that ran out
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    write_atomic(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_bytes(path, data: bytes) -> None:
    write_atomic(path, lambda p: Path(p).write_bytes(data))


def write_npy(path, array: np.ndarray) -> None:
    """One numpy array in ``.npy`` format (no pickles), atomically."""
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array), allow_pickle=False)

    write_atomic(path, write)


def write_npz(path, **arrays: np.ndarray) -> None:
    """Named numpy arrays in one uncompressed ``.npz`` (no pickles), atomically."""
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_atomic(path, write)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=jsonable))


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def jsonable(obj):
    """``json.dumps`` ``default=``: numpy scalars and arrays, paths."""
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


FLOAT_FORMAT = "%.9g"  # logits and probabilities are stored with 9 significant digits


def as_stored(values) -> np.ndarray:
    """``values`` exactly as a table of ours stores and reads them back (:data:`FLOAT_FORMAT`). The one
    rounding rule: a value fitted now is rounded like this before it is used (averaged, stacked), so a
    fresh run, a resumed one (reading the tables) and a prediction from the saved models agree to the bit."""
    values = np.asarray(values, dtype=np.float64)
    return np.char.mod(FLOAT_FORMAT, values).astype(np.float64) if values.size else values


def content_key(*parts) -> str:
    """A short stable hash of JSON-able parts (resolved config, data hash, folds): decides reuse."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=jsonable).encode()).hexdigest()[:16]


class OutputExistsError(UserError, FileExistsError):
    """A result file would replace something the user did not ask to replace."""


def check_output_file(path, overwrite: bool = False) -> Path:
    """The one overwrite rule for result files (predictions, pseudo-labels, converted data): a directory
    is never replaced; an existing file only with ``overwrite`` (``--overwrite``)."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a directory; --out names the file to write")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise OutputExistsError(f"{path}: the folder {path.parent} does not exist")
    return path
