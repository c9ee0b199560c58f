"""``run.py tune``: an experiment on a finished run's ensemble, kept beside the saved one.

``tune`` refits the ensemble over the run's finished stages with the run's config, changed by
``--config`` (its ``stacker`` section) and ``--set``, and writes the **candidate** into its own folder
of the run, never over the saved ensemble:

    <run>/tune/<name>/        name: --name, else the UTC time (20261202-121500)
      config.json             the candidate's resolved config
      ensemble/ensemble.json  the candidate ensemble (what predict would use), oof_probs.csv
      submission.csv          with the run's test file
      report.html (+ PNGs)    the candidate's report
      comparison.json         the candidate against the saved ensemble (below)
      timings.json

The folder is written as ``tune/.<name>.partial`` and renamed when every file is there, so a
candidate folder is always whole; a failed fit leaves the run as it was.

**The comparison** (:func:`compare`): the candidate's nested-CV log loss minus the saved ensemble's,
row by row on the labelled rows both stand on, with the paired 90% bootstrap interval over prompt
groups: the same test that decides between stage sets (:mod:`ensemble.coverage`). The candidate is
*better by the rule* when the whole interval lies below 0, *worse* when it lies above 0, else *no
clear difference*.

Only the ``stacker`` section may change (:func:`check_tunable`): the stages were fitted with the
rest of the config, so a change there (a stage's params, the folds, the seed) is refused naming the
key; leaving a whole stage out is allowed (``remove-stage --refit``).

**Applying** (``--apply``): only then are the run's ``config.json``, ``ensemble/ensemble.json``,
``ensemble/oof_probs.csv``, ``submission.csv`` and report replaced by the candidate's (each file
atomically), and only after the candidate was fitted and written whole. Without ``--apply`` nothing
of the run changes, whatever the comparison says, even when the candidate is better by the rule: an
experiment is applied by the person who ran it (the printed line says whether the rule favours it).
"""
from __future__ import annotations

import datetime as _dt
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from battles.columns import LABEL_COLUMNS
from battles.folds import prompt_groups
from battles.labels import label_index_or_missing
from ensemble.coverage import INTERVAL, bootstrap_interval, below_zero, row_log_loss
from ensemble.record import EnsembleRecord
from kernel.errors import UserError
from kernel.files import read_json, write_bytes, write_json
from pipeline.config import RunConfig
from pipeline.manifests import record_ensemble
from pipeline.rundir import RunDir, read_id_table
from pipeline.runner import Run

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
APPLIED_FILES = ("config", "ensemble", "oof_probs", "submission")  # RunDir attributes --apply copies


class TuneError(UserError, ValueError):
    pass


@dataclass
class TuneResult:
    record: EnsembleRecord  # the candidate's
    folder: Path  # <run>/tune/<name>
    comparison: dict  # see compare()
    applied: bool


def candidate_folder(run: RunDir, name: str | None) -> Path:
    """``<run>/tune/<name>`` (``name``: given, else the UTC time), refused when it exists already."""
    if name is None:
        name = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if not NAME.match(name):
        raise TuneError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (at most 100, not starting with '.')")
    folder = run.path / TUNE_DIR / name
    if folder.exists():
        raise TuneError(f"--name {name}: {folder} exists already (an earlier tune); choose another name")
    return folder


