"""Warnings when the data cannot support the score: logged loudly, kept in ``ensemble.json`` and shown
in a box at the top of the report. Each names what it saw and what to do (README, "Warnings").

* lopsided folds: the largest grouped fold is more than twice the smallest (a few prompts dominate,
  e.g. many battles with an empty prompt share one group);
* few rows per fold: fewer than ``MIN_FOLD_ROWS`` battles in some fold (scores swing by chance);
* many empty prompts: they all fall in one prompt group, hence one fold;
* test battles that repeat training battles (:func:`overlap_warning`: same prompt and replies, in
  either order, after folding case and whitespace; one function for ``run``/``predict``/``evaluate``);
* test unlike training: adversarial validation tells the test file's prompts from the training
  prompts (AUC above ``SHIFT_AUC``), so the cross-validated score may not carry over;
* a stage, or the final ensemble, scores worse than the class prior on its rows;
* pseudo-labels of this data: an external source of pseudo-labels made by a run trained on this very
  training data carries every fold's validation labels, so the OOF scores are optimistic;
* a distilled student: its targets are a teacher's out-of-fold probabilities, which still carry what
  the teacher learned from the other folds (``pipeline/distill.py``), so its OOF scores are optimistic.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np

from battles.text import normalised, plain_text
from ensemble.record import EnsembleRecord
from kernel.errors import UserError
from flywheel.shift import adversarial_auc
from pipeline.rundata import RunData
from pipeline.rundir import RunDir

log = logging.getLogger(__name__)

LOPSIDED_RATIO = 2.0
MIN_FOLD_ROWS = 300
EMPTY_PROMPT_SHARE = 0.2
SHIFT_AUC = 0.75
SHIFT_SAMPLE = 5000  # prompts per side for the adversarial check


def _warn(message: str) -> str:
    log.warning("WARNING: %s", message)
    return message


def data_warnings(data: RunData, seed: int) -> list[str]:
    out = []
    sizes = np.bincount(data.folds)
    if sizes.min() > 0 and sizes.max() / sizes.min() > LOPSIDED_RATIO:
        out.append(_warn(f"lopsided folds: sizes {sizes.tolist()} (largest/smallest {sizes.max() / sizes.min():.1f}x); "
                         "a few prompt groups dominate, so fold scores are not comparable. Check for repeated or "
                         "empty prompts."))
    if sizes.min() < MIN_FOLD_ROWS:
        out.append(_warn(f"few rows per fold: the smallest fold has {sizes.min()} battles (< {MIN_FOLD_ROWS}); "
                         "scores on folds this small move by chance by several hundredths of log loss."))
    read = data.repairs["train"]  # the reader counted the empty prompts
    empty = read.empty_prompts / max(read.rows, 1)
    if empty > EMPTY_PROMPT_SHARE:
        out.append(_warn(f"{empty:.0%} of training battles have an empty prompt: they share one prompt group, "
                         "hence one fold; check the file's prompt column."))
    teacher = (read.provenance or {}).get("distilled_from")
    if teacher:
        out.append(_warn(f"distilled student of the run {teacher}: its targets come from teacher models that saw the "
                         "other folds' labels, so the OOF scores of this run are optimistic; compare student and "
                         "teacher on labelled battles neither saw."))
    if data.test is not None:
        overlap = overlap_warning(data.train, data.test, f"test file {data.test_path}", overlap_of_test(data))
        if overlap:
            out.append(overlap)
        auc = shift_auc_of_test(data, seed)
        if auc is not None and auc > SHIFT_AUC:
            out.append(_warn(f"test unlike training: a classifier tells the test prompts from the training prompts "
                             f"with AUC {auc:.2f} (> {SHIFT_AUC}; 0.5 = alike); the cross-validated score may not "
                             "carry over to this test file."))
    return out


def overlap_keys(battles) -> np.ndarray:
    """One text key per battle for the overlap check: a hash of the normalised prompt and the two replies,
    the replies in sorted order (a battle and its swapped copy share a key; unlike the exact content
    keys of :mod:`battles.keys`, case and spacing are folded)."""
    keys = []
    for p, a, b in zip(battles["prompt"], battles["response_a"], battles["response_b"]):
        replies = sorted((normalised(plain_text(a)), normalised(plain_text(b))))
        text = "\x1e".join([normalised(plain_text(p)), *replies])
        keys.append(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest())
    return np.array(keys, dtype=object)


def overlapping(train, other) -> np.ndarray:
    """(len(other),) bool: the battles of ``other`` that repeat a training battle (:func:`overlap_keys`)."""
    return np.isin(overlap_keys(other), overlap_keys(train))


def overlap_warning(train, other, what: str, n: int | None = None) -> str | None:
    """The warning (logged) when battles of ``other`` (``what``: e.g. "test file x.csv") repeat training
    battles (``n`` of them, when counted already); None when none do."""
    n = int(overlapping(train, other).sum()) if n is None else n
    if not n:
        return None
    return _warn(f"{what}: {n} of {len(other)} battles ({n / len(other):.1%}) repeat a training battle of the run (same "
                 "prompt and replies, either order): the models saw their labels, so scores on them are optimistic "
                 "and their predictions are not out-of-sample.")


def run_training_battles(run: RunDir):
    """A finished run's training battles, read again from the file its marker names; None (and a note in
    the log) when that file is gone or changed since the run."""
    from battles.io import read_battles
    from pipeline.rundata import table_key

    record = run.record()
    path = record.get("train_path")
    try:
        train, _ = read_battles(path, require_labels=True)  # as the run read it (the same table key)
    except (UserError, OSError, TypeError):
        log.info("the run's training file %s cannot be read: checks against it are skipped", path)
        return None
    if record.get("train_hash") not in (None, table_key(train)):
        log.info("the run's training file %s changed since the run: checks against it are skipped", path)
        return None
    return train


def run_overlap_warning(run: RunDir, other, what: str) -> str | None:
    """:func:`overlap_warning` against a finished run's training battles (:func:`run_training_battles`)."""
    train = run_training_battles(run)
    return None if train is None else overlap_warning(train, other, what)


