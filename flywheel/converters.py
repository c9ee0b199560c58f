"""Converters from external data shapes into the battle table, each tagging rows with a ``source``.

Every converter returns ``(battles, ConversionReport)``. The report counts rows read, battles kept
and rows dropped per reason (e.g. ``identical_replies``, ``prompt_mismatch``), and carries the
reader's :class:`~battles.io.RepairReport` (null turns, lone surrogates, ...) of the converted table.
Input that cannot be understood at all (a missing column, a cell of the wrong type) raises
:class:`~battles.io.BattleDataError` naming file, row and column; input that is understood but
unusable (a pair whose two sides are the same reply) is dropped and counted, never silently.

Shapes understood:

* competition CSV/parquet/JSONL (:func:`from_competition`): the reader, plus a source tag;
* chosen/rejected preference pairs (:func:`from_preference_pairs`): columns ``chosen``,
  ``rejected`` and optionally ``prompt``; each cell a plain string, a JSON list of
  ``{role, content}`` messages, or an Anthropic-style ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``
  transcript. Prompt turns are the human turns; the replies are the assistant turns (shared earlier
  assistant turns go into both sides, the last one differs). The chosen side is placed at A or B by
  a seeded coin per pair, which sets the winner label;
* score-rated completions, UltraFeedback style (:func:`from_scored_answers`): several rated
  answers per prompt become pairs (all, or a seeded capped number per prompt), equal scores a tie;
* arena conversation logs (:func:`from_arena_conversations`): ``conversation_a``,
  ``conversation_b`` as lists of ``{role, content}`` messages and ``winner`` in
  ``{model_a, model_b, tie, tie (bothbad)}``;
* soft-labelled battles (:func:`from_pseudo_labels`): a pseudo-label file of ``run.py
  pseudo-label`` (or any battle file whose rows carry ``soft_a/soft_b/soft_tie``), read by the
  battle reader; its provenance line goes into the report.

Ids are stable: they are built from the source tag and the input's own keys (row id, question id,
model names), never from row order after sampling, so re-running a conversion gives the same ids.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from battles.columns import LABEL_COLUMNS, MODEL_COLUMNS
from battles.formats import read_frame
from battles.io import BattleDataError, RepairReport, battles_from_frame, parse_turns, read_battles
from battles.labels import soft_mask
from flywheel.messages import Unusable, conversation_to_turns, conversation_turns, is_missing, parse_messages
from kernel.schema import NonNegativeFloat, PositiveInt, Seed

log = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """What a converter read, kept and dropped (per reason), plus the reader's repairs."""

    file: str = ""
    source: str = ""
    rows_read: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)
    repairs: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    provenance: dict | None = None  # a pseudo-label file's provenance line

    def drop(self, reason: str, row, detail: str = "") -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if len(self.examples) < 10:
            self.examples.append({"reason": reason, "row": row, "detail": detail[:120]})

    def as_dict(self) -> dict:
        return {"file": self.file, "source": self.source, "rows_read": self.rows_read, "kept": self.kept,
                "dropped": dict(self.dropped), "repairs": dict(self.repairs), "examples": list(self.examples),
                "provenance": self.provenance}

    def summary(self) -> str:
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.source} ({self.file}): read {self.rows_read}, kept {self.kept}, dropped: {dropped}"


def _finish(frame: pd.DataFrame, path, source: str, report: ConversionReport) -> tuple[pd.DataFrame, ConversionReport]:
    """Validate the converted rows with the battle reader and fill the report."""
    if len(frame) == 0:
        raise BattleDataError(path, f"no usable battles after conversion (dropped: {report.dropped})")
    battles, repairs = battles_from_frame(frame, path, source=source, require_labels=None)
    report.kept = len(battles)
    report.repairs.update(repairs.as_dict())
    log.info(report.summary())
    return battles, report


def side_coin(seed: int, *keys) -> int:
    """A deterministic coin (0 or 1) per pair: the same pair lands on the same side in every run."""
    digest = hashlib.sha256(json.dumps([seed, *map(str, keys)]).encode("utf-8", "surrogatepass")).digest()
    return digest[0] & 1


def _one_hot(k: int) -> dict:
    return {c: int(j == k) for j, c in enumerate(LABEL_COLUMNS)}


# --------------------------------------------------------------------------------------------
# competition format


