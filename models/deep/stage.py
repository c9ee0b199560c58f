"""The deep-stage template: everything the encoder and the decoder do the same way, written once.

:class:`DeepStage` owns

- set-up in ``fit`` / ``load`` (never in ``__init__``): tokenizer, input encoding
  (:class:`models.deep.inputs.Encoding`), device, precision;
- ``fit``: the training rows (with the A/B-swapped copies when ``swap_augment``), the model the
  subclass builds, the Trainer (:mod:`models.deep.training`: one loss, one set of arguments, the
  fold's checkpoint folder), callbacks (one logs the fold's projected training time after its first
  steps, and warns on CPU above 30 minutes), and the log history (saved as ``training_log.json``); what
  packing cut of the training battles is kept in :attr:`DeepStage.fit_truncation` and logged;
- scoring: battles encoded once per A/B order however many models of one stage object score them
  (the decoder's fold adapters, the folds cross-fitting refits: :class:`models.deep.inputs.RecentEncodings`),
  sorted by length into batches of at most ``predict_batch_size`` rows and ``predict_batch_tokens``
  padded tokens (:func:`batch_budget`: the encoder's defaults bound a batch by rows, the decoder's by
  tokens), run on the device the model's weights are on, under autocast in the stage's precision;
  under a multi-process launch each rank scores its shard (:mod:`models.deep.batching`); optional
  swap TTA;
- ``save`` (main process only: the weights, ``stage.json``, ``training_log.json``, and ``inputs.json``:
  what packing cut of the training battles, which the run's ``metrics.json`` and report show) and ``load``.

A subclass keeps only what differs: how its model is built for training (:meth:`DeepStage._build_model`)
and restored from a saved directory (:meth:`DeepStage._load_model`), how it is written
(:meth:`DeepStage._save_model`), and its own Trainer settings (:meth:`DeepStage._trainer_settings`:
the encoder's early stopping on the fold's validation battles) and after-training step
(:meth:`DeepStage._after_training`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from battles.columns import LABEL_COLUMNS, SOFT_COLUMNS
from battles.labels import has_labels, soft_mask
from battles.text import FIELDS
from kernel.dist import is_main_process
from kernel.errors import UserError
from kernel.files import read_json, write_text
from kernel.local_models import default_device, load_tokenizer
from models.deep.batching import length_batches, predict_sharded
from models.deep.inputs import EncodedBattles, RecentEncodings, training_rows, training_table
from models.deep.precision import resolve_precision
from models.stage import FoldModels, Stage, StageContext

log = logging.getLogger(__name__)

TRAINING_LOG = "training_log.json"
INPUTS = "inputs.json"  # what packing did to the training battles (summarize_truncation), and the frame


def log_loss(logits, targets) -> float:
    """Mean over rows of the cross-entropy of ``targets`` (n, 3 distributions) under ``softmax(logits)``."""
    logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1).numpy()
    return float(-(np.asarray(targets, dtype=np.float64) * logp).sum(axis=1).mean())


def _log_loss_metric(eval_pred) -> dict:
    """The Trainer's ``compute_metrics``: validation log loss (what early stopping watches)."""
    return {"log_loss": log_loss(eval_pred.predictions, eval_pred.label_ids)}


def model_device(model) -> torch.device:
    """The device of the model's weights (where it was placed when built, loaded or trained)."""
    return next(p for p in model.parameters() if p.is_floating_point()).device


