"""``run.py remove-stage --run R STAGE [--refit]``: take a stage out of a run (its config entry and files).

The rule: a stage the saved ensemble uses is refused unless ``--refit``, which first fits the ensemble
over the remaining finished stages (as ``tune --apply``: the candidate goes to
``tune/remove-<stage>-<time>/`` and replaces the run's config, ensemble, submission and report only
once it was fitted whole). Then, in this order:

1. ``config.json`` without the stage (atomically): from here on no command sees the stage;
2. ``stages/<stage>/`` renamed to ``stages/.<stage>.removed`` (one rename), then deleted.

An interruption between the steps leaves a consistent run: a stage missing from the config is never
read, and a leftover ``.removed`` folder is deleted by the next ``remove-stage``. A stage that is not
in the config but has files (the config was edited) is removed the same way. The saved ensemble is
kept when it does not use the stage; its report still lists the stage until the next ``tune``.
"""
from __future__ import annotations

import datetime as _dt
import logging
import shutil

from ensemble.record import EnsembleRecord
from kernel.errors import UserError
from kernel.files import read_json, write_json
from pipeline.config import ConfigError, load_config
from pipeline.rundir import RunDir

log = logging.getLogger(__name__)


class RemoveStageError(UserError, ValueError):
    pass


def remove_stage(run_path, name: str, refit: bool = False, progress: bool = True) -> str:
    """Remove stage ``name`` from the run (module docstring); return a one-line summary."""
    run = RunDir.open(run_path)
    saved = read_json(run.config)
    stage_dir = run.stage(name).path
    if name not in saved.get("stages", {}) and not stage_dir.exists():
        raise RemoveStageError(f"remove-stage {name}: not a stage of {run} (stages: {', '.join(saved['stages'])})")
    remaining = {k: v for k, v in saved["stages"].items() if k != name}
    if not remaining:
        raise RemoveStageError(f"remove-stage {name}: it is the run's only stage; a run needs one (make a new run)")
    data = {**saved, "stages": remaining}
    try:
        config = load_config(None, (), saved=data)
    except ConfigError as exc:
        raise RemoveStageError(f"remove-stage {name}: {exc}") from None
    uses = run.ensemble.exists() and name in EnsembleRecord.read(run.ensemble).stages
    refitted = ""
    if uses:
        if not refit:
            raise RemoveStageError(f"remove-stage {name}: the saved ensemble ({run.ensemble}) uses this stage; pass "
                                   "--refit to refit the ensemble over the other stages first (nothing was changed)")
        from pipeline.tune import tune

        when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        result = tune(run.path, config, name=f"remove-{name}-{when}", apply=True,
                      progress=progress)
        refitted = f"; ensemble refitted without it: {result.record.chosen}"
    else:
        write_json(run.config, config.as_dict())
    for leftover in run.path.glob("stages/.*.removed"):
        shutil.rmtree(leftover)
    if stage_dir.exists():
        trash = stage_dir.with_name(f".{name}.removed")
        stage_dir.rename(trash)
        shutil.rmtree(trash)
    summary = f"removed stage {name} from {run}{refitted}"
    log.info("%s", summary)
    return summary