def _scalar_turns_as_text(frame: pd.DataFrame, report: ConversionReport) -> pd.DataFrame:
    """Turn JSON scalars inside turn lists (``[true]``, ``[42]``: a reply "True" that some export
    decoded) into their JSON text, counted as a repair; everything else is left to the reader."""
    frame = frame.copy()
    for col in ("prompt", "response_a", "response_b"):
        if col not in frame.columns:
            continue
        values = frame[col].tolist()
        for i, v in enumerate(values):
            if not isinstance(v, str) or not any(x in v for x in ("true", "false", "]")):
                continue
            try:
                turns = json.loads(v)
            except json.JSONDecodeError:
                continue  # the reader reports it with file, row and column
            if isinstance(turns, list) and any(isinstance(t, (bool, int, float)) for t in turns):
                fixed = [json.dumps(t) if isinstance(t, (bool, int, float)) else t for t in turns]
                values[i] = json.dumps(fixed, ensure_ascii=False)
                report.repairs["scalar_turns_as_text"] = report.repairs.get("scalar_turns_as_text", 0) + 1
                if len(report.examples) < 10:
                    report.examples.append({"reason": "scalar_turns_as_text", "row": i + 1, "detail": f"{col}: {v[:60]}"})
        frame[col] = values
    return frame


def _reason_slug(message: str) -> str:
    """'turn counts differ: prompt 9, ...' -> 'turn_counts_differ'."""
    head = message.split(":")[0].strip().lower()
    return "invalid_" + re.sub(r"[^a-z0-9]+", "_", " ".join(head.split()[:4])).strip("_")


def from_competition(path, source: str, require_labels: bool | None = True, invalid_rows: str = "drop",
                     prefix_ids: bool = True) -> tuple[pd.DataFrame, ConversionReport]:
    """A file already in the competition format (e.g. the 33k arena set, PandaLM converted).

    Extra columns (PandaLM's ``n_agree``) are ignored. JSON scalars inside turn lists become text
    (counted as ``scalar_turns_as_text``). ``invalid_rows="drop"`` drops rows the reader rejects
    (e.g. HH-RLHF transcripts with two assistant turns in a row: turn counts differ) and counts
    them per reason; ``"raise"`` stops at the first, as the reader does for the target data. Ids get
    a ``source:`` prefix so they never collide with the target's ids.
    """
    if invalid_rows not in ("drop", "raise"):
        raise ValueError(f"invalid_rows must be 'drop' or 'raise', got {invalid_rows!r}")
    frame = read_frame(path)
    report = ConversionReport(file=str(path), source=source, rows_read=len(frame))
    frame = _scalar_turns_as_text(frame, report)
    frame.index = np.arange(1, len(frame) + 1)  # file row numbers, kept through drops
    while True:
        try:
            battles, repairs = battles_from_frame(frame.reset_index(drop=True), path, source=source,
                                                  require_labels=require_labels)
            break
        except BattleDataError as exc:
            if invalid_rows == "raise" or exc.row is None:
                raise
            file_row = int(frame.index[exc.row - 1])
            message = str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)
            report.drop(_reason_slug(message), file_row, f"{exc.column}: {message}")
            frame = frame.drop(index=file_row)
            if len(frame) == 0:
                raise BattleDataError(path, f"no usable battles (dropped: {report.dropped})") from None
    if prefix_ids:
        battles["id"] = [f"{source}:{i}" for i in battles["id"]]
    report.kept = len(battles)
    report.repairs.update(repairs.as_dict())
    log.info(report.summary())
    return battles, report


# --------------------------------------------------------------------------------------------
# chosen / rejected pairs


def _prompt_messages(prompt, path, row: int) -> list[tuple[str, str]]:
    """The prompt cell as messages, without a trailing empty ``Assistant:`` cue."""
    if prompt is None:
        raise BattleDataError(path, "replies without their conversation need a 'prompt' column", row, "prompt")
    msgs = parse_messages(prompt, path, row, "prompt")
    if msgs is None:
        msgs = [("user", str(prompt))]
    if msgs and msgs[-1][0] == "assistant" and not msgs[-1][1].strip():
        msgs = msgs[:-1]
    return msgs