class DeepStage(Stage):
    """Base of :class:`models.encoder.EncoderStage` and :class:`models.decoder.DecoderStage`.

    Class attributes a subclass sets: ``Encoding`` (its :class:`models.deep.inputs.Encoding`),
    ``pad_with_eos`` (a tokenizer without a pad token pads with EOS), ``forward_kwargs`` (extra
    arguments of every scoring forward pass) and ``evaluates_during_training``."""

    Encoding: type  # models.deep.inputs.ChatEncoding or PairEncoding
    pad_with_eos = False
    forward_kwargs: dict = {}
    evaluates_during_training = False
    """Whether ``fit`` hands the fold's validation battles to the Trainer (the encoder: early stopping).
    The decoder trains without them (and may score them afterwards: ``evaluate_valid``)."""

    def __init__(self, params=None, context: StageContext | None = None):
        super().__init__(params, context)
        self.model = None  # the fitted or loaded model
        self.tokenizer = None
        self.log_history: list[dict] = []  # the Trainer's log of the last fit (saved as training_log.json)
        self.fit_truncation: dict | None = None  # what packing cut of the last fit's battles (summarize_truncation)
        self.cost = None  # the last fit's CostProjection (projected_minutes)

    # -- set-up (in fit / load, never in __init__)
    def _setup(self) -> None:
        if self.tokenizer is not None:
            return
        p = self.params
        self.tokenizer = load_tokenizer(p.model, self.kind, pad_with_eos=self.pad_with_eos)
        self.encoding = self.Encoding(self.tokenizer, p.max_length, p.prompt_share, **self.encoding_options())
        self.recent_encodings = RecentEncodings(self.encoding)  # prediction encodes each battle set once
        self.device = default_device()
        self.precision = resolve_precision(p.precision, self.device, self.kind)

    def encoding_options(self) -> dict:
        """Keyword arguments of this stage's ``Encoding`` beyond the tokenizer, ``max_length`` and ``prompt_share``."""
        return {}

    def check_inputs(self) -> None:
        """Load the tokenizer and build the input encoding, nothing else: a setting the inputs cannot
        honour (``max_length`` below the frame) is one :class:`models.deep.inputs.InputFrameError` line
        here, before any model loads or battle is encoded."""
        self._setup()

    def encode(self, battles: pd.DataFrame, progress: bool = False) -> EncodedBattles:
        """The stage's model inputs for ``battles`` and the truncation record of each, as prediction
        encodes them: the same battles (in the same A/B order) are encoded once however many fold
        models or calls ask (:class:`models.deep.inputs.RecentEncodings`)."""
        self._setup()
        return self.recent_encodings.encode(battles, progress)

    # -- what a subclass provides
    def _build_model(self):
        """The model to train on this fold: a fresh 3-class head (the decoder: and fresh LoRA adapters)."""
        raise NotImplementedError

    def _load_model(self, directory: Path) -> None:
        """Set ``self.model`` from the weights ``save`` wrote in ``directory``, ready to predict."""
        raise NotImplementedError

    def _save_model(self, directory: Path) -> None:
        """Write the fitted weights (safetensors) into ``directory``."""
        raise NotImplementedError

    @property
    def optimizer(self) -> str:
        """The Trainer's ``optim``."""
        return "adamw_torch"

    def _trainer_settings(self, has_eval: bool) -> dict:
        """Trainer arguments of this stage beyond the shared ones (:func:`models.deep.training.training_arguments`).
        ``has_eval``: the fit has validation battles and the stage evaluates them during training
        (:attr:`evaluates_during_training`)."""
        return {}

    def training_callbacks(self, has_eval: bool) -> list:
        """Extra ``TrainerCallback``s for this stage's Trainer (none by default)."""
        return []

    def _after_training(self, trainer, valid: pd.DataFrame | None) -> None:
        """Anything a stage does once its model is trained (log the best checkpoint, set the inference layout)."""

    # -- training
    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "DeepStage":
        from transformers import DataCollatorWithPadding

        from models.deep.training import CostProjection, PreferenceTrainer, checkpoint_folder, training_arguments

        p = self.params
        if not (has_labels(train) or soft_mask(train).any()):  # before the (long) encoding pass
            raise ValueError(f"{self.kind} fit needs labelled battles ({', '.join(LABEL_COLUMNS)}, or soft labels "
                             f"{', '.join(SOFT_COLUMNS)})")
        self._setup()
        table = training_table(train, p.swap_augment)
        encoded = self.encoding.encode(table, self.context.progress)
        train_rows = training_rows(table, encoded)
        self.fit_truncation = encoded.truncation_summary(len(train))
        has_eval = self.evaluates_during_training and valid is not None and len(valid) > 0
        valid_rows = training_rows(valid, self.encoding.encode(valid, self.context.progress)) if has_eval else None
        log.info("%s: %d training sequences (swap_augment=%s), %d validation, model %s; %s", self.kind,
                 len(train_rows), p.swap_augment, len(valid_rows or []), p.model, _cut_line(self.fit_truncation))
        from transformers import set_seed

        set_seed(self.context.seed)  # a fresh head is drawn from the stage's seed, not from whatever ran before
        self.model = self._build_model()
        args = training_arguments(p, self.precision, self.device, self.optimizer, self.context.seed,
                                  self.context.progress, **self._trainer_settings(has_eval))
        self.cost = CostProjection(self.kind, self.device)
        with checkpoint_folder(self.context.work_dir, args) as resume:
            trainer = PreferenceTrainer(
                model=self.model, args=args, train_dataset=train_rows, eval_dataset=valid_rows,
                processing_class=self.tokenizer, data_collator=DataCollatorWithPadding(self.tokenizer),
                compute_metrics=_log_loss_metric if has_eval else None,
                callbacks=[*self.training_callbacks(has_eval), self.cost],
                label_smoothing=p.label_smoothing)
            trainer.train(resume_from_checkpoint=resume)
        self.model.eval()
        self.log_history = list(trainer.state.log_history)
        self._after_training(trainer, valid)
        return self

    # -- inference
    def predict_one_order(self, battles: pd.DataFrame) -> np.ndarray:
        """Logits for the battles as given (no TTA); under a multi-process launch each rank scores a shard."""
        if self.model is None:
            raise RuntimeError(f"{self.kind} stage is not fitted or loaded: call fit() or load() first")
        return predict_sharded(self._score, battles)

    def _score(self, battles: pd.DataFrame) -> np.ndarray:
        """Logits of one shard of battles: length-sorted batches within the row and token budgets."""
        from transformers import DataCollatorWithPadding

        p = self.params
        encoded = self.encode(battles)
        features = encoded.features()
        batches = length_batches(encoded.lengths, *batch_budget(p))
        collate = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        device = model_device(self.model)
        out = np.zeros((len(features), 3), dtype=np.float32)
        with torch.inference_mode(), self.precision.autocast(device):
            for idx in tqdm(batches, desc=f"{self.kind} predict", disable=not self.context.progress, leave=False):
                batch = {k: v.to(device) for k, v in collate([features[i] for i in idx]).items()}
                out[idx] = self.model(**batch, **self.forward_kwargs).logits.float().cpu().numpy()
        check_finite(out, self.kind, self.precision.name)
        return out

    @property
    def tta_from_orders(self) -> bool:
        """With swap TTA the answer is the base class's average of both orders: the pipeline may then
        ask for the two orders itself and keep them for the position-bias check."""
        return bool(self.params.swap_tta)

    @property
    def passes_per_battle(self) -> int:
        """2 with ``swap_tta`` (both A/B orders scored), else 1."""
        return 2 if self.params.swap_tta else 1

    def predict_logits(self, battles: pd.DataFrame) -> np.ndarray:
        if self.params.swap_tta:
            return super().predict_logits(battles)
        return self.predict_one_order(battles).astype(np.float64)

    # -- persistence
    def save(self, directory) -> None:
        """The weights (:meth:`_save_model`), ``stage.json`` and ``training_log.json``; main process only."""
        if self.model is None:
            raise RuntimeError(f"{self.kind} stage is not fitted: nothing to save")
        if not is_main_process():
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_model(directory)
        self.write_stage_json(directory)
        write_text(directory / TRAINING_LOG, json.dumps(self.log_history, indent=2, default=float))
        if self.fit_truncation is not None:
            write_text(directory / INPUTS, json.dumps({"max_length": self.params.max_length,
                                                       "training_battles": self.fit_truncation}, indent=1))

    @classmethod
    def saved_figures(cls, directory) -> dict:
        """``{"truncation": summary}`` of the battles the saved model trained on (``inputs.json``), if kept."""
        path = Path(directory) / INPUTS
        if not path.is_file():
            return {}
        return {"truncation": read_json(path)["training_battles"]}

    @classmethod
    def _saved_params(cls, directory: Path) -> dict:
        """The params ``load`` builds the stage with: those in ``stage.json``."""
        return cls.read_stage_json(directory)["params"]

    @classmethod
    def load(cls, directory, context: StageContext | None = None) -> "DeepStage":
        directory = Path(directory)
        stage = cls(cls._saved_params(directory), context)
        stage._setup()
        stage._load_model(directory)
        log_path = directory / TRAINING_LOG
        stage.log_history = read_json(log_path) if log_path.exists() else []
        return stage

    @classmethod
    def load_folds(cls, directories, context: StageContext | None = None) -> FoldModels:
        """Each fold's saved model; folds that read their inputs alike (equal :meth:`input_signature`)
        share one :class:`models.deep.inputs.RecentEncodings`, so each battle set is encoded once per
        A/B order for all of them (the decoder overrides this: one stage object for every fold's adapter)."""
        folds = super().load_folds(directories, context)
        first = folds.models[0]
        signature = first.input_signature()
        for other in folds.models[1:]:
            if other.input_signature() == signature:
                other.recent_encodings = first.recent_encodings
        return folds

    def input_signature(self) -> tuple:
        """What encoding a battle depends on: the stage type, ``max_length``, ``prompt_share``, the
        encoding options and the tokenizer, the whole of it (a saved encoder fold carries its own copy:
        compared by its full serialisation). Two stages with equal signatures encode every battle alike."""
        p, tok = self.params, self.tokenizer
        vocabulary = (tok.backend_tokenizer.to_str() if hasattr(tok, "backend_tokenizer")
                      else (sorted(tok.get_vocab().items()), tuple(tok.all_special_tokens)))
        return (self.kind, p.max_length, p.prompt_share, sorted(self.encoding_options().items()), type(tok).__name__,
                tok.padding_side, tok.truncation_side, getattr(tok, "chat_template", None), vocabulary)


