"""Unlabelled battles from single-reply chat logs (LMSYS-Chat-1M layout), streamed through disk shards.

Input: parquet or JSONL (``.gz`` too) files with ``conversation_id``, ``model`` and ``conversation``
(a list of ``{role, content}`` messages: parquet ``list<struct>``, JSON, or a JSON string) and,
optionally, ``language``. Other columns (``turn``, ``openai_moderation``, ...) are not read.

Pairing rules (each unusable conversation or pair is dropped and counted under its reason):

1. A conversation becomes user turns and replies as every converter does
   (:func:`flywheel.messages.conversation_to_turns`: system messages dropped, consecutive messages
   of one role joined); ``empty_conversation``, ``starts_with_assistant``, ``no_final_reply``,
   ``empty_prompt`` (blank first user turn), ``empty_final_reply`` and, with ``languages``,
   ``language_filtered`` drop it.
2. Conversations are grouped by their normalised first prompt (:func:`battles.text.normalised`),
   then by all their user turns: only conversations whose user turns all match are paired, so a
   multi-turn battle always has one prompt. A conversation whose turns no other model shares is
   ``single_model_prompt`` (no other model answered this first prompt) or ``user_turns_differ``
   (others did, but their later user turns differ).
3. One conversation per model and prompt: the one with the smallest seeded hash of its id; the
   others are ``same_model_repeat``.
4. Every two models give a candidate pair; equal replies (normalised) are ``identical_replies``; of
   the rest, a seeded sample of ``max_pairs_per_prompt`` is kept, the others are ``over_pair_cap``.
   Sides come from a seeded coin per pair, the id is ``source:conversation_a:conversation_b``, so
   neither ids nor sides depend on row order, batch size or shard count.
5. Pairs go through :func:`flywheel.dedup.find_duplicates` against the training file with its exact
   rules (``exact_battle_in_target``, ``exact_prompt_in_target`` - dropped by default, as the
   external-data path does - and ``exact_within_external``; replies equal to a training reply to the
   same first prompt are counted in ``flagged_pairs``, and kept). Near duplicates (MinHash) are
   left to the run: pseudo-labelled pairs used as an external source are de-duplicated again, near
   rules included, when a run loads them.

The report counts conversations (``rows_read == sum(dropped) + conversations_paired``) and pairs
(``pairs_considered == sum(dropped_pairs) + kept``) separately, plus the reader's repairs.

How it streams: pass 1 reads the input in batches (:func:`battles.formats.iter_frames`: parquet row
batches, JSONL line by line) and appends each usable conversation as one JSON line to one of
``n_shards`` temporary shard files, chosen by the hash of its normalised first prompt, so every
conversation it could pair with lands in the same shard; it keeps only 8 bytes per conversation
(a hash of its id, to refuse duplicate ids). Training battles are split by the same key, so
de-duplicating shard by shard finds every exact match. Pass 2 loads one shard at a time, pairs,
de-duplicates, validates (:func:`battles.io.battles_from_frame`) and appends the pairs to the output
(a parquet row group or JSONL lines), written atomically. Peak memory: one input batch or one shard,
plus the training file. The shards live in a hidden temporary directory beside the output (or in
``work_dir``), removed at the end (a killed job leaves ``.<out>.shards-*`` behind: delete it).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from pydantic import Field
from tqdm.auto import tqdm

from battles.columns import ID, MODEL_COLUMNS, SOURCE, TEXT_COLUMNS
from battles.formats import count_rows, file_type, iter_frames
from battles.io import BattleDataError, battles_from_frame, read_battles
from battles.stream import BattleWriter
from battles.text import normalised
from flywheel.converters import ConversionReport, side_coin
from flywheel.dedup import DedupConfig, find_duplicates
from flywheel.messages import Unusable, conversation_turns, is_missing
from kernel.context import DEFAULT_SEED
from kernel.files import check_output_file, refused_writes, write_atomic, write_json
from kernel.schema import Section, Seed

log = logging.getLogger(__name__)

COLUMNS = ["conversation_id", "model", "conversation", "language"]
OUTPUT_COLUMNS = [ID, *TEXT_COLUMNS, *MODEL_COLUMNS, SOURCE]
SHARD_BYTES = 16 << 20  # input bytes per shard when n_shards is not given


class NoPairsError(BattleDataError):
    """Every conversation or pair was dropped; the report (written anyway) says why."""


class PairingParams(Section):
    """How chat-log conversations become pairs (see the module docstring)."""

    source: str = "chatlog"
    max_pairs_per_prompt: int | None = Field(3, ge=1)  # None: every pair of models
    seed: Seed = DEFAULT_SEED
    languages: list[str] | None = None  # keep only these ``language`` values; None: all
    drop_prompt_matches: bool = True  # drop pairs whose prompt is a training prompt
    n_shards: int | None = Field(None, ge=1, le=1024)  # None: one per 16 MiB of input, 16 to 256
    batch_rows: int = Field(8192, ge=1)


@dataclass
class ChatlogReport(ConversionReport):
    """A :class:`ConversionReport` with conversations and pairs counted apart (see module docstring)."""

    conversations_paired: int = 0
    prompts_paired: int = 0
    pairs_considered: int = 0
    dropped_pairs: dict = field(default_factory=dict)
    flagged_pairs: dict = field(default_factory=dict)
    n_target: int = 0
    seconds: float = 0.0
    params: dict = field(default_factory=dict)

    def drop_pairs(self, reason: str, n: int = 1, detail: str = "") -> None:
        if n:
            self.dropped_pairs[reason] = self.dropped_pairs.get(reason, 0) + n
            if detail and len(self.examples) < 20:
                self.examples.append({"reason": reason, "row": None, "detail": detail[:120]})

    def as_dict(self) -> dict:
        return {**super().as_dict(), "conversations_paired": self.conversations_paired,
                "prompts_paired": self.prompts_paired, "pairs_considered": self.pairs_considered,
                "dropped_pairs": dict(self.dropped_pairs), "flagged_pairs": dict(self.flagged_pairs),
                "n_target": self.n_target, "seconds": round(self.seconds, 2), "params": dict(self.params)}

    def summary(self) -> str:
        conv = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        pairs = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped_pairs.items())) or "none"
        return (f"{self.source}: {self.rows_read} conversations read, {self.conversations_paired} paired "
                f"(dropped: {conv}); {self.pairs_considered} candidate pairs over {self.prompts_paired} prompts, "
                f"kept {self.kept} (dropped: {pairs})")


def _key(turns) -> str:
    """md5 of the normalised turns: equal for turns equal up to case and spacing."""
    return hashlib.md5("\x00".join(normalised(t) for t in turns).encode("utf-8", "surrogatepass")).hexdigest()


def _id_hash(conversation_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(conversation_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


# --------------------------------------------------------------------------------------------
# pass 1: conversations -> shard files


def _turns(path, row: int, conv, language, languages: set | None) -> tuple[list[str], list[str]]:
    """User turns and replies of one log row; :class:`Unusable` names why a row cannot be paired."""
    if languages is not None and language not in languages:
        raise Unusable("language_filtered", str(language))
    users, replies = conversation_turns(conv, path, row, "conversation")
    if not users[0].strip():
        raise Unusable("empty_prompt")
    if not replies[-1].strip():
        raise Unusable("empty_final_reply")
    return users, replies


def _shard_conversations(paths, params: PairingParams, report: ChatlogReport, shards: list,
                         progress: bool) -> None:
    """Read every input file in batches; append each usable conversation to its prompt's shard."""
    languages = set(params.languages) if params.languages else None
    id_hashes = array("Q")  # one per row read, in reading order: duplicate conversation ids are refused
    row_origin = []  # (file, first global index) per file, to name the rows of a duplicate
    bar = tqdm(total=sum(count_rows(p) for p in paths) if progress else None, desc="chat logs: read", unit="conv", disable=not progress,
               smoothing=0.1)
    for path in paths:
        row_origin.append((path, len(id_hashes)))
        for first, frame in iter_frames(path, params.batch_rows, columns=COLUMNS):
            missing = [c for c in COLUMNS[:3] if c not in frame.columns]
            if missing:
                raise BattleDataError(path, f"missing column(s) {missing} (rows {first + 1}-{first + len(frame)}); "
                                            f"found {list(frame.columns)}")
            if languages is not None and "language" not in frame.columns:
                raise BattleDataError(path, f"a language filter needs a 'language' column (rows {first + 1}-)")
            frame_languages = frame["language"].tolist() if "language" in frame.columns else [None] * len(frame)
            for k, (cid, model, conv, language) in enumerate(zip(
                    frame["conversation_id"].tolist(), frame["model"].tolist(), frame["conversation"].tolist(),
                    frame_languages)):
                row = first + k + 1
                report.rows_read += 1
                for column, value in (("conversation_id", cid), ("model", model)):
                    if is_missing(value) or not str(value).strip():
                        raise BattleDataError(path, "missing value", row, column)
                cid, model = str(cid), str(model)
                id_hashes.append(_id_hash(cid))
                try:
                    users, replies = _turns(path, row, conv, language, languages)
                except Unusable as exc:
                    report.drop(exc.reason, row, f"{cid} {exc.detail}".strip())
                    continue
                first_key = _key(users[:1])
                prompt_key = first_key if len(users) == 1 else _key(users)
                shards[int(first_key[:8], 16) % len(shards)].write(
                    json.dumps([first_key, prompt_key, row, cid, model, users, replies]) + "\n")
            bar.update(len(frame))
    bar.close()
    _refuse_duplicate_ids(id_hashes, row_origin)


