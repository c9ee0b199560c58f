"""GPU training throughput and peak memory of a DeBERTa-v3-base-sized encoder (random weights).

Builds ``DebertaV2Config`` with the base sizes (hidden 768, 12 layers, 12 heads, intermediate 3072,
vocab 128100, relative positions as in v3), then times forward+backward+AdamW steps on random
tokens at each ``--max-lengths`` with bf16 autocast, printing train tokens/s and peak GPU memory.
Refuses cleanly (exit code 2) without CUDA.

    python benchmarks/encoder_gpu.py --max-lengths 512 1024 --batch-size 8 --steps 10
"""
from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-lengths", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or min(args.max_lengths) < 8:
        ap.error("--steps and --batch-size must be positive and --max-lengths at least 8")
    return args


def base_config():
    from transformers import DebertaV2Config

    return DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
        num_labels=3,
    )


def measure(args: argparse.Namespace) -> list[dict]:
    import torch
    from transformers import DebertaV2ForSequenceClassification

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    results = []
    for length in args.max_lengths:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = DebertaV2ForSequenceClassification(base_config()).cuda().train()
        if args.grad_checkpointing:
            model.gradient_checkpointing_enable()
        optim = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
        scaler = torch.amp.GradScaler(enabled=args.precision == "fp16")
        ids = torch.randint(1000, 128000, (args.batch_size, length), device="cuda")
        labels = torch.randint(0, 3, (args.batch_size,), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=ids, labels=labels).loss
            scaler.scale(loss).backward()
            scaler.step(optim)
            scaler.update()
            optim.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results.append({"max_length": length, "batch_size": args.batch_size, "precision": args.precision,
                        "train_tokens_per_s": args.steps * args.batch_size * length / seconds,
                        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
        del model, optim
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("encoder_gpu: no CUDA GPU found; this benchmark only runs on a GPU", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}")
    for r in measure(args):
        print(f"max_length {r['max_length']:5d}  batch {r['batch_size']}  {r['precision']}: "
              f"{r['train_tokens_per_s']:,.0f} train tokens/s, peak {r['peak_memory_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
