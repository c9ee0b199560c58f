"""A verdict per external source: does adding it to training help a cheap stage on your data?

    python run.py external-check --train train.csv --config cfg.json --out runs/check [--stage NAME]
    external_check(Run("runs/check", config, "train.csv"))      # the same from Python

The config's ``external`` section lists the sources (as for a run). One stage (default
:data:`DEFAULT_STAGE`: LightGBM on text statistics, similarity and Word2Vec features, no TF-IDF;
``--stage NAME`` takes a stage of the config instead) is cross-fitted on the run's folds (grouped by
prompt, seeded by the config) in several settings:

* ``none``: the training data alone (the baseline);
* ``+<source>``: each source alone, converted, de-duplicated against the training data and within
  itself, weighted as the config says;
* ``all``: every source, exactly the rows a run with this config would add (de-duplicated across
  sources too: the first source listed keeps a shared battle).

Per setting it reports the rows kept after de-duplication, the adversarial AUC of the source's
prompts against the training prompts (:mod:`flywheel.shift`; 0.5 = looks like your prompts), the
stage's OOF log loss on the hard-labelled training rows, its change against ``none`` and a paired
bootstrap 90% interval of that change (the same rows, the same folds: :func:`bootstrap_interval`),
and a verdict by :data:`RULE`. ``external_check.json`` and ``external_check.txt`` go into the
directory; each setting's stage lives under ``stages/<setting>/``, so a rerun reuses what finished.
"""
from __future__ import annotations

import logging
import re
from dataclasses import replace

from battles.labels import hard_mask, label_index
from ensemble.coverage import bootstrap_interval, row_log_loss
from ensemble.metrics import probs_from_logits
from flywheel.shift import shift_weights
from flywheel.sources import ExternalConfig, convert_sources, gather_external
from kernel.files import write_json, write_text
from models.stage import stage_class
from pipeline.config import ConfigError, RunConfig, StageSpec
from pipeline.crossfit import StageFit
from pipeline.runner import Run

log = logging.getLogger(__name__)

DEFAULT_STAGE = {"type": "lgbm", "params": {"blocks": [{"type": "text_stats"}, {"type": "similarity"},
                                                       {"type": "word2vec"}]}}
RULE = ("keep if the whole 90% interval of the change in OOF log loss lies below 0 (the source helps); drop if it "
        "lies above 0 (the source hurts) or no row survives de-duplication; down-weight otherwise (no measurable "
        "effect at this size: train on it with a weight below 1 or with shift_weighting, and check again on more data)")


def verdict(interval: list[float], rows_kept: int) -> str:
    """keep / drop / down-weight by :data:`RULE`."""
    lo, hi = interval
    if rows_kept == 0 or lo > 0:
        return "drop"
    return "keep" if hi < 0 else "down-weight"


def check_stage(config: RunConfig, name: str | None) -> tuple[str, StageSpec]:
    """The stage to measure with: ``name`` from the config, else :data:`DEFAULT_STAGE` (params resolved)."""
    if name is not None:
        if name not in config.stages:
            raise ConfigError(f"--stage {name}: not a stage of the config (stages: {', '.join(config.stages)})")
        return name, config.stages[name]
    params = stage_class(DEFAULT_STAGE["type"]).Params.model_validate(DEFAULT_STAGE["params"]).as_dict()
    return "lgbm_cheap", StageSpec(type=DEFAULT_STAGE["type"], params=params)


