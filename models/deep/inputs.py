"""Battles -> model inputs for both deep stages, and the rows they train on.

One interface for both stages: an :class:`Encoding` is made for one tokenizer, ``max_length`` and
``prompt_share``; ``encode(battles, progress=False)`` returns :class:`EncodedBattles`: per row the
token ids (plus token type ids where the model uses them) and the :class:`models.packing.Truncation`
record of what the shared packing policy (:func:`models.packing.pack_battle`) kept of that battle
(tokens per field, fields cut, turns dropped; :meth:`EncodedBattles.truncation_summary` sums it up).
A subclass lays out one battle (:meth:`Encoding.encode_battle`).

Encoder (:class:`PairEncoding`): ``[CLS] prompt [SEP] response A [SEP] response B [SEP]`` with token
type 0 for the first segment and 1 for the rest, each field packed into ``max_length`` minus the four
special tokens.

Decoder (:class:`ChatEncoding`): the whole battle goes into a single user message of the model's own
chat template::

    <instruction>
    <prompt> ... </prompt>
    <response_a> ... </response_a>
    <response_b> ... </response_b>
    Which response is better? Answer A, B or tie.

followed by the template's generation prompt (the classifier reads the hidden state of the last
token). No system turn unless the stage's ``system_prompt`` asks for one: a template that inserts a
default system prompt when none is given (SmolLM2, Qwen2.5, Llama-3.1's date header) gets the bare
user turn instead (:func:`chat_frame`). The frame (template, instruction, tags, final question) is measured first and never cut;
what is left of ``max_length`` goes to the shared packing policy; a ``max_length`` that leaves
under :data:`MIN_TEXT_TOKENS` is one :class:`InputFrameError` line when the encoding is made. Exactly one BOS: chat templates of
Gemma-2 and Llama-3.x already write the BOS token and their tokenizers add another one when asked for
special tokens, so the rendered text is tokenized without special tokens, any leading BOS dropped and
exactly one put back (when the tokenizer has one; Qwen2 has none).

Training rows (:func:`training_rows`): the model inputs plus ``labels`` (the ``[a, b, tie]`` target:
one-hot, or the soft label where a row has one) and ``weight``; :func:`training_table` adds the
A/B-swapped copy of every battle when swap augmentation is on.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from battles.keys import battle_keys, texts_digest
from battles.labels import label_matrix, row_weights, swap_battles
from kernel.errors import UserError
from models.packing import PackedBattle, PackingPolicy, Truncation, pack_battle, summarize_truncation

INSTRUCTION = (
    "Two AI assistants answered the same user prompt. Decide which response the user preferred."
)
FINAL_QUESTION = "Which response is better? Answer A, B or tie."
# Smallest text budget worth packing into; below it the caller's max_length is too small.
MIN_TEXT_TOKENS = 24


@dataclass
class EncodedBattles:
    """Model inputs of a battle table, row by row, and what packing kept of each battle."""

    input_ids: list[list[int]]
    truncation: list[Truncation]
    token_type_ids: list[list[int]] | None = None  # segment ids, for encoder checkpoints that use them

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        """Tokens per row (what inference batches are budgeted by)."""
        return [len(ids) for ids in self.input_ids]

    def features(self) -> list[dict]:
        """One dict of model inputs per row: ``input_ids``, ``attention_mask`` (ones; padding adds the
        zeros) and, where the model uses them, ``token_type_ids``."""
        rows = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in self.input_ids]
        if self.token_type_ids is not None:
            for row, types in zip(rows, self.token_type_ids):
                row["token_type_ids"] = types
        return rows

    def truncation_summary(self, rows: int | None = None) -> dict:
        """:func:`models.packing.summarize_truncation` of the first ``rows`` rows (all by default)."""
        return summarize_truncation(self.truncation[:rows])


def user_message(prompt: str, response_a: str, response_b: str) -> str:
    return (
        f"{INSTRUCTION}\n\n<prompt>\n{prompt}\n</prompt>\n\n<response_a>\n{response_a}\n</response_a>\n\n"
        f"<response_b>\n{response_b}\n</response_b>\n\n{FINAL_QUESTION}"
    )


class InputFrameError(UserError, ValueError):
    """A setting that the stage's input frame cannot honour (``max_length`` below the frame, a system
    prompt for a template without a system turn): one line naming the stage and the key."""


CONTENT = "@@BATTLE_CONTENT_7f3a@@"  # stands for the user message while the template's frame is measured


def _template(tokenizer, messages: list[dict], generation: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _bare_user_turn(tokenizer, text_user: str) -> str | None:
    """The template's rendering of one user turn (and the generation prompt) with nothing before it but
    the BOS the template writes: the turn as it appears after an earlier exchange, where no template
    inserts its default system text. None when the template cannot render that conversation."""
    first = [{"role": "user", "content": "u0"}, {"role": "assistant", "content": "a0"}]
    try:
        closed = _template(tokenizer, first, generation=False)
        conv = _template(tokenizer, [*first, {"role": "user", "content": CONTENT}])
    except Exception:  # a template that refuses the roles or their order
        return None
    if not conv.startswith(closed):
        return None
    turn = conv[len(closed):]
    bos = tokenizer.bos_token or ""
    lead = bos if bos and text_user.startswith(bos) and not turn.startswith(bos) else ""
    return lead + turn


def chat_frame(tokenizer, system_prompt: str | None = None, stage: str = "decoder") -> tuple[str, str]:
    """``(head, tail)``: the input text is ``head + user message + tail``.

    With the tokenizer's chat template: one user turn and the generation prompt, after a system turn
    holding ``system_prompt`` when one is given. With ``system_prompt=None`` no system text at all:
    templates that insert a default system prompt when the messages have none (SmolLM2's "You are a
    helpful AI assistant named SmolLM ...", Qwen2.5's, Llama-3.1's date header) get the bare user
    turn, rendered as the template renders a later user turn. Without a chat template: a plain
    format (``system_prompt`` first, then the message and ``Answer:``).
    """
    if not getattr(tokenizer, "chat_template", None):
        head = f"{system_prompt}\n\n" if system_prompt else ""
        return head, "\nAnswer:"
    user = {"role": "user", "content": CONTENT}
    if system_prompt is not None:
        try:
            text = _template(tokenizer, [{"role": "system", "content": system_prompt}, user])
        except Exception as exc:
            raise InputFrameError(f"{stage}: system_prompt is set but the model's chat template has no system turn "
                                  f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                                  "leave system_prompt unset (null)") from None
    else:
        text = _template(tokenizer, [user])
        bare = _bare_user_turn(tokenizer, text)
        if bare is not None and bare != text:
            text = bare  # the template put text of its own before the user turn: left out
    head, _, tail = text.partition(CONTENT)
    return head, tail


def render(tokenizer, prompt: str, response_a: str, response_b: str, system_prompt: str | None = None) -> str:
    """The full input text (:func:`chat_frame` around :func:`user_message`)."""
    head, tail = chat_frame(tokenizer, system_prompt)
    return head + user_message(prompt, response_a, response_b) + tail


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with exactly one leading BOS (none if the tokenizer has no BOS token)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    start = 0
    while start < len(ids) and ids[start] == bos:
        start += 1
    return [bos] + ids[start:]


class Encoding:
    """Battles -> model inputs for one tokenizer and ``max_length``, each battle packed by the shared
    policy with the stage's ``prompt_share``. Subclasses implement :meth:`encode_battle`."""

    uses_token_types = False  # whether rows carry token type ids

    def __init__(self, tokenizer, max_length: int, prompt_share: float):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.prompt_share = prompt_share

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def pack(self, prompt_turns, a_turns, b_turns, max_tokens: int) -> PackedBattle:
        """The battle's three fields packed into ``max_tokens`` tokens of this tokenizer."""
        policy = PackingPolicy(max_tokens=max_tokens, prompt_share=self.prompt_share)
        return pack_battle(prompt_turns, a_turns, b_turns, self.count_tokens, policy)

    def encode_battle(self, prompt_turns, a_turns, b_turns) -> tuple[list[int], list[int] | None, Truncation]:
        """One battle: ``(input_ids, token_type_ids or None, truncation record)``."""
        raise NotImplementedError

    def encode(self, battles: pd.DataFrame, progress: bool = False) -> EncodedBattles:
        """Every battle of the table, in row order."""
        ids, types, records = [], [], []
        rows = zip(battles["prompt"], battles["response_a"], battles["response_b"])
        for p, a, b in tqdm(rows, total=len(battles), desc="encoding battles", disable=not progress, leave=False):
            row_ids, row_types, record = self.encode_battle(p, a, b)
            ids.append(row_ids)
            types.append(row_types)
            records.append(record)
        return EncodedBattles(ids, records, types if self.uses_token_types else None)


def battles_fingerprint(battles: pd.DataFrame) -> str:
    """A digest of the battles' texts in row order (:func:`battles.keys.texts_digest`): what
    :class:`RecentEncodings` keys on. About 2 ms per hundred real battles, against ~1.2 s to encode
    them for a decoder."""
    return texts_digest(battle_keys(battles))


class RecentEncodings:
    """The prediction path's encoding: an :class:`Encoding` that keeps its last ``size`` results, keyed
    by :func:`battles_fingerprint`, so the same battles are encoded once however many models score them.

    The one rule for reuse at prediction: a stage's fold models share one tokenizer, ``max_length`` and
    packing (the decoder's fold adapters share one stage and so one of these), and each scores the same
    battles in the given and in the swapped order, so every battle set is encoded once per order, not
    once per model and order. Four results are kept: cross-fitting refits one stage object per fold and
    scores the fold's validation battles and then the test battles, each in both orders, so the test
    battles are encoded once for all folds too. Results are kept compactly (one int32 array of token
    ids per encoding: 25k battles of ~700 tokens take 70 MB) and every call returns fresh lists:
    identical to encoding anew, and nothing a caller changes reaches the next caller. Training rows
    are not encoded through here."""

    def __init__(self, encoding: Encoding, size: int = 4):
        self.encoding = encoding
        self.size = int(size)
        self._kept: OrderedDict[str, tuple] = OrderedDict()
        self.encoded_battles = 0  # battles actually encoded (not taken from the kept results)

    def encode(self, battles: pd.DataFrame, progress: bool = False) -> EncodedBattles:
        key = battles_fingerprint(battles)
        kept = self._kept.pop(key, None)
        if kept is None:
            encoded = self.encoding.encode(battles, progress)
            self.encoded_battles += len(encoded)
            kept = _compact(encoded)
        self._kept[key] = kept
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)
        return _expand(kept)


