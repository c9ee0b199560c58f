"""Decoder stage: a (Q)LoRA-tuned decoder LM (Gemma-2, Llama-3.x, Qwen2) with a 3-class head.

``AutoModelForSequenceClassification`` (3 labels) reads the hidden state of the last non-pad token.
The base model loads 4-bit NF4 (double quantisation), 8-bit or unquantised (``quantization``) on
whatever device runs it, CPU included (:mod:`models.deep.quantization`); precision follows the one
rule of :mod:`models.deep.precision`. LoRA adapters go on all linear projections by default and the
``score`` head is trained in full in fp32, re-initialised with a small std so training starts from
near-uniform predictions. Inputs: :class:`models.deep.inputs.ChatEncoding`. Training, scoring,
saving and loading are the deep-stage template (:class:`models.deep.stage.DeepStage`; checkpoints
every ``save_steps`` in the fold directory, a killed fold resumes from the last one); the decoder
trains without looking at the fold's validation battles (``evaluate_valid`` scores them afterwards).

One base model per process: cross-fitting calls ``fit`` once per fold on the same stage object,
which unloads the previous fold's adapter and trains a fresh one on the base model already in
memory; :meth:`DecoderStage.load_folds` loads the base once and attaches every fold's adapter.
Under a multi-process launch (``accelerate launch`` / ``torchrun``) every rank trains (DDP), scores
its shard of the battles, and the shards are gathered in row order on every rank; only the main
process writes files.

Saved stage directory: ``stage.json`` (params), ``training_log.json`` and peft's
``adapter_config.json`` and ``adapter_model.safetensors`` (LoRA weights and the head). The base
checkpoint is not copied; ``load`` reads it from ``params.model``.
"""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from battles.labels import has_labels, label_matrix
from kernel.local_models import check_model_dir
from kernel.schema import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from models.deep import quantization
from models.deep.inputs import ChatEncoding
from models.deep.params import DeepParams
from models.deep.quantization import QUANTIZATIONS
from models.deep.stage import DeepStage, log_loss
from models.stage import FoldModels, StageContext

log = logging.getLogger(__name__)

# Settings that must agree between fold models that share one base model at prediction.
BASE_KEYS = ("model", "quantization", "predict_quantization", "precision", "attn_implementation", "max_length",
             "prompt_share", "system_prompt")


class DecoderParams(DeepParams):
    quantization: Literal[QUANTIZATIONS] = "4bit"  # bitsandbytes, on every device it supports
    predict_quantization: Literal[QUANTIZATIONS] | None = None  # the base at prediction; None: as trained
    max_length: int = Field(2048, ge=64)  # tokens per battle, chat template included
    system_prompt: str | None = None  # None: no system turn (a template's own default system prompt is left out)
    lora_r: PositiveInt = 16  # LoRA rank
    lora_alpha: PositiveInt = 32  # LoRA scaling (alpha / r multiplies the update)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)  # dropout on the LoRA input
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # layers with adapters
    layers_to_transform: list[NonNegativeInt] | None = Field(None, min_length=1)  # e.g. list(range(16, 42)): adapters only on upper layers
    head_init_std: NonNegativeFloat = 1e-3  # the 3-class head starts near zero: uniform first predictions (loss ~ log 3)
    learning_rate: PositiveFloat = 1e-4  # peak of the cosine schedule
    weight_decay: NonNegativeFloat = 0.0  # AdamW weight decay
    train_batch_size: int = Field(2, ge=1)  # per device
    grad_accum: int = Field(8, ge=1)  # gradient accumulation steps (global batch = batch x accum x devices)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)  # share of the steps spent warming the learning rate up
    gradient_checkpointing: bool = True  # recompute activations in the backward pass (less memory)
    swap_augment: bool = False  # train on each battle in both A/B orders
    predict_batch_tokens: int = Field(16384, ge=64)  # padded tokens per inference batch
    predict_batch_size: int | None = Field(None, ge=1)  # rows per inference batch (per device); None: no cap, tokens bound it
    attn_implementation: str | None = None  # None: transformers' choice (Gemma-2: eager, keeps soft-capping)
    evaluate_valid: bool = False  # log the valid log loss after fit (an extra pass over valid)


