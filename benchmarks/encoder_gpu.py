"""GPU figures of the encoder stage itself at the DeBERTa-v3-large shape (random weights).

Builds a random-weight DeBERTa-v3-large-shaped checkpoint (24 layers, hidden 1024, 16 heads, vocab
128100, v3 relative attention) with a small tokenizer in ``--cache-dir`` in this same command, then
times ``EncoderStage.fit`` (training tokens/s and MFU from per-step times after the first step) and
``EncoderStage.predict_logits`` with swap TTA (battles/s, MFU, peak memory, projected time for 25k
battles) in the stage's own precision rule. Every battle is packed to the full ``--max-length``.

    python benchmarks/encoder_gpu.py --out encoder_gpu.json
    python benchmarks/encoder_gpu.py --layers 2 --train-steps 3 --battles 32   # smoke run

Without CUDA it exits with code 2 and one line saying why.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_common as gpu  # noqa: E402

DEBERTA_V3_LARGE = dict(vocab_size=128100, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, max_position_embeddings=512, relative_attention=True,
                        position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                        pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0)


def parse_args(argv=None):
    ap = gpu.benchmark_parser(__doc__, "/tmp/deberta-v3-large-random", DEBERTA_V3_LARGE["num_hidden_layers"],
                          max_length=1024, train_batch=8, train_steps=10, predict_batch=32, battles=256)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    args = ap.parse_args(argv)
    gpu.check_sizes(ap, args)
    return args


def model_config(layers: int):
    from transformers import DebertaV2Config

    return DebertaV2Config(**{**DEBERTA_V3_LARGE, "num_hidden_layers": layers}, num_labels=3)


def build_checkpoint(cache_dir: Path, layers: int) -> Path:
    """Random weights of the DeBERTa-v3-large shape (built on the GPU) with a small tokenizer; reused if present."""

    def build(path: Path) -> None:
        import torch
        from transformers import DebertaV2ForSequenceClassification

        from tests.tiny_models import build_deberta

        build_deberta(path)  # its tokenizer (ids < 200) stays; config and weights are replaced by the large shape
        config = model_config(layers)
        config.pad_token_id = 0
        with torch.device("cuda"):
            DebertaV2ForSequenceClassification(config).save_pretrained(path)

    return gpu.cached_checkpoint(cache_dir, layers, build)


def measure(path: Path, args) -> dict:
    import torch

    from models.encoder import EncoderStage
    from models.stage import StageContext

    config = model_config(args.layers)
    device = torch.cuda.get_device_name(0)
    peak = gpu.peak_tflops(device, args.peak_tflops)
    fwd = gpu.forward_flops_per_token(config, args.max_length)

    class Timed(EncoderStage):
        def training_callbacks(self, has_eval):
            self.steps = gpu.step_times()
            return [self.steps]

    battles = gpu.synthetic_battles(max(args.battles, args.train_batch * (args.train_steps + 1)), args.max_length)
    params = {"model": str(path), "max_length": args.max_length, "train_batch_size": args.train_batch,
              "max_steps": args.train_steps + 1, "predict_batch_size": args.predict_batch, "precision": args.precision,
              "swap_augment": False, "save_steps": 0, "logging_steps": 1000}
    torch.cuda.reset_peak_memory_stats()
    stage = Timed(params, StageContext(progress=False))
    stage.fit(battles.iloc[: args.train_batch * (args.train_steps + 1)])
    rate = args.train_steps * args.train_batch * args.max_length / (stage.steps.times[-1] - stage.steps.times[0])
    figures = {"device": device, "peak_tflops": peak, "precision": stage.precision.name, "layers": args.layers,
               "max_length": args.max_length,
               "train": {"tokens_per_s": rate, "mfu": 3 * fwd * rate / (peak * 1e12) if peak else None,
                         "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}}
    figures["predict"] = gpu.time_prediction(stage, battles.iloc[: args.battles], args.max_length, fwd, peak)
    return figures


def main(argv=None) -> int:
    return gpu.main_of("encoder_gpu", parse_args, build_checkpoint, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
