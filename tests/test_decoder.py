"""Decoder stage on CPU with tiny random Gemma-2 / Llama checkpoints and tokenizers trained on the fly.

The checkpoints are built from configs (2 layers, hidden 32) and saved to a temp directory, so the
stage loads them exactly as it loads a real local checkpoint. Their tokenizers put the BOS token in
the chat template *and* add one in the post-processor, as Llama-3.1 and Gemma-2 tokenizers do.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from battles import make_folds, read_battles, swap_battles, swap_columns
from models import decoder as dec
from models.decoder import DecoderStage, length_batches, preference_loss, shard_indices
from models.decoder_inputs import FINAL_QUESTION, BattleEncoder, encode_text, render
from models.stage import StageContext, make_stage, predict_with_orders
from models.tiny_checkpoints import build_checkpoint, build_tokenizer
from tests.conftest import shared_file

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, several times so on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny-gemma2"), "gemma2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


def toy_battles(n: int = 12, seed: int = 0) -> pd.DataFrame:
    """Battles whose label is learnable: the winning reply says 'Paris', the loser refuses."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(0, 3))
        good, bad = "The capital of France is Paris.", "I cannot help with that request."
        a, b = (good, bad) if label == 0 else (bad, good) if label == 1 else (good, good)
        rows.append({"id": str(i), "prompt": [f"question {i}: capital of France?"], "response_a": [a],
                     "response_b": [b], "winner_model_a": int(label == 0), "winner_model_b": int(label == 1),
                     "winner_tie": int(label == 2), "source": "toy"})
    return pd.DataFrame(rows)


FAST = {"max_length": 256, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "train_batch_size": 4, "grad_accum": 1,
        "learning_rate": 1e-2, "warmup_ratio": 0.0, "gradient_checkpointing": False, "logging_steps": 1,
        "quantization": "none", "head_init_std": 0.02}


def make(model_dir, **overrides) -> DecoderStage:
    return DecoderStage({"model": str(model_dir), **FAST, **overrides}, StageContext(progress=False))


