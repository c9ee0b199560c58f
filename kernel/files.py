"""Writing files safely, for every layer: atomic writes, JSON, and content keys.

Every floor of the house writes through these helpers, so a crash never leaves half a file and a
multi-process launch never has two writers (:mod:`kernel.dist` says who the main process is). Nothing here knows what a run directory looks like (that is :mod:`pipeline.rundir`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from kernel.dist import is_main_process
from kernel.errors import UserError


def write_atomic(path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves half a file.

    Under a multi-process launch only the main process writes: every rank computes the same run
    files, and one writer keeps them whole.
    """
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    write_atomic(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_bytes(path, data: bytes) -> None:
    write_atomic(path, lambda p: Path(p).write_bytes(data))


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
