"""An export bundle, as prediction reads it: verified before anything is loaded, its base checkpoints found.

``run.py export`` (:mod:`pipeline.export`) writes a bundle: a run directory holding only what prediction
needs (a budgeted prediction's fallback ensemble included: :mod:`pipeline.budget`), plus ``bundle.json``
(the bundle manifest):

    {"tool": "arena-stack", "format_version": 1, "version", "created", "exported_from",
     "python", "libraries": {package: version},          # the versions the run was exported with
     "label_order": [winner_model_a, winner_model_b, winner_tie],
     "stages": {name: {"type", "models": [folders], "packing": {max_length, prompt_share, swap_tta}}},
     "ensemble": the chosen method,
     "bases": [{"name", "path", "stages", "included", "files": {config and tokenizer files: size, sha256}}],
     "files": {every bundled file: {"size", "sha256"}}}

A deep stage's base checkpoint (the decoder's ``params.model``, a frozen embedding model) is not copied
unless exported with ``--include-base`` (then it is ``bases/<name>/`` inside the bundle): it is
referenced by its original path and the hashes of its config and tokenizer files. On another machine
``--base-dir DIR`` says where referenced checkpoints live (``DIR/<name>``, or ``DIR`` itself when it is
the checkpoint); the checkpoint found is checked against the recorded hashes.

:func:`open_bundle` is what :meth:`pipeline.predict.Predictor.load` calls: it refuses a changed,
missing or truncated file in one line naming it, warns about library versions that differ from the
export's, and maps each stage model folder whose saved params name a moved checkpoint to a scratch view
of it (links to the verified files and a ``stage.json`` naming the checkpoint where it now lives).
"""
from __future__ import annotations

import json
import logging
import tempfile
from importlib import metadata
from pathlib import Path

from kernel.errors import UserError
from kernel.files import read_json
from kernel.manifest import ManifestError, verify
from models.stage import STAGE_FILE
from pipeline.rundir import TOOL, RunDir

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
BASES_FOLDER = "bases"
FORMAT_VERSION = 1
# the libraries whose versions a bundle records (those that read or compute the saved models)
LIBRARIES = ("numpy", "pandas", "scipy", "scikit-learn", "lightgbm", "gensim", "torch", "transformers", "tokenizers",
             "safetensors", "peft", "accelerate", "bitsandbytes", "sentencepiece", "pydantic")
# what identifies a checkpoint without reading its weights: its config and its tokenizer's files
BASE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spm.model",
              "tokenizer.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja")


class BundleError(UserError, ValueError):
    """A bundle that cannot be used as it is; the message names the file or checkpoint and what to do."""


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def is_bundle(path) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def read_record(path) -> dict:
    """``bundle.json`` of the bundle at ``path``, checked to be one of ours that this version reads."""
    where = Path(path) / BUNDLE_FILE
    try:
        record = read_json(where)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where}: unreadable ({exc}); export the run again") from None
    if not isinstance(record, dict) or record.get("tool") != TOOL or not isinstance(record.get("files"), dict):
        raise BundleError(f"{where}: not a bundle manifest written by {TOOL}")
    if int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(f"{where}: format version {record['format_version']} is newer than this version of {TOOL} "
                          f"reads ({FORMAT_VERSION}); install the version that exported it ({record.get('version')})")
    return record


def base_files(directory: Path) -> list[str]:
    """The files that identify a checkpoint folder (its config and tokenizer files present there)."""
    return [name for name in BASE_FILES if (directory / name).is_file()]


def replace_paths(value, mapping: dict[str, str]):
    """``value`` (JSON) with every string equal to a key of ``mapping`` replaced by its value."""
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, dict):
        return {k: replace_paths(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_paths(v, mapping) for v in value]
    return value


class Bundle:
    """A verified bundle and where its base checkpoints are on this machine."""

    def __init__(self, run: RunDir, record: dict, located: dict[str, Path]):
        self.run, self.record = run, record
        self.moved = {original: str(path) for original, path in located.items() if str(path) != original}
        self._scratch: tempfile.TemporaryDirectory | None = None  # the views of remapped model folders
        self._views = 0

    def model_dirs(self, directories: list[Path]) -> list[Path]:
        """The model folders to load: as bundled, or (where their saved params name a checkpoint that moved)
        a view with links to the verified files and a ``stage.json`` naming the checkpoint's place here."""
        if not self.moved:
            return list(directories)
        out = []
        for directory in directories:
            meta = read_json(directory / STAGE_FILE)
            mapped = replace_paths(meta, self.moved)
            if mapped == meta:
                out.append(directory)
                continue
            if self._scratch is None:
                self._scratch = tempfile.TemporaryDirectory(prefix="arena-bundle-")
            self._views += 1
            view = Path(self._scratch.name) / str(self._views) / directory.name
            view.mkdir(parents=True)
            for entry in directory.iterdir():
                if entry.name != STAGE_FILE:
                    (view / entry.name).symlink_to(entry.resolve())
            (view / STAGE_FILE).write_text(json.dumps(mapped, indent=2), encoding="utf-8")
            out.append(view)
        return out


def _locate_base(run: RunDir, base: dict, base_dir) -> Path:
    """Where a base checkpoint of the bundle is on this machine: inside the bundle, under ``--base-dir``
    (``DIR/<name>`` or ``DIR`` itself), else its original path; checked against the recorded hashes."""
    name, original = base["name"], base["path"]
    if base.get("included"):
        candidates = [run.path / BASES_FOLDER / name]
    elif base_dir is not None:
        base_dir = Path(base_dir).expanduser()
        if not base_dir.is_dir():
            raise BundleError(f"--base-dir {base_dir}: not a directory")
        candidates = [base_dir / name, base_dir]
    else:
        candidates = [Path(original)]
    found = next((c for c in candidates if (c / "config.json").is_file()), None)
    if found is None:
        where = " or ".join(str(c) for c in candidates)
        raise BundleError(f"{run.path}: base checkpoint {name!r} of stage(s) {', '.join(base['stages'])} not found at "
                          f"{where} (exported from {original}); pass --base-dir DIR with the checkpoint at DIR/{name} "
                          "(e.g. an attached Kaggle dataset), or export with --include-base")
    verify(found, base["files"], run.path / BUNDLE_FILE,
           f"this is not the checkpoint stage(s) {', '.join(base['stages'])} were trained on; attach that one")
    return found


def open_bundle(run: RunDir, base_dir=None) -> Bundle | None:
    """The verified bundle at ``run`` (None when ``run`` is a run directory, not a bundle)."""
    if not is_bundle(run.path):
        if base_dir is not None:
            raise BundleError(f"--base-dir is for exported bundles; {run.path} is a run directory (it reads its "
                              "checkpoints where it was trained). Export it with `run.py export` first")
        return None
    record = read_record(run.path)
    verify(run.path, record["files"], run.path / BUNDLE_FILE,
           "the bundle's files must stay as exported: restore the file or export the run again")
    here = library_versions()
    differ = [f"{k} {v} (here {here.get(k)})" for k, v in record.get("libraries", {}).items()
              if v is not None and here.get(k) is not None and here.get(k) != v]
    if differ:
        log.warning("bundle %s was exported with other library versions: %s; predictions may differ slightly",
                    run.path, ", ".join(differ))
    located = {b["path"]: _locate_base(run, b, base_dir) for b in record.get("bases", [])}
    return Bundle(run, record, located)


__all__ = ["BUNDLE_FILE", "Bundle", "BundleError", "ManifestError", "open_bundle", "read_record", "is_bundle"]
