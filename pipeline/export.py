"""``run.py export``: a finished run's prediction part as a verified bundle, and an offline install kit.

    python run.py export --run runs/x --out bundle/                     # models, feature state, ensemble, config
    python run.py export --run runs/x --out bundle/ --include-base      # also the deep stages' base checkpoints
    python run.py export --run runs/x --out bundle/ --wheels kit/       # and every wheel for an offline install

The bundle is a run directory holding only what :class:`pipeline.predict.Predictor` reads (the run's
marker and config, its folds, the saved ensemble, each ensemble stage's ``done.json`` and the model
folders of its fold plan, the label-free state models reference under ``resources/``), what a budgeted
prediction's fallback ensemble fits on (:mod:`pipeline.budget`: each ensemble stage's ``oof_logits.csv``,
the ensemble's ``oof_probs.csv`` for the prior, and ``ensemble/fallback_train.csv``: the training rows'
ids, hard labels and, where the ensemble uses them, meta features; no text) and its manifest
``bundle.json`` (:mod:`pipeline.bundle`: format version, every file's size and SHA-256, library
versions, label order, packing settings, base checkpoints). The run is verified against its own
manifests before anything is copied, and the bundle is written to a temporary sibling folder and
renamed into place, so ``--out`` is either the whole bundle or untouched. ``--out`` may be a new path,
an empty directory, or (with ``--overwrite``) a bundle this tool exported; anything else is refused.

The install kit (``--wheels DIR``) holds the project's own wheel and every dependency's wheel for a
target (Python version, platform) except what the target already has (``--target-has``: by default
``torch``, as on a Kaggle image, with everything torch itself depends on), and ``INSTALL.txt`` with the
one command that installs it without an index. Which packages the kit needs is pip's own resolution
(``pip install --dry-run --report``) of the project for the target, less pip's resolution of the
target's packages; the wheels are then fetched with ``pip download --no-deps`` (pip's cache serves a
second kit without the network).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from battles.columns import LABEL_COLUMNS
from kernel.errors import UserError
from kernel.files import read_json, write_json, write_text
from kernel.manifest import describe, describe_folder, total_size
from models.stage import STAGE_FILE, stage_class
from pipeline.budget import write_fallback_train
from pipeline.bundle import BASES_FOLDER, BUNDLE_FILE, FORMAT_VERSION, base_files, is_bundle, library_versions, \
    read_record
from pipeline.manifests import RESOURCE_CACHES, check_done, check_ensemble
from pipeline.predict import check_complete, stage_models
from pipeline.rundir import TOOL, RunDir, tool_version

log = logging.getLogger(__name__)

PACKING_KEYS = ("max_length", "prompt_share", "swap_tta")  # what a deep stage's inputs are cut to at prediction
KAGGLE_HAS = ("torch",)  # the default --target-has: what a Kaggle notebook image ships that the kit leaves out
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ExportError(UserError, ValueError):
    """An export that cannot be made as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    files: int
    size: int  # bytes of every bundled file
    bases: list  # the base checkpoints: dicts of bundle.json's "bases"


# ----------------------------------------------------------------------------------------------- bundle
def check_out(out: Path, overwrite: bool) -> None:
    """The bundle's ``--out``: new, empty, or (with ``overwrite``) a bundle of ours; else refused."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: is a file; give a new directory for the bundle")
    if not out.exists() or not any(out.iterdir()):
        return
    if not is_bundle(out):
        raise ExportError(f"--out {out}: the directory is not empty and is not a bundle exported by {TOOL}; refusing "
                          "to write into it (nothing was written). Choose a new path or an empty directory")
    read_record(out)
    if not overwrite:
        raise ExportError(f"--out {out}: a bundle exists there; pass --overwrite to replace it")


def _saved_params(kind: str, directory: Path) -> dict:
    """The params a saved model is loaded with (a stage may read its checkpoint from the folder itself)."""
    cls = stage_class(kind)
    reader = getattr(cls, "_saved_params", None)
    return reader(directory) if reader is not None else cls.read_stage_json(directory)["params"]


def _checkpoints(value, inside: Path) -> list[str]:
    """Paths in saved params (``model`` keys at any depth) that name a checkpoint outside ``inside``."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "model" and isinstance(v, str) and v and not Path(v).resolve().is_relative_to(inside.resolve()):
                found.append(v)
            else:
                found += _checkpoints(v, inside)
    elif isinstance(value, list):
        for v in value:
            found += _checkpoints(v, inside)
    return found


