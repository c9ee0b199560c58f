"""The GPU path's defects, shown on CPU: one device per process, one weight layout in training and at
prediction, each rank on its own GPU, memory released after a fold, Gemma-2's attention choice, and
the fp16 rule (models/deep/precision.py) on a tiny Gemma-2 whose activations overflow fp16."""
from __future__ import annotations

import gc
import logging
import weakref

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from kernel.local_models import default_device
from models.deep import quantization
from models.deep.precision import Precision
from models.deep.training import PreferenceTrainer, training_arguments
from models.stage import StageContext, make_stage
from tests.test_decoder import FAST, gemma_dir, llama_dir, toy_battles  # noqa: F401  (tiny-model fixtures)

QUIET = StageContext(progress=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- one process, one GPU
class _Rows(torch.nn.Module):
    """A stand-in model that records how many rows each training batch has."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 3)
        self.rows = []

    def forward(self, input_ids, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        self.rows.append(len(input_ids))
        return SequenceClassifierOutput(logits=self.w(input_ids.float()))


def test_one_process_seeing_two_gpus_trains_per_device_rows(monkeypatch, tmp_path, caplog):
    """Kaggle's 2x T4 with plain ``python run.py``: the Trainer would take n_gpu x the per-device batch
    (GPU 0 gets 4 x 2048 tokens, GPU 1 idles, half the optimizer steps). Simulated device count: the
    arguments are pinned to one device, with a message pointing to accelerate launch."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    params = make_stage("decoder", {"model": "x", **FAST, "train_batch_size": 2, "max_steps": 3}).params
    with caplog.at_level(logging.WARNING, logger="models.deep.training"):
        args = training_arguments(params, Precision("fp32", "test"), torch.device("cuda", 0), "adamw_torch", 0,
                                  progress=False, output_dir=str(tmp_path), dataloader_pin_memory=False)
    assert args.n_gpu == 1 and args.train_batch_size == 2
    assert "sees 2 GPUs" in caplog.text and "accelerate launch --num_processes 2" in caplog.text
    model = _Rows()
    rows = [{"input_ids": [i, 1], "labels": [1.0, 0.0, 0.0], "weight": 1.0} for i in range(8)]
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert model.rows == [2, 2, 2] and trainer.state.global_step == 3  # the configured batch and steps


# ----------------------------------------------------------------------------- one weight layout
class _DtypeTrace(TrainerCallback):
    """Dtypes of the embedding output, every decoder layer's output and the frozen weights, recorded by
    forward hooks during the Trainer's training steps."""

    def __init__(self):
        self.outputs, self.weights, self.handles = {}, {}, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model()

        def record(name):
            return lambda m, a, out: self.outputs.setdefault(name, set()).add((out[0] if isinstance(out, tuple)
                                                                                else out).dtype)

        self.handles.append(base.get_input_embeddings().register_forward_hook(record("embedding")))
        for i, layer in enumerate(base.model.layers):
            self.handles.append(layer.register_forward_hook(record(f"layer{i}")))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for name, p in model.named_parameters():
            if not p.requires_grad and p.is_floating_point():
                self.weights.setdefault(name.split(".")[-2], set()).add(p.dtype)

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_training_runs_the_residual_stream_in_the_compute_dtype(family, gemma_dir, llama_dir):  # noqa: F811
    """bf16 compute, 4-bit: peft's k-bit preparation upcasts the frozen embedding (and norms) to fp32, and
    bitsandbytes' layers return their input's dtype, so the whole residual stream ran in fp32 while
    training (and in bf16 at prediction). Now: embedding weight and output, every layer's output in bf16."""
    from models.decoder import DecoderStage

    class Traced(DecoderStage):
        def training_callbacks(self, has_eval):
            self.trace = _DtypeTrace()
            return [self.trace]

    model_dir = {"gemma2": gemma_dir, "llama": llama_dir}[family]
    stage = Traced({"model": str(model_dir), **FAST, "quantization": "4bit", "precision": "bf16", "max_steps": 2,
                    "gradient_checkpointing": True}, QUIET)
    stage.fit(toy_battles(8))
    outputs = stage.trace.outputs
    assert outputs["embedding"] == {torch.bfloat16}
    assert {k for k in outputs if k.startswith("layer")} == {"layer0", "layer1"}
    assert all(v == {torch.bfloat16} for v in outputs.values()), outputs
    assert stage.trace.weights["embed_tokens"] == {torch.bfloat16}
    assert all(v == {torch.bfloat16} for k, v in stage.trace.weights.items() if "norm" in k), stage.trace.weights


# ----------------------------------------------------------------------------- each rank on its own GPU
def test_each_rank_gets_and_selects_its_own_gpu(monkeypatch):
    """FSDP/DDP: rank 1 must load onto GPU 1 and make it the current device before anything touches
    CUDA (else contexts and FSDP's weights land on GPU 0)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")


# ----------------------------------------------------------------------------- memory after a fold
def test_a_finished_fold_leaves_nothing_in_bitsandbytes_registries(gemma_dir):  # noqa: F811
    """The Trainer registers the embedding with bitsandbytes' global 8-bit optimizer manager, which kept
    it (and so the model) alive after the stage was gone; now nothing of the model stays there."""
    import bitsandbytes as bnb

    manager = bnb.optim.GlobalOptimManager.get_instance()
    stage = make_stage("decoder", {"model": str(gemma_dir), **FAST, "quantization": "4bit", "max_steps": 2}, QUIET)
    stage.fit(toy_battles(4))
    base = stage.model.get_base_model()
    embedding = weakref.ref(base.get_input_embeddings().weight)
    ids = {id(p) for p in stage.model.parameters()}
    modules = {id(m) for m in stage.model.modules()}
    assert not any(id(m) in modules for m, _, _ in manager.module_weight_config_triple)
    assert not ids & set(manager.pid2config)
    del stage, base
    gc.collect()
    assert embedding() is None  # no reference to the model's weights is left anywhere


def test_paged_optimizer_state_is_unlisted_and_freed(monkeypatch):
    """A paged optimizer's state (CUDA managed memory, listed forever in GlobalPageManager) is unlisted
    and handed to cudaFree when training ends; simulated here with a CPU tensor marked paged."""
    import bitsandbytes as bnb

    from models.deep import training

    freed = []
    monkeypatch.setattr(training, "_free_managed", freed.extend)
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([p], lr=0.1)
    state = torch.zeros(4)
    state.is_paged = True
    optimizer.state[p] = {"state1": state, "step": torch.tensor(1.0)}
    pages = bnb.functional.GlobalPageManager.get_instance()
    other = torch.zeros(2)
    pages.paged_tensors += [state, other]
    try:
        training.release_optimizer(optimizer, torch.nn.Linear(1, 1))
        assert freed == [state.data_ptr()] and not optimizer.state
        assert not any(t is state for t in pages.paged_tensors) and any(t is other for t in pages.paged_tensors)
    finally:
        pages.paged_tensors = [t for t in pages.paged_tensors if t is not other and t is not state]
    assert training._cuda_runtime() is None or torch.cuda.is_available()  # no CUDA runtime in a CPU process


# ----------------------------------------------------------------------------- Gemma-2 attention
def test_attention_choice(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert quantization.choose_attention("gemma2", None, cpu) == "eager"
    assert quantization.choose_attention("llama", None, cpu) is None  # transformers' choice (SDPA)
    assert quantization.choose_attention("gemma2", "flex_attention", cpu) == "flex_attention"
    with pytest.raises(ValueError, match="sdpa cannot soft-cap"):
        quantization.choose_attention("gemma2", "sdpa", gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4
    assert quantization.choose_attention("gemma2", None, gpu) == "eager"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
    monkeypatch.setattr(quantization, "_flash_attention_version", lambda: None)
    assert quantization.choose_attention("gemma2", None, gpu) == "flex_attention"
    monkeypatch.setattr(quantization, "_flash_attention_version", lambda: (2, 5))
    assert quantization.choose_attention("gemma2", None, gpu) == "flex_attention"  # no soft-capping before 2.6


def test_flex_attention_matches_eager_on_gemma2(gemma_dir):  # noqa: F811
    """flex_attention keeps Gemma-2's soft-capping: the same logits as eager (fp32, CPU, padded rows)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    ids = torch.randint(10, 300, (2, 48))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    logits = {}
    for attention in ("eager", "flex_attention"):
        model = AutoModelForSequenceClassification.from_pretrained(gemma_dir, num_labels=3, dtype=torch.float32,
                                                                   attn_implementation=attention).eval()
        model.config.attn_logit_softcapping = 5.0  # small enough that the cap changes the scores
        with torch.no_grad():
            logits[attention] = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logits["eager"], logits["flex_attention"], atol=1e-5)


