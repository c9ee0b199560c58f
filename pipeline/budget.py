"""Predicting within a time budget: ``run.py predict --budget 8h30m``.

The budget counts from the start of the command (reading the battles and loading the models
included). The predictor cuts the battles into small chunks (a probe of :data:`PROBE` battles, chunks
doubling from there to about 1/:data:`BUDGET_CHUNKS` of the job, so the projection has something to
re-check), times every stage on every chunk, and after each chunk projects the rest of the job from
the stages' measured seconds per battle on the latest chunk (:class:`Costs`). When the rest would not
fit in what is left of the budget less a reserve (:func:`reserve`: :data:`SAFETY` of the budget plus
the time to write the output), it degrades by this ordered plan, going only as far as it must:

1. **One A/B order on the most confident battles.** A stage that scores the two A/B orders by two
   forward passes (the deep stages with ``swap_tta``) scores the given order of every battle and the
   swapped order only on the least confident fraction of them (smallest margin between the first
   order's two most likely classes); the fraction is the largest that fits, down to none.
2. **A shorter ``max_length`` for the longest battles** is not part of this version: the plan goes
   from step 1 to step 3 (the log says so).
3. **Dropping the costliest stage on the rows it has not reached.** The costliest stage (by measured
   seconds per battle) keeps running chunk by chunk while the rows after the chunk could still be
   done without it; then it is dropped (and the next costliest, should that not be enough), until a
   later projection has room for it again.
   Rows without every stage of the saved ensemble get a *fallback ensemble* over the stages they
   have: the saved ensemble's method (the same calibrator kind, C and meta features; a weighted
   average of one stage is its temperature scaling) fitted on the run's stored out-of-fold logits of
   those stages, on the labelled training rows they all cover (the labels, and the meta features where
   the saved ensemble uses them, computed from the training file the run recorded; an exported bundle
   keeps them in :data:`FALLBACK_TRAIN` with every stage's out-of-fold logits, so a bundle fits the same
   fallback as its run). The fit is deterministic (the same files give the same fallback) and logged.
   A row no stage reached (the budget ran out), or whose fallback cannot be fitted (no training file,
   no out-of-fold logits), gets the saved ensemble's mean out-of-fold probability (``prior``; a third
   each where the run keeps none).

A stage is also skipped on a chunk whenever its projected time on that chunk would eat into the
reserve, so the submission is always written, whole, before the budget ends. Every row's treatment
is recorded (:func:`treatment_frame`: ``full``, ``one_order``, ``fallback:<stages>``, ``prior``,
joined by ``;``), the plan and each change of it are logged, and :attr:`BudgetResult.summary` is the
one line that says what was degraded. Without a budget nothing of this runs; with a budget the full
plan fits, the probabilities are those of :meth:`pipeline.predict.Predictor.predict_proba` (the stages'
answers do not depend on the chunking). A budgeted prediction runs in one process (under a
multi-process launch each rank would choose its own plan): it is refused there.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import log_softmax, softmax

from battles.labels import label_index_or_missing, swap_battles
from ensemble.meta import META_NAMES, meta_features
from ensemble.stacking import Candidate
from kernel.dist import launched_processes
from kernel.errors import UserError
from kernel.files import write_atomic
from models.stage import Stage, average_logits, combine_orders, stage_class
from battles.columns import LABEL_COLUMNS
from pipeline.rundir import LOGIT_COLUMNS, as_stored, read_id_table

log = logging.getLogger(__name__)

SAFETY = 0.05  # share of the budget kept free
WRITE_SECONDS = 1.0  # writing the output: a fixed part ...
WRITE_SECONDS_PER_ROW = 1e-4  # ... and a part per row (two small CSV files)
BUDGET_CHUNKS = 20  # a budgeted prediction is cut into about this many chunks
MIN_CHUNK, MAX_CHUNK = 8, 2048
HEADROOM = 1.5  # step 3 keeps the costliest stage for a chunk only with this margin on the chunk's projected time
PROBE = 2  # battles in the first chunk: timed before any projection exists, so kept small
DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
FALLBACK_TRAIN = "ensemble/fallback_train.csv"  # in a bundle: what a fallback ensemble reads of the training rows
FALLBACK_FLOAT_FORMAT = "%.17g"  # its meta features round-trip exactly (the run computes them from the texts)
STEP_2_NOTE = "a shorter max_length for the longest battles: not implemented in this version, the plan goes from 1 to 3"


class BudgetError(UserError, ValueError):
    """A budget that cannot be read, or a budgeted prediction that cannot degrade as planned."""


def parse_duration(text: str, option: str = "--budget") -> float:
    """Seconds in a duration such as ``90s``, ``45m``, ``8h30m``, ``1.5h`` or ``1h2m3s`` (more than 0)."""
    value = str(text).strip().lower()
    match = DURATION.match(value)
    if not value or match is None or not any(match.groups()):
        raise BudgetError(f"{option} {text!r}: not a duration; write it like 90s, 45m, 8h30m or 1.5h")
    seconds = sum(float(g) * unit for g, unit in zip(match.groups(), (3600, 60, 1)) if g)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise BudgetError(f"{option} {text!r}: must be more than 0 seconds")
    return seconds


class Budget:
    """``seconds`` of wall time from ``started`` (default: now), measured by ``clock``."""

    def __init__(self, seconds: float, clock=time.monotonic, started: float | None = None):
        if not seconds > 0:
            raise BudgetError(f"budget {seconds!r} s: must be more than 0 seconds")
        self.seconds, self.clock = float(seconds), clock
        self.started = clock() if started is None else started

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()


def reserve(budget: Budget, n_rows: int) -> float:
    """Seconds kept free at the end: :data:`SAFETY` of the budget and the time to write ``n_rows``."""
    return SAFETY * budget.seconds + WRITE_SECONDS + WRITE_SECONDS_PER_ROW * n_rows


def chunk_size(n_rows: int) -> int:
    return max(MIN_CHUNK, min(MAX_CHUNK, -(-n_rows // BUDGET_CHUNKS)))


def chunk_starts(n_rows: int) -> list[int]:
    """Where each chunk starts: a probe of :data:`PROBE` battles, chunks doubling from there up to
    :func:`chunk_size`, then chunks of that size."""
    starts, size, start = [], PROBE, 0
    while start < n_rows:
        starts.append(start)
        start += size
        size = min(2 * size, chunk_size(n_rows))
    return starts


def two_pass_stage(spec) -> bool:
    """Whether a stage scores the two A/B orders by two forward passes (step 1 applies to it): a stage
    type that keeps the base ``predict_both_orders`` (the deep stages), with ``swap_tta`` on."""
    return (stage_class(spec.type).predict_both_orders is Stage.predict_both_orders
            and spec.params.get("swap_tta") is not False)


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class Costs:
    """Measured seconds per battle of each stage (per order for a two-pass stage, else per battle): the
    latest chunk's (the largest so far: chunks grow from a small probe, so a fixed cost per call weighs
    less and less) for projections, and the whole run's so far for ranking the stages by cost (stable
    from chunk to chunk)."""

    latest: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)

    def add(self, name: str, seconds: float, units: int) -> None:
        if units:
            self.latest[name] = seconds / units
            spent, done = self.total.get(name, (0.0, 0))
            self.total[name] = (spent + seconds, done + units)

    def known(self, names) -> bool:
        return all(n in self.latest for n in names)

    def per(self, name: str) -> float:
        return self.latest[name]

    def rank(self, name: str) -> float:
        spent, done = self.total[name]
        return spent / done


def per_battle(costs: Costs, names, two_pass: set, fraction: float) -> float:
    """Projected seconds per battle of ``names`` with the second order on ``fraction`` of the battles."""
    return sum(costs.per(n) * ((1 + fraction) if n in two_pass else 1) for n in names)


def choose(costs: Costs, active: list, two_pass: set, remaining: int, chunk: int, available: float):
    """The plan for the next chunk: ``(fraction, active)``: the share of battles that get the second A/B
    order in two-pass stages (step 1) and the stages that run on it (step 3 keeps the costliest of
    ``active`` while the chunk with it and the rows after without it still fit, else drops it and looks
    at the next costliest). The caller passes every stage each time: a projection that improves brings
    a dropped stage back."""
    if remaining <= 0 or remaining * per_battle(costs, active, two_pass, 1.0) <= available:
        return 1.0, list(active)
    doubled = [n for n in active if n in two_pass]
    if doubled:
        spare = available / remaining - per_battle(costs, active, two_pass, 0.0)
        if spare >= 0:
            return min(1.0, spare / sum(costs.per(n) for n in doubled)), list(active)
    active = list(active)
    while active:
        costliest = max(active, key=lambda n: (costs.rank(n), n))
        rest = [n for n in active if n != costliest]
        if HEADROOM * chunk * per_battle(costs, active, two_pass, 0.0) + \
                (remaining - chunk) * per_battle(costs, rest, two_pass, 0.0) <= available:
            break
        active = rest
    return 0.0, active


# ------------------------------------------------------------------------------------------- fallback
def uses_meta(record) -> bool:
    """Whether the saved ensemble (an :class:`ensemble.record.EnsembleRecord`) reads meta features."""
    return record.model.get("kind") == "logistic" and bool(record.model.get("meta", False))


def fallback_train(train: pd.DataFrame, meta: bool) -> pd.DataFrame:
    """What a fallback ensemble reads of the training battles: ``id`` and ``label`` (the hard class index)
    of every row with a hard label, in the file's order, and with ``meta`` their meta features
    (:data:`ensemble.meta.META_NAMES`: numbers, no text)."""
    y = label_index_or_missing(train)
    keep = y >= 0
    frame = pd.DataFrame({"id": train["id"].astype(str).to_numpy()[keep], "label": y[keep]})
    if meta:
        frame[META_NAMES] = meta_features(train[keep])
    return frame


def write_fallback_train(run, ensemble, folder: Path) -> bool:
    """Write :data:`FALLBACK_TRAIN` of ``run`` under ``folder`` (an export bundle being made), from the training
    file the run recorded; False (logged) where that file cannot be read: the bundle's fallback is the prior."""
    try:
        train = Fallbacks.read_training(run)
    except BudgetError as exc:
        log.warning("export: %s; a budgeted prediction from the bundle gives the rows without every stage the "
                    "prior", exc)
        return False
    target = folder / FALLBACK_TRAIN
    target.parent.mkdir(parents=True, exist_ok=True)
    table = fallback_train(train, uses_meta(ensemble))
    write_atomic(target, lambda p: table.to_csv(p, index=False, float_format=FALLBACK_FLOAT_FORMAT))
    return True