def _bases(models: dict[str, tuple[str, list[Path]]], include: bool) -> list[dict]:
    """The base checkpoints the stages' saved models read (name, original path, stages, identifying files)."""
    by_path: dict[str, dict] = {}
    for stage, (kind, directories) in models.items():
        for directory in directories:
            for path in _checkpoints(_saved_params(kind, directory), directory):
                base = by_path.setdefault(path, {"path": path, "stages": []})
                if stage not in base["stages"]:
                    base["stages"].append(stage)
    names: set[str] = set()
    out = []
    for path, base in by_path.items():
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ExportError(f"base checkpoint {path} of stage(s) {', '.join(base['stages'])} not found (no "
                              "config.json there); export on a machine where it is, to record its hashes")
        name, i = folder.name, 1
        while name in names:
            i += 1
            name = f"{folder.name}-{i}"
        names.add(name)
        out.append({**base, "name": name, "included": include, "files": describe(folder, base_files(folder))})
    return out


def export_run(run_path, out, include_base: bool = False, overwrite: bool = False) -> ExportSummary:
    """Write the bundle of the finished run at ``run_path`` to ``out`` (see the module docstring)."""
    run = RunDir.open(run_path)
    out = Path(out)
    check_out(out, overwrite)
    if is_bundle(run.path):
        raise ExportError(f"--run {run.path}: is a bundle already; export from the run directory it came from")
    check_ensemble(run)
    ensemble, config, folds = check_complete(run)
    places = {n: stage_models(run, n, config.stages[n], folds) for n in ensemble.stages}
    copy = [run.marker, run.config, run.folds, run.ensemble, run.oof_probs]
    for name, models in places.items():
        for place in (run.stage(name), *models):
            check_done(place)
        copy += [run.stage(name).done, run.stage(name).spec, run.stage(name).oof_logits]
        copy += [m.done for m in models]
        copy += [p for m in models for p in sorted(m.model.rglob("*")) if p.is_file()]
    if run.resources.is_dir():
        copy += [p for p in sorted(run.resources.rglob("*")) if p.is_file()
                 and p.relative_to(run.resources).parts[0] not in RESOURCE_CACHES]
    models = {n: (config.stages[n].type, [m.model for m in ms]) for n, ms in places.items()}
    bases = _bases(models, include_base)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for path in copy:
            if path.exists():
                target = tmp / path.relative_to(run.path)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        for base in bases if include_base else []:
            shutil.copytree(base["path"], tmp / BASES_FOLDER / base["name"])
        write_fallback_train(run, ensemble, tmp)
        record = {
            "tool": TOOL, "format_version": FORMAT_VERSION, "version": tool_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "exported_from": str(run.path.resolve()), "python": platform.python_version(),
            "libraries": library_versions(), "label_order": list(LABEL_COLUMNS), "ensemble": ensemble.chosen,
            "stages": {n: {"type": kind, "models": [d.parent.relative_to(run.path).as_posix() for d in dirs],
                           "packing": _packing(kind, dirs[0])} for n, (kind, dirs) in models.items()},
            "bases": bases,
            "files": describe_folder(tmp),
        }
        write_json(tmp / BUNDLE_FILE, record)
        if out.exists():
            shutil.rmtree(out)  # an empty folder, or a bundle of ours (with --overwrite): checked above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    summary = ExportSummary(out, len(record["files"]), total_size(record["files"]), record["bases"])
    log.info("export: %s -> %s (%d files, %s)", run, out, summary.files, human_size(summary.size))
    return summary


def _packing(kind: str, directory: Path) -> dict:
    params = read_json(directory / STAGE_FILE).get("params", {})
    return {k: params[k] for k in PACKING_KEYS if k in params}


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ----------------------------------------------------------------------------------------------- install kit
@dataclass(frozen=True)
class Target:
    """The machine a kit is for: its Python version (``3.11``), its pip platform tags and what it already has."""

    python_version: str
    platforms: tuple[str, ...]
    has: tuple[str, ...]

    def pip_options(self) -> list[str]:
        opts = ["--python-version", self.python_version, "--only-binary=:all:"]
        for p in self.platforms:
            opts += ["--platform", p]
        return opts


