"""Decoder stage: a (Q)LoRA-tuned decoder LM (Gemma-2, Llama-3.x, Qwen2) with a 3-class head.

``AutoModelForSequenceClassification`` (3 labels) reads the hidden state of the last non-pad token.
The base model loads 4-bit NF4 (double quantisation), 8-bit or unquantised (``quantization``) on
whatever device runs it, CPU included (:mod:`models.deep.quantization`); precision follows the one
rule of :mod:`models.deep.precision`. LoRA adapters go on all linear projections by default and the
``score`` head is trained in full in fp32, re-initialised with a small std so training starts from
near-uniform predictions. Inputs: :class:`models.deep.inputs.ChatEncoding`. Loss and Trainer:
:mod:`models.deep.training` (checkpoints every ``save_steps`` in the fold directory; a killed fold
resumes from the last one).

One base model per process: cross-fitting calls ``fit`` once per fold on the same stage object,
which unloads the previous fold's adapter and trains a fresh one on the base model already in
memory; :meth:`DecoderStage.load_folds` loads the base once and attaches every fold's adapter.
Under a multi-process launch (``accelerate launch`` / ``torchrun``) every rank trains (DDP), scores
its shard of the battles, and the shards are gathered in row order on every rank; only the main
process writes files.

Saved stage directory: ``stage.json`` (params) plus peft's ``adapter_config.json`` and
``adapter_model.safetensors`` (LoRA weights and the head). The base checkpoint is not copied; ``load``
reads it from ``params.model``.
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from tqdm.auto import tqdm

from battles.labels import has_labels, label_matrix
from kernel.files import read_json, write_json
from kernel.local_models import check_model_dir
from models.deep import quantization
from models.deep.batching import length_batches
from models.deep.inputs import ChatEncoding, training_rows, training_table
from models.deep.params import DeepParams
from models.deep.stage import DeepStage
from models.stage import FoldModels, StageContext

log = logging.getLogger(__name__)

# Settings that must agree between fold models that share one base model at prediction.
BASE_KEYS = ("model", "quantization", "precision", "attn_implementation", "max_length", "prompt_share")


class DecoderParams(DeepParams):
    quantization: Literal["4bit", "8bit", "none"] = "4bit"  # bitsandbytes, on every device it supports
    max_length: int = Field(2048, ge=64)  # tokens per battle, chat template included
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling (alpha / r multiplies the update)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # layers with adapters
    layers_to_transform: list[int] | None = None  # e.g. list(range(16, 42)): adapters only on upper layers
    head_init_std: float = 1e-3  # the 3-class head starts near zero: uniform first predictions (loss ~ log 3)
    learning_rate: float = 1e-4  # peak of the cosine schedule
    weight_decay: float = 0.0  # AdamW weight decay
    train_batch_size: int = Field(2, ge=1)  # per device
    grad_accum: int = Field(8, ge=1)  # gradient accumulation steps (global batch = batch x accum x devices)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)  # share of the steps spent warming the learning rate up
    gradient_checkpointing: bool = True  # recompute activations in the backward pass (less memory)
    swap_augment: bool = False  # train on each battle in both A/B orders
    predict_batch_tokens: int = Field(16384, ge=64)  # padded tokens per inference batch
    attn_implementation: str | None = None  # None: transformers' choice (Gemma-2: eager, keeps soft-capping)
    evaluate_valid: bool = False  # log the valid log loss after fit (an extra pass over valid)


class DecoderStage(DeepStage):
    """QLoRA decoder sequence classifier. Params: :class:`DecoderParams`; ``model`` is required."""

    kind = "decoder"
    Params = DecoderParams
    Encoding = ChatEncoding
    pad_with_eos = True  # self.model: the PeftModel (base + this fold's adapter), once fitted or loaded

    def _load_base(self):
        p = self.params
        return quantization.load_base_model(check_model_dir(p.model, "decoder"), p.quantization, self.precision,
                                            self.device, self.tokenizer.pad_token_id, p.attn_implementation)

    def encode(self, battles: pd.DataFrame) -> list[list[int]]:
        self._setup()
        return self.encoding(battles)

    # -- training
    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "DecoderStage":
        from transformers import DataCollatorWithPadding

        from models.deep.training import PreferenceTrainer, checkpoint_folder, training_arguments

        if not has_labels(train):
            raise ValueError("decoder fit needs labelled battles (winner_model_a/winner_model_b/winner_tie)")
        self._setup()
        p = self.params
        table = training_table(train, p.swap_augment)
        rows = training_rows(table, [{"input_ids": ids} for ids in self.encoding(table, self.context.progress)])
        if self.model is not None:  # the previous fold's adapter comes off; the base model stays in memory
            base, self.model = self.model.unload(), None
            gc.collect()
        else:
            base = self._load_base()
        self.model = quantization.add_lora(base, p, self.context.seed)
        args = training_arguments(p, self.precision, self.device, quantization.optimizer_name(self.device),
                                  self.context.seed, self.context.progress)
        with checkpoint_folder(self.context.work_dir, args) as resume:
            trainer = PreferenceTrainer(model=self.model, args=args, train_dataset=rows,
                                        data_collator=DataCollatorWithPadding(self.tokenizer),
                                        callbacks=self.training_callbacks(has_eval=False), label_smoothing=p.label_smoothing)
            trainer.train(resume_from_checkpoint=resume)
        self.log_history = list(trainer.state.log_history)
        self.model.eval()
        quantization.inference_layout(self.model, self.precision.dtype)
        if valid is not None and len(valid) and p.evaluate_valid and has_labels(valid):
            self.valid_log_loss_ = self.log_loss(valid)
            log.info("decoder valid log loss %.4f on %d battles", self.valid_log_loss_, len(valid))
        return self

    def log_loss(self, battles: pd.DataFrame) -> float:
        logp = torch.log_softmax(torch.as_tensor(self.predict_logits(battles)), dim=-1).numpy()
        return float(-(label_matrix(battles) * logp).sum(axis=1).mean())

    # -- inference
    def _score(self, battles: pd.DataFrame) -> np.ndarray:
        encoded = self.encoding(battles)
        batches = length_batches([len(x) for x in encoded], int(self.params.predict_batch_tokens),
                                 int(self.params.predict_batch_size))
        device = next(p for p in self.model.parameters() if p.is_floating_point()).device
        out = np.zeros((len(battles), 3), dtype=np.float32)
        with torch.inference_mode(), self.precision.autocast(device):
            for idx in tqdm(batches, desc="decoder predict", disable=not self.context.progress, leave=False):
                batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
                logits = self.model(input_ids=batch["input_ids"].to(device),
                                    attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
                out[idx] = logits.float().cpu().numpy()
        return out

    # -- persistence
    def save(self, directory) -> None:
        """The adapter (LoRA weights and head, safetensors) and ``stage.json``; main process only."""
        directory = self.save_directory(directory)
        if directory is None:
            return
        self.model.save_pretrained(directory, safe_serialization=True)
        write_json(directory / "stage.json", {"kind": self.kind, "params": self.params.as_dict()})

    @classmethod
    def load(cls, directory, context: StageContext | None = None) -> "DecoderStage":
        return cls._with_adapters([directory], ["default"], context)

    @classmethod
    def load_folds(cls, directories, context: StageContext | None = None) -> FoldModels:
        """Every fold's adapter on ONE base model (loaded once), predicting like cross-fitting averages folds."""
        directories = [Path(d) for d in directories]
        if not directories:
            raise ValueError("load_folds needs at least one saved fold directory")
        names = [f"fold{k}" for k in range(len(directories))]
        stage = cls._with_adapters(directories, names, context)
        return FoldModels([_Adapter(stage, name) for name in names])

    @classmethod
    def _with_adapters(cls, directories, names: list[str], context) -> "DecoderStage":
        from peft import PeftModel

        params = []
        for directory in directories:
            meta = Path(directory) / "stage.json"
            if not meta.is_file():
                raise FileNotFoundError(f"{meta} not found: not a saved decoder stage directory")
            params.append(read_json(meta)["params"])
        for directory, other in zip(directories[1:], params[1:]):
            clash = [k for k in BASE_KEYS if other.get(k) != params[0].get(k)]
            if clash:
                raise ValueError(f"{directory}: {clash} differ from {directories[0]}; fold models that share one "
                                 "base model must agree on them")
        stage = cls(params[0], context)
        stage._setup()
        model = PeftModel.from_pretrained(stage._load_base(), directories[0], adapter_name=names[0])
        for name, directory in zip(names[1:], directories[1:]):
            model.load_adapter(directory, adapter_name=name)
        model.eval()
        quantization.inference_layout(model, stage.precision.dtype)
        stage.model = model
        return stage


class _Adapter:
    """One fold's adapter on the shared base model, predicting like that fold's stage alone; a stage's
    adapters go together in a :class:`models.stage.FoldModels` (which averages them)."""

    def __init__(self, stage: DecoderStage, name: str):
        self.stage, self.name = stage, name

    def predict_logits(self, battles: pd.DataFrame) -> np.ndarray:
        log.info("decoder: predicting %d battles with adapter %s", len(battles), self.name)
        self.stage.model.set_adapter(self.name)
        return self.stage.predict_logits(battles)