def _compact(encoded: EncodedBattles) -> tuple:
    """``(row offsets, token ids, token type ids or None, truncation records)``, the ids in one int32 array."""
    offsets = np.concatenate([[0], np.cumsum(np.array(encoded.lengths, dtype=np.int64))])

    def flat(rows):
        return np.concatenate([np.zeros(0, np.int32), *(np.asarray(r, dtype=np.int32) for r in rows)])

    types = None if encoded.token_type_ids is None else flat(encoded.token_type_ids)
    return offsets, flat(encoded.input_ids), types, tuple(encoded.truncation)


def _expand(kept: tuple) -> EncodedBattles:
    """The :class:`EncodedBattles` that :func:`_compact` kept, in fresh lists."""
    offsets, ids, types, truncation = kept

    def rows(flat):
        return [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]

    return EncodedBattles(rows(ids), list(truncation), None if types is None else rows(types))


class ChatEncoding(Encoding):
    """The decoder layout: the battle in one user message of the tokenizer's chat template (after a
    system turn only when ``system_prompt`` is given: :func:`chat_frame`)."""

    def __init__(self, tokenizer, max_length: int, prompt_share: float, system_prompt: str | None = None,
                 stage: str = "decoder"):
        super().__init__(tokenizer, max_length, prompt_share)
        self.head, self.tail = chat_frame(tokenizer, system_prompt, stage)
        self.frame_tokens = len(encode_text(tokenizer, self.render("", "", "")))
        check_frame(stage, self.max_length, self.frame_tokens)

    def render(self, prompt: str, response_a: str, response_b: str) -> str:
        return self.head + user_message(prompt, response_a, response_b) + self.tail

    def encode_battle(self, prompt_turns, a_turns, b_turns) -> tuple[list[int], None, Truncation]:
        """Pack the texts into the budget left by the frame; shrink and retry if token merges overshoot."""
        budget = self.max_length - self.frame_tokens
        for _ in range(4):
            packed = self.pack(prompt_turns, a_turns, b_turns, budget)
            ids = encode_text(self.tokenizer, self.render(packed.prompt, packed.response_a, packed.response_b))
            overflow = len(ids) - self.max_length
            if overflow <= 0:
                return ids, None, packed.truncation
            budget -= overflow
        raise ValueError(f"could not fit a battle into max_length={self.max_length} (still {overflow} tokens over)")


