"""Why a finished run scores a battle as it does: the ensemble's probabilities and verdict, each stage's
own answer, its share in the ensemble, both A/B orders before swap TTA averages them, and, for the deep
stages, what truncation kept of the battle.

    from pipeline.explain import explain
    from pipeline.predict import Predictor
    predictor = Predictor.load("runs/x")
    [e] = explain(predictor, [{"prompt": "Hi", "response_a": "Hello!", "response_b": "Go away."}])
    e.probs, e.verdict, e.stages[0].share, e.stages[0].orders, e.as_dict()

``explain`` takes what :meth:`pipeline.predict.Predictor.predict_proba` takes and computes the stage
logits the same way (each stage's models averaged, held as the run stores them), so ``e.probs`` equals
``predict_proba`` for the same battles. ``run.py score`` (one pair, or a JSONL file of battles:
:func:`read_score_file`) and ``run.py serve`` (:mod:`pipeline.serve`) show it.

Both orders: a stage whose answer is the average of the two A/B orders (swap TTA,
:func:`models.stage.predict_with_orders`) gives its single-order probabilities, ``ab`` for the battle as
given and ``ba`` for the battle with A and B exchanged (realigned, so column 0 is always response A);
each is the average over the stage's fold models. When every stage of the ensemble has both orders,
the ensemble's own answer on each order alone is given too (its calibrator on those logits). A stage
without swap TTA has no orders (``None``).

Share: the stage's share in the chosen ensemble (``EnsembleRecord.stage_weights``: stage shares of the
average, the fitted simplex weights, or each stage's share of the logistic stacker's absolute
coefficients), the same for every battle.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import softmax
from tqdm.auto import tqdm

from battles.columns import TEXT_COLUMNS
from battles.formats import check_regular_file, jsonl_records
from battles.labels import swap_columns
from ensemble.meta import meta_features, swap_meta
from kernel.errors import BattleDataError, UserError
from kernel.files import write_text
from models.packing import Truncation
from models.stage import average_logits, predict_with_orders
from pipeline.predict import CHUNK, Predictor, as_battles
from pipeline.rundir import as_stored

VERDICTS = ("A wins", "B wins", "tie")
CLASSES = ("a", "b", "tie")


@dataclass(frozen=True)
class StageExplanation:
    """One stage's part in one battle's score."""

    name: str
    type: str
    share: float  # the stage's share in the chosen ensemble
    probs: np.ndarray  # (3,) softmax of the stage's logits (its own answer, before the ensemble)
    orders: tuple[np.ndarray, np.ndarray] | None  # (ab, ba realigned) single-order probabilities, or None
    truncation: Truncation | None  # deep stages: what packing kept of the battle as given

    def as_dict(self) -> dict:
        out = {"stage": self.name, "type": self.type, "share": self.share, "probs": _probs_dict(self.probs),
               "orders": None if self.orders is None else
               {"ab": _probs_dict(self.orders[0]), "ba": _probs_dict(self.orders[1])}}
        if self.truncation is not None:
            t = self.truncation
            out["truncation"] = {"tokens": dict(t.tokens), "cut": dict(t.cut), "turns_dropped": dict(t.turns_dropped)}
        return out


@dataclass(frozen=True)
class Explanation:
    """One battle: the ensemble's probabilities ``[a, b, tie]``, its verdict, and every stage's part."""

    id: str
    probs: np.ndarray  # (3,) what Predictor.predict_proba gives
    orders: tuple[np.ndarray, np.ndarray] | None  # the ensemble on each single order (ab, ba realigned)
    stages: list[StageExplanation]

    @property
    def verdict(self) -> str:
        return VERDICTS[int(np.argmax(self.probs))]

    def as_dict(self) -> dict:
        return {"id": self.id, "probs": _probs_dict(self.probs), "verdict": self.verdict,
                "orders": None if self.orders is None else
                {"ab": _probs_dict(self.orders[0]), "ba": _probs_dict(self.orders[1])},
                "stages": [s.as_dict() for s in self.stages]}


def _probs_dict(p: np.ndarray) -> dict:
    return {c: float(v) for c, v in zip(CLASSES, p)}


def _model_orders(model, battles: pd.DataFrame):
    """``(logits, straight, swapped)`` of one fold model: its single orders where it gives them."""
    if getattr(model, "tta_from_orders", False):
        return predict_with_orders(model, battles)
    return model.predict_logits(battles), None, None


def _truncation(models, battles: pd.DataFrame) -> list[Truncation] | None:
    """What the stage's packing kept of each battle (deep stages: their models can ``encode``), else None.
    The fold models of a stage share ``max_length`` and ``prompt_share``, so the first one answers."""
    encode = getattr(models.models[0], "encode", None)
    return None if encode is None else list(encode(battles).truncation)


def _stage_parts(predictor: Predictor, name: str, battles: pd.DataFrame):
    """A stage's logits (as :meth:`Predictor.stage_logits` computes them), its single-order log-probs
    (straight, swapped as predicted for the swapped battle) or None, and its truncation records."""
    models = predictor.stage_models[name]
    parts = [_model_orders(m, battles) for m in models.models]
    logits = as_stored(average_logits([p[0] for p in parts]))
    orders = None
    if all(p[1] is not None for p in parts):
        orders = (average_logits([p[1] for p in parts]), average_logits([p[2] for p in parts]))
    return logits, orders, _truncation(models, battles)


def _shown_orders(orders):
    """Single-order log-probs (straight, swapped as predicted) -> probabilities (ab, ba realigned)."""
    if orders is None:
        return None
    return softmax(orders[0], axis=1), swap_columns(softmax(orders[1], axis=1))


def explain(predictor: Predictor, data) -> list[Explanation]:
    """One :class:`Explanation` per battle of ``data`` (anything ``Predictor.predict_proba`` takes)."""
    battles = as_battles(data)
    out: list[Explanation] = []
    weights = predictor.ensemble.stage_weights
    bar = tqdm(total=len(battles), desc="score", unit="battle", disable=not predictor.progress)
    for start in range(0, len(battles), CHUNK):
        chunk = battles.iloc[start:start + CHUNK]
        parts = {n: _stage_parts(predictor, n, chunk) for n in predictor.stage_names}
        probs = predictor.ensemble_proba(chunk, {n: parts[n][0] for n in predictor.stage_names})
        ensemble_orders = None
        if all(parts[n][1] is not None for n in predictor.stage_names):
            meta = meta_features(chunk) if predictor.ensemble.meta_features else None
            straight = predictor.model.predict_proba([parts[n][1][0] for n in predictor.stage_names], meta=meta)
            swapped_meta = swap_meta(meta) if meta is not None else None
            swapped = predictor.model.predict_proba([parts[n][1][1] for n in predictor.stage_names], meta=swapped_meta)
            ensemble_orders = (straight, swap_columns(swapped))
        shown = {n: _shown_orders(parts[n][1]) for n in predictor.stage_names}
        for i, battle_id in enumerate(chunk["id"]):
            stages = []
            for n in predictor.stage_names:
                stage_logits, _, truncation = parts[n]
                stages.append(StageExplanation(
                    name=n, type=predictor.specs[n].type, share=float(weights.get(n, float("nan"))),
                    probs=softmax(stage_logits[i]),
                    orders=None if shown[n] is None else (shown[n][0][i], shown[n][1][i]),
                    truncation=None if truncation is None else truncation[i]))
            out.append(Explanation(id=str(battle_id), probs=probs[i],
                                   orders=None if ensemble_orders is None else
                                   (ensemble_orders[0][i], ensemble_orders[1][i]),
                                   stages=stages))
        bar.update(len(chunk))
    bar.close()
    return out


# -- input: one pair from text, a JSONL file of battles ----------------------------------------------------
def turns_of(value) -> list:
    """A field as turns: a list as is; a string holding a JSON list (the competition's cells) parsed;
    any other string one turn. The battle table's validation checks the turns afterwards."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                return [value]
            if isinstance(parsed, list):
                return parsed
        return [value]
    return value


def read_score_file(path) -> pd.DataFrame:
    """The battle table of a JSONL file of battles to score: one JSON object per non-blank line with
    ``prompt``, ``response_a``, ``response_b`` (each a list of turns, a JSON-list string as in the
    competition CSV, or a plain string: one turn) and an optional ``id`` (default: the line number).
    Any mistake is one :class:`kernel.errors.BattleDataError` naming the file and line."""
    path = check_regular_file(path)
    if not path.name.lower().endswith((".jsonl", ".ndjson")):
        raise BattleDataError(path, "score --jsonl reads a JSON-lines file (.jsonl): one battle per line")
    rows, lines = [], []
    for line_no, record in jsonl_records(path):
        missing = [c for c in TEXT_COLUMNS if c not in record]
        if missing:
            raise BattleDataError(path, f"missing field(s) {missing}; a battle needs {list(TEXT_COLUMNS)}",
                                  line=line_no)
        rows.append({"id": record.get("id", str(line_no)), **{c: turns_of(record[c]) for c in TEXT_COLUMNS}})
        lines.append(line_no)
    if not rows:
        raise BattleDataError(path, "no battles (every line is blank)")
    return _validated(pd.DataFrame(rows, columns=["id", *TEXT_COLUMNS]), path, lines)


def _validated(frame: pd.DataFrame, path: Path, lines: list[int]) -> pd.DataFrame:
    """The battle table of ``frame``; a cell the data layer refuses is named by its file line."""
    try:
        return as_battles(frame)
    except BattleDataError as exc:
        if exc.row is None:
            raise BattleDataError(path, exc.message) from None
        raise BattleDataError(path, exc.message, line=lines[exc.row - 1], column=exc.column) from None


def read_text_arg(path, flag: str) -> str:
    """The text of ``--prompt-file`` / ``--a-file`` / ``--b-file`` (UTF-8), or one line naming the file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path}: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"{flag} {path}: {exc.strerror or exc}") from None


def pair_battle(prompt: str, response_a: str, response_b: str, battle_id: str = "pair") -> pd.DataFrame:
    """One battle from three texts (each one turn, or a JSON list of turns); an empty field is refused."""
    fields = dict(zip(TEXT_COLUMNS, (prompt, response_a, response_b)))
    empty = [c for c, v in fields.items() if not str(v).strip()]
    if empty:
        raise UserError(f"{', '.join(empty)}: empty; a pair to score needs a prompt and both replies")
    frame = pd.DataFrame([{"id": battle_id, **{c: turns_of(v) for c, v in fields.items()}}])
    try:
        return as_battles(frame)
    except BattleDataError as exc:
        raise UserError(f"{exc.column or 'input'}: {exc.message}") from None


# -- output ------------------------------------------------------------------------------------------------
def format_explanation(e: Explanation) -> str:
    """The text ``run.py score`` prints for one battle."""
    def row(label: str, p) -> str:
        return f"  {label:<44}" + "".join(f"{v:>9.4f}" for v in p)

    lines = [f"battle {e.id}: {e.verdict}", f"  {'':<44}{'P(A)':>9}{'P(B)':>9}{'P(tie)':>9}",
             row("ensemble", e.probs)]
    if e.orders is not None:
        lines += [row("  order A/B only", e.orders[0]), row("  order B/A only (realigned)", e.orders[1])]
    for s in e.stages:
        lines.append(row(f"{s.name} ({s.type}), share {s.share:.1%}", s.probs))
        if s.orders is not None:
            lines += [row("  order A/B", s.orders[0]), row("  order B/A (realigned)", s.orders[1])]
        if s.truncation is not None:
            t = s.truncation
            kept = ", ".join(f"{f} {t.tokens[f]} tokens{' (cut)' if t.cut[f] else ''}"
                             f"{f', {t.turns_dropped[f]} turns dropped' if t.turns_dropped[f] else ''}"
                             for f in TEXT_COLUMNS)
            lines.append(f"    kept: {kept}")
    return "\n".join(lines)


def write_explanations(path, explanations: list[Explanation]) -> None:
    """One JSON line per battle (:meth:`Explanation.as_dict`), written atomically."""
    write_text(path, "".join(json.dumps(e.as_dict(), ensure_ascii=False) + "\n" for e in explanations))