def _pair_turns(prompt, chosen, rejected, path, row: int):
    """(prompt turns, chosen replies, rejected replies) from one preference row."""
    c_msgs = parse_messages(chosen, path, row, "chosen")
    r_msgs = parse_messages(rejected, path, row, "rejected")
    if (c_msgs is None) != (r_msgs is None):
        raise Unusable("mixed_formats", "one side is a conversation, the other plain text")
    if c_msgs is None:  # plain replies to the prompt (single- or multi-turn prompt)
        p_msgs = _prompt_messages(prompt, path, row)
        c_msgs, r_msgs = p_msgs + [("assistant", str(chosen))], p_msgs + [("assistant", str(rejected))]
    elif c_msgs and c_msgs[0][0] == "assistant":  # reply messages only: the prompt holds the rest
        p_msgs = _prompt_messages(prompt, path, row)
        c_msgs, r_msgs = p_msgs + c_msgs, p_msgs + r_msgs
    c_users, c_replies = conversation_to_turns(c_msgs)
    r_users, r_replies = conversation_to_turns(r_msgs)
    if [" ".join(t.split()) for t in c_users] != [" ".join(t.split()) for t in r_users]:
        raise Unusable("prompt_mismatch", "chosen and rejected have different human turns")
    return c_users, c_replies, r_replies


def from_preference_pairs(data, source: str, seed: Seed = 0, path=None,
                          columns: dict | None = None) -> tuple[pd.DataFrame, ConversionReport]:
    """Chosen/rejected preference rows (a CSV/JSONL path or a DataFrame) -> labelled battles.

    ``columns`` maps our names ``prompt``/``chosen``/``rejected``/``id`` to the file's (e.g.
    ``{"chosen": "response_j", "rejected": "response_k", "prompt": "question"}``). The chosen side
    goes to A or B by a seeded coin per row, so labels are balanced and stable across runs.
    """
    frame = read_frame(data) if not isinstance(data, pd.DataFrame) else data
    path = path or (str(data) if not isinstance(data, pd.DataFrame) else "<DataFrame>")
    names = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": "id", **(columns or {})}
    for need in ("chosen", "rejected"):
        if names[need] not in frame.columns:
            raise BattleDataError(path, f"missing column '{names[need]}' ({need}); found {list(frame.columns)}")
    has_prompt = names["prompt"] in frame.columns
    has_id = names["id"] in frame.columns
    report = ConversionReport(file=str(path), source=source, rows_read=len(frame))
    rows = []
    seen_ids: set = set()
    for i, rec in enumerate(frame.to_dict("records")):
        row = i + 1
        chosen, rejected = rec[names["chosen"]], rec[names["rejected"]]
        prompt = rec[names["prompt"]] if has_prompt else None
        for col, v in ((names["chosen"], chosen), (names["rejected"], rejected)):
            if is_missing(v):
                raise BattleDataError(path, "missing value", row, col)
        try:
            p_turns, c_turns, r_turns = _pair_turns(prompt, chosen, rejected, path, row)
            if [" ".join(t.split()) for t in c_turns] == [" ".join(t.split()) for t in r_turns]:
                raise Unusable("identical_replies")
            if not c_turns[-1].strip() or not r_turns[-1].strip():
                raise Unusable("empty_final_reply")
        except Unusable as exc:
            report.drop(exc.reason, row, exc.detail)
            continue
        base = str(rec[names["id"]]) if has_id else str(i)
        bid = f"{source}:{base}"
        if bid in seen_ids:
            raise BattleDataError(path, f"duplicate id {base!r}", row, names["id"] if has_id else None)
        seen_ids.add(bid)
        chosen_at_b = side_coin(seed, source, base)
        a, b = (r_turns, c_turns) if chosen_at_b else (c_turns, r_turns)
        rows.append({"id": bid, "prompt": p_turns, "response_a": a, "response_b": b,
                     "model_a": "rejected" if chosen_at_b else "chosen",
                     "model_b": "chosen" if chosen_at_b else "rejected", **_one_hot(chosen_at_b)})
    return _finish(pd.DataFrame(rows), path, source, report)


# --------------------------------------------------------------------------------------------
# score-rated completions (UltraFeedback style)


