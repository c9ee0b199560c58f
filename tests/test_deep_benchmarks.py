"""The GPU benchmarks without a GPU: argument handling, the clean refusal, and the FLOP arithmetic."""
from __future__ import annotations

import pytest
import torch

from benchmarks import decoder_gpu, encoder_gpu
from benchmarks.gpu_common import forward_flops_per_token, matmul_params, peak_tflops


def test_arguments_and_refusal_without_cuda(capsys):
    args = decoder_gpu.parse_args(["--layers", "2", "--quantization", "4bit, none", "--max-length", "1024"])
    assert args.quantization == ["4bit", "none"] and args.layers == 2 and args.train_variants == ["4bit", "none"]
    assert decoder_gpu.parse_args([]).layers == 42 and decoder_gpu.GEMMA2_9B["hidden_size"] == 3584
    with pytest.raises(SystemExit):
        decoder_gpu.parse_args(["--quantization", "3bit"])
    assert "unknown variant" in capsys.readouterr().err
    assert encoder_gpu.parse_args([]).layers == 24 and encoder_gpu.model_config(24).hidden_size == 1024
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the refusal path is not reachable")
    assert decoder_gpu.main(["--layers", "2"]) == 2 and encoder_gpu.main(["--layers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("no CUDA GPU" in line for line in err)


@pytest.mark.parametrize("family", ["gemma2", "deberta"])
def test_matmul_params_count_the_real_layers(family):
    """The FLOP formula's weight count equals the Linear weights of a small model built from the same config."""
    if family == "gemma2":
        config = decoder_gpu.model_config(2)
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
    config = decoder_gpu.model_config(42)
    assert 8.0e9 < matmul_params(config) < 8.6e9  # Gemma-2-9B: ~9.2B weights, 0.92B of them the embedding
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("Tesla T4") == 65.0
    assert peak_tflops("Unknown GPU") is None and peak_tflops("Unknown GPU", 100.0) == 100.0
