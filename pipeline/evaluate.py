"""``run.py evaluate --run R --data labelled.csv``: score a finished run on labelled battles it never saw.

The run's saved models predict the file (every finished stage, and the saved ensemble over its
stages, as ``predict`` does); on the battles with a hard label it reports, for each output:

* log loss with its 90% bootstrap interval (prompt groups resampled, :func:`ensemble.coverage.bootstrap_interval`,
  seeded with the run's seed) and accuracy, every figure with the rows it stands on;
* the class prior of the run's training labels as the baseline, and the ensemble minus the prior
  and minus each stage, paired on the same rows (the same interval);
* reliability per class (``calibration.png``) and log loss by prompt length, turn count and tie vs
  non-tie (``subgroups.png``), with the report's own functions.

It writes a small report beside the run, never over the run's own report:

    <run>/evaluations/<data file stem>/
      report.md, evaluation.json, predictions.csv (id, the ensemble's probabilities), calibration.png, subgroups.png

The folder is written as ``.<stem>.partial`` and renamed into place; an earlier evaluation of a file
with the same stem is replaced. Battles that repeat a training battle of the run (same prompt and
replies, either order: :func:`pipeline.checks.overlap_warning`) make a warning, and the figures are
given once more without them.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from battles.folds import prompt_groups
from battles.io import read_battles
from battles.labels import hard_mask, label_index, label_index_or_missing
from ensemble.coverage import INTERVAL, bootstrap_interval, row_log_loss
from ensemble.metrics import probs_from_logits
from kernel.errors import UserError
from kernel.files import write_json, write_text
from kernel.context import StageContext
from models.stage import stage_class
from pipeline import checks
from pipeline.predict import Predictor, check_complete, stage_models
from pipeline.report import FINAL, plot_calibration, plot_subgroups, subgroup_scores
from pipeline.rundir import RunDir, write_probs

log = logging.getLogger(__name__)

EVALUATIONS = "evaluations"
ENSEMBLE = "ensemble"


class EvaluateError(UserError, ValueError):
    pass


@dataclass
class Evaluation:
    folder: Path
    rows: int  # labelled battles scored
    table: list[dict]  # one row per output: output, rows, log loss, interval, accuracy
    paired: list[dict]  # the ensemble minus the prior / each stage, paired
    warnings: list[str] = field(default_factory=list)


def _finished_stages(run: RunDir, config, folds: np.ndarray, ensemble_stages: list[str]) -> list[str]:
    """The ensemble's stages, then every other stage of the config with all its models saved."""
    out = list(ensemble_stages)
    for name, spec in config.stages.items():
        if name in out or not run.stage(name).done.exists():
            continue
        if all(m.done.exists() and m.model.is_dir() for m in stage_models(run, name, spec, folds)):
            out.append(name)
    return out


def _score(name: str, y: np.ndarray, probs: np.ndarray, groups: np.ndarray, seed: int) -> dict:
    losses = row_log_loss(y, probs)
    lo, hi = bootstrap_interval(losses, seed, groups=groups)
    return {"output": name, "rows": int(len(y)), "log_loss": float(losses.mean()), "interval": [lo, hi],
            "accuracy": float((probs.argmax(axis=1) == y).mean())}


def _paired(comparison: str, y, mine, theirs, groups, seed) -> dict:
    a, b = row_log_loss(y, mine), row_log_loss(y, theirs)
    lo, hi = bootstrap_interval(a, seed, paired_with=b, groups=groups)
    return {"comparison": comparison, "rows": int(len(y)), "difference": float((a - b).mean()),
            "interval": [lo, hi], "verdict": "lower" if hi < 0 else "higher" if lo > 0 else "no clear difference"}


def score_outputs(outputs: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray, prior: np.ndarray,
                  seed: int) -> tuple[list[dict], list[dict]]:
    """Per output (name -> (n, 3) probabilities) its scores; the ensemble (``ENSEMBLE``) minus the prior
    and minus each stage, paired."""
    prior_probs = np.tile(prior, (len(y), 1))
    table = [_score("class prior (training labels)", y, prior_probs, groups, seed)]
    table += [_score(n, y, p, groups, seed) for n, p in outputs.items()]
    ens = outputs[ENSEMBLE]
    paired = [_paired(f"{ENSEMBLE} minus class prior", y, ens, prior_probs, groups, seed)]
    paired += [_paired(f"{ENSEMBLE} minus {n}", y, ens, p, groups, seed) for n, p in outputs.items() if n != ENSEMBLE]
    return table, paired