# ----------------------------------------------------------------------------- the fp16 rule
def _overflowing_gemma(gemma_dir, tmp_path):  # noqa: F811
    """The tiny Gemma-2 with its post-norms scaled so the residual stream passes fp16's 65,504."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(gemma_dir, num_labels=3, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.fill_(3e4)
            layer.post_feedforward_layernorm.weight.fill_(3e4)
        torch.manual_seed(1)
        model.score.weight.normal_(0, 0.05)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(gemma_dir).save_pretrained(tmp_path)
    return tmp_path, model


@pytest.mark.parametrize("quant", ["4bit", "none"])
def test_fp16_gemma2_with_overflowing_activations_stays_finite(quant, gemma_dir, tmp_path):  # noqa: F811
    """The decoder's loading code in fp16 on a Gemma-2 whose residual stream reaches ~1.7e5: logits finite
    and within 5% (+-0.01) of the same weights computed in fp32; the plain fp16 model (no rule) gives NaN."""
    from transformers import AutoModelForSequenceClassification

    path, reference = _overflowing_gemma(gemma_dir, tmp_path)
    torch.manual_seed(0)
    ids = torch.randint(10, 300, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.no_grad():
        states = reference.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert max(float(h.abs().max()) for h in states) > 65504  # it really overflows fp16
    cpu = torch.device("cpu")

    def logits(precision: Precision, rule: bool = True):
        if rule:
            model = quantization.load_base_model(path, quant, precision, cpu, 0)
        else:  # the same loading without the fp16 rule
            bnb = quantization.quantization_config(quant, cpu, precision.dtype)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, dtype=precision.dtype,
                                                                       quantization_config=bnb)
            quantization._keep_cpu_layout(model)
        with torch.no_grad(), precision.autocast(cpu):
            return model.eval()(input_ids=ids, attention_mask=mask).logits.float()

    fp16, fp32 = Precision("fp16", "test"), Precision("fp32", "test")
    assert torch.isnan(logits(fp16, rule=False)).all()
    half, full = logits(fp16), logits(fp32)
    assert torch.isfinite(half).all()
    np.testing.assert_allclose(half.numpy(), full.numpy(), rtol=5e-2, atol=1e-2)  # fp16 rounding of 2 layers
    assert not torch.allclose(full, torch.zeros_like(full), atol=1e-3)  # a comparison of real logits