def batch_budget(params) -> tuple[int, int | None]:
    """``(max_tokens, max_rows)`` of one inference batch: ``predict_batch_tokens`` padded tokens (None:
    ``predict_batch_size`` rows of ``max_length``) and ``predict_batch_size`` rows (None: no row cap, the
    token budget alone bounds a batch, so short battles fill it)."""
    rows = params.predict_batch_size
    tokens = params.predict_batch_tokens or (rows or 1) * params.max_length
    return int(tokens), (None if rows is None else int(rows))


class NonFiniteLogitsError(UserError, FloatingPointError):
    """A deep stage predicted NaN or infinite logits (one line: the stage, how many battles, what to change)."""


def check_finite(logits: np.ndarray, stage: str, precision: str) -> None:
    """:class:`NonFiniteLogitsError` unless every logit is finite: a NaN row must not reach the ensemble."""
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        rule = ("under fp16 only the projections compute in fp16 and the residual stream stays in fp32 "
                "(docs/deep_stages.md, 'The fp16 rule'), so a projection's own output overflowed"
                if precision == "fp16" else "the weights or inputs hold NaN/inf")
        raise NonFiniteLogitsError(
            f"{stage}: {int(bad.sum())} of {len(logits)} battles got NaN/inf logits at precision {precision} "
            f"(first row {int(np.flatnonzero(bad)[0])}); {rule}; try precision bf16 (GPUs with native bf16) or fp32")


def _cut_line(summary: dict) -> str:
    """One log line of a truncation summary: the share of battles cut per field, whole turns dropped."""
    cut = ", ".join(f"{f} {summary[f]['share_cut']:.0%}" for f in FIELDS)
    return f"battles cut: {cut}; {sum(summary[f]['turns_dropped'] for f in FIELDS)} whole turns dropped"
