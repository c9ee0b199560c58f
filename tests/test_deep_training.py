"""The shared pieces of the deep stages: the one loss, the one precision rule, batches and shards."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.deep.batching import length_batches, predict_sharded, shard_indices
from models.deep.precision import resolve_precision
from models.deep.training import preference_loss


def test_loss_is_cross_entropy_for_hard_rows_and_kl_for_soft_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    hard = torch.tensor([0, 2])
    onehot = torch.nn.functional.one_hot(hard, 3).float()
    assert torch.allclose(preference_loss(logits[:2], onehot), torch.nn.functional.cross_entropy(logits[:2], hard))
    smoothed = torch.nn.functional.cross_entropy(logits[:2], hard, label_smoothing=0.1)
    entropy = lambda t: -(t * t.log()).sum(-1)  # noqa: E731
    target = 0.9 * onehot + 0.1 / 3
    assert torch.allclose(preference_loss(logits[:2], onehot, smoothing=0.1), smoothed - entropy(target).mean())
    soft = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert preference_loss(soft.log(), soft).abs() < 1e-6  # zero when the model matches the teacher
    soft_ce = -(soft * torch.log_softmax(logits[2:], -1)).sum(-1)
    assert torch.allclose(preference_loss(logits[2:], soft), (soft_ce - entropy(soft)).mean())
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])  # a zero-weight row does not count; the rest by weight
    targets = torch.cat([onehot, soft])
    per_row = torch.stack([preference_loss(logits[i:i + 1], targets[i:i + 1]) for i in range(4)])
    assert torch.allclose(preference_loss(logits, targets, w), (w * per_row).sum() / w.sum())
    assert preference_loss(logits, targets, torch.zeros(4)) == 0


def test_precision_rule(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32"
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be"):
        resolve_precision("fp8", cpu)
    # The GPU branch of the rule, on a stand-in GPU: native bf16 (A100/H100) vs none (T4/V100).
    cuda = torch.device("cuda", 0)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: asked.append(including_emulation) or False)
    t4 = resolve_precision("auto", cuda, "decoder")
    assert (t4.name, t4.trainer_flags()) == ("fp16", {"bf16": False, "fp16": True})
    assert asked == [False]  # emulated bf16 does not count
    with pytest.raises(ValueError, match="no native bf16"):
        resolve_precision("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with caplog.at_level("INFO", logger="models.deep.precision"):
        assert resolve_precision("auto", cuda, "decoder").trainer_flags() == {"bf16": True, "fp16": False}
    assert "decoder precision: bf16" in caplog.text


def test_length_batches_and_shards_cover_every_row_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=101)
    batches = length_batches(lengths, max_tokens=1000, max_size=8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(101))
    for b in batches:
        assert len(b) <= 8 and (len(b) == 1 or len(b) * lengths[b].max() <= 1000)
    assert lengths[batches[0]].max() == lengths.max()  # longest first: running out of memory shows at once
    shards = shard_indices(lengths, 3)
    assert sorted(np.concatenate(shards).tolist()) == list(range(101))
    loads = [lengths[s].sum() for s in shards]
    assert max(loads) - min(loads) <= lengths.max()


def test_predict_sharded_in_one_process_is_a_plain_call():
    frame = pd.DataFrame({"prompt": [["a"]] * 3, "response_a": [["b"]] * 3, "response_b": [["c"]] * 3})
    out = predict_sharded(lambda b: np.arange(3 * len(b)).reshape(len(b), 3), frame)
    assert out.shape == (3, 3) and out[2, 2] == 8


def test_recipe_configs_validate():
    """configs/*.json are valid run configs (the documented `run.py --config configs/...` way in)."""
    import json
    from pathlib import Path

    from pipeline.config import load_config

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
    assert {p.name for p in paths} >= {"gemma2_9b_qlora.json", "gemma2_9b_qlora_t4.json", "deberta_v3_large.json",
                                       "cpu_tiny.json", "cpu_minilm.json"}
    for path in paths:
        cfg = load_config(str(path))  # the schema checks every key and type (ConfigError otherwise)
        assert set(cfg.stages) == set(json.loads(path.read_text())["stages"])
