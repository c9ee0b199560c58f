"""Battles -> model inputs for both deep stages, and the rows they train on.

Encoder (:class:`PairEncoding`): ``[CLS] prompt [SEP] response A [SEP] response B [SEP]`` with token
type 0 for the first segment and 1 for the rest, each field packed by the shared truncation policy
(:func:`models.packing.pack_battle`) into ``max_length`` minus the four special tokens.

Decoder (:class:`ChatEncoding`): the whole battle goes into a single user message of the model's own
chat template::

    <instruction>
    <prompt> ... </prompt>
    <response_a> ... </response_a>
    <response_b> ... </response_b>
    Which response is better? Answer A, B or tie.

followed by the template's generation prompt (the classifier reads the hidden state of the last
token). The frame (template, instruction, tags, final question) is measured first and never cut;
what is left of ``max_length`` goes to the shared packing policy. Exactly one BOS: chat templates of
Gemma-2 and Llama-3.x already write the BOS token and their tokenizers add another one when asked for
special tokens, so the rendered text is tokenized without special tokens, any leading BOS dropped and
exactly one put back (when the tokenizer has one; Qwen2 has none).

Training rows (:func:`training_rows`): token ids plus ``labels`` (the ``[a, b, tie]`` target: one-hot,
or the soft label where a row has one) and ``weight``; :func:`training_table` adds the A/B-swapped
copy of every battle when swap augmentation is on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from battles.labels import label_matrix, row_weights, swap_battles
from models.packing import PackingPolicy, pack_battle

INSTRUCTION = (
    "Two AI assistants answered the same user prompt. Decide which response the user preferred."
)
FINAL_QUESTION = "Which response is better? Answer A, B or tie."
# Smallest text budget worth packing into; below it the caller's max_length is too small.
MIN_TEXT_TOKENS = 24


@dataclass
class EncodedBattle:
    input_ids: list[int]
    truncated: dict


def user_message(prompt: str, response_a: str, response_b: str) -> str:
    return (
        f"{INSTRUCTION}\n\n<prompt>\n{prompt}\n</prompt>\n\n<response_a>\n{response_a}\n</response_a>\n\n"
        f"<response_b>\n{response_b}\n</response_b>\n\n{FINAL_QUESTION}"
    )


def render(tokenizer, prompt: str, response_a: str, response_b: str) -> str:
    """The full input text: the chat template when the tokenizer has one, else a plain format."""
    content = user_message(prompt, response_a, response_b)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return f"{content}\nAnswer:"


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


class ChatEncoding:
    """Encodes battles for one decoder tokenizer and ``max_length`` with the shared packing policy."""

    def __init__(self, tokenizer, max_length: int, prompt_share: float = 0.2):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.prompt_share = prompt_share
        self.frame_tokens = len(encode_text(tokenizer, render(tokenizer, "", "", "")))
        if self.max_length - self.frame_tokens < MIN_TEXT_TOKENS:
            raise ValueError(
                f"max_length={self.max_length} leaves {self.max_length - self.frame_tokens} tokens for the battle "
                f"after the {self.frame_tokens}-token template and instructions; use at least "
                f"{self.frame_tokens + MIN_TEXT_TOKENS}"
            )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt_turns, a_turns, b_turns) -> EncodedBattle:
        """Pack the texts into the budget left by the frame; shrink and retry if token merges overshoot."""
        budget = self.max_length - self.frame_tokens
        for _ in range(4):
            policy = PackingPolicy(max_tokens=budget, prompt_share=self.prompt_share)
            packed = pack_battle(list(prompt_turns), list(a_turns), list(b_turns), self.count_tokens, policy)
            text = render(self.tokenizer, packed.prompt, packed.response_a, packed.response_b)
            ids = encode_text(self.tokenizer, text)
            overflow = len(ids) - self.max_length
            if overflow <= 0:
                return EncodedBattle(ids, packed.truncated)
            budget -= overflow
        raise ValueError(f"could not fit a battle into max_length={self.max_length} (still {overflow} tokens over)")

    def __call__(self, battles: pd.DataFrame, progress: bool = False) -> list[list[int]]:
        """Token ids of every battle."""
        rows = zip(battles["prompt"], battles["response_a"], battles["response_b"])
        return [self.encode(p, a, b).input_ids
                for p, a, b in tqdm(rows, total=len(battles), desc="encoding battles", disable=not progress, leave=False)]


class PairEncoding:
    """Packs and tokenizes battles into ``[CLS] prompt [SEP] A [SEP] B [SEP]`` (encoder checkpoints)."""

    def __init__(self, tokenizer, max_length: int, prompt_share: float = 0.2):
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no CLS/SEP tokens: not an encoder tokenizer")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.policy = PackingPolicy(max_tokens=self.max_length - 4, prompt_share=prompt_share)
        self.with_types = "token_type_ids" in tokenizer.model_input_names

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def features(self, battles: pd.DataFrame, progress: bool = False) -> list[dict]:
        """One dict per battle: ``input_ids``, ``attention_mask`` and (when the model uses them) ``token_type_ids``."""
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        rows = zip(battles["prompt"], battles["response_a"], battles["response_b"])
        features = []
        for p, a, b in tqdm(rows, total=len(battles), desc="packing battles", disable=not progress, leave=False):
            packed = pack_battle(p, a, b, self.count_tokens, self.policy)
            ids = self.tokenizer([packed.prompt, packed.response_a, packed.response_b],
                                 add_special_tokens=False)["input_ids"]
            first = [cls, *ids[0], sep]
            rest = [*ids[1], sep, *ids[2], sep]
            feature = {"input_ids": first + rest, "attention_mask": [1] * (len(first) + len(rest))}
            if self.with_types:
                feature["token_type_ids"] = [0] * len(first) + [1] * len(rest)
            features.append(feature)
        return features


def training_table(battles: pd.DataFrame, swap_augment: bool) -> pd.DataFrame:
    """The battles a model trains on: with ``swap_augment``, each battle also with A and B exchanged."""
    if swap_augment:
        return pd.concat([battles, swap_battles(battles)], ignore_index=True)
    return battles


def training_rows(battles: pd.DataFrame, features: list[dict]) -> list[dict]:
    """``features`` (one dict of model inputs per battle) with the ``labels`` target and ``weight`` added."""
    targets = label_matrix(battles).astype(np.float32)
    weights = row_weights(battles).astype(np.float32)
    return [{**f, "labels": t.tolist(), "weight": float(w)} for f, t, w in zip(features, targets, weights)]