def evaluate(run_path, data_path, progress: bool = True) -> Evaluation:
    """Score the run ``run_path`` on the labelled battles of ``data_path``; write the report beside the
    run (module docstring) and return its figures."""
    run = RunDir.open(run_path)
    ensemble, config, folds = check_complete(run)
    battles, _ = read_battles(data_path, require_labels=True)
    labelled = hard_mask(battles)
    if not labelled.any():
        raise EvaluateError(f"{data_path}: no battle has a hard label (winner_* columns): nothing to score")
    battles = battles[labelled].reset_index(drop=True)
    train = checks.run_training_battles(run)
    seen = np.zeros(len(battles), bool) if train is None else checks.overlapping(train, battles)
    warnings = [w for w in [None if train is None else checks.overlap_warning(train, battles, f"--data {data_path}")] if w]

    names = _finished_stages(run, config, folds, ensemble.stages)
    context = StageContext(resource_dir=run.resources, seed=config.seed, progress=False)
    specs = {n: config.stages[n] for n in names}
    models = {n: stage_class(s.type).load_folds([m.model for m in stage_models(run, n, s, folds)], context)
              for n, s in specs.items()}
    predictor = Predictor(run, specs, models, ensemble, progress)
    logits = dict(zip(names, predictor.stage_logits(battles)))
    outputs = {n: probs_from_logits(logits[n]) for n in names}
    outputs[ENSEMBLE] = predictor.ensemble_proba(battles, logits)

    y = label_index(battles)
    groups = np.unique(prompt_groups(battles), return_inverse=True)[1]
    if train is None:
        prior = np.full(3, 1 / 3)
        warnings.append("the run's training file cannot be read: the prior row is the uniform distribution")
    else:
        train_y = label_index_or_missing(train)
        prior = np.bincount(train_y[train_y >= 0], minlength=3) / int((train_y >= 0).sum())
    table, paired = score_outputs(outputs, y, groups, prior, config.seed)
    if seen.any() and not seen.all():
        table.append(_score(f"{ENSEMBLE}, battles not in training", y[~seen], outputs[ENSEMBLE][~seen], groups[~seen],
                            config.seed))

    stem = Path(str(data_path)).name.split(".")[0] or "data"
    folder = run.path / EVALUATIONS / stem
    partial = folder.with_name(f".{stem}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        shown = {(FINAL if n == ENSEMBLE else n): p for n, p in outputs.items()}
        plot_calibration(y, shown, partial / "calibration.png", title=f"Reliability per class on {Path(data_path).name}")
        groups_table = subgroup_scores(battles, y, shown)
        plot_subgroups(groups_table, partial / "subgroups.png", ylabel="log loss on the labelled file",
                       title=f"Log loss by prompt length, turn count and tie vs non-tie on {Path(data_path).name}")
        write_probs(partial / "predictions.csv", battles["id"], outputs[ENSEMBLE])
        result = {"run": str(run.path), "data": str(Path(data_path).resolve()), "rows": int(len(y)),
                  "ensemble": ensemble.chosen, "stages": names, "interval_level": INTERVAL, "scores": table,
                  "paired": paired, "subgroups": groups_table.to_dict("records"), "warnings": warnings}
        write_json(partial / "evaluation.json", result)
        write_text(partial / "report.md", markdown(result, groups_table))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)  # an earlier evaluation of a file with this stem: ours (under evaluations/)
    partial.rename(folder)
    log.info("evaluate: report written to %s", folder)
    return Evaluation(folder, int(len(y)), table, paired, warnings)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float) for x in v):
        return f"[{v[0]:+.4f}, {v[1]:+.4f}]" if min(v) < 0 else f"{v[0]:.4f} - {v[1]:.4f}"
    return str(v)


def _md_table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result: dict, groups: pd.DataFrame) -> str:
    """The evaluation as a short Markdown page (figures embedded by file name)."""
    warn = "".join(f"> **WARNING:** {w}\n>\n" for w in result["warnings"])
    groups_cols = list(groups.columns)
    return f"""# Evaluation of `{result['run']}` on `{result['data']}`

{warn}
{result['rows']} labelled battles. Ensemble: `{result['ensemble']}`. Stages: {', '.join(result['stages'])}.
Intervals: {result['interval_level']:.0%} bootstrap over prompt groups; every figure says how many rows it stands on.

## Scores

{_md_table(result['scores'], ['output', 'rows', 'log_loss', 'interval', 'accuracy'])}

## The ensemble against the prior and each stage (paired, same rows)

{_md_table(result['paired'], ['comparison', 'rows', 'difference', 'interval', 'verdict'])}

## Reliability per class

![reliability](calibration.png)

## By prompt length, turn count, tie vs non-tie (log loss)

{_md_table(groups.to_dict('records'), groups_cols)}

![subgroups](subgroups.png)

The run's own report (`report.html`) is unchanged; this folder is written by `run.py evaluate`.
"""
