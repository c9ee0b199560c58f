"""GPU figures of the decoder stage itself at the Gemma-2-9B shape (random weights).

Builds a random-weight Gemma-2-9B-shaped checkpoint (42 layers, hidden 3584; ``--layers`` fewer for
a smoke run) with a small tokenizer in ``--cache-dir`` in this same command, then times
``DecoderStage.fit`` (training tokens/s and MFU from the per-step times after the first step, for
4-bit QLoRA and bf16 LoRA) and ``DecoderStage.predict_logits`` with swap TTA (battles/s, MFU, peak
memory, projected time for 25k battles) for each of ``--quantization`` 4bit, 8bit, none (bf16).
Every battle is packed to the full ``--max-length``. FLOP accounting: benchmarks/gpu_common.py.

    python benchmarks/decoder_gpu.py --out decoder_gpu.json                  # the real shape, one GPU
    python benchmarks/decoder_gpu.py --layers 2 --train-steps 3 --battles 16 # smoke run

Without CUDA it exits with code 2 and one line saying why.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_common as gpu  # noqa: E402

GEMMA2_9B = dict(hidden_size=3584, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=256, intermediate_size=14336, vocab_size=256000, sliding_window=4096,
                 max_position_embeddings=8192)
VARIANTS = ("4bit", "8bit", "none")


def parse_args(argv=None):
    ap = gpu.benchmark_parser(__doc__, "/tmp/gemma2-9b-random", GEMMA2_9B["num_hidden_layers"], max_length=2048,
                          train_batch=2, train_steps=6, predict_batch=8, battles=64)
    ap.add_argument("--train-variants", default="4bit,none", help="quantizations to train: 4bit, 8bit, none")
    ap.add_argument("--quantization", default="4bit,8bit,none", help="inference variants")
    args = ap.parse_args(argv)
    for name in ("quantization", "train_variants"):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        if any(v not in VARIANTS for v in values):
            ap.error(f"--{name.replace('_', '-')}: unknown variant in {values}; use 4bit, 8bit, none")
        setattr(args, name, values)
    gpu.check_sizes(ap, args)
    return args


def model_config(layers: int):
    from transformers import Gemma2Config

    return Gemma2Config(**{**GEMMA2_9B, "num_hidden_layers": layers}, num_labels=3)


def build_checkpoint(cache_dir: Path, layers: int) -> Path:
    """Random weights of the Gemma-2-9B shape (bf16, built on the GPU) with a small tokenizer; reused if present."""

    def build(path: Path) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        from tests.tiny_models import build_tokenizer

        tokenizer = build_tokenizer(path)
        config = model_config(layers)
        config.pad_token_id, config.bos_token_id, config.eos_token_id = (
            tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        with torch.device("cuda"):
            AutoModelForSequenceClassification.from_config(config, dtype=torch.bfloat16).save_pretrained(path)

    return gpu.cached_checkpoint(cache_dir, layers, build)


def stage_params(path: Path, quantization: str, args) -> dict:
    return {"model": str(path), "quantization": quantization, "max_length": args.max_length, "lora_r": 16,
            "lora_alpha": 32, "train_batch_size": args.train_batch, "grad_accum": 1, "max_steps": args.train_steps + 1,
            "predict_batch_size": args.predict_batch, "predict_batch_tokens": args.predict_batch * args.max_length,
            "save_steps": 0, "logging_steps": 1000}


def measure(path: Path, args) -> dict:
    import torch

    from models.decoder import DecoderStage
    from models.stage import StageContext

    config = model_config(args.layers)
    device = torch.cuda.get_device_name(0)
    peak = gpu.peak_tflops(device, args.peak_tflops)
    fwd = gpu.forward_flops_per_token(config, args.max_length)
    battles = gpu.synthetic_battles(max(args.battles, args.train_batch * (args.train_steps + 1)), 4 * args.max_length)
    figures = {"device": device, "peak_tflops": peak, "layers": args.layers, "max_length": args.max_length,
               "forward_gflops_per_token": fwd / 1e9, "train": {}, "predict": {}}

    class Timed(DecoderStage):
        def training_callbacks(self, has_eval):
            self.steps = gpu.step_times()
            return [self.steps]

    for quantization in dict.fromkeys(args.train_variants + args.quantization):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        stage = Timed(stage_params(path, quantization, args), StageContext(progress=False))
        train_rows = battles.iloc[: args.train_batch * (args.train_steps + 1)]
        stage.fit(train_rows)
        if quantization in args.train_variants:
            seconds = stage.steps.times[-1] - stage.steps.times[0]  # the first step is the warm-up
            tokens = args.train_steps * args.train_batch * args.max_length
            rate = tokens / seconds
            figures["train"][quantization] = {
                "tokens_per_s": rate, "mfu": 2 * fwd * rate / (peak * 1e12) if peak else None,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
        if quantization in args.quantization:
            figures["predict"][quantization] = gpu.time_prediction(stage, battles.iloc[: args.battles], args.max_length,
                                                               fwd, peak)
        del stage
    return figures


def main(argv=None) -> int:
    return gpu.main_of("decoder_gpu", parse_args, build_checkpoint, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
