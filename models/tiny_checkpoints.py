"""Tiny random decoder checkpoints (Gemma-2, Llama, Qwen2 shapes) with a tokenizer trained on the fly.

Real Gemma-2 / Llama weights are not available offline; these 2-layer models exercise the decoder
stage's real code path on CPU, in tests and in CPU demos of the full stack:

    python -m models.tiny_checkpoints gemma2 /tmp/tiny-gemma2

The tokenizer mimics the real ones where it matters: its chat template writes BOS *and* the tokenizer
adds BOS itself (as Llama-3.1's does), so the one-BOS rule is tested for real.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = [
    "Which response is better? Answer A, B or tie.", "Two AI assistants answered the same user prompt.",
    "The capital of France is Paris. Python is a programming language.", "hello world, how are you today?",
    "Sure! Here is a short poem about the sea and the sky.", "I cannot help with that request.",
] * 20


def build_tokenizer(directory: Path, bos_in_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    template = GEMMA_TEMPLATE if bos_in_template else GEMMA_TEMPLATE.replace("{{ bos_token }}", "")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=template)
    fast.save_pretrained(directory)
    return fast


def build_checkpoint(directory: Path, family: str) -> Path:
    """A tiny random ``family`` ("gemma2" or "llama") checkpoint with its tokenizer in ``directory``."""
    from transformers import AutoModelForSequenceClassification, Gemma2Config, LlamaConfig, Qwen2Config

    tokenizer = build_tokenizer(directory, bos_in_template=family != "qwen2")
    if family == "qwen2":  # Qwen2 has no BOS token and pads with an ordinary special token
        tokenizer.bos_token = None
        tokenizer.save_pretrained(directory)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id or 0,
                  eos_token_id=tokenizer.eos_token_id, num_labels=3)
    configs = {"gemma2": lambda: Gemma2Config(**common, sliding_window=64), "llama": lambda: LlamaConfig(**common),
               "qwen2": lambda: Qwen2Config(**common)}
    config = configs[family]()
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("gemma2", "llama", "qwen2"):
        sys.exit("usage: python -m models.tiny_checkpoints {gemma2,llama,qwen2} DIRECTORY")
    print(build_checkpoint(Path(sys.argv[2]), sys.argv[1]))