_SHIFT_AUCS: dict = {}
_OVERLAPS: dict = {}


def overlap_of_test(data: RunData) -> int:
    """How many of the run's test battles repeat a training battle, counted once per data (the warnings
    and the report's test-set section both read it)."""
    key = (data.keys.train, data.keys.test)
    if key not in _OVERLAPS:
        _OVERLAPS[key] = 0 if data.test is None else int(overlapping(data.train, data.test).sum())
    return _OVERLAPS[key]


def shift_auc_of_test(data: RunData, seed: int) -> float | None:
    """:func:`prompt_shift_auc` of the run's test file, computed once per data and seed (the warnings
    and the report's test-set section both read it)."""
    key = (data.keys.train, data.keys.test, seed)
    if key not in _SHIFT_AUCS:
        _SHIFT_AUCS[key] = None if data.test is None else prompt_shift_auc(data.train, data.test, seed)
    return _SHIFT_AUCS[key]


def prompt_shift_auc(train, test, seed: int) -> float | None:
    """Adversarial AUC of test prompts vs training prompts (unique prompts, sampled), or None if too few."""
    rng = np.random.default_rng(seed)

    def sample(battles):
        prompts = sorted({plain_text(p) for p in battles["prompt"] if plain_text(p).strip()})
        if len(prompts) > SHIFT_SAMPLE:
            prompts = [prompts[i] for i in sorted(rng.choice(len(prompts), SHIFT_SAMPLE, replace=False))]
        return prompts

    a, b = sample(train), sample(test)
    if min(len(a), len(b)) < 20:
        return None
    auc, _ = adversarial_auc(a, b, seed=seed)
    log.info("test vs training prompts: adversarial AUC %.3f (%d vs %d prompts)", auc, len(b), len(a))
    return auc


def score_warnings(record: EnsembleRecord) -> list[str]:
    out = []
    prior = record.prior_log_loss
    final = record.nested_scores.log_loss
    if final > prior:
        out.append(_warn(f"the final ensemble ({final:.4f}, nested CV on {record.rows} rows) scores worse than "
                         f"predicting the class prior ({prior:.4f}): the stages found no signal these rows support."))
    for name, s in record.stages_raw.items():
        if s.log_loss > prior:
            out.append(_warn(f"stage {name} ({s.log_loss:.4f} OOF log loss on {s.n} rows) scores worse than the "
                             f"class prior ({prior:.4f})."))
    return out


def pseudo_label_warnings(external_report: dict, train_hash: str) -> list[str]:
    """Pseudo-labels made by a run on this very training data were predicted by models that saw every
    training row, each fold's validation rows included: the OOF scores are optimistic."""
    out = []
    for conversion in external_report.get("conversion", []):
        made_by = (conversion.get("provenance") or {}).get("run")
        if made_by and RunDir(made_by).is_ours() and RunDir(made_by).record().get("train_hash") == train_hash:
            out.append(_warn(f"external source {conversion['source']!r}: its pseudo-labels come from the run {made_by}, "
                             "trained on this training data, so they carry every fold's validation labels: the OOF "
                             "scores of this run are optimistic (pseudo-label with a run trained on other data, or "
                             "judge on a holdout)"))
    return out
