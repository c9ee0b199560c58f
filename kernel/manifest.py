"""File manifests: the size and SHA-256 of every file a step wrote, and the one check that they are unchanged.

A manifest is a plain mapping ``{relative posix path: {"size": bytes, "sha256": hex digest}}`` of the
files under one folder. The pipeline records one wherever it marks work as finished (a fold's or a
stage's ``done.json``, the ensemble's ``manifest.json``, an export bundle's ``bundle.json``) and
checks it before a later command loads those files: a changed, missing or truncated file is refused
with one line naming it (:class:`ManifestError`), never read into a silently different prediction.

Hashing reads every byte: files are hashed by a few threads at once (hashlib releases the GIL on
large buffers), in 1 MiB blocks, so a run's model files cost about one read of the disk.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from kernel.errors import UserError

BLOCK = 1 << 20
WORKERS = min(4, os.cpu_count() or 1)


class ManifestError(UserError, ValueError):
    """A file recorded in a manifest is missing, truncated or changed; the message names it."""


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def file_entry(path) -> dict:
    """``{"size", "sha256"}`` of one file."""
    path = Path(path)
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and ".tmp" in name  # kernel.files.write_atomic's temporary files


def files_under(root, skip: Iterable[str] = ()) -> list[str]:
    """Relative posix paths of every regular file under ``root`` (recursively, sorted), leaving out the
    top-level names in ``skip`` (files or folders) and atomic writes' temporary files."""
    root, skip = Path(root), set(skip)
    found = []
    for folder, dirs, names in os.walk(root):
        rel = Path(folder).relative_to(root)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
            names = [n for n in names if n not in skip]
        found += [(rel / n).as_posix() for n in names if not _is_temporary(n) and (Path(folder) / n).is_file()]
    return sorted(found)


def describe(root, relative: Iterable[str]) -> dict[str, dict]:
    """The manifest of the files ``relative`` (posix paths) under ``root``."""
    root, relative = Path(root), list(relative)
    with ThreadPoolExecutor(WORKERS) as pool:
        entries = list(pool.map(lambda rel: file_entry(root / rel), relative))
    return dict(zip(relative, entries))


def describe_folder(root, skip: Iterable[str] = ()) -> dict[str, dict]:
    """The manifest of every file under ``root`` (see :func:`files_under` for ``skip``)."""
    return describe(root, files_under(root, skip))


def _problem(path: Path, entry: dict) -> str | None:
    """What is wrong with ``path`` against its manifest entry (None: unchanged)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size < entry["size"]:
        return f"truncated ({size} of {entry['size']} bytes)"
    if size != entry["size"]:
        return f"changed ({size} bytes, {entry['size']} recorded)"
    if sha256_file(path) != entry["sha256"]:
        return "changed (its SHA-256 differs from the one recorded)"
    return None


def verify(root, files: dict[str, dict], recorded_in, advice: str) -> None:
    """Check every file of the manifest ``files`` under ``root``; raise :class:`ManifestError` naming the
    first (in path order) that is missing, truncated or changed, where it was recorded and ``advice``."""
    root = Path(root)
    names = sorted(files)
    for rel in names:  # missing or resized files first: no hashing needed to refuse them
        if not (root / rel).is_file() or (root / rel).stat().st_size != files[rel]["size"]:
            raise ManifestError(f"{root / rel}: {_problem(root / rel, files[rel])}; recorded in {recorded_in}; {advice}")
    with ThreadPoolExecutor(WORKERS) as pool:
        problems = list(pool.map(lambda rel: _problem(root / rel, files[rel]), names))
    for rel, problem in zip(names, problems):
        if problem is not None:
            raise ManifestError(f"{root / rel}: {problem}; recorded in {recorded_in}; {advice}")


def total_size(files: dict[str, dict]) -> int:
    return sum(int(e["size"]) for e in files.values())