def _dir_name(setting: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", setting)


def _auc(train, rows, source: str, spec: ExternalConfig, seed: int) -> float | None:
    """Adversarial AUC of the source's kept prompts against the training prompts (None: too few prompts)."""
    if rows is None or len(rows) == 0:
        return None
    try:
        _, report = shift_weights(train, rows, spec.shift, seed=seed)
    except ValueError as exc:  # fewer than two distinct prompts on a side
        log.warning("external-check: no adversarial AUC for %s: %s", source, exc)
        return None
    return report[source]["auc"]


def external_check(run: Run, stage: str | None = None) -> dict:
    """Run the check (see the module docstring) in ``run``'s directory, on its training data and
    config; write and return its result."""
    config = run.config
    spec = config.external
    if not spec.sources:
        raise ConfigError("external-check: the config's external section lists no sources "
                          "(external.sources: [{kind, path, source, ...}])")
    name, stage_spec = check_stage(config, stage)
    converted = convert_sources(spec.sources)  # once, for every setting
    data = run.load_data(converted)  # claims the directory, fixes the folds, gathers the 'all' setting's rows
    train, seed = data.train, config.seed
    settings = [("none", None, None, None)]
    for src, conv in zip(spec.sources, converted):
        rows, _ = gather_external(train, spec.model_copy(update={"sources": [src]}), seed, converted=[conv],
                                  progress=run.context.progress)
        settings.append((f"+{src.source}", src, conv[1], rows))
    if len(spec.sources) > 1:
        settings.append(("all", None, None, data.extra))

    scored = hard_mask(train)
    results, losses = [], {}
    for i, (setting, src, conversion, rows) in enumerate(settings):
        log.info("external-check: setting %d of %d: %s (%d external rows)", i + 1, len(settings), setting,
                 0 if rows is None else len(rows))
        with run.timings.step(f"external-check: {setting}"):
            context = replace(run.context, feature_memo={})  # each setting's features are its own
            result = StageFit(run.dir, _dir_name(setting), stage_spec, data.training_only(rows), context,
                              run.timings).result()
        use = scored & result.covered
        losses[setting] = row_log_loss(label_index(train[use]), probs_from_logits(result.oof_logits[use]))
        row = {"setting": setting, "rows_kept": None if setting == "none" else 0 if rows is None else len(rows),
               "log_loss": float(losses[setting].mean()), "scored_rows": int(use.sum())}
        if src is not None:
            row.update({"source": src.source, "kind": src.kind, "weight": src.weight,
                        "rows_read": conversion["rows_read"], "battles": conversion["kept"],
                        "auc": _auc(train, rows, src.source, spec, seed)})
        results.append(row)
    base = losses["none"]
    for row in results:
        if row["setting"] == "none":
            row.update({"delta": 0.0, "interval": [0.0, 0.0], "verdict": "baseline"})
            continue
        mine = losses[row["setting"]]
        row["delta"] = float((mine - base).mean())
        row["interval"] = bootstrap_interval(mine, seed, paired_with=base)
        row["verdict"] = verdict(row["interval"], row["rows_kept"])
    summary = {"train": str(data.train_path), "rows": int(scored.sum()), "n_folds": config.n_folds, "seed": seed,
               "stage": {"name": name, **stage_spec.as_dict()}, "rule": RULE, "settings": results}
    write_json(run.dir.external_check, summary)
    write_text(run.dir.external_check_table, format_table(summary) + "\n")
    run.finish()
    return summary


def _blocks(stage: dict) -> str:
    blocks = stage.get("params", {}).get("blocks")
    return f"{stage['type']} ({'+'.join(b['type'] for b in blocks)})" if blocks else stage["type"]


def format_table(summary: dict) -> str:
    """The check as a plain-text table (what the command prints and ``external_check.txt`` holds)."""
    lines = [f"external-check: stage {summary['stage']['name']} = {_blocks(summary['stage'])}, {summary['n_folds']} "
             f"grouped folds; OOF log loss on {summary['rows']} hard-labelled training rows",
             f"{'setting':<16}{'kind':<16}{'read':>7}{'battles':>9}{'kept':>7}{'AUC':>7}{'OOF LL':>9}"
             f"{'change vs none [90% CI]':>33}  verdict"]
    for r in summary["settings"]:
        auc = "-" if r.get("auc") is None else f"{r['auc']:.3f}"
        change = "" if r["setting"] == "none" else \
            f"{r['delta']:+.4f} [{r['interval'][0]:+.4f}, {r['interval'][1]:+.4f}]"
        lines.append(f"{r['setting']:<16}{r.get('kind', '-'):<16}{r.get('rows_read', '-'):>7}{r.get('battles', '-'):>9}"
                     f"{'-' if r['rows_kept'] is None else r['rows_kept']:>7}{auc:>7}{r['log_loss']:>9.4f}{change:>33}  {r['verdict']}")
    lines.append(f"rule: {summary['rule']}")
    return "\n".join(lines)
