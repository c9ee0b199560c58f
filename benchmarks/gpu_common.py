"""Shared parts of the GPU benchmarks of the deep stages (``gpu_check.py`` for the decoder,
``encoder_gpu.py``): synthetic battles, the Gemma-2-9B shape, device peaks, model FLOPs, timing.

They time the STAGE itself (``fit``, ``predict_logits`` with swap TTA) on a random-weight
checkpoint of the real shape built in the same command, and report tokens/s, model FLOPs utilisation
(MFU), battles/s, peak GPU memory and the projected time to score 25k battles.

Model FLOPs per token (the usual accounting, no recomputation counted): a forward pass costs
``2 * N`` for the ``N`` weights of the matrix multiplications (embedding lookups excluded) plus
``4 * L * S * d_attn`` for attention scores and values at sequence length ``S`` over ``L`` layers
(``d_attn`` = heads x head_dim). Full fine-tuning costs three forwards (activation and weight
gradients); LoRA training two (the frozen weights need activation gradients only).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "T4": 65.0, "V100": 125.0}
BATTLES_TO_PROJECT = 25_000
GEMMA2_9B = dict(hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=256, intermediate_size=14336, vocab_size=256000, sliding_window=4096,
                 max_position_embeddings=8192)
WORDS = ("the capital of france is paris python is a programming language hello world how are you today "
         "sure here is a short poem about the sea and the sky i cannot help with that request").split()


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name.upper()), None)


def matmul_params(config) -> int:
    """Weights in the matrix multiplications of one forward pass of a decoder/encoder layer stack (no embeddings)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    attention = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    gated = getattr(config, "model_type", "") in ("gemma2", "llama", "qwen2", "gemma", "mistral")
    mlp = (3 if gated else 2) * h * inter
    return layers * (attention + mlp)


def forward_flops_per_token(config, seq_len: int) -> float:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2.0 * matmul_params(config) + 4.0 * config.num_hidden_layers * seq_len * heads * head_dim


def synthetic_battles(n: int, words_per_field: int, seed: int = 0) -> pd.DataFrame:
    """Labelled battles long enough that packing fills ``max_length`` (every row costs the full length)."""
    rng = np.random.default_rng(seed)
    say = lambda: " ".join(rng.choice(WORDS, size=words_per_field))  # noqa: E731
    labels = rng.integers(0, 3, size=n)
    return pd.DataFrame({"id": [f"b{i}" for i in range(n)], "prompt": [[say()] for _ in range(n)],
                         "response_a": [[say()] for _ in range(n)], "response_b": [[say()] for _ in range(n)],
                         "winner_model_a": (labels == 0).astype(int), "winner_model_b": (labels == 1).astype(int),
                         "winner_tie": (labels == 2).astype(int)})


def gemma2_config(layers: int, **shape):
    """A Gemma-2 config of the 9B shape (``shape`` overrides it, e.g. a tiny width) with 3 labels."""
    from transformers import Gemma2Config

    return Gemma2Config(**{**GEMMA2_9B, "num_hidden_layers": layers, **shape}, num_labels=3)


def build_decoder_checkpoint(path: Path, config) -> None:
    """Random bf16 weights of ``config`` with the tiny test tokenizer (ids < 400 of the real vocabulary),
    made on the GPU when there is one."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tests.tiny_models import build_tokenizer

    tokenizer = build_tokenizer(path)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16).save_pretrained(path)


def sync() -> None:
    """Wait for the GPU's queued work (timings); a no-op without CUDA."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """Peak GPU memory allocated by torch since :func:`reset_peak` (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def refuse_without_cuda(name: str) -> bool:
    """True (and one line on stderr) when no CUDA GPU is visible."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"{name}: no CUDA GPU visible; this benchmark measures GPU throughput only", file=sys.stderr)
    return True


def step_times():
    """A TrainerCallback recording the wall time at the end of every optimizer step."""
    import time

    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter())

    return StepTimes()


def cached_checkpoint(cache_dir: Path, layers: int, build) -> Path:
    """``cache_dir/layers<k>``: a random-weight checkpoint of the real shape with ``layers`` layers, made
    by ``build(path)`` (on the GPU) the first time and reused afterwards."""
    import torch

    path = Path(cache_dir) / f"layers{layers}"
    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    build(path)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def time_prediction(stage, battles, max_length: int, forward_flops: float, peak: float | None) -> dict:
    """The stage's own ``predict_logits`` (swap TTA: both orders) timed on ``battles``: battles/s,
    tokens/s, MFU, peak GPU memory, and the projected time for BATTLES_TO_PROJECT battles."""
    import time

    reset_peak()
    start = time.perf_counter()
    logits = stage.predict_logits(battles)
    sync()
    seconds = time.perf_counter() - start
    if not np.isfinite(logits).all():
        raise FloatingPointError(f"{int((~np.isfinite(logits)).any(axis=1).sum())} of {len(battles)} rows of "
                                 "logits are not finite")
    per_s = len(battles) / seconds
    tokens_per_s = 2 * len(battles) * max_length / seconds
    return {"battles_per_s_with_swap_tta": per_s, "tokens_per_s": tokens_per_s,
            "mfu": forward_flops * tokens_per_s / (peak * 1e12) if peak else None,
            "peak_memory_gib": peak_gib(), "projected_minutes_for_25k_battles": BATTLES_TO_PROJECT / per_s / 60}


def main_of(name: str, parse_args, build_checkpoint, measure, argv=None) -> int:
    """A GPU benchmark's command line: refuse without CUDA, build (or reuse) the random checkpoint,
    measure, print and optionally save the figures as JSON."""
    import json
    import logging

    args = parse_args(argv)
    if refuse_without_cuda(name):
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    figures = measure(build_checkpoint(args.cache_dir, args.layers), args)
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


def benchmark_parser(doc: str, cache_dir: str, layers: int, max_length: int, train_batch: int, train_steps: int,
                     predict_batch: int, battles: int):
    """The arguments both GPU benchmarks take, with each one's defaults."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=Path(cache_dir), help="where the random checkpoint is kept")
    ap.add_argument("--layers", type=int, default=layers, help=f"{layers} = the real model; fewer for a smoke run")
    ap.add_argument("--max-length", type=int, default=max_length)
    ap.add_argument("--train-batch", type=int, default=train_batch, help="per-device training batch (grad_accum 1)")
    ap.add_argument("--train-steps", type=int, default=train_steps, help="timed optimizer steps (+1 warm-up)")
    ap.add_argument("--predict-batch", type=int, default=predict_batch, help="battles per inference batch")
    ap.add_argument("--battles", type=int, default=battles, help="battles scored (x2 orders)")
    ap.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in the built-in table")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    return ap


def check_sizes(ap, args) -> None:
    if min(args.layers, args.train_steps, args.battles, args.predict_batch, args.train_batch) < 1:
        ap.error("--layers, --train-steps, --battles, --predict-batch and --train-batch must be positive")
    if args.max_length < 16:
        ap.error("--max-length must be at least 16")
