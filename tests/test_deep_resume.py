"""Long runs survive: a decoder fold interrupted mid-training resumes from its last Trainer checkpoint.

A child process trains the tiny 4-bit Gemma-2 with checkpoints every 2 steps in its fold directory
and interrupts itself (SIGINT, as Ctrl-C does) after step 3; the rerun must resume from checkpoint 2
(optimizer, scheduler, RNG and data position restored), train steps 3..6 only, end at the same number
of optimizer steps as an uninterrupted run with the same logits, and remove its checkpoints.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.test_decoder import gemma_dir  # noqa: F401  (the session-wide tiny Gemma-2 fixture)

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, logging, os, signal, sys
from pathlib import Path
import torch
from transformers import TrainerCallback
from models.decoder import DecoderStage
from models.stage import StageContext
from tests.test_decoder import FAST, toy_battles

work, model, kill_at, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
# Ctrl-C as in a terminal: a shell that starts this suite in the background (``cmd &``) hands its
# children SIGINT ignored, and Python then leaves it ignored; restore Python's own handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO)
steps = []

class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        steps.append(state.global_step)
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGINT)

class Stage(DecoderStage):
    def training_callbacks(self, has_eval):
        return [Interrupt()]

params = {"model": model, **FAST, "quantization": "4bit", "max_steps": 6, "save_steps": 2, "train_batch_size": 2}
stage = Stage(params, StageContext(progress=False, work_dir=work))
battles = toy_battles(12)
stage.fit(battles)
json.dump({"steps": steps, "global_step": stage.log_history[-1]["step"], "logits": stage.predict_logits(battles).tolist(),
           "checkpoints_left": (work / "checkpoints").exists()}, open(out, "w"))
"""


def _start(tmp_path, work, model_dir, kill_at, out) -> subprocess.Popen:
    script = tmp_path / "child.py"
    if not script.exists():  # written once: a child may be starting from it while the next is launched
        script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(work), str(model_dir), str(kill_at), str(out)], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(child: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = child.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        child.kill()
        raise
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


def _child(tmp_path, work, model_dir, kill_at, out):
    return _wait(_start(tmp_path, work, model_dir, kill_at, out))


def test_killed_fold_resumes_from_its_checkpoint(tmp_path, gemma_dir):  # noqa: F811
    work = tmp_path / "fold0"
    # the uninterrupted reference runs beside the killed and resumed children (one thread each; the
    # test process only waits), in its own work directory
    straight_child = _start(tmp_path, tmp_path / "other", gemma_dir, -1, tmp_path / "straight.json")
    try:
        killed = _child(tmp_path, work, gemma_dir, 3, tmp_path / "killed.json")
        assert killed.returncode != 0 and "KeyboardInterrupt" in killed.stderr
        assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["checkpoint-2"]
        resumed = _child(tmp_path, work, gemma_dir, -1, tmp_path / "resumed.json")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming the fold's training from" in resumed.stderr
        result = json.loads((tmp_path / "resumed.json").read_text())
        assert result["steps"] == [3, 4, 5, 6] and result["global_step"] == 6  # continued, not restarted
        assert not result["checkpoints_left"]  # cleaned when the fold finished
    finally:  # a failed assertion above leaves no child behind
        straight = _wait(straight_child)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = json.loads((tmp_path / "straight.json").read_text())
    assert reference["steps"] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(result["logits"], reference["logits"], atol=1e-5)
