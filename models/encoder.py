"""Encoder stage: a cross-encoder (DeBERTa-v3 by default, any local HF encoder) giving 3-class logits.

Each battle is packed with the shared policy and read as one sequence ``[CLS] prompt [SEP] response A
[SEP] response B [SEP]`` (:class:`models.deep.inputs.PairEncoding`) by
``AutoModelForSequenceClassification`` with three labels in ``[a, b, tie]`` order. The model is fully
fine-tuned (weights in fp32, mixed precision per the one rule of :mod:`models.deep.precision`).

Training, scoring, saving and loading are the deep-stage template (:class:`models.deep.stage.DeepStage`):
length-grouped batches, cosine schedule with warmup, the one soft-label loss, optional swap
augmentation, gradient checkpointing and accumulation, DDP under ``accelerate launch`` / ``torchrun``;
length-sorted batches under autocast and swap TTA at prediction. What is the encoder's own:

- the model: the checkpoint with a fresh 3-class head, every weight trained;
- early stopping, with the fold's validation battles (:meth:`EncoderStage._trainer_settings`): the
  Trainer evaluates the validation log loss every ``eval_steps`` optimizer steps (once per epoch when
  ``eval_steps`` is None), keeps a checkpoint at every evaluation, stops after
  ``early_stopping_patience`` evaluations without improvement (0: never stops early) and reloads the
  best checkpoint at the end. Checkpoints then follow the evaluation schedule *instead of*
  ``save_steps`` (the best one must be on disk to be reloaded); the log says so when ``save_steps``
  asked for another schedule. Without validation battles there is no evaluation, no early stopping,
  and checkpoints follow ``save_steps``;
- ``save`` writes the whole model and the tokenizer with ``save_pretrained`` (safetensors), so a saved
  stage loads without the original checkpoint.

DeBERTa-v3 checkpoints ship ``spm.model`` and no ``tokenizer.json``; they load through
``sentencepiece`` and ``protobuf`` (:mod:`kernel.local_models`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import Field

from battles.labels import CLASS_NAMES
from kernel.local_models import check_model_dir
from kernel.schema import NonNegativeFloat, PositiveFloat
from models.deep.inputs import PairEncoding
from models.deep.params import DeepParams
from models.deep.stage import DeepStage

log = logging.getLogger(__name__)


class EncoderParams(DeepParams):
    max_length: int = Field(512, ge=16)  # tokens per battle, special tokens included
    learning_rate: PositiveFloat = 2e-5  # peak of the cosine schedule (AdamW)
    weight_decay: NonNegativeFloat = 0.01  # AdamW weight decay
    train_batch_size: int = Field(8, ge=1)  # per device
    grad_accum: int = Field(1, ge=1)  # gradient accumulation steps (global batch = batch x accum x devices)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)  # share of the steps spent warming the learning rate up
    swap_augment: bool = True  # train on each battle and its A/B-swapped copy
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% slower)
    predict_batch_tokens: int | None = Field(None, ge=64)  # padded tokens per inference batch; None: no cap but rows
    eval_steps: int | None = Field(None, ge=1)  # with valid: evaluate + checkpoint every n steps; None: per epoch
    early_stopping_patience: int = Field(2, ge=0)  # evaluations without improvement before stopping; 0 disables


class EncoderStage(DeepStage):
    kind = "encoder"
    Params = EncoderParams
    Encoding = PairEncoding

    evaluates_during_training = True

    def _pretrained(self, directory: Path, new_head: bool):
        """The sequence classifier in ``directory`` (fp32), with a fresh 3-class head when ``new_head``."""
        from transformers import AutoModelForSequenceClassification

        kwargs = {}
        if new_head:
            kwargs = {"num_labels": 3, "id2label": dict(enumerate(CLASS_NAMES)),
                      "label2id": {n: i for i, n in enumerate(CLASS_NAMES)}}
        model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32, **kwargs)
        if model.config.num_labels != 3:
            raise ValueError(f"{directory}: model has {model.config.num_labels} labels, the encoder stage needs 3")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and getattr(model.config, "position_biased_input", True) and self.params.max_length > limit:
            raise ValueError(f"encoder max_length {self.params.max_length} exceeds the model's "
                             f"max_position_embeddings {limit} ({directory})")
        return model

    def _build_model(self):
        """The checkpoint with a fresh 3-class head (the Trainer places it on the device)."""
        return self._pretrained(check_model_dir(self.params.model, "encoder"), new_head=True)

    def _trainer_settings(self, has_eval: bool) -> dict:
        """Gradient checkpointing, and early stopping (module docstring): with validation battles the
        checkpoint schedule is the evaluation schedule, replacing ``save_steps``."""
        p = self.params
        settings = {"activation_checkpointing": bool(p.gradient_checkpointing)}
        if not has_eval:
            return settings
        strategy = "steps" if p.eval_steps else "epoch"
        log.info("encoder: early stopping on the validation battles (patience %d): evaluation and checkpoint every "
                 "%s, in place of save_steps=%d", p.early_stopping_patience,
                 f"{p.eval_steps} steps" if p.eval_steps else "epoch", p.save_steps)
        return {**settings, "eval_strategy": strategy, "eval_steps": p.eval_steps, "save_strategy": strategy,
                "save_steps": p.eval_steps or 500, "load_best_model_at_end": True,
                "metric_for_best_model": "log_loss", "greater_is_better": False}

    def training_callbacks(self, has_eval: bool) -> list:
        from transformers import EarlyStoppingCallback

        if has_eval and self.params.early_stopping_patience > 0:
            return [EarlyStoppingCallback(early_stopping_patience=int(self.params.early_stopping_patience))]
        return []

    def _after_training(self, trainer, valid) -> None:
        if trainer.state.best_metric is not None:
            log.info("encoder: best validation log loss %.4f at step %s",
                     trainer.state.best_metric, trainer.state.best_global_step)

    # ---- persistence: the whole model and its tokenizer ----
    def _save_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @classmethod
    def _saved_params(cls, directory: Path) -> dict:
        """The saved params, reading the model (and tokenizer) from ``directory``: the fitted weights live
        there, and the original checkpoint may be gone."""
        return {**super()._saved_params(directory), "model": str(directory)}

    def _load_model(self, directory: Path) -> None:
        self.model = self._pretrained(directory, new_head=False).to(self.device).eval()