def from_scored_answers(data, source: str, seed: Seed = 0, max_pairs_per_prompt: PositiveInt | None = None,
                        keep_ties: bool = True, tie_margin: NonNegativeFloat = 0.0, path=None,
                        columns: dict | None = None) -> tuple[pd.DataFrame, ConversionReport]:
    """Rated single answers (several per prompt) -> pairwise battles.

    Columns (renamable with ``columns``): ``question_id``, ``model``, ``prompt``, ``response``,
    ``score`` (default name ``gpt4_score``). Every pair of answers to one prompt is a battle (or a
    seeded sample of ``max_pairs_per_prompt``); ``|score_a - score_b| <= tie_margin`` is a tie,
    dropped when ``keep_ties`` is False. Ids are ``source:question_id:model_x:model_y`` and the side
    order is a seeded coin per pair, so ids and labels do not depend on sampling or row order.
    """
    frame = read_frame(data) if not isinstance(data, pd.DataFrame) else data
    path = path or (str(data) if not isinstance(data, pd.DataFrame) else "<DataFrame>")
    names = {"question_id": "question_id", "model": "model", "prompt": "prompt", "response": "response",
             "score": "gpt4_score", **(columns or {})}
    missing = [v for v in names.values() if v not in frame.columns]
    if missing:
        raise BattleDataError(path, f"missing column(s) {missing}; found {list(frame.columns)}")
    report = ConversionReport(file=str(path), source=source, rows_read=len(frame))
    scores = pd.to_numeric(frame[names["score"]], errors="coerce")
    answers: dict[str, list] = {}
    prompts: dict[str, object] = {}
    repairs = RepairReport(file=str(path))
    for i, rec in enumerate(frame.to_dict("records")):
        row = i + 1
        if np.isnan(scores.iloc[i]):
            report.drop("missing_score", row, str(rec[names["score"]]))
            continue
        qid, model = str(rec[names["question_id"]]), str(rec[names["model"]])
        response = parse_turns(rec[names["response"]], path, row, names["response"], repairs)
        prompt = parse_turns(rec[names["prompt"]], path, row, names["prompt"], repairs)
        if qid in prompts and prompts[qid] != prompt:
            raise BattleDataError(path, f"question {qid!r} has a different prompt than its earlier rows", row,
                                  names["prompt"])
        prompts[qid] = prompt
        if any(m == model for m, _, _ in answers.get(qid, [])):
            report.drop("duplicate_model_answer", row, f"{qid} {model}")
            continue
        answers.setdefault(qid, []).append((model, response, float(scores.iloc[i])))
    rng = np.random.default_rng(seed)
    rows = []
    n_pairs = Counter()
    for qid in sorted(answers):
        group = sorted(answers[qid], key=lambda x: x[0])
        pairs = list(itertools.combinations(range(len(group)), 2))
        if len(group) < 2:
            report.drop("single_answer_prompt", qid)
            continue
        usable = []
        for x, y in pairs:
            (mx, rx, sx), (my, ry, sy) = group[x], group[y]
            if [" ".join(t.split()) for t in rx] == [" ".join(t.split()) for t in ry]:
                report.drop("identical_replies", f"{qid}:{mx}:{my}")
                continue
            tie = abs(sx - sy) <= tie_margin
            if tie and not keep_ties:
                report.drop("tie_dropped", f"{qid}:{mx}:{my}")
                continue
            usable.append((x, y, tie))
        if max_pairs_per_prompt is not None and len(usable) > max_pairs_per_prompt:
            take = np.sort(rng.choice(len(usable), size=max_pairs_per_prompt, replace=False))
            report.dropped["over_pair_cap"] = report.dropped.get("over_pair_cap", 0) + len(usable) - len(take)
            usable = [usable[k] for k in take]
        for x, y, tie in usable:
            (mx, rx, sx), (my, ry, sy) = group[x], group[y]
            if side_coin(seed, source, qid, mx, my):
                (mx, rx, sx), (my, ry, sy) = (my, ry, sy), (mx, rx, sx)
            label = 2 if tie else (0 if sx > sy else 1)
            n_pairs[label] += 1
            rows.append({"id": f"{source}:{qid}:{mx}:{my}", "prompt": prompts[qid], "response_a": rx,
                         "response_b": ry, "model_a": mx, "model_b": my, **_one_hot(label)})
    log.info("%s: %d pairs from %d prompts (a/b/tie %d/%d/%d)", source, len(rows), len(answers),
             n_pairs[0], n_pairs[1], n_pairs[2])
    battles, report = _finish(pd.DataFrame(rows), path, source, report)
    for k in ("null_turns", "lone_surrogates"):
        report.repairs[k] = report.repairs.get(k, 0) + getattr(repairs, k)
    return battles, report


# --------------------------------------------------------------------------------------------
# arena conversation logs

ARENA_WINNERS = {"model_a": 0, "model_b": 1, "tie": 2, "tie (bothbad)": 2}


