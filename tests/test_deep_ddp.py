"""Multi-process training and prediction on CPU: ``torchrun --nproc_per_node 2 run.py train decoder``
(two gloo ranks, what ``accelerate launch`` runs on two GPUs) against the same command in one process,
and ``torchrun --nproc_per_node 2 run.py predict`` on the finished one-process run: the ranks join one
process group before the models load and each scores its shard; the gathered predictions equal the
one-process ones.

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
import pytest
from safetensors.numpy import load_file

from tests.conftest import shared_file
from tests.test_decoder import gemma_dir  # noqa: F401  (the session-wide tiny Gemma-2 fixture)

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"quantization": "4bit", "max_length": 160, "max_steps": 1, "grad_accum": 1, "lora_r": 4, "lora_alpha": 8,
          "learning_rate": 1e-4, "warmup_ratio": 0.0, "gradient_checkpointing": False, "head_init_std": 0.02,
          "save_steps": 0}


def _launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    # "--": torchrun would take run.py's --run for an abbreviation of its own --run-path
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--"] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + ["run.py", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=480)


def _run(tmp_path, model_dir, out: str, processes: int, batch: int) -> subprocess.CompletedProcess:
    params = {**PARAMS, "train_batch_size": batch}
    sets = [a for k, v in params.items() for a in ("--set", f"stages.decoder.params.{k}={json.dumps(v)}")]
    return _launch(["train", "decoder", "--model", str(model_dir), "--train", str(tmp_path / "train.csv"),
                    "--test", str(tmp_path / "test.csv"), "--out", str(tmp_path / out), "--quiet", "--set",
                    "n_folds=3", *sets], processes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gemma_dir):  # noqa: F811
    """The same decoder run in one process and in two (gloo ranks)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    frame = pd.read_csv(shared_file("arena/train_sample.csv"))
    frame.iloc[:40].to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[40:47][["id", "prompt", "response_a", "response_b"]].to_csv(tmp_path / "test.csv", index=False)
    one = _run(tmp_path, gemma_dir, "one", 1, 32)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(tmp_path, gemma_dir, "two", 2, 16)
    assert two.returncode == 0, two.stderr[-4000:]
    return tmp_path


def test_two_process_run_matches_one_process(runs):
    tmp_path = runs
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


def test_two_process_predict_shards_and_matches_one_process(runs):
    """``run.py predict`` under torchrun used to score every battle on every rank (no process group
    outside training); now both ranks join one group and the gathered predictions equal the
    one-process ones (and the run's own submission)."""
    tmp_path = runs
    common = ["predict", "--run", str(tmp_path / "one"), "--test", str(tmp_path / "test.csv"), "--quiet"]
    one = _launch([*common, "--out", str(tmp_path / "preds1.csv")], 1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "joined the launch's process group" not in one.stderr
    two = _launch([*common, "--out", str(tmp_path / "preds2.csv")], 2)
    assert two.returncode == 0, two.stderr[-4000:]
    assert all(f"rank {r} of 2 (gloo)" in two.stderr for r in (0, 1)), two.stderr[-3000:]
    a, b = pd.read_csv(tmp_path / "preds1.csv"), pd.read_csv(tmp_path / "preds2.csv")
    assert a["id"].tolist() == b["id"].tolist() and len(a) == 7
    np.testing.assert_allclose(b.iloc[:, 1:].to_numpy(), a.iloc[:, 1:].to_numpy(), atol=1e-6)
    submission = pd.read_csv(tmp_path / "one" / "submission.csv").set_index("id").loc[a["id"]]
    np.testing.assert_allclose(a.iloc[:, 1:].to_numpy(), submission.to_numpy(), atol=1e-6)
