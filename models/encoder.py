"""Encoder stage: a cross-encoder (DeBERTa-v3 by default, any local HF encoder) giving 3-class logits.

Each battle is packed with the shared policy and read as one sequence ``[CLS] prompt [SEP] response A
[SEP] response B [SEP]`` (:class:`models.deep.inputs.PairEncoding`) by
``AutoModelForSequenceClassification`` with three labels in ``[a, b, tie]`` order. The model is fully
fine-tuned (weights in fp32, mixed precision per the one rule of :mod:`models.deep.precision`).

Training: the shared Trainer (:mod:`models.deep.training`): length-grouped batches, cosine schedule
with warmup, the one soft-label loss (hard, soft and smoothed targets, row weights), optional swap
augmentation, gradient checkpointing and accumulation, early stopping on the fold's validation log
loss, Trainer checkpoints in the fold directory (a killed fold resumes). ``accelerate launch`` /
``torchrun`` runs it with DDP; each rank then scores its shard of the battles and the shards are
gathered in row order; only the main process writes files.

Prediction: length-sorted batches under autocast, both A/B orders averaged (swap TTA). ``save`` writes
the model and tokenizer with ``save_pretrained`` (safetensors) plus ``stage.json``.

DeBERTa-v3 checkpoints ship ``spm.model`` and no ``tokenizer.json``; they load through
``sentencepiece`` and ``protobuf`` (:mod:`kernel.local_models`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from tqdm.auto import tqdm

from battles.labels import CLASS_NAMES
from kernel.files import read_json, write_json, write_text
from kernel.local_models import check_model_dir
from models.deep.batching import length_batches
from models.deep.inputs import PairEncoding, training_rows, training_table
from models.deep.params import DeepParams
from models.deep.stage import DeepStage
from models.stage import StageContext

log = logging.getLogger(__name__)


class EncoderParams(DeepParams):
    max_length: int = Field(512, ge=16)  # tokens per battle, special tokens included
    learning_rate: float = 2e-5  # peak of the cosine schedule (AdamW)
    weight_decay: float = 0.01  # AdamW weight decay
    train_batch_size: int = Field(8, ge=1)  # per device
    grad_accum: int = Field(1, ge=1)  # gradient accumulation steps (global batch = batch x accum x devices)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)  # share of the steps spent warming the learning rate up
    swap_augment: bool = True  # train on each battle and its A/B-swapped copy
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% slower)
    eval_steps: int | None = Field(None, ge=1)  # evaluate (and checkpoint) every n steps; None = once per epoch
    early_stopping_patience: int = Field(2, ge=0)  # evaluations without improvement before stopping; 0 disables


def _log_loss_metric(eval_pred) -> dict:
    logits, targets = eval_pred.predictions, eval_pred.label_ids
    logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1).numpy()
    return {"log_loss": float(-(np.asarray(targets, dtype=np.float64) * logp).sum(axis=1).mean())}


class EncoderStage(DeepStage):
    kind = "encoder"
    Params = EncoderParams
    Encoding = PairEncoding

    # ---- set-up (in fit / load) ----
    def _load_pretrained(self, directory: Path, new_head: bool) -> None:
        from transformers import AutoModelForSequenceClassification

        kwargs = {}
        if new_head:
            kwargs = {"num_labels": 3, "id2label": dict(enumerate(CLASS_NAMES)),
                      "label2id": {n: i for i, n in enumerate(CLASS_NAMES)}}
        self.model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32, **kwargs)
        if self.model.config.num_labels != 3:
            raise ValueError(f"{directory}: model has {self.model.config.num_labels} labels, the encoder stage needs 3")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit and getattr(self.model.config, "position_biased_input", True) and self.params.max_length > limit:
            raise ValueError(f"encoder max_length {self.params.max_length} exceeds the model's "
                             f"max_position_embeddings {limit} ({directory})")

    def training_callbacks(self, has_eval: bool) -> list:
        from transformers import EarlyStoppingCallback

        if has_eval and self.params.early_stopping_patience > 0:
            return [EarlyStoppingCallback(early_stopping_patience=int(self.params.early_stopping_patience))]
        return []

    def _rows(self, battles: pd.DataFrame) -> list[dict]:
        return training_rows(battles, self.encoding.features(battles, progress=self.context.progress))

    # ---- the stage contract ----
    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "EncoderStage":
        from transformers import DataCollatorWithPadding

        from models.deep.training import PreferenceTrainer, checkpoint_folder, training_arguments

        p = self.params
        self._setup()
        self._load_pretrained(check_model_dir(p.model, "encoder"), new_head=True)
        train_set = self._rows(training_table(train, p.swap_augment))
        valid_set = self._rows(valid) if valid is not None and len(valid) else None
        has_eval = valid_set is not None
        log.info("encoder: %d training sequences (swap_augment=%s), %d validation, model %s",
                 len(train_set), p.swap_augment, len(valid_set or []), p.model)
        evaluation = {}
        if has_eval:  # a checkpoint at every evaluation: the best one is reloaded at the end
            strategy = "steps" if p.eval_steps else "epoch"
            evaluation = dict(eval_strategy=strategy, eval_steps=p.eval_steps, save_strategy=strategy,
                              save_steps=p.eval_steps or 500, load_best_model_at_end=True,
                              metric_for_best_model="log_loss", greater_is_better=False)
        args = training_arguments(p, self.precision, self.device, "adamw_torch", self.context.seed,
                                  self.context.progress, activation_checkpointing=bool(p.gradient_checkpointing),
                                  **evaluation)
        with checkpoint_folder(self.context.work_dir, args) as resume:
            trainer = PreferenceTrainer(
                model=self.model, args=args, train_dataset=train_set, eval_dataset=valid_set,
                processing_class=self.tokenizer, data_collator=DataCollatorWithPadding(self.tokenizer),
                compute_metrics=_log_loss_metric if has_eval else None, callbacks=self.training_callbacks(has_eval),
                label_smoothing=p.label_smoothing)
            trainer.train(resume_from_checkpoint=resume)
        self.model = trainer.model
        self.model.eval()
        self.log_history = list(trainer.state.log_history)
        if has_eval and trainer.state.best_metric is not None:
            log.info("encoder: best validation log loss %.4f at step %s",
                     trainer.state.best_metric, trainer.state.best_global_step)
        return self

    def _score(self, battles: pd.DataFrame) -> np.ndarray:
        from transformers import DataCollatorWithPadding

        features = self.encoding.features(battles)
        size = int(self.params.predict_batch_size)
        batches = length_batches([len(f["input_ids"]) for f in features], size * self.params.max_length, size)
        collate = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        self.model.to(self.device)
        out = np.zeros((len(features), 3), dtype=np.float32)
        with torch.inference_mode(), self.precision.autocast(self.device):
            for idx in tqdm(batches, desc="encoder predict", disable=not self.context.progress, leave=False):
                batch = {k: v.to(self.device) for k, v in collate([features[i] for i in idx]).items()}
                out[idx] = self.model(**batch).logits.float().cpu().numpy()
        return out

    def save(self, directory) -> None:
        """Model and tokenizer (safetensors), ``stage.json`` and the training log; main process only."""
        directory = self.save_directory(directory)
        if directory is None:
            return
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        write_json(directory / "stage.json", {"kind": self.kind, "params": self.params.as_dict()})
        write_text(directory / "training_log.json", json.dumps(self.log_history, indent=2, default=float))

    @classmethod
    def load(cls, directory, context: StageContext | None = None) -> "EncoderStage":
        directory = Path(directory)
        meta_path = directory / "stage.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no encoder stage saved in {directory} (stage.json missing)")
        params = read_json(meta_path)["params"]
        params["model"] = str(directory)  # the fitted weights live here; the original checkpoint may be gone
        stage = cls(params, context)
        stage._setup()
        stage._load_pretrained(directory, new_head=False)
        stage.model.to(stage.device).eval()
        log_path = directory / "training_log.json"
        stage.log_history = read_json(log_path) if log_path.exists() else []
        return stage