class DecoderStage(DeepStage):
    """QLoRA decoder sequence classifier. Params: :class:`DecoderParams`; ``model`` is required."""

    kind = "decoder"
    Params = DecoderParams
    Encoding = ChatEncoding
    pad_with_eos = True  # self.model: the PeftModel (base + this fold's adapter), once fitted or loaded
    forward_kwargs = {"use_cache": False}  # a classifier never generates: no KV cache on any scoring pass

    def encoding_options(self) -> dict:
        return {"system_prompt": self.params.system_prompt, "stage": self.kind}

    @property
    def inference_quantization(self) -> str:
        """The base model's quantization at prediction: ``predict_quantization``, else as trained."""
        return self.params.predict_quantization or self.params.quantization

    def _load_base(self, quantization_name: str):
        p = self.params
        base = quantization.load_base_model(check_model_dir(p.model, "decoder"), quantization_name, self.precision,
                                            self.device, self.tokenizer.pad_token_id, p.attn_implementation)
        self._base_quantization = quantization_name
        return base

    # -- training
    def _build_model(self):
        """Fresh LoRA adapters and head on the base model: the one already in memory (the previous fold's
        adapter comes off) or, on the first fold (or when the one in memory is the prediction base of
        another quantization), the base loaded from ``params.model``."""
        p = self.params
        if self.model is not None and getattr(self, "_base_quantization", None) == p.quantization:
            base, self.model = self.model.unload(), None
            gc.collect()
        else:
            self.model = None
            gc.collect()
            base = self._load_base(p.quantization)
        return quantization.add_lora(base, self.params, self.context.seed)

    @property
    def optimizer(self) -> str:
        """bitsandbytes' 8-bit AdamW where it runs on the device (:func:`models.deep.quantization.optimizer_name`)."""
        return quantization.optimizer_name(self.device)

    def _after_training(self, trainer, valid) -> None:
        if self.inference_quantization != self.params.quantization:
            self._to_prediction_base()
        else:
            quantization.inference_layout(self.model, self.precision.dtype)
        if valid is not None and len(valid) and self.params.evaluate_valid and has_labels(valid):
            self.valid_log_loss_ = log_loss(self.predict_logits(valid), label_matrix(valid))
            log.info("decoder valid log loss %.4f on %d battles", self.valid_log_loss_, len(valid))

    def _to_prediction_base(self) -> None:
        """The adapter just trained, moved onto a base loaded at ``predict_quantization`` (the training
        base is released first: one base in memory at a time)."""
        import tempfile

        import torch

        log.info("decoder: trained on a %s base, predicting from a %s base", self.params.quantization,
                 self.inference_quantization)
        with tempfile.TemporaryDirectory(prefix="decoder-adapter-") as folder:
            self.model.save_pretrained(folder, safe_serialization=True)
            self.model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._attach_adapters([Path(folder)], ["default"])

    # -- persistence: the adapter; the base model stays where params.model says
    def _save_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)

    def _load_model(self, directory: Path) -> None:
        self._attach_adapters([directory], ["default"])

    @classmethod
    def load_folds(cls, directories, context: StageContext | None = None) -> FoldModels:
        """Every fold's adapter on ONE base model (loaded once), predicting like cross-fitting averages folds."""
        directories = [Path(d) for d in directories]
        if not directories:
            raise ValueError("load_folds needs at least one saved fold directory")
        params = [cls._saved_params(d) for d in directories]
        for directory, other in zip(directories[1:], params[1:]):
            clash = [k for k in BASE_KEYS if other.get(k) != params[0].get(k)]
            if clash:
                raise ValueError(f"{directory}: {clash} differ from {directories[0]}; fold models that share one "
                                 "base model must agree on them")
        stage = cls(params[0], context)
        stage._setup()
        names = [f"fold{k}" for k in range(len(directories))]
        stage._attach_adapters(directories, names)
        return FoldModels([_Adapter(stage, name) for name in names])

    def _attach_adapters(self, directories: list[Path], names: list[str]) -> None:
        """The base model with the adapter saved in each directory (under its name), ready to predict."""
        from peft import PeftModel

        model = PeftModel.from_pretrained(self._load_base(self.inference_quantization), directories[0],
                                          adapter_name=names[0])
        for name, directory in zip(names[1:], directories[1:]):
            model.load_adapter(directory, adapter_name=name)
        model.eval()
        quantization.inference_layout(model, self.precision.dtype)
        self.model = model


class _Adapter:
    """One fold's adapter on the shared base model, predicting like that fold's stage alone; a stage's
    adapters go together in a :class:`models.stage.FoldModels` (which averages them)."""

    def __init__(self, stage: DecoderStage, name: str):
        self.stage, self.name = stage, name

    @property
    def passes_per_battle(self) -> int:
        return self.stage.passes_per_battle

    def predict_logits(self, battles: pd.DataFrame) -> np.ndarray:
        log.info("decoder: predicting %d battles with adapter %s", len(battles), self.name)
        self.stage.model.set_adapter(self.name)
        return self.stage.predict_logits(battles)

    @property
    def tta_from_orders(self) -> bool:
        return self.stage.tta_from_orders

    def predict_one_order(self, battles: pd.DataFrame) -> np.ndarray:
        """The given A/B order only, with this fold's adapter (a budgeted prediction's step 1)."""
        self.stage.model.set_adapter(self.name)
        return self.stage.predict_one_order(battles)

    def predict_both_orders(self, battles: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Both A/B orders with this fold's adapter (what :func:`models.stage.predict_with_orders` asks for)."""
        self.stage.model.set_adapter(self.name)
        return self.stage.predict_both_orders(battles)

    def encode(self, battles: pd.DataFrame):
        """The stage's model inputs and truncation records (shared by every fold's adapter)."""
        return self.stage.encode(battles)