def config_changes(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``key.path: old -> new`` for every value that differs between two resolved configs."""
    return [f"{path}: {_short(a)} -> {_short(b)}" for path, a, b in _diff(before, after, prefix)]


def _diff(before: dict, after: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, path + ".")
        elif a != b:
            out.append((path, a, b))
    return out


def check_tunable(before: dict, after: dict) -> None:
    """``tune`` fits only the ensemble: refuse a change outside the ``stacker`` section (a stage's
    params, the folds, the data) other than leaving a whole stage out, naming the key."""
    for path, a, b in _diff(before, after):
        removed_stage = path.startswith("stages.") and path.count(".") == 1 and b is None
        if not (path.startswith("stacker.") or path == "stacker" or removed_stage):
            raise TuneError(f"tune --set {path}: tune refits only the ensemble (the 'stacker' section) on the finished "
                            "stages; a change to stages, folds or data needs the main command or `run.py train`")


def _short(value) -> str:
    import json

    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def compare(run: Run, candidate: RunDir) -> dict:
    """The candidate's nested-CV log loss against the saved ensemble's (each read from its
    ``oof_probs.csv``, as stored) on the labelled rows both cover, with the paired 90% bootstrap interval
    over prompt groups and the rule's verdict (module docstring)."""
    train, seed = run.data.train, run.config.seed
    if not run.dir.oof_probs.exists():
        return {"saved": None, "verdict": "no saved ensemble to compare with"}
    y = label_index_or_missing(train)
    ids = train["id"].astype(str).to_numpy()
    saved = read_id_table(run.dir.oof_probs).set_index("id")
    mine_table = read_id_table(candidate.oof_probs).set_index("id")
    common = np.isin(ids, saved.index.to_numpy()) & np.isin(ids, mine_table.index.to_numpy()) & (y >= 0)
    if not common.any():
        return {"saved": None, "verdict": "the saved ensemble and the candidate share no labelled row"}
    mine = row_log_loss(y[common], mine_table.loc[ids[common], LABEL_COLUMNS].to_numpy(dtype=np.float64))
    theirs = row_log_loss(y[common], saved.loc[ids[common], LABEL_COLUMNS].to_numpy(dtype=np.float64))
    groups = np.unique(prompt_groups(train), return_inverse=True)[1]
    interval = bootstrap_interval(mine, seed, paired_with=theirs, groups=groups[common])
    if below_zero(interval):
        verdict = "better by the rule (the paired interval lies below 0)"
    elif interval[0] > 0:
        verdict = "worse by the rule (the paired interval lies above 0)"
    else:
        verdict = "no clear difference (the paired interval spans 0)"
    return {"rows": int(common.sum()), "candidate_log_loss": float(mine.mean()), "saved_log_loss": float(theirs.mean()),
            "minus_saved": float((mine - theirs).mean()), "minus_saved_interval": interval,
            "interval_level": INTERVAL, "better": below_zero(interval), "verdict": verdict, "saved": True}


def tune(run_path, config: RunConfig, name: str | None = None, apply: bool = False, progress: bool = True) -> TuneResult:
    """Fit the candidate ensemble of ``config`` over the run's finished stages into ``<run>/tune/<name>``,
    compare it with the saved ensemble, and with ``apply`` make it the run's (module docstring)."""
    rundir = RunDir.open(run_path)
    saved_config = read_json(rundir.config)
    check_tunable(saved_config, config.as_dict())
    folder = candidate_folder(rundir, name)
    partial = folder.with_name(f".{folder.name}.partial")
    run = Run(rundir.path, config, progress=progress)
    try:
        run.load_data(write=False)  # takes the run's lock: held until the candidate is applied
        if partial.exists():  # an interrupted tune of the same name: ours (inside the run's tune folder)
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        out = RunDir(partial)
        try:
            write_json(out.config, config.as_dict())
            fit = run.fit_ensemble(out)
            run.write_report(fit, out)
            comparison = compare(run, out)
            comparison["config_changes"] = config_changes(saved_config, config.as_dict())
            write_json(partial / "comparison.json", comparison)
            run.timings.write(out.timings)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(folder)
        log.info("tune: candidate written to %s (%s)", folder, comparison["verdict"])
        if apply:
            apply_candidate(run, RunDir(folder), fit)
    finally:
        run.close()
    return TuneResult(fit.record, folder, comparison, apply)


def apply_candidate(run: Run, candidate: RunDir, fit) -> None:
    """Make a finished candidate the run's: its config, ensemble, OOF probabilities and submission
    (copied file by file, each atomically; the ensemble last, as predict reads it) and the run's report."""
    for attr in (*APPLIED_FILES[:1], *APPLIED_FILES[2:], "ensemble"):
        source = getattr(candidate, attr)
        if source.exists():
            write_bytes(getattr(run.dir, attr), source.read_bytes())
    record_ensemble(run.dir)  # the run's ensemble manifest, for the files just replaced
    run.write_report(fit)
    log.info("tune: applied %s to %s", candidate.path.name, run.dir)