def check_frame(stage: str, max_length: int, frame_tokens: int) -> None:
    """:class:`InputFrameError` when ``max_length`` leaves under :data:`MIN_TEXT_TOKENS` tokens for the battle."""
    if max_length - frame_tokens < MIN_TEXT_TOKENS:
        raise InputFrameError(
            f"{stage}: max_length={max_length} is too small for the {frame_tokens}-token input frame (chat template, "
            f"instructions, tags, final question) plus {MIN_TEXT_TOKENS} tokens of battle; "
            f"set max_length to at least {frame_tokens + MIN_TEXT_TOKENS}")


class PairEncoding(Encoding):
    """The encoder layout ``[CLS] prompt [SEP] A [SEP] B [SEP]`` (encoder checkpoints)."""

    def __init__(self, tokenizer, max_length: int, prompt_share: float):
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no CLS/SEP tokens: not an encoder tokenizer")
        super().__init__(tokenizer, max_length, prompt_share)
        self.uses_token_types = "token_type_ids" in tokenizer.model_input_names

    def encode_battle(self, prompt_turns, a_turns, b_turns) -> tuple[list[int], list[int] | None, Truncation]:
        packed = self.pack(prompt_turns, a_turns, b_turns, self.max_length - 4)
        texts = [packed.prompt, packed.response_a, packed.response_b]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        first = [self.tokenizer.cls_token_id, *ids[0], self.tokenizer.sep_token_id]
        rest = [*ids[1], self.tokenizer.sep_token_id, *ids[2], self.tokenizer.sep_token_id]
        types = [0] * len(first) + [1] * len(rest) if self.uses_token_types else None
        return first + rest, types, packed.truncation


def training_table(battles: pd.DataFrame, swap_augment: bool) -> pd.DataFrame:
    """The battles a model trains on: with ``swap_augment``, each battle also with A and B exchanged."""
    if swap_augment:
        return pd.concat([battles, swap_battles(battles)], ignore_index=True)
    return battles


def training_rows(battles: pd.DataFrame, encoded: EncodedBattles) -> list[dict]:
    """The model inputs of every battle (``encoded``, in row order) with the ``labels`` target and
    ``weight`` added."""
    targets = label_matrix(battles).astype(np.float32)
    weights = row_weights(battles).astype(np.float32)
    return [{**f, "labels": t.tolist(), "weight": float(w)} for f, t, w in zip(encoded.features(), targets, weights)]