class Fallbacks:
    """Ensembles over subsets of the saved ensemble's stages, fitted on demand from the run's stored
    out-of-fold logits with the saved ensemble's method (module docstring), and the last-resort prior."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.record = predictor.ensemble
        self.models: dict[tuple, object] = {}
        self._train = None
        self._error: str | None = None  # why the training file could not be read (asked once)
        self.fit_seconds = 0.0

    def candidate(self, names: list) -> Candidate:
        saved = self.record.model
        kind = saved["kind"]
        if kind == "logistic":
            return Candidate("logistic", None, float(saved["C"]), bool(saved.get("meta", False)))
        if kind == "weighted" and len(names) > 1:
            return Candidate("weighted")
        if kind == "temperature" and saved.get("stages") is not None:
            kept = [names.index(self.record.stages[i]) for i in saved["stages"] if self.record.stages[i] in names]
            if kept:
                return Candidate("temperature", tuple(kept))
        return Candidate("temperature", None)

    @staticmethod
    def read_training(run) -> pd.DataFrame:
        """The run's training battles (labels and texts) from the file it recorded, as the run read it
        (:func:`pipeline.checks.run_training_battles`: a file gone or changed since the run is not used)."""
        from pipeline.checks import run_training_battles

        train = run_training_battles(run)
        if train is None:
            raise BudgetError(f"{run}: the run's training file ({run.record().get('train_path')}) is gone or changed "
                              "since the run; a fallback ensemble needs its labels")
        return train

    def training(self) -> pd.DataFrame:
        """:func:`fallback_train` of the run's training rows: a bundle's :data:`FALLBACK_TRAIN`, else computed
        from the training file the run recorded."""
        if self._error is not None:
            raise BudgetError(self._error)
        if self._train is None:
            bundled = self.predictor.run.path / FALLBACK_TRAIN
            try:
                if bundled.exists():
                    try:
                        self._train = read_id_table(bundled)
                    except (OSError, ValueError) as exc:
                        raise BudgetError(f"{bundled}: unreadable ({exc})") from None
                else:
                    self._train = fallback_train(self.read_training(self.predictor.run), uses_meta(self.record))
            except BudgetError as exc:
                self._error = str(exc)
                raise
        return self._train

    def model(self, names: list):
        key = tuple(names)
        if key not in self.models:
            started = time.monotonic()
            train = self.training()
            ids = train["id"].astype(str).to_numpy()
            y = train["label"].to_numpy(dtype=np.int64)
            rows = y >= 0
            logits = []
            for n in names:
                path = self.predictor.run.stage(n).oof_logits
                try:
                    table = read_id_table(path).set_index("id")
                except (OSError, ValueError) as exc:  # an exported bundle keeps no out-of-fold logits
                    raise BudgetError(f"{path}: the stage's out-of-fold logits are needed for a fallback "
                                      f"ensemble: {exc}") from None
                oof = table.reindex(ids)[LOGIT_COLUMNS].to_numpy(dtype=np.float64)
                rows &= ~np.isnan(oof).any(axis=1)
                logits.append(oof)
            if not rows.any():
                raise BudgetError(f"no labelled training row has out-of-fold logits of every stage of {names}")
            candidate = self.candidate(names)
            meta = None
            if candidate.meta:
                if not set(META_NAMES) <= set(train.columns):
                    raise BudgetError(f"{self.predictor.run.path / FALLBACK_TRAIN}: no meta feature columns "
                                      f"{META_NAMES}; the saved ensemble uses them")
                meta = train[META_NAMES].to_numpy(dtype=np.float64)[rows]
            self.models[key] = candidate.build().fit([x[rows] for x in logits], y[rows], meta=meta)
            self.fit_seconds = max(self.fit_seconds, time.monotonic() - started)
            log.info("budget: fallback ensemble over %s: %s fitted on %d labelled rows' out-of-fold logits (%.1f s)",
                     "+".join(names), candidate.label(names), int(rows.sum()), time.monotonic() - started)
        return self.models[key]

    def prior(self) -> np.ndarray:
        """The saved ensemble's mean out-of-fold probability (for rows no stage reached; a bundle carries
        ``oof_probs.csv`` too); a third each where there is none (a bundle exported before it did)."""
        try:
            table = read_id_table(self.predictor.run.oof_probs)
            prior = table[LABEL_COLUMNS].to_numpy(dtype=np.float64).mean(axis=0)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("budget: no out-of-fold probabilities to take a prior from (%s): a third each", exc)
            return np.full(3, 1 / 3)
        return prior / prior.sum() if np.isfinite(prior).all() and prior.sum() > 0 else np.full(3, 1 / 3)


# ------------------------------------------------------------------------------------------- the run
@dataclass
class BudgetResult:
    probs: np.ndarray  # (n, 3)
    treatment: list  # per row: "full", or ";"-joined "one_order", "fallback:<stages>", "prior"
    summary: str  # one line: what was degraded
    plan_log: list  # the plan and each change of it, as logged


def treatment_frame(ids, treatment) -> pd.DataFrame:
    return pd.DataFrame({"id": [str(i) for i in ids], "treatment": list(treatment)})


def treatment_path(submission) -> Path:
    """The treatment file written next to a submission: ``<stem>.treatment.csv``."""
    path = Path(submission)
    return path.with_name(f"{path.stem}.treatment.csv")


def predict_within(predictor, battles: pd.DataFrame, budget: Budget) -> BudgetResult:
    """Every battle's probabilities, degraded by the plan (module docstring) so that writing them ends
    inside ``budget``."""
    if launched_processes() > 1:
        raise BudgetError("--budget: a budgeted prediction runs in one process (each rank would time its own shard "
                          "and choose its own plan); run predict without a multi-process launcher")
    n, names, specs = len(battles), list(predictor.stage_names), predictor.specs
    two_pass = {nm for nm in names if two_pass_stage(specs[nm])}
    size, keep = chunk_size(n), reserve(budget, n)
    plan_log = []

    def say(message, *args):
        plan_log.append(message % args if args else message)
        log.info("budget: " + message, *args)

    say("%.0f s for %d battles (%.0f s left after loading; %.0f s kept free: %.0f%% of the budget and the time "
        "to write); chunks of %d, the projection re-checked after each. Plan where it does not fit: 1. the second "
        "A/B order only on the least confident battles of %s; 2. (%s); 3. drop the costliest stage on the rows it "
        "has not reached, those rows get a fallback ensemble over the stages they have", budget.seconds, n,
        budget.left(), keep, SAFETY * 100, size, "+".join(sorted(two_pass)) or "(no two-pass stage)", STEP_2_NOTE)
    out = {nm: np.zeros((n, 3)) for nm in names}
    have = {nm: np.zeros(n, dtype=bool) for nm in names}
    one_order = np.zeros(n, dtype=bool)
    costs, fallbacks = Costs(), Fallbacks(predictor)
    active, fraction, last = list(names), 1.0, None
    starts = chunk_starts(n)
    for start, end in zip(starts, [*starts[1:], n]):
        chunk = battles.iloc[start:end]
        rows = np.arange(start, end)
        remaining = n - start
        if costs.known(names):
            available = budget.left() - keep - fallbacks.fit_seconds
            fraction, now_active = choose(costs, names, two_pass, remaining, len(chunk), available)
            full_cost = remaining * per_battle(costs, names, two_pass, 1.0)
            plan = (round(fraction, 2), tuple(now_active))
            if plan != last:
                if fraction >= 1 and len(now_active) == len(names):
                    how = "the full plan fits"
                elif len(now_active) == len(names) and fraction > 0:
                    how = f"step 1: the second A/B order on the least confident {fraction:.0%} of battles"
                else:
                    how = (f"step 3: {'one A/B order, and ' if two_pass else ''}"
                           f"{'+'.join(now_active) or 'no stage'} on the next chunk "
                           "(the costliest runs while the rows after it would fit without it)")
                say("after %d battles: %.0f s left, %.0f s usable; the rest in full projected at %.0f s: %s",
                    start, budget.left(), available, full_cost, how)
                dropped = [nm for nm in names if nm not in now_active]
                if dropped:
                    say("%s not run from battle %d on (step 3)", "+".join(dropped), start)
                last = plan
            if (fraction < 1 or len(now_active) < len(names)) and not fallbacks.models and len(names) > 1:
                costliest = max(names, key=lambda nm: (costs.rank(nm), nm))
                try:  # fitted ahead: its time is then known (and kept free for another set at the end)
                    fallbacks.model([nm for nm in names if nm != costliest])
                except BudgetError as exc:
                    say("no fallback ensemble (%s): rows without every stage would get the ensemble's mean "
                        "out-of-fold probability", exc)
                    fallbacks.models[()] = None  # tried: not again ahead
            active = now_active
        for nm in names:
            if nm not in active:
                continue
            # the guard: never eat into the reserve (a stage not timed yet runs while some time is left)
            est = len(chunk) * costs.per(nm) * ((1 + fraction) if nm in two_pass else 1) if costs.known([nm]) else 0.0
            if est > budget.left() - keep or budget.left() <= keep:
                continue
            t0 = budget.clock()
            if nm in two_pass and fraction < 1:
                logits, second = one_order_logits(predictor.stage_models[nm], chunk, fraction)
                costs.add(nm, budget.clock() - t0, len(chunk) + int(second.sum()))
                one_order[rows[~second]] = True
            else:
                logits = predictor.stage_models[nm].predict_logits(chunk)
                costs.add(nm, budget.clock() - t0, len(chunk) * (2 if nm in two_pass else 1))
            out[nm][rows] = as_stored(logits)
            have[nm][rows] = True
    probs, treatment = combine(predictor, battles, Scored(names, out, have, one_order), fallbacks)
    summary = summarize(treatment, budget)
    say("%s; %.1f s used before writing", summary, budget.elapsed())
    return BudgetResult(probs, treatment, summary, plan_log)


def one_order_logits(models, battles: pd.DataFrame, fraction: float):
    """A two-pass stage's logits with the swapped order only on the least confident ``fraction`` of
    ``battles`` (by the margin of the given order's averaged probabilities); and which rows got it."""
    straight = [log_softmax(np.asarray(m.predict_one_order(battles), dtype=np.float64), axis=1) for m in models.models]
    probs = np.sort(softmax(average_logits(straight), axis=1), axis=1)
    margin = probs[:, -1] - probs[:, -2]
    k = int(math.floor(fraction * len(battles)))
    second = np.zeros(len(battles), dtype=bool)
    second[np.argsort(margin, kind="stable")[:k]] = True
    logits = average_logits(straight)
    if k:
        swapped = swap_battles(battles.iloc[np.flatnonzero(second)])
        both = [combine_orders(s[second], m.predict_one_order(swapped)) for s, m in zip(straight, models.models)]
        logits[second] = average_logits(both)
    return logits, second


@dataclass(frozen=True)
class Scored:
    """What the chunks produced: per stage its logits (``out``) and which rows it reached (``have``), and the
    rows whose two-order stages scored one order only."""

    names: list
    out: dict
    have: dict
    one_order: np.ndarray


def combine(predictor, battles, scored: Scored, fallbacks) -> tuple[np.ndarray, list]:
    """The saved ensemble on rows with every stage, a fallback ensemble on the others: (probabilities,
    each row's treatment)."""
    names, out, have, one_order = scored.names, scored.out, scored.have, scored.one_order
    n = len(battles)
    probs = np.zeros((n, 3))
    treatment = np.array(["full"] * n, dtype=object)
    treatment[one_order] = "one_order"
    sets = np.array(["+".join(nm for nm in names if have[nm][i]) for i in range(n)], dtype=object)
    full = "+".join(names)
    for members in dict.fromkeys(sets.tolist()):
        rows = sets == members
        part = battles.iloc[np.flatnonzero(rows)]
        if members == full:
            probs[rows] = predictor.ensemble_proba(part, {nm: out[nm][rows] for nm in names})
            continue
        kept = members.split("+") if members else []
        if kept:
            try:
                model = fallbacks.model(kept)
            except BudgetError as exc:
                log.warning("budget: %s; those rows get the ensemble's mean out-of-fold probability", exc)
                kept, tag = [], "prior"
            else:
                tag = f"fallback:{members}"
                meta = meta_features(part) if getattr(model, "meta", False) else None
                probs[rows] = model.predict_proba([out[nm][rows] for nm in kept], meta=meta)
        else:
            tag = "prior"
        if not kept:
            probs[rows] = fallbacks.prior()
        treatment[rows] = [f"{t};{tag}" if t != "full" else tag for t in treatment[rows]]
    return probs, treatment.tolist()


def summarize(treatment: list, budget: Budget) -> str:
    """One line: how many battles got which treatment."""
    n = len(treatment)
    counts = pd.Series(treatment, dtype=object).value_counts()
    degraded = {k: int(v) for k, v in counts.items() if k != "full"}
    summary = (f"budget {budget.seconds:.0f} s: all {n} battles predicted in full" if not degraded else
               f"budget {budget.seconds:.0f} s: degraded {sum(degraded.values())} of {n} battles (" +
               ", ".join(f"{v} {k}" for k, v in sorted(degraded.items())) + f"); {counts.get('full', 0)} in full")
    return summary