_LEGACY = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}


def platform_tags(tag: str) -> list[str]:
    """A target's pip platform tags from its newest one: ``manylinux_2_35_x86_64`` (a glibc 2.35 machine, e.g.
    a Kaggle image on Ubuntu 22.04) also installs every older manylinux wheel, as pip itself decides on
    that machine; any other tag stands alone."""
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", tag)
    if m is None:
        return [tag]
    major, minor, arch = int(m[1]), int(m[2]), m[3]
    tags = [f"manylinux_{major}_{y}_{arch}" for y in range(minor, 4, -1)]
    tags += [f"{legacy}_{arch}" for legacy, (lmaj, lmin) in _LEGACY.items() if (lmaj, lmin) <= (major, minor)]
    return tags


def this_machine(has=KAGGLE_HAS) -> Target:
    """This interpreter's Python version and platform tags (a kit for a machine like this one)."""
    from packaging.tags import sys_tags

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    plats = []
    for tag in sys_tags():
        if tag.platform not in plats and tag.platform != "any":
            plats.append(tag.platform)
    return Target(version, tuple(plats), tuple(has))


def _pip(args: list[str], what: str) -> str:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log.debug("pip: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ExportError(f"--wheels: pip could not {what}: {' | '.join(tail)}")
    return done.stdout


def _resolve(requirements: list[str], target: Target, scratch: Path) -> dict[str, str]:
    """pip's resolution of ``requirements`` for ``target``: {normalised name: version}."""
    scratch.mkdir(parents=True)
    report = scratch / "report.json"
    _pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
          "--target", str(scratch / "never-written"), *target.pip_options(), *requirements],
         f"resolve {' '.join(requirements)} for Python {target.python_version}")
    items = json.loads(report.read_text())["install"]
    return {_normal(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_kit_dir(wheels: Path) -> None:
    """``--wheels``: a new or empty directory, or a kit (wheels and INSTALL.txt); anything else is refused."""
    if wheels.exists() and not wheels.is_dir():
        raise ExportError(f"--wheels {wheels}: is a file; give a directory for the install kit")
    if wheels.exists() and any(not p.name.endswith(".whl") and p.name != "INSTALL.txt" for p in wheels.iterdir()):
        raise ExportError(f"--wheels {wheels}: holds files other than wheels; give a new or empty directory (or a "
                          "kit made by this command)")


def build_kit(wheels: Path, target: Target) -> str:
    """Write the project's wheel, every dependency's wheel the target lacks, and ``INSTALL.txt``;
    return the install command."""
    wheels = Path(wheels)
    check_kit_dir(wheels)
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="arena-kit-") as scratch:
        scratch = Path(scratch)
        own = scratch / "own"
        _pip(["wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(own), str(PROJECT_ROOT)],
             "build the project's wheel")
        [wheel] = list(own.glob("*.whl"))
        with ThreadPoolExecutor(2) as pool:  # two independent resolutions, mostly waiting on the index
            needed = pool.submit(_resolve, [str(wheel)], target, scratch / "needed")
            present = pool.submit(_resolve, list(target.has), target, scratch / "present") if target.has else None
            needed, present = needed.result(), present.result() if present is not None else {}
        fetch = sorted(f"{n}=={v}" for n, v in needed.items() if n not in present and n != _normal(TOOL))
        log.info("install kit: %d wheels for Python %s (the target has %s: %d packages left out)", len(fetch) + 1,
                 target.python_version, ", ".join(target.has) or "nothing", len(present))
        if fetch:
            _pip(["download", "--no-deps", "--quiet", "--dest", str(wheels), *target.pip_options(), *fetch],
                 "download the dependencies' wheels")
        shutil.copy2(wheel, wheels / wheel.name)
    command = f"pip install --no-index --find-links {wheels} {TOOL}"
    write_text(wheels / "INSTALL.txt", command + "\n")
    return command
