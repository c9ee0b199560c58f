"""Multi-process training and prediction on CPU: ``torchrun --nproc_per_node 2 run.py train decoder``
(two gloo ranks, what ``accelerate launch`` runs on two GPUs) against the same command in one process.

Every rank trains (DDP), scores its shard of the validation and test battles, and the shards are
gathered in row order; only the main process writes. Global batch and steps are the same in both
runs (2 x 16 per rank vs 32 in one process, one optimizer step per fold). The gradients still differ
slightly (the DDP sampler pads a fold of odd size with repeated rows; float sums run in another
order), and Adam's first step moves every weight by +-lr whatever the gradient's size, so the
learning rate is kept small (1e-4) and the logits must agree within 5e-3.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from tests.conftest import shared_file
from tests.test_decoder import gemma_dir  # noqa: F401  (the session-wide tiny Gemma-2 fixture)

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"quantization": "4bit", "max_length": 160, "max_steps": 1, "grad_accum": 1, "lora_r": 4, "lora_alpha": 8,
          "learning_rate": 1e-4, "warmup_ratio": 0.0, "gradient_checkpointing": False, "head_init_std": 0.02,
          "save_steps": 0}


def _run(tmp_path, model_dir, out: str, processes: int, batch: int) -> subprocess.CompletedProcess:
    params = {**PARAMS, "train_batch_size": batch}
    sets = [a for k, v in params.items() for a in ("--set", f"stages.decoder.params.{k}={json.dumps(v)}")]
    args = ["run.py", "train", "decoder", "--model", str(model_dir), "--train", str(tmp_path / "train.csv"),
            "--test", str(tmp_path / "test.csv"), "--out", str(tmp_path / out), "--quiet", "--set", "n_folds=3", *sets]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 \
        else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=480)


def test_two_process_run_matches_one_process(tmp_path, gemma_dir):  # noqa: F811
    frame = pd.read_csv(shared_file("arena/train_sample.csv"))
    frame.iloc[:40].to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[40:47][["id", "prompt", "response_a", "response_b"]].to_csv(tmp_path / "test.csv", index=False)
    one = _run(tmp_path, gemma_dir, "one", 1, 32)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(tmp_path, gemma_dir, "two", 2, 16)
    assert two.returncode == 0, two.stderr[-4000:]
    for name in ("oof_logits.csv", "test_logits.csv"):
        a = pd.read_csv(tmp_path / "one" / "stages" / "decoder" / name)
        b = pd.read_csv(tmp_path / "two" / "stages" / "decoder" / name)
        assert a["id"].tolist() == b["id"].tolist()
        np.testing.assert_allclose(b.iloc[:, 1:].to_numpy(), a.iloc[:, 1:].to_numpy(), atol=5e-3)
    stage_dir = tmp_path / "two" / "stages" / "decoder"
    for k in range(3):  # every fold trained and saved once, by the main process, with nothing half-written
        adapter = load_file(str(stage_dir / f"fold{k}" / "model" / "adapter_model.safetensors"))
        assert any(np.abs(v).sum() > 0 for key, v in adapter.items() if "lora_B" in key)
    leftovers = [p for p in (tmp_path / "two").rglob("*") if ".tmp" in p.name]
    assert not leftovers and (tmp_path / "two" / "submission.csv").is_file()
