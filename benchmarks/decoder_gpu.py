"""GPU benchmark of the decoder stage at the real Gemma-2-9B shape, with random weights.

Measures one QLoRA training step (tokens/s, peak memory) and inference throughput (battles/s at a
fixed sequence length) for 4-bit, 8-bit and bf16 loading, with and without swap TTA (TTA = both
A/B orders, i.e. two forward passes per battle).

How the random model is made (works with transformers 5): ``from_config`` of a ``Gemma2Config``
with the 9B shape is built in bf16 directly on the GPU, saved once as a safetensors checkpoint in
``--cache-dir`` (about 18 GB), and then every variant is loaded from that directory through the
stage's own :func:`models.decoder.load_base_model`, i.e. the exact ``from_pretrained`` +
``BitsAndBytesConfig`` path a user's real checkpoint takes. Inputs are random token ids of the
requested length, so no tokenizer is needed.

    python benchmarks/decoder_gpu.py --cache-dir /tmp/gemma2-9b-random --out bench.json
    python benchmarks/decoder_gpu.py --layers 4 --quantization 4bit   # quick smoke on a small GPU

Without CUDA it refuses with exit code 2 and a one-line reason.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.decoder import DecoderParams, add_lora, load_base_model, preference_loss  # noqa: E402

logger = logging.getLogger("decoder_gpu")

GEMMA2_9B = dict(hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=256, intermediate_size=14336, vocab_size=256000)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/gemma2-9b-random"),
                        help="where the random checkpoint is written once and reused")
    parser.add_argument("--layers", type=int, default=GEMMA2_9B["num_hidden_layers"],
                        help="number of layers (42 = the real 9B; fewer for a quick smoke run)")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per battle")
    parser.add_argument("--train-batch", type=int, default=1, help="sequences per training step")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--infer-batch", type=int, default=4, help="battles per inference batch")
    parser.add_argument("--infer-battles", type=int, default=32, help="battles timed per inference variant")
    parser.add_argument("--quantization", default="4bit,8bit,none",
                        help="comma-separated inference variants among 4bit, 8bit, none (bf16)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.quantization.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("4bit", "8bit", "none")]
    if bad:
        parser.error(f"--quantization: unknown variant(s) {bad}; use 4bit, 8bit, none")
    args.variants = variants
    return args


def random_checkpoint(cache_dir: Path, layers: int) -> Path:
    """A random-weight Gemma-2-9B-shaped seq-cls checkpoint in ``cache_dir`` (built on first use)."""
    from transformers import AutoModelForSequenceClassification, Gemma2Config

    path = cache_dir / f"layers{layers}"
    if (path / "config.json").is_file():
        return path
    config = Gemma2Config(**{**GEMMA2_9B, "num_hidden_layers": layers}, num_labels=3, pad_token_id=0,
                          bos_token_id=2, eos_token_id=1, max_position_embeddings=8192)
    logger.info("building a random %d-layer Gemma-2-9B-shaped checkpoint in %s", layers, path)
    with torch.device("cuda"):
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def random_ids(batch: int, length: int, vocab: int) -> dict:
    ids = torch.randint(3, vocab, (batch, length), device="cuda")
    ids[:, 0] = 2  # BOS
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bench_train(path: Path, args) -> dict:
    import bitsandbytes as bnb

    params = DecoderParams(model=str(path), lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    model = add_lora(load_base_model(path, "4bit", pad_token_id=0), params)
    model.train()
    optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    target = torch.nn.functional.one_hot(torch.randint(0, 3, (args.train_batch,)), 3).float().cuda()
    soft, weight = torch.zeros(args.train_batch, device="cuda"), torch.ones(args.train_batch, device="cuda")

    def step():
        batch = random_ids(args.train_batch, args.max_length, GEMMA2_9B["vocab_size"])
        loss = preference_loss(model(**batch).logits, target, soft, weight)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up (allocations, kernels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"tokens_per_s": args.train_steps * args.train_batch * args.max_length / seconds,
              "seconds_per_step": seconds / args.train_steps,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model, optimizer
    torch.cuda.empty_cache()
    return result


@torch.inference_mode()
def bench_infer(path: Path, quantization: str, args) -> dict:
    from peft import LoraConfig, get_peft_model

    # As at prediction time: the (quantised) base with un-merged LoRA adapters and the head on top.
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=DecoderParams.model_fields["target_modules"].default,
                      task_type="SEQ_CLS", modules_to_save=["score"])
    model = get_peft_model(load_base_model(path, quantization, pad_token_id=0), lora).eval()
    n_batches = max(1, args.infer_battles // args.infer_batch)
    model(**random_ids(args.infer_batch, args.max_length, GEMMA2_9B["vocab_size"]))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(n_batches):
        model(**random_ids(args.infer_batch, args.max_length, GEMMA2_9B["vocab_size"]))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    battles_per_s = n_batches * args.infer_batch / seconds
    # Swap TTA runs every battle in both orders: exactly two of these passes per battle.
    result = {"battles_per_s": battles_per_s, "battles_per_s_tta_derived": battles_per_s / 2,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("decoder_gpu benchmark needs a CUDA GPU (bitsandbytes 4/8-bit kernels); none is visible", file=sys.stderr)
        return 2
    path = random_checkpoint(args.cache_dir, args.layers)
    figures = {"device": torch.cuda.get_device_name(0), "layers": args.layers, "max_length": args.max_length,
               "train_batch": args.train_batch, "infer_batch": args.infer_batch}
    if not args.skip_train:
        figures["train_qlora_4bit"] = bench_train(path, args)
        logger.info("train: %s", figures["train_qlora_4bit"])
    for variant in args.variants:
        figures[f"infer_{variant}"] = bench_infer(path, variant, args)
        logger.info("infer %s: %s", variant, figures[f"infer_{variant}"])
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
