"""Turn a battle into one decoder input: the model's own chat template, one BOS, a budgeted prompt.

The whole battle goes into a single user message::

    <instruction>
    <prompt> ... </prompt>
    <response_a> ... </response_a>
    <response_b> ... </response_b>
    Which response is better? Answer A, B or tie.

followed by the template's generation prompt (the classifier reads the hidden state of the last
token). The frame (template, instruction, tags, final question) is measured first and never cut;
what is left of ``max_length`` is handed to the shared truncation policy
(:func:`models.packing.pack_battle`: per-field budgets, most recent turns kept, cut markers).

Exactly one BOS: chat templates of Gemma-2 and Llama-3.x already write the BOS token and their
tokenizers add another one when asked for special tokens. We therefore tokenize the rendered text
without special tokens, drop any leading BOS and put back exactly one (when the tokenizer has one;
Qwen2 has none).
"""
from __future__ import annotations

from dataclasses import dataclass

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


class BattleEncoder:
    """Encodes battles for one tokenizer and ``max_length`` with the shared packing policy."""

    def __init__(self, tokenizer, max_length: int, prompt_share: float = 0.2, cut_marker: str = " [...] "):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.prompt_share = prompt_share
        self.cut_marker = cut_marker
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
            policy = PackingPolicy(max_tokens=budget, prompt_share=self.prompt_share, cut_marker=self.cut_marker)
            packed = pack_battle(list(prompt_turns), list(a_turns), list(b_turns), self.count_tokens, policy)
            text = render(self.tokenizer, packed.prompt, packed.response_a, packed.response_b)
            ids = encode_text(self.tokenizer, text)
            overflow = len(ids) - self.max_length
            if overflow <= 0:
                return EncodedBattle(ids, packed.truncated)
            budget -= overflow
        raise ValueError(f"could not fit a battle into max_length={self.max_length} (still {overflow} tokens over)")