# ----------------------------------------------------------------------------- inputs
def test_bos_exactly_once_when_template_and_tokenizer_both_add_it(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    text = render(tokenizer, "hi", "a", "b")
    naive = tokenizer(text)["input_ids"]
    assert naive[:2] == [tokenizer.bos_token_id] * 2, "fixture must reproduce the Llama-3.1 double BOS"
    ids = encode_text(tokenizer, text)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_bos_added_once_when_template_lacks_it(tmp_path):
    tokenizer = build_tokenizer(tmp_path, bos_in_template=False)
    ids = encode_text(tokenizer, render(tokenizer, "hi", "a", "b"))
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_no_bos_for_tokenizers_without_one(tmp_path):
    """Qwen2-style: no BOS token at all, so none is added."""
    tokenizer = build_tokenizer(tmp_path, bos_in_template=False)
    tokenizer.bos_token = None
    ids = encode_text(tokenizer, render(tokenizer, "hi", "a", "b"))
    assert tokenizer.convert_tokens_to_ids("<bos>") not in ids


def test_final_instruction_survives_a_huge_battle(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    encoder = BattleEncoder(tokenizer, max_length=400)
    huge = ["The capital of France is Paris. " * 400] * 3
    encoded = encoder.encode(["question one " * 300, "question two " * 300, "last question?"], huge, huge)
    assert len(encoded.input_ids) <= 400
    assert all(encoded.truncated.values())
    text = tokenizer.decode(encoded.input_ids)
    assert text.rstrip().endswith(FINAL_QUESTION + "<end_of_turn>\n<start_of_turn>model")
    assert "last question?" in text  # the most recent prompt turn is kept
    with pytest.raises(ValueError, match="max_length=20"):
        BattleEncoder(tokenizer, max_length=20)


# ----------------------------------------------------------------------------- quantisation selection
def test_4bit_config_only_with_cuda(monkeypatch, caplog):
    from transformers import BitsAndBytesConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = dec.quantization_config("4bit")
    assert isinstance(cfg, BitsAndBytesConfig) and cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_use_double_quant and cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert "score" in cfg.llm_int8_skip_modules
    assert dec.quantization_config("8bit").load_in_8bit
    assert dec.quantization_config("none") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="models.decoder"):
        assert dec.quantization_config("4bit") is None
    assert "UNQUANTISED" in caplog.text and "CUDA is not available" in caplog.text
    with pytest.raises(ValueError, match="quantization"):
        dec.quantization_config("3bit")


def test_missing_model_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        DecoderStage({"model": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="model\\n  Field required"):
        DecoderStage({})


# ----------------------------------------------------------------------------- loss
def test_loss_ce_for_hard_rows_kl_for_soft_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    target = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    hard = torch.tensor([False, False, False, False])
    ones = torch.ones(4)
    ce_rows = -(target * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(preference_loss(logits[:2], target[:2], hard[:2], ones[:2]),
                          torch.nn.functional.cross_entropy(logits[:2], target[:2].argmax(-1)))
    soft = torch.tensor([False, False, True, True])
    entropy = -(target[2:] * target[2:].log()).sum(-1)
    expected = torch.cat([ce_rows[:2], ce_rows[2:] - entropy]).mean()
    assert torch.allclose(preference_loss(logits, target, soft, ones), expected)
    assert not torch.allclose(preference_loss(logits, target, soft, ones), preference_loss(logits, target, hard, ones))
    # KL is zero when the model reproduces the teacher; CE is not (it keeps the teacher's entropy).
    perfect = target[2:].log()
    assert preference_loss(perfect, target[2:], soft[2:], ones[2:]).abs() < 1e-6
    assert preference_loss(perfect, target[2:], hard[2:], ones[2:]) > 0.5
    # Weights: a zero-weight row does not count.
    w = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.allclose(preference_loss(logits, target, soft, w),
                          (expected * 4 - (ce_rows[1])) / 3)


def test_soft_rows_selected_per_row():
    battles = toy_battles(4)
    battles["soft_a"] = [0.7, np.nan, 0.1, np.nan]
    battles["soft_b"] = [0.2, np.nan, 0.1, np.nan]
    battles["soft_tie"] = [0.1, np.nan, 0.8, np.nan]
    battles["weight"] = [1.0, 2.0, np.nan, 0.5]
    assert dec.soft_mask(battles).tolist() == [True, False, True, False]
    assert dec.row_weights(battles).tolist() == [1.0, 2.0, 1.0, 0.5]


# ----------------------------------------------------------------------------- batching
def test_length_batches_and_shards_cover_every_row_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=101)
    batches = length_batches(lengths, max_tokens=1000, max_size=8)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(101))
    for b in batches:
        assert len(b) <= 8 and (len(b) == 1 or len(b) * lengths[b].max() <= 1000)
    assert lengths[batches[0]].max() == lengths.max()  # longest first: OOM shows up at once
    shards = shard_indices(lengths, 3)
    assert sorted(np.concatenate(shards).tolist()) == list(range(101))
    loads = [lengths[s].sum() for s in shards]
    assert max(loads) - min(loads) <= lengths.max()
    assert all(np.all(np.diff(s) > 0) for s in shards)


# ----------------------------------------------------------------------------- training and persistence
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_fit_reduces_loss_trains_only_lora_and_head_and_round_trips(family, gemma_dir, llama_dir, tmp_path):
    model_dir = {"gemma2": gemma_dir, "llama": llama_dir}[family]
    battles = toy_battles(8)
    stage = make(model_dir, max_steps=30, train_batch_size=8)  # full batch: the 8 battles are memorised
    # Reference: base weights and loss before training, read from the saved checkpoint.
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    stage.fit(battles)
    tuned = stage.model
    after = {k: v for k, v in tuned.named_parameters()}
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: nonzero means trained
    head = {k: v for k, v in after.items() if "score" in k}
    trained_head = next(v for k, v in head.items() if "modules_to_save" in k)
    frozen_head = next(v for k, v in head.items() if "original_module" in k)
    assert not torch.equal(trained_head, frozen_head) and not frozen_head.requires_grad
    trainable = {k for k, v in after.items() if v.requires_grad}
    assert all(("lora_" in k) or ("score" in k and "modules_to_save" in k) for k in trainable), trainable
    # Base weights identical: merge nothing, compare the wrapped base layers to the checkpoint.
    compared = 0
    for name, value in tuned.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" in key or "score" in key:
            continue
        assert torch.equal(value, base_state[key]), f"base weight {key} changed"
        compared += 1
    assert compared == len([k for k in base_state if "score" not in k])
    # Loss went well below the uniform start (log 3 = 1.099).
    logits = stage.predict_logits(battles)
    logp = torch.log_softmax(torch.as_tensor(logits), -1).numpy()
    from battles import label_matrix

    loss_after = float(-(label_matrix(battles) * logp).sum(1).mean())
    assert loss_after < 0.9, loss_after
    # Save / load round trip: identical logits; only safetensors, no pickles.
    stage.save(tmp_path / "stage")
    files = sorted(p.name for p in (tmp_path / "stage").iterdir())
    assert "adapter_model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = DecoderStage.load(tmp_path / "stage", StageContext(progress=False))
    np.testing.assert_allclose(loaded.predict_logits(battles), logits, atol=1e-5)


def test_swap_tta_exactly_equivariant(gemma_dir):
    stage = make(gemma_dir, max_steps=2)
    battles = toy_battles(6)
    stage.fit(battles)
    straight = stage.predict_logits(battles)
    swapped = stage.predict_logits(swap_battles(battles))
    np.testing.assert_allclose(swapped, swap_columns(straight), atol=1e-6)
    one_order = stage.predict_one_order(battles)
    assert not np.allclose(stage.predict_one_order(swap_battles(battles)), swap_columns(one_order), atol=1e-6)
    combined, first, second = predict_with_orders(stage, battles)  # single orders kept for the bias check
    assert first is not None and second is not None
    np.testing.assert_allclose(combined, straight, atol=1e-6)


def test_soft_labels_and_swap_augmentation_train(gemma_dir):
    battles = toy_battles(6)
    battles["soft_a"] = [0.7, np.nan, 0.1, np.nan, 0.3, 0.3]
    battles["soft_b"] = [0.2, np.nan, 0.1, np.nan, 0.3, 0.5]
    battles["soft_tie"] = [0.1, np.nan, 0.8, np.nan, 0.4, 0.2]
    battles["weight"] = [1.0, 2.0, 0.5, 1.0, 1.0, 0.0]
    stage = make(gemma_dir, max_steps=2, swap_augment=True, gradient_checkpointing=True)
    table = stage.training_table(battles)
    assert len(table) == 12
    np.testing.assert_array_equal(table["soft_a"].to_numpy()[6:], battles["soft_b"].to_numpy())
    np.testing.assert_array_equal(table["winner_model_b"].to_numpy()[6:], battles["winner_model_a"].to_numpy())
    rows = stage._train_rows(table)
    assert [r["soft"] for r in rows[:6]] == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert rows[6]["labels"] == pytest.approx([0.2, 0.7, 0.1])
    stage.fit(battles)
    assert stage.model.get_base_model().is_activation_checkpointing
    assert np.isfinite(stage.predict_logits(battles)).all()


def test_lora_layers_to_transform_and_small_head_init(gemma_dir):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(gemma_dir)
    model = dec.add_lora(base, dec.DecoderParams(model=str(gemma_dir), lora_r=4, layers_to_transform=[1],
                                                  gradient_checkpointing=False))
    lora_layers = {n.split("layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora_layers == {"1"}
    lora_kinds = {n.split(".lora_A")[0].rsplit(".", 1)[1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora_kinds == set(dec.DecoderParams.model_fields["target_modules"].default)
    head = next(v for n, v in model.named_parameters() if "score" in n and "modules_to_save" in n)
    assert head.requires_grad and 0.5e-3 < float(head.detach().std()) < 2e-3


def test_qwen2_without_bos_trains_and_predicts(qwen_dir):
    stage = make(qwen_dir, max_steps=2)
    battles = toy_battles(4)
    bos = stage.tokenizer.convert_tokens_to_ids("<bos>")
    assert stage.tokenizer.bos_token_id is None and all(bos not in ids for ids in stage.encode(battles))
    stage.fit(battles)
    assert np.isfinite(stage.predict_logits(battles)).all()


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    """Llama-3 checkpoints ship without a pad token: the stage pads with EOS."""
    build_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text("{}")
    tokenizer = dec.load_tokenizer(tmp_path)
    assert tokenizer.pad_token == "<eos>" and tokenizer.padding_side == "right"


def test_stage_registry_and_unknown_params(gemma_dir):
    stage = make_stage("decoder", {"model": str(gemma_dir), "quantization": "none"}, StageContext(progress=False))
    assert isinstance(stage, DecoderStage)
    with pytest.raises(ValueError, match="lora_rank"):
        DecoderStage({"model": str(gemma_dir), "lora_rank": 8})


# ----------------------------------------------------------------------------- GPU benchmark script
def _benchmark_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decoder_gpu.py"
    spec = importlib.util.spec_from_file_location("decoder_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_parses_arguments_and_refuses_without_cuda(monkeypatch, capsys):
    bench = _benchmark_module()
    args = bench.parse_args(["--layers", "4", "--quantization", "4bit, none", "--max-length", "1024"])
    assert args.variants == ["4bit", "none"] and args.layers == 4 and args.max_length == 1024
    assert bench.parse_args([]).layers == 42 and bench.GEMMA2_9B["hidden_size"] == 3584
    with pytest.raises(SystemExit):
        bench.parse_args(["--quantization", "3bit"])
    assert "unknown variant" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--layers", "2"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------- cross-fitting on real battles
def test_cross_fit_on_real_battles_gives_oof_and_averaged_test_logits(gemma_dir, tmp_path):
    """What the pipeline does with a stage: fit per fold, OOF logits for train, fold-averaged test logits."""
    from models.stage import average_logits

    battles = read_battles(shared_file("arena/train_sample.csv"))[0].iloc[:40].reset_index(drop=True)
    train, test = battles.iloc[:30].reset_index(drop=True), battles.iloc[30:].reset_index(drop=True)
    folds = make_folds(train, n_folds=2, seed=0)
    oof, test_per_fold = np.full((len(train), 3), np.nan), []
    for k in range(2):
        stage = make(gemma_dir, max_steps=2, max_length=192, evaluate_valid=True)
        stage.fit(train[folds != k], train[folds == k])
        assert np.isfinite(stage.valid_log_loss_)
        stage.save(tmp_path / f"fold{k}")
        oof[folds == k] = stage.predict_logits(train[folds == k])
        reloaded = DecoderStage.load(tmp_path / f"fold{k}", StageContext(progress=False))
        test_per_fold.append(reloaded.predict_logits(test))
    assert np.isfinite(oof).all()
    combined = average_logits(test_per_fold)
    one_base = DecoderStage.predict_folds([tmp_path / "fold0", tmp_path / "fold1"], test, StageContext(progress=False))
    np.testing.assert_allclose(one_base, combined, atol=1e-5)
    assert combined.shape == (len(test), 3) and np.isfinite(combined).all()
    assert not np.allclose(test_per_fold[0], test_per_fold[1])  # two folds, two different models


def test_data_parallel_predict_reassembles_shards_in_order(gemma_dir):
    """Two worker processes (CPU stands in for two GPUs) give the same logits, in the same row order."""
    stage = make(gemma_dir, max_steps=2)
    battles = toy_battles(7, seed=3)
    battles["response_a"] = [[r[0] * (i + 1)] for i, r in enumerate(battles["response_a"])]  # varied lengths
    stage.fit(battles)
    np.testing.assert_allclose(stage.predict_data_parallel(battles, ["cpu", "cpu"]), stage.predict_logits(battles),
                               atol=1e-5)


def test_run_py_train_decoder_end_to_end(gemma_dir, tmp_path):
    """``run.py train decoder --model DIR`` on a slice of the sample: OOF logits reach the stacker."""
    import run

    pd.read_csv(shared_file("arena/train_sample.csv")).iloc[:40].to_csv(tmp_path / "train.csv", index=False)
    params = {"max_length": 192, "max_steps": 1, "train_batch_size": 4, "grad_accum": 1, "lora_r": 4, "lora_alpha": 8,
              "gradient_checkpointing": False}
    sets = [arg for key, value in params.items() for arg in ("--set", f"stages.decoder.params.{key}={json.dumps(value)}")]
    code = run.main(["train", "decoder", "--model", str(gemma_dir), "--train", str(tmp_path / "train.csv"),
                     "--out", str(tmp_path / "run"), "--quiet", "--set", "n_folds=3", *sets])
    assert code == 0
    stage_dir = tmp_path / "run" / "stages" / "decoder"
    oof = pd.read_csv(stage_dir / "oof_logits.csv")
    assert len(oof) == 40 and np.isfinite(oof[["logit_a", "logit_b", "logit_tie"]].to_numpy()).all()
    assert (stage_dir / "fold1" / "model" / "adapter_model.safetensors").is_file()
    assert "decoder" in (tmp_path / "run" / "report.html").read_text()
