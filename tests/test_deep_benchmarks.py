"""The GPU benchmarks without a GPU: ``gpu_check.py --dry-cpu`` (the same phases at a tiny size), argument
handling, the clean refusal, and the FLOP arithmetic."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import encoder_gpu, gpu_check
from benchmarks.gpu_common import forward_flops_per_token, gemma2_config, matmul_params, peak_tflops


def test_arguments_and_refusal_without_cuda(capsys):
    assert gpu_check.parse_args(["--phases", "environment, fit"]).phases == ["environment", "fit"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--phases", "warp"])
    assert "unknown ['warp']" in capsys.readouterr().err
    assert gpu_check.FULL.layers == 42 and gemma2_config(42).hidden_size == 3584
    assert encoder_gpu.parse_args([]).layers == 24 and encoder_gpu.model_config(24).hidden_size == 1024
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the refusal path is not reachable")
    assert gpu_check.main([]) == 2 and encoder_gpu.main(["--layers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("no CUDA GPU" in line for line in err)


def test_gpu_check_dry_cpu_runs_every_phase(tmp_path, capsys):
    """What CI can run of the GPU check: every phase on a tiny random Gemma-2 on CPU, one JSON line each on
    stdout and in --out; the recipe's fit trains (4 optimizer steps), prediction gives figures, SDPA is
    refused for Gemma-2, and nothing is left in bitsandbytes' registries after the stage is deleted."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = gpu_check.main(["--dry-cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out.jsonl")])
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["phase"] for r in lines] == list(gpu_check.PHASES)
    assert code == 0 and all(r["ok"] for r in lines), [r.get("error") for r in lines]
    assert lines == [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    phase = {r["phase"]: r for r in lines}
    assert phase["build"]["layers"] == 2 and phase["environment"]["attention_kernels"]["eager"]
    fit = phase["fit"]
    assert fit["optimizer_steps"] == 4 and fit["quantized_layers"] == {"Linear4bit": 14} and fit["seconds_per_step"] > 0
    assert phase["predict"]["battles_per_s_with_swap_tta"] > 0
    kernels = phase["attention"]["kernels"]
    assert kernels["eager"]["finite"] and "cannot soft-cap" in kernels["sdpa"]["error"]
    assert phase["memory_after_delete"]["bnb_optim_manager_modules"] == 0
    assert phase["t4_emulation"]["fit"]["optimizer_steps"] == 4


def test_a_failing_phase_is_recorded_and_the_next_runs(tmp_path, capsys):
    code = gpu_check.main(["--dry-cpu", "--cache-dir", str(tmp_path), "--phases", "predict,environment"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 1 and [(r["phase"], r["ok"]) for r in lines] == [("predict", False), ("environment", True)]
    assert "needs the fit phase's stage" in lines[0]["error"]


@pytest.mark.parametrize("family", ["gemma2", "deberta"])
def test_matmul_params_count_the_real_layers(family):
    """The FLOP formula's weight count equals the Linear weights of a small model built from the same config."""
    if family == "gemma2":
        config = gemma2_config(2)
        config.update(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, vocab_size=100))
        from transformers import Gemma2Model as Model
    else:
        config = encoder_gpu.model_config(2)
        config.update(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=100))
        from transformers import DebertaV2Model as Model
    model = Model(config)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "layer" in n and "rel_embeddings" not in n)
    assert matmul_params(config) == linear
    assert forward_flops_per_token(config, 100) == 2 * linear + 4 * 2 * 100 * 64


def test_gemma2_9b_arithmetic_and_peaks():
    config = gemma2_config(42)
    assert 8.0e9 < matmul_params(config) < 8.6e9  # Gemma-2-9B: ~9.2B weights, 0.92B of them the embedding
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("Tesla T4") == 65.0
    assert peak_tflops("Unknown GPU") is None and peak_tflops("Unknown GPU", 100.0) == 100.0


def test_real_weights_benchmark_smoke(tmp_path, smollm2_dir, arena_sample_path, capsys):
    """benchmarks/real_weights.py on a slice: the real SmolLM2 trains one step on 4 battles of fold 0 and
    scores 6; the figures hold the learning curve and the log losses of the decoder, the prior and the
    CPU stages on the same rows."""
    from benchmarks import real_weights

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        code = real_weights.main(["--data", str(arena_sample_path), "--train-rows", "120", "--valid-rows", "6",
                                  "--max-steps", "1", "--batch", "4", "--max-length", "192", "--precision", "fp32",
                                  "--out", str(tmp_path / "figures.json")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["optimizer_steps"] == 1 and figures["valid_battles"] == 6 and figures["train_battles"] == 120
    assert list(figures["learning_curve"]) == ["1"] and figures["seconds_per_step"] > 0
    assert set(figures["log_loss"]) == {"decoder_smollm2", "class_prior", "length_lr", "lgbm_stats", "lgbm_full"}
    assert all(0 < v < 5 for v in figures["log_loss"].values())
    assert "decoder_smollm2" in capsys.readouterr().out