def _refuse_duplicate_ids(id_hashes: array, row_origin: list) -> None:
    """Raise naming both rows when two conversations share an id (ids name the battles)."""
    hashes = np.frombuffer(id_hashes, dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    if len(same) == 0:
        return

    def where(i: int):
        path, start = [o for o in row_origin if o[1] <= i][-1]
        return path, i - start + 1

    (path1, row1), (path2, row2) = where(int(order[same[0]])), where(int(order[same[0] + 1]))
    raise BattleDataError(path2, f"duplicate conversation_id (also at {path1} row {row1}): ids name the "
                                 "battles, so they must be unique", row2, "conversation_id")


# --------------------------------------------------------------------------------------------
# pass 2: one shard -> pairs


class _Conversation(NamedTuple):
    row: int  # in its input file, from 1
    cid: str
    model: str
    users: list
    replies: list


def _pick(seed: int, conversation_id: str) -> str:
    return hashlib.md5(f"{seed}:{conversation_id}".encode("utf-8", "surrogatepass")).hexdigest()


def _pairs_of_prompt(convs: list[_Conversation], prompt_key: str, params: PairingParams,
                     report: ChatlogReport) -> list[dict]:
    """Battles from the conversations that share all user turns (one prompt key), per the rules."""
    by_model: dict[str, list] = {}
    for c in convs:
        by_model.setdefault(c.model, []).append(c)
    chosen = {}
    for model, group in by_model.items():
        group.sort(key=lambda c: _pick(params.seed, c.cid))
        chosen[model] = group[0]
        for c in group[1:]:
            report.drop("same_model_repeat", c.row, f"{c.cid} ({model})")
    report.conversations_paired += len(chosen)
    report.prompts_paired += 1
    models = sorted(chosen)
    replies = {m: [normalised(t) for t in chosen[m].replies] for m in models}
    candidates = []
    for mx, my in itertools.combinations(models, 2):
        report.pairs_considered += 1
        if replies[mx] == replies[my]:
            report.drop_pairs("identical_replies", 1, f"{chosen[mx].cid} ~ {chosen[my].cid}")
        else:
            candidates.append((mx, my))
    cap = params.max_pairs_per_prompt
    if cap is not None and len(candidates) > cap:
        rng = np.random.default_rng([params.seed, int(prompt_key[:12], 16)])
        take = np.sort(rng.choice(len(candidates), size=cap, replace=False))
        report.drop_pairs("over_pair_cap", len(candidates) - cap)
        candidates = [candidates[k] for k in take]
    rows = []
    for mx, my in candidates:
        x, y = sorted((chosen[mx], chosen[my]), key=lambda c: c.cid)
        prompt = x.users  # user turns match up to case and spacing: take the first conversation's
        if side_coin(params.seed, params.source, x.cid, y.cid):
            x, y = y, x
        rows.append({"id": f"{params.source}:{x.cid}:{y.cid}", "prompt": prompt, "response_a": x.replies,
                     "response_b": y.replies, "model_a": x.model, "model_b": y.model})
    return rows


def _shard_battles(shard_path: Path, target: pd.DataFrame, params: PairingParams, dedup: DedupConfig,
                   report: ChatlogReport, repairs: Counter) -> pd.DataFrame | None:
    """The kept, validated battles of one shard (None when none are left)."""
    first_prompt: dict[str, dict[str, list]] = {}
    with open(shard_path, encoding="utf-8") as f:
        for line in f:
            first_key, prompt_key, *fields = json.loads(line)
            first_prompt.setdefault(first_key, {}).setdefault(prompt_key, []).append(_Conversation(*fields))
    rows = []
    for first_key in sorted(first_prompt):
        prompts = first_prompt[first_key]
        n_models = len({c.model for convs in prompts.values() for c in convs})
        for prompt_key in sorted(prompts):
            convs = prompts[prompt_key]
            if len({c.model for c in convs}) < 2:
                reason = "single_model_prompt" if n_models < 2 else "user_turns_differ"
                for c in convs:
                    report.drop(reason, c.row, c.cid)
                continue
            rows.extend(_pairs_of_prompt(convs, prompt_key, params, report))
    if not rows:
        return None
    battles, repair = battles_from_frame(pd.DataFrame(rows), f"{shard_path.name} (pairs)", source=params.source,
                                         require_labels=False)
    repairs.update({k: v for k, v in repair.as_dict().items() if isinstance(v, int) and k != "rows"})
    # per shard: no bar and no log line of its own (the job has one bar and one summary)
    reasons, dedup_report = find_duplicates(target, battles, dedup, progress=False)
    for reason, n in dedup_report.dropped.items():
        report.drop_pairs(reason, n)
    for reason, n in dedup_report.flagged.items():
        report.flagged_pairs[reason] = report.flagged_pairs.get(reason, 0) + n
    battles = battles.loc[reasons == ""].reset_index(drop=True)
    return battles if len(battles) else None


# --------------------------------------------------------------------------------------------
# the job


def _shard_target(train, n_shards: int) -> tuple[pd.DataFrame, list]:
    """The training battles and, per shard, the index of its rows (by the first prompt's key)."""
    if train is None:
        return pd.DataFrame(columns=["id", *TEXT_COLUMNS]), [np.zeros(0, dtype=int)] * n_shards
    target, _ = read_battles(train, require_labels=None)
    shard = np.array([int(_key(p[:1])[:8], 16) % n_shards for p in target["prompt"]], dtype=int)
    return target, [np.flatnonzero(shard == s) for s in range(n_shards)]


def pair_chatlogs(data, out, train=None, params: PairingParams | dict | None = None, report_path=None,
                  overwrite: bool = False, progress: bool = True, work_dir=None) -> ChatlogReport:
    """Pair the conversations of ``data`` (one path or several) into unlabelled battles at ``out``
    (``.parquet`` or ``.jsonl[.gz]``) and write the report JSON (default ``<out>.report.json``).

    ``train``: a battle file whose prompts and battles the pairs must not repeat (see the module
    docstring). ``work_dir``: where the temporary shards go (default: beside ``out``).
    """
    started = time.time()
    params = params if isinstance(params, PairingParams) else PairingParams.model_validate(params or {})
    paths = [Path(p) for p in ([data] if isinstance(data, (str, Path)) else data)]
    for p in paths:
        if file_type(p) == "csv":
            raise BattleDataError(p, "chat logs are read from .parquet or .jsonl(.gz) (a list of messages per row)")
    out = Path(out)
    out_kind = file_type(out)
    if out_kind == "csv":
        raise BattleDataError(out, "write the pairs as .parquet or .jsonl (turn lists stay lists)")
    report_path = Path(report_path) if report_path else out.with_name(out.name + ".report.json")
    for p in (out, report_path):
        check_output_file(p, overwrite)
    n_shards = params.n_shards or int(np.clip(sum(p.stat().st_size for p in paths if p.exists()) // SHARD_BYTES,
                                              16, 256))
    report = ChatlogReport(file=", ".join(map(str, paths)), source=params.source,
                           params={**params.as_dict(), "n_shards": n_shards})
    target, target_rows = _shard_target(train, n_shards)
    report.n_target = len(target)
    dedup = DedupConfig(near=False, drop_prompt_matches=params.drop_prompt_matches)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.shards-", dir=work_dir or out.parent) as tmp:
        shard_paths = [Path(tmp) / f"shard{s:04d}.jsonl" for s in range(n_shards)]
        with refused_writes(tmp):  # scratch shards (removed with the folder); a full disk says so, naming it
            shards = [open(p, "w", encoding="utf-8") for p in shard_paths]
            try:
                _shard_conversations(paths, params, report, shards, progress)
            finally:
                for f in shards:
                    f.close()
        repairs: Counter = Counter()

        def write(tmp_out):
            writer = BattleWriter(Path(tmp_out), out_kind, OUTPUT_COLUMNS)
            try:
                for s in tqdm(range(n_shards), desc="chat logs: pair", unit="shard", disable=not progress):
                    battles = _shard_battles(shard_paths[s], target.iloc[target_rows[s]], params, dedup, report,
                                             repairs)
                    shard_paths[s].unlink()
                    if battles is not None:
                        writer.write(battles)
            finally:
                writer.close()
            report.kept = writer.n
            if writer.n == 0:
                raise NoPairsError(out, f"no usable pairs (conversations dropped: {report.dropped}; "
                                           f"pairs dropped: {report.dropped_pairs}); see {report_path}")

        try:
            write_atomic(out, write)
        except NoPairsError:
            _write_report(report, repairs, started, report_path)  # it says why nothing was usable
            raise
    _write_report(report, repairs, started, report_path)
    log.info(report.summary())
    return report


def _write_report(report: ChatlogReport, repairs: Counter, started: float, path: Path) -> None:
    report.repairs = dict(repairs)
    report.seconds = time.time() - started
    write_json(path, report.as_dict())