def from_arena_conversations(data, source: str, path=None) -> tuple[pd.DataFrame, ConversionReport]:
    """Arena logs (``conversation_a``, ``conversation_b``, ``winner``; optional ``question_id`` or
    ``id``, ``model_a``, ``model_b``) -> battles. ``tie (bothbad)`` counts as a tie; rows whose two
    conversations have different user turns are dropped (``prompt_mismatch``)."""
    frame = read_frame(data) if not isinstance(data, pd.DataFrame) else data
    path = path or (str(data) if not isinstance(data, pd.DataFrame) else "<DataFrame>")
    missing = [c for c in ("conversation_a", "conversation_b", "winner") if c not in frame.columns]
    if missing:
        raise BattleDataError(path, f"missing column(s) {missing}; found {list(frame.columns)}")
    id_col = next((c for c in ("id", "question_id") if c in frame.columns), None)
    report = ConversionReport(file=str(path), source=source, rows_read=len(frame))
    rows, seen = [], set()
    for i, rec in enumerate(frame.to_dict("records")):
        row = i + 1
        winner = str(rec["winner"]).strip()
        if winner not in ARENA_WINNERS:
            raise BattleDataError(path, f"winner must be one of {sorted(ARENA_WINNERS)}, got {winner!r}", row, "winner")
        try:
            sides = []
            for col in ("conversation_a", "conversation_b"):
                sides.append(conversation_turns(rec[col], path, row, col))
            (ua, ra), (ub, rb) = sides
            if [" ".join(t.split()) for t in ua] != [" ".join(t.split()) for t in ub]:
                raise Unusable("prompt_mismatch", "the two conversations have different user turns")
        except Unusable as exc:
            report.drop(exc.reason, row, exc.detail)
            continue
        base = str(rec[id_col]) if id_col else str(i)
        bid = f"{source}:{base}"
        if bid in seen:
            raise BattleDataError(path, f"duplicate id {base!r}", row, id_col)
        seen.add(bid)
        out = {"id": bid, "prompt": ua, "response_a": ra, "response_b": rb, **_one_hot(ARENA_WINNERS[winner])}
        for c in MODEL_COLUMNS:
            if c in rec:
                out[c] = str(rec[c])
        rows.append(out)
    return _finish(pd.DataFrame(rows), path, source, report)


# --------------------------------------------------------------------------------------------
# soft-labelled battles (pseudo-labels)


def from_pseudo_labels(path, source: str, prefix_ids: bool = True) -> tuple[pd.DataFrame, ConversionReport]:
    """A pseudo-label file (``run.py pseudo-label``) or any battle file with soft labels -> battles.

    Read by the battle reader with every row needing a target (soft labels validated there; rows may
    carry hard labels too, the soft label is then the target), which also refuses an unfinished job's
    file or a truncated one (:func:`battles.io.check_provenance`). Each row keeps its own ``weight``
    (the pseudo-label file's ``--weight``), multiplied later by the source's weight. The provenance
    line goes into the report. A file without a single soft-labelled row is refused: its kind is
    ``competition``. Ids get a ``source:`` prefix.
    """
    battles, repairs = read_battles(path, source=source, require_labels=True)
    report = ConversionReport(file=str(path), source=source, rows_read=repairs.rows, repairs=repairs.as_dict(),
                              provenance=repairs.provenance)
    report.repairs.pop("provenance", None)
    n_soft = int(soft_mask(battles).sum())
    if not n_soft:
        raise BattleDataError(path, "no row has soft labels (soft_a, soft_b, soft_tie); a file of hard labels "
                                    "is an external source of kind 'competition'")
    if prefix_ids:
        battles["id"] = [f"{source}:{i}" for i in battles["id"]]
    report.kept = len(battles)
    log.info("%s; soft-labelled rows: %d", report.summary(), n_soft)
    return battles, report


CONVERTERS = {
    "competition": from_competition,
    "preference_pairs": from_preference_pairs,
    "scored_answers": from_scored_answers,
    "arena_conversations": from_arena_conversations,
    "pseudo_labels": from_pseudo_labels,
}


def convert(kind: str, path, source: str, **options) -> tuple[pd.DataFrame, ConversionReport]:
    """Dispatch by converter name (what a config's ``external`` list names)."""
    if kind not in CONVERTERS:
        raise ValueError(f"unknown converter {kind!r}; known: {sorted(CONVERTERS)}")
    return CONVERTERS[kind](path, source=source, **options)
