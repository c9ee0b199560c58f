"""Decoder stage on CPU: the real 4-bit QLoRA path (bitsandbytes runs NF4 and 8-bit on CPU) with tiny
random Gemma-2 / Llama / Qwen2 checkpoints and tokenizers trained on the fly (tests/tiny_models.py).

The tokenizers put the BOS token in the chat template *and* add one in the post-processor, as
Llama-3.1 and Gemma-2 tokenizers do, so the one-BOS rule is tested for real.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from battles import label_matrix, make_folds, read_battles, swap_battles, swap_columns
from kernel.local_models import load_tokenizer
from models.decoder import DecoderParams, DecoderStage
from models.deep import quantization
from models.deep.inputs import FINAL_QUESTION, ChatEncoding, InputFrameError, encode_text, render, training_table
from models.stage import StageContext, average_logits, make_stage, predict_with_orders
from tests.conftest import shared_file
from tests.tiny_models import build_checkpoint, build_tokenizer

QUIET = StageContext(progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, several times so on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
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
        rows.append({"id": str(i), "prompt": [f"question {i}: capital of France?" + " more" * (i % 5)],
                     "response_a": [a], "response_b": [b], "winner_model_a": int(label == 0),
                     "winner_model_b": int(label == 1), "winner_tie": int(label == 2), "source": "toy"})
    return pd.DataFrame(rows)


FAST = {"max_length": 256, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "train_batch_size": 4, "grad_accum": 1,
        "learning_rate": 1e-2, "warmup_ratio": 0.0, "gradient_checkpointing": False, "logging_steps": 1,
        "head_init_std": 0.02, "save_steps": 0}


def make(model_dir, **overrides) -> DecoderStage:
    return DecoderStage({"model": str(model_dir), **FAST, **overrides}, QUIET)


class Recorder(TrainerCallback):
    """Dtypes of the trainable parameters while the Trainer runs."""

    def __init__(self):
        self.trainable_dtypes = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.trainable_dtypes |= {p.dtype for p in model.parameters() if p.requires_grad}


class RecordingStage(DecoderStage):
    def training_callbacks(self, has_eval):
        self.recorder = Recorder()
        return [self.recorder]


# ----------------------------------------------------------------------------- inputs
def test_bos_exactly_once_when_template_and_tokenizer_both_add_it(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    text = render(tokenizer, "hi", "a", "b")
    naive = tokenizer(text)["input_ids"]
    assert naive[:2] == [tokenizer.bos_token_id] * 2, "fixture must reproduce the Llama-3.1 double BOS"
    ids = encode_text(tokenizer, text)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_bos_added_once_when_template_lacks_it_and_none_without_bos(tmp_path):
    tokenizer = build_tokenizer(tmp_path, bos_in_template=False)
    ids = encode_text(tokenizer, render(tokenizer, "hi", "a", "b"))
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    tokenizer.bos_token = None  # Qwen2-style: no BOS token at all, so none is added
    assert tokenizer.convert_tokens_to_ids("<bos>") not in encode_text(tokenizer, render(tokenizer, "hi", "a", "b"))


def test_final_instruction_survives_a_huge_battle(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    encoder = ChatEncoding(tokenizer, max_length=400, prompt_share=0.2)
    huge = ["The capital of France is Paris. " * 400] * 3
    ids, types, truncation = encoder.encode_battle(["question one " * 300, "question two " * 300, "last question?"],
                                                   huge, huge)
    assert len(ids) <= 400 and types is None and all(truncation.cut.values())
    text = tokenizer.decode(ids)
    assert text.rstrip().endswith(FINAL_QUESTION + "<end_of_turn>\n<start_of_turn>model")
    assert "last question?" in text  # the most recent prompt turn is kept
    # the record: the fields' tokens fill what the frame leaves; older turns were dropped
    assert sum(truncation.tokens.values()) <= 400 - encoder.frame_tokens
    assert truncation.turns_dropped["prompt"] >= 1 and truncation.turns_dropped["response_a"] == 2
    with pytest.raises(InputFrameError, match=rf"^decoder: max_length=20 .* at least {encoder.frame_tokens + 24}$"):
        ChatEncoding(tokenizer, max_length=20, prompt_share=0.2)


def test_one_encoding_interface_and_its_truncation_record(gemma_dir, minilm_dir):
    """Both stages encode through ``encode(battles)``: ids per row (token types for the encoder) and a
    truncation record per row that sums up per field."""
    from models.encoder import EncoderStage

    battles = read_battles(shared_file("arena/train_sample.csv"))[0].iloc[:40]
    for stage in (make(gemma_dir, max_length=256), EncoderStage({"model": minilm_dir, "max_length": 128}, QUIET)):
        encoded = stage.encode(battles)
        assert len(encoded) == len(battles) == len(encoded.truncation)
        assert max(encoded.lengths) <= stage.params.max_length
        assert (encoded.token_type_ids is not None) == (stage.kind == "encoder")
        summary = encoded.truncation_summary()
        assert summary["battles"] == 40
        for field in ("prompt", "response_a", "response_b"):
            cut = [r.cut[field] for r in encoded.truncation]
            assert summary[field]["share_cut"] == pytest.approx(sum(cut) / 40)
            assert summary[field]["max_tokens"] <= stage.params.max_length
            # a field that was not cut lost no turn
            assert all(r.turns_dropped[field] == 0 for r in encoded.truncation if not r.cut[field])
        assert 0 < summary["response_a"]["share_cut"] < 1  # long and short replies in the sample
        assert encoded.truncation_summary(10)["battles"] == 10


# ----------------------------------------------------------------------------- quantisation selection
def test_quantization_config_on_cpu_and_fallback_when_bitsandbytes_cannot(monkeypatch, caplog):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    cpu = torch.device("cpu")
    cfg = quantization.quantization_config("4bit", cpu, torch.bfloat16)
    assert isinstance(cfg, BitsAndBytesConfig) and cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_use_double_quant and cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert cfg.bnb_4bit_quant_storage == torch.bfloat16 and cfg.llm_int8_skip_modules == ["score"]
    assert quantization.quantization_config("8bit", cpu, torch.float32).load_in_8bit
    assert quantization.quantization_config("none", cpu, torch.float32) is None
    assert quantization.optimizer_name(cpu) == "adamw_8bit"
    with pytest.raises(ValueError, match="quantization"):
        quantization.quantization_config("3bit", cpu, torch.float32)
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cuda"})  # a bitsandbytes without a CPU backend
    with caplog.at_level(logging.INFO, logger="models.deep.quantization"):
        assert quantization.quantization_config("4bit", cpu, torch.float32) is None
        assert quantization.optimizer_name(cpu) == "adamw_torch"
    assert "UNQUANTISED" in caplog.text and "has no cpu backend" in caplog.text


def test_bad_params_and_missing_model_dir_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model\\n  Field required"):
        DecoderStage({})
    with pytest.raises(ValueError, match="lora_rank"):
        DecoderStage({"model": "x", "lora_rank": 8})
    stage = DecoderStage({"model": str(tmp_path / "nope")})  # __init__ only stores params (sklearn style)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        stage.fit(toy_battles(2))
    assert isinstance(make_stage("decoder", {"model": "x"}, QUIET), DecoderStage)


# ----------------------------------------------------------------------------- the real QLoRA path
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_qlora_4bit_on_cpu(family, gemma_dir, llama_dir, tmp_path, monkeypatch):
    """Part 1 of the deep-stage issue: quantised layers, k-bit preparation, only LoRA and head train (in
    fp32 while the base computes in bf16), the loss goes down, predictions after training equal those
    after save -> load in 4-bit, every scoring pass runs without a KV cache."""
    import peft

    model_dir = {"gemma2": gemma_dir, "llama": llama_dir}[family]
    prepared, loaded = [], []
    real_prepare, real_load = peft.prepare_model_for_kbit_training, quantization.load_base_model
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda m, **kw: prepared.append(m) or real_prepare(m, **kw))

    def load_and_snapshot(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return model

    monkeypatch.setattr(quantization, "load_base_model", load_and_snapshot)
    battles = toy_battles(8)
    stage = RecordingStage({"model": str(model_dir), **FAST, "quantization": "4bit", "precision": "bf16",
                            "max_steps": 30, "train_batch_size": 8}, QUIET)
    stage.fit(battles)
    base = stage.model.get_base_model()
    assert quantization.quantized_layers(base) == {"Linear4bit": 14}  # 7 projections x 2 layers
    assert len(prepared) == 1 and base.config.use_cache is False
    assert stage.recorder.trainable_dtypes == {torch.float32}  # LoRA and head train in fp32 ...
    assert {p.dtype for n, p in base.named_parameters() if "norm" in n} == {torch.bfloat16}  # ... the base in bf16
    # Only LoRA weights and the head changed: every base weight (4-bit packed ones included) is as loaded.
    trained = dict(stage.model.named_parameters())
    lora_b = [v for k, v in trained.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: nonzero means trained
    compared = 0
    for name, before in loaded[0].items():
        if name.startswith("score"):
            continue
        key = "base_model.model." + name.replace(".weight", ".base_layer.weight") if any(
            t in name for t in ("_proj.weight",)) else "base_model.model." + name
        after = trained[key].detach()  # compared bit for bit: packed 4-bit bytes read as bf16 include NaNs
        assert after.dtype == before.dtype and torch.equal(after.contiguous().view(torch.uint8),
                                                            before.contiguous().view(torch.uint8)), name
        compared += 1
    assert compared == len(loaded[0]) - 1
    assert all(("lora_" in k) or ("modules_to_save" in k) for k, v in trained.items() if v.requires_grad)
    # It learned: loss well below the uniform start (log 3 = 1.099).
    logits = stage.predict_logits(battles)
    logp = torch.log_softmax(torch.as_tensor(logits), -1).numpy()
    assert float(-(label_matrix(battles) * logp).sum(1).mean()) < 0.9
    # No KV cache on scoring passes.
    seen = []
    hook = base.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)
    stage.predict_one_order(battles.iloc[:2])
    hook.remove()
    assert seen and set(seen) == {False}
    # Save -> load in 4-bit: same parameter dtypes, same logits (tolerance 1e-5: the same kernels run).
    stage.save(tmp_path / "stage")
    files = sorted(p.name for p in (tmp_path / "stage").iterdir())
    assert "adapter_model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    reloaded = DecoderStage.load(tmp_path / "stage", QUIET)
    assert quantization.quantized_layers(reloaded.model) == {"Linear4bit": 14}
    dtypes = lambda m: {n: p.dtype for n, p in m.named_parameters()}  # noqa: E731
    assert dtypes(reloaded.model) == dtypes(stage.model)
    np.testing.assert_allclose(reloaded.predict_logits(battles), logits, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_gradient_accumulation_keeps_the_loss_scale(family, gemma_dir, llama_dir):
    """One optimizer step over the same 4 battles: batch 4 x accumulation 1 and batch 2 x accumulation 2
    log the same loss and gradient norm (a custom loss the Trainer does not divide by the accumulation
    steps would double both)."""
    model_dir = {"gemma2": gemma_dir, "llama": llama_dir}[family]
    battles = toy_battles(4)
    first = {}
    for batch, accum in ((4, 1), (2, 2)):
        stage = make(model_dir, quantization="4bit", max_steps=1, train_batch_size=batch, grad_accum=accum)
        first[accum] = next(e for e in stage.fit(battles).log_history if "loss" in e)
    assert first[2]["loss"] == pytest.approx(first[1]["loss"], rel=1e-3)
    assert first[2]["grad_norm"] == pytest.approx(first[1]["grad_norm"], rel=1e-3)


def test_8bit_trains_and_round_trips(gemma_dir, tmp_path):
    stage = make(gemma_dir, quantization="8bit", max_steps=2)
    battles = toy_battles(4)
    stage.fit(battles)
    assert quantization.quantized_layers(stage.model) == {"Linear8bitLt": 14}
    logits = stage.predict_logits(battles)
    stage.save(tmp_path / "s8")
    np.testing.assert_allclose(DecoderStage.load(tmp_path / "s8", QUIET).predict_logits(battles), logits, atol=1e-5)


def test_swap_tta_exactly_equivariant(gemma_dir):
    stage = make(gemma_dir, quantization="4bit", max_steps=2)
    battles = toy_battles(6)
    stage.fit(battles)
    straight = stage.predict_logits(battles)
    np.testing.assert_allclose(stage.predict_logits(swap_battles(battles)), swap_columns(straight), atol=1e-6)
    one_order = stage.predict_one_order(battles)
    assert not np.allclose(stage.predict_one_order(swap_battles(battles)), swap_columns(one_order), atol=1e-6)
    combined, first, second = predict_with_orders(stage, battles)  # single orders kept for the bias check
    assert first is not None and second is not None
    np.testing.assert_allclose(combined, straight, atol=1e-6)


def test_soft_labels_weights_and_swap_augmentation_train(gemma_dir):
    battles = toy_battles(6)
    battles["soft_a"] = [0.7, np.nan, 0.1, np.nan, 0.3, 0.3]
    battles["soft_b"] = [0.2, np.nan, 0.1, np.nan, 0.3, 0.5]
    battles["soft_tie"] = [0.1, np.nan, 0.8, np.nan, 0.4, 0.2]
    battles["weight"] = [1.0, 2.0, 0.5, 1.0, 1.0, 0.0]
    table = training_table(battles, swap_augment=True)
    assert len(table) == 12
    np.testing.assert_array_equal(table["soft_a"].to_numpy()[6:], battles["soft_b"].to_numpy())
    np.testing.assert_array_equal(table["winner_model_b"].to_numpy()[6:], battles["winner_model_a"].to_numpy())
    stage = make(gemma_dir, max_steps=2, swap_augment=True, gradient_checkpointing=True, quantization="4bit")
    stage.fit(battles)
    assert stage.model.get_base_model().is_activation_checkpointing
    assert np.isfinite(stage.predict_logits(battles)).all()


def test_lora_layers_to_transform_and_small_head_init(gemma_dir):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(gemma_dir)
    params = DecoderParams(model=str(gemma_dir), lora_r=4, layers_to_transform=[1], gradient_checkpointing=False)
    model = quantization.add_lora(base, params, seed=0)
    lora_layers = {n.split("layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora_layers == {"1"}
    lora_kinds = {n.split(".lora_A")[0].rsplit(".", 1)[1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert lora_kinds == set(DecoderParams.model_fields["target_modules"].default)
    head = next(v for n, v in model.named_parameters() if "score" in n and "modules_to_save" in n)
    assert head.requires_grad and head.dtype == torch.float32 and 0.5e-3 < float(head.detach().std()) < 2e-3


def test_qwen2_without_bos_trains_and_predicts(qwen_dir):
    stage = make(qwen_dir, max_steps=2, quantization="4bit")
    battles = toy_battles(4)
    bos = stage.encode(battles).input_ids
    assert stage.tokenizer.bos_token_id is None
    assert all(stage.tokenizer.convert_tokens_to_ids("<bos>") not in ids for ids in bos)
    stage.fit(battles)
    assert np.isfinite(stage.predict_logits(battles)).all()


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    """Llama-3 checkpoints ship without a pad token: the stage pads with EOS."""
    build_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text("{}")
    tokenizer = load_tokenizer(tmp_path, "decoder", pad_with_eos=True)
    assert tokenizer.pad_token == "<eos>" and tokenizer.padding_side == "right"


# ----------------------------------------------------------------------------- folds on one base model
def test_folds_share_one_base_model(gemma_dir, tmp_path, monkeypatch):
    """Cross-fitting refits one stage object per fold on the base model already in memory (a fold equals
    the same fold trained in a fresh stage); load_folds loads the base once for every fold's adapter and
    averages the folds exactly like loading and predicting each fold on its own."""
    battles = read_battles(shared_file("arena/train_sample.csv"))[0].iloc[:36].reset_index(drop=True)
    train, test = battles.iloc[:30].reset_index(drop=True), battles.iloc[30:].reset_index(drop=True)
    folds = make_folds(train, n_folds=3, seed=0)
    loads = []
    real_load = quantization.load_base_model
    monkeypatch.setattr(quantization, "load_base_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    stage = make(gemma_dir, quantization="4bit", max_steps=2, max_length=192, evaluate_valid=True)
    per_fold = []
    for k in range(2):
        stage.fit(train[folds != k], train[folds == k])
        assert np.isfinite(stage.valid_log_loss_)
        stage.save(tmp_path / f"fold{k}")
        per_fold.append(stage.predict_logits(test))
    assert len(loads) == 1  # two folds trained, one base model loaded
    fresh = make(gemma_dir, quantization="4bit", max_steps=2, max_length=192).fit(train[folds != 1])
    np.testing.assert_allclose(fresh.predict_logits(test), per_fold[1], atol=1e-5)
    assert not np.allclose(per_fold[0], per_fold[1])  # two folds, two different models
    loads.clear()
    together = DecoderStage.load_folds([tmp_path / "fold0", tmp_path / "fold1"], QUIET).predict_logits(test)
    assert len(loads) == 1
    np.testing.assert_allclose(together, average_logits(per_fold), atol=1e-5)


# ----------------------------------------------------------------------------- through run.py
@pytest.fixture(scope="module")
def decoder_run(gemma_dir, tmp_path_factory):
    """``run.py train decoder --model DIR --set ...quantization=4bit`` on 45 battles of the sample, 3 folds."""
    import run

    root = tmp_path_factory.mktemp("decoder-run")
    frame = pd.read_csv(shared_file("arena/train_sample.csv"))
    frame.iloc[:45].to_csv(root / "train.csv", index=False)
    frame.iloc[45:51][["id", "prompt", "response_a", "response_b"]].to_csv(root / "test.csv", index=False)
    params = {"quantization": "4bit", "max_length": 192, "max_steps": 1, "train_batch_size": 4, "grad_accum": 1,
              "lora_r": 4, "lora_alpha": 8, "gradient_checkpointing": False}
    sets = [a for k, v in params.items() for a in ("--set", f"stages.decoder.params.{k}={json.dumps(v)}")]
    logger = logging.getLogger("models.deep.quantization")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        code = run.main(["train", "decoder", "--model", str(gemma_dir), "--train", str(root / "train.csv"),
                         "--test", str(root / "test.csv"), "--out", str(root / "run"), "--quiet",
                         "--set", "n_folds=3", *sets])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert code == 0
    return root, [r.getMessage() for r in records]


def test_run_py_train_decoder_4bit_end_to_end(decoder_run):
    root, messages = decoder_run
    assert any("Linear4bit layers" in m for m in messages), messages  # the log shows the 4-bit layers in use
    stage_dir = root / "run" / "stages" / "decoder"
    oof = pd.read_csv(stage_dir / "oof_logits.csv")
    assert len(oof) == 45 and np.isfinite(oof[["logit_a", "logit_b", "logit_tie"]].to_numpy()).all()
    for k in range(3):
        assert (stage_dir / f"fold{k}" / "model" / "adapter_model.safetensors").is_file()
        assert not (stage_dir / f"fold{k}" / "checkpoints").exists()  # cleaned when the fold finished
    assert "decoder" in (root / "run" / "report.html").read_text()


def test_predict_of_a_3_fold_run_loads_the_base_model_once(decoder_run, monkeypatch):
    import run

    root, _ = decoder_run
    loads = []
    real_load = quantization.load_base_model
    monkeypatch.setattr(quantization, "load_base_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    code = run.main(["predict", "--run", str(root / "run"), "--test", str(root / "test.csv"),
                     "--out", str(root / "preds.csv"), "--quiet"])
    assert code == 0 and len(loads) == 1
    preds = pd.read_csv(root / "preds.csv")
    submission = pd.read_csv(root / "run" / "submission.csv")
    pd.testing.assert_frame_equal(preds.sort_values("id").reset_index(drop=True),
                                  submission.sort_values("id").reset_index(drop=True), atol=1e-6)


def test_score_explains_a_decoder_run(decoder_run):
    """``run.py score``'s explanation of a decoder run: each fold adapter gives both A/B orders and the
    truncation record; the probabilities are predict_proba's."""
    from pipeline.explain import explain
    from pipeline.predict import Predictor

    root, _ = decoder_run
    predictor = Predictor.load(root / "run", progress=False)
    battles = read_battles(root / "test.csv", require_labels=False)[0].iloc[:2]
    explanations = explain(predictor, battles)
    np.testing.assert_array_equal([e.probs for e in explanations], predictor.predict_proba(battles))
    [decoder] = explanations[0].stages
    assert decoder.orders is not None and decoder.truncation is not None
    assert sum(decoder.truncation.tokens.values()) < 192
