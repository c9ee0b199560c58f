"""Encoder stage throughput on CPU (or whatever torch sees): battles/s for training and prediction.

Runs the real stage (packing, Trainer, swap TTA) with the MiniLM test package on real battles:

    python benchmarks/encoder_speed.py --train ../shared/data/arena/train_sample.csv --n 64 --steps 4
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from battles import read_battles  # noqa: E402
from models.stage import StageContext, make_stage  # noqa: E402
from tests.tiny_models import packaged_minilm_dir  # noqa: E402  (the MiniLM that a dev dependency ships)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="labelled battle file")
    ap.add_argument("--model", default=None, help="local checkpoint dir (default: the MiniLM test package)")
    ap.add_argument("--n", type=int, default=64, help="battles to predict")
    ap.add_argument("--steps", type=int, default=4, help="training steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    battles, _ = read_battles(args.train)
    battles = battles.iloc[: max(args.n, args.steps * args.batch_size)]
    params = {"model": args.model or packaged_minilm_dir(), "max_length": args.max_length, "max_steps": args.steps,
              "train_batch_size": args.batch_size, "predict_batch_size": 32, "swap_augment": False}
    stage = make_stage("encoder", params, StageContext(progress=False))
    start = time.perf_counter()
    stage.fit(battles.iloc[: args.steps * args.batch_size])
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    stage.predict_logits(battles.iloc[: args.n])
    predict_s = time.perf_counter() - start
    result = {
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "max_length": args.max_length,
        "train_battles_per_s": args.steps * args.batch_size / train_s,
        "predict_battles_per_s_with_swap_tta": args.n / predict_s,
    }
    for key, value in result.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
