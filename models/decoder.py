"""Decoder stage: a (Q)LoRA-tuned decoder LM (Gemma-2, Llama-3.x, Qwen2) with a 3-class head.

``AutoModelForSequenceClassification`` (num_labels=3) reads the hidden state of the last non-pad
token. On CUDA the base model is loaded in 4-bit NF4 (double quantisation, bf16 compute), 8-bit or
bf16 (``quantization``); without CUDA it is loaded unquantised in float32 and the log says so.
LoRA adapters (peft, task SEQ_CLS) go on all linear projections by default; the ``score`` head is
trained in full (``modules_to_save``) and re-initialised with a small std (``head_init_std``,
default 1e-3) so that the first logits are close to zero: predictions start uniform (loss ~ log 3)
instead of carrying the large, arbitrary logits that a default-initialised head produces on
Gemma's large-norm hidden states.

Training uses the HF Trainer with one custom loss (:func:`preference_loss`): cross-entropy for
rows with hard labels, KL divergence to the teacher distribution for rows with soft labels
(``soft_a/soft_b/soft_tie``), each row weighted by ``weight``. Inference sorts battles by length
into token-budgeted batches, averages both A/B orders (:func:`models.stage.swap_tta`) and, with
several GPUs, splits the battles across them (one process per GPU).

Saved stage directory: ``decoder.json`` (params) plus peft's ``adapter_config.json`` and
``adapter_model.safetensors`` (LoRA weights and the head). The base checkpoint is not copied;
``load`` reads it from ``params.model``.

Multi-GPU training: run the same command under ``accelerate launch`` (DDP; see
``configs/accelerate_fsdp.yaml`` for an FSDP example); the Trainer picks the process group up.
"""
from __future__ import annotations

import gc
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from typing import Literal

from battles.labels import has_labels, label_matrix, row_weights, soft_mask, swap_battles
from battles.schema import Section
from models.decoder_inputs import BattleEncoder
from models.stage import Stage, StageContext, swap_tta
from battles.files import read_json, write_json

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("4bit", "8bit", "none")


class DecoderParams(Section):
    model: str  # local checkpoint directory (required), e.g. /models/gemma-2-9b-it
    quantization: Literal["4bit", "8bit", "none"] = "4bit"  # ignored (unquantised fp32) without CUDA
    max_length: int = 2048
    prompt_share: float = 0.2  # packing: share of the text budget for the prompt
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    layers_to_transform: list[int] | None = None  # e.g. list(range(16, 42)): adapters only on upper layers
    head_init_std: float = 1e-3
    learning_rate: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    train_batch_size: int = 2  # per device
    grad_accum: int = 8
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    swap_augment: bool = False  # train on each battle in both A/B orders
    predict_batch_tokens: int = 16384  # padded tokens per inference batch
    predict_batch_size: int = 32
    swap_tta: bool = True  # average both A/B orders at prediction
    data_parallel: bool = True  # split inference across all visible GPUs
    attn_implementation: str | None = None  # None: transformers' choice (Gemma-2: eager, keeps soft-capping)
    evaluate_valid: bool = False  # log the valid log loss after fit (an extra pass over valid)
    logging_steps: int = 10


# ----------------------------------------------------------------------------- model loading
def quantization_config(quantization: str):
    """The ``BitsAndBytesConfig`` for ``quantization`` on CUDA; ``None`` (unquantised) otherwise.

    Without CUDA bitsandbytes cannot run 4/8-bit layers, so the same code path runs unquantised
    and a warning says so. The ``score`` head is kept out of quantisation: it is trained in full.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if not torch.cuda.is_available():
        if quantization != "none":
            logger.warning("CUDA is not available: running the decoder UNQUANTISED (float32 on CPU) "
                           "instead of %s", quantization)
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        # bf16 quant storage: identical numerics, and lets FSDP shard the 4-bit weights with the rest.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
                                  llm_int8_skip_modules=["score"])
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["score"])
    return None


def compute_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def check_model_dir(path) -> Path:
    if not path:
        raise ValueError("decoder params need 'model': a local checkpoint directory (e.g. /models/gemma-2-9b-it)")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"decoder model directory {path} does not exist or has no config.json")
    return path


def load_tokenizer(path):
    """The checkpoint's tokenizer, with a pad token (EOS when the checkpoint has none) and right padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The seq-cls head pools the last non-pad token, which works for either side; right is the HF default.
    tokenizer.padding_side = "right"
    return tokenizer


def load_base_model(path, quantization: str, pad_token_id: int, attn_implementation=None, device=None):
    """``AutoModelForSequenceClassification`` with 3 labels, quantised per :func:`quantization_config`."""
    from transformers import AutoModelForSequenceClassification

    path = check_model_dir(path)
    bnb = quantization_config(quantization)
    kwargs = {"num_labels": 3, "dtype": compute_dtype(), "quantization_config": bnb}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": device or f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"}
    logger.info("loading %s (quantization=%s, dtype=%s)", path, quantization if bnb else "none", kwargs["dtype"])
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    model.config.pad_token_id = pad_token_id
    if device is not None and not torch.cuda.is_available():
        model.to(device)
    return model


def add_lora(model, params: dict):
    """Re-initialise the head, prepare k-bit training, and wrap the model with LoRA adapters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.nn.init.normal_(model.score.weight, mean=0.0, std=float(params.head_init_std))
    gc_kwargs = {"use_reentrant": False}
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=params.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif params.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    config = LoraConfig(r=int(params.lora_r), lora_alpha=int(params.lora_alpha),
                        lora_dropout=float(params.lora_dropout), target_modules=list(params.target_modules),
                        layers_to_transform=params.layers_to_transform, task_type="SEQ_CLS",
                        modules_to_save=["score"])
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%s on %s: %s trainable of %s parameters", params.lora_r, params.target_modules,
                f"{trainable:,}", f"{total:,}")
    return model


# ----------------------------------------------------------------------------- loss and training
def preference_loss(logits: torch.Tensor, target: torch.Tensor, soft: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean over rows of CE (hard rows) or KL(target || model) (rows where ``soft`` is true).

    For a one-hot target KL equals CE; for a soft target KL = soft CE - entropy(target), so KL is
    zero when the model matches the teacher. Normalised by the sum of weights in the batch.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    cross = -(target * logp).sum(-1)
    kl = (torch.special.xlogy(target, target) - target * logp).sum(-1)
    per_row = torch.where(soft.bool(), kl, cross)
    return (weight * per_row).sum() / weight.sum().clamp_min(1e-12)


def _trainer_class():
    from transformers import Trainer

    class PreferenceTrainer(Trainer):
        """Trainer whose loss is :func:`preference_loss` (a per-batch mean; the Trainer scales it for GA)."""

        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            target, soft, weight = inputs.pop("labels"), inputs.pop("soft"), inputs.pop("weight")
            outputs = model(**inputs)
            loss = preference_loss(outputs.logits, target, soft, weight)
            return (loss, outputs) if return_outputs else loss

    return PreferenceTrainer


def optimizer_name() -> str:
    if torch.cuda.is_available():
        return "paged_adamw_8bit"
    logger.info("CUDA is not available: optimizer adamw_torch instead of paged_adamw_8bit")
    return "adamw_torch"


# ----------------------------------------------------------------------------- batching and sharding
def length_batches(lengths, max_tokens: int, max_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, longest first, each padded size <= ``max_tokens``."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, current = [], []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_size or (len(current) + 1) * longest > max_tokens):
            batches.append(np.array(current))
            current = []
        current.append(i)
    if current:
        batches.append(np.array(current))
    return batches


def shard_indices(lengths, n_shards: int) -> list[np.ndarray]:
    """Split rows across ``n_shards`` devices with balanced token totals (longest first, to the lightest shard)."""
    lengths = np.asarray(lengths)
    shards, loads = [[] for _ in range(n_shards)], np.zeros(n_shards)
    for i in np.argsort(-lengths, kind="stable"):
        k = int(np.argmin(loads))
        shards[k].append(int(i))
        loads[k] += lengths[i]
    return [np.array(sorted(s), dtype=np.int64) for s in shards]


def _predict_shard(rank: int, stage_dir: str, parts: list, out_dir: str, devices: list) -> None:
    """Worker of :meth:`DecoderStage.predict_data_parallel`: ``parts[rank]`` on ``devices[rank]``."""
    stage = DecoderStage.load(stage_dir, StageContext(progress=False), device=devices[rank])
    stage.params.data_parallel = False
    np.save(Path(out_dir) / f"logits_{rank}.npy", stage.predict_logits(parts[rank]), allow_pickle=False)


# ----------------------------------------------------------------------------- the stage
class DecoderStage(Stage):
    """QLoRA decoder sequence classifier. Params: :class:`DecoderParams`; ``model`` is required."""

    kind = "decoder"
    Params = DecoderParams

    def __init__(self, params=None, context: StageContext | None = None, device=None):
        super().__init__(params, context)
        check_model_dir(self.params.model)
        self.device = device
        self.tokenizer = load_tokenizer(self.params.model)
        self.encoder = BattleEncoder(self.tokenizer, self.params.max_length, self.params.prompt_share)
        self.model = None

    # -- inputs
    def encode(self, battles: pd.DataFrame) -> list[list[int]]:
        return [self.encoder.encode(p, a, b).input_ids
                for p, a, b in zip(battles["prompt"], battles["response_a"], battles["response_b"])]

    def training_table(self, train: pd.DataFrame) -> pd.DataFrame:
        """The battles the model trains on: with ``swap_augment``, each battle in both A/B orders."""
        if self.params.swap_augment:
            return pd.concat([train, swap_battles(train)], ignore_index=True)
        return train

    def _train_rows(self, battles: pd.DataFrame) -> list[dict]:
        targets, soft, weight = label_matrix(battles), soft_mask(battles), row_weights(battles)
        return [{"input_ids": ids, "labels": t.tolist(), "soft": float(s), "weight": float(w)}
                for ids, t, s, w in zip(self.encode(battles), targets, soft, weight)]

    # -- training
    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "DecoderStage":
        from transformers import DataCollatorWithPadding, TrainingArguments, set_seed

        if not has_labels(train):
            raise ValueError("decoder fit needs labelled battles (winner_model_a/winner_model_b/winner_tie)")
        p = self.params
        rows = self._train_rows(self.training_table(train))
        self.model = None  # the pipeline refits one stage object per fold: free the last fold's model first
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        set_seed(self.context.seed)  # head re-init and LoRA init draw from the global RNG
        base = load_base_model(p.model, p.quantization, self.tokenizer.pad_token_id,
                               p.attn_implementation, self.device)
        self.model = add_lora(base, p)
        use_bf16 = compute_dtype() == torch.bfloat16
        with tempfile.TemporaryDirectory(prefix="decoder-trainer-") as scratch:
            args = TrainingArguments(
                output_dir=scratch, per_device_train_batch_size=int(p.train_batch_size),
                gradient_accumulation_steps=int(p.grad_accum), learning_rate=float(p.learning_rate),
                num_train_epochs=float(p.epochs), max_steps=int(p.max_steps), lr_scheduler_type="cosine",
                warmup_steps=float(p.warmup_ratio), weight_decay=float(p.weight_decay),
                max_grad_norm=float(p.max_grad_norm), optim=optimizer_name(), bf16=use_bf16,
                logging_steps=int(p.logging_steps), save_strategy="no", report_to="none",
                remove_unused_columns=False, train_sampling_strategy="group_by_length",
                seed=self.context.seed, data_seed=self.context.seed, disable_tqdm=not self.context.progress,
                ddp_find_unused_parameters=False, dataloader_pin_memory=torch.cuda.is_available(),
            )
            trainer = _trainer_class()(model=self.model, args=args, train_dataset=rows,
                                       data_collator=DataCollatorWithPadding(self.tokenizer))
            trainer.train()
        self.model.eval()
        if valid is not None and len(valid) and p.evaluate_valid and has_labels(valid):
            self.valid_log_loss_ = self.log_loss(valid)
            logger.info("decoder valid log loss %.4f on %d battles", self.valid_log_loss_, len(valid))
        return self

    def log_loss(self, battles: pd.DataFrame) -> float:
        logp = torch.log_softmax(torch.as_tensor(self.predict_logits(battles)), dim=-1).numpy()
        return float(-(label_matrix(battles) * logp).sum(axis=1).mean())

    # -- inference
    @torch.inference_mode()
    def predict_one_order(self, battles: pd.DataFrame) -> np.ndarray:
        """Logits for the battles as given (no TTA), in length-sorted token-budgeted batches."""
        if self.model is None:
            raise RuntimeError("decoder stage is not fitted or loaded")
        encoded = self.encode(battles)
        lengths = np.array([len(x) for x in encoded])
        batches = length_batches(lengths, int(self.params.predict_batch_tokens),
                                 int(self.params.predict_batch_size))
        device = next(self.model.parameters()).device
        out = np.zeros((len(battles), 3), dtype=np.float32)
        self.model.eval()
        for idx in tqdm(batches, desc="decoder predict", disable=not self.context.progress, leave=False):
            batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            logits = self.model(input_ids=batch["input_ids"].to(device),
                                attention_mask=batch["attention_mask"].to(device)).logits
            out[idx] = logits.float().cpu().numpy()
        return out

    @property
    def tta_from_orders(self) -> bool:
        """True when ``predict_logits`` is exactly the average of both orders in this process (TTA on,
        no multi-GPU split): the pipeline may then keep the two orders for the position-bias check."""
        return bool(self.params.swap_tta) and not (self.params.data_parallel and torch.cuda.device_count() > 1)

    def predict_logits(self, battles: pd.DataFrame) -> np.ndarray:
        n_gpu = torch.cuda.device_count()
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under accelerate/torchrun: no nested spawn
        if self.params.data_parallel and n_gpu > 1 and not distributed and len(battles) >= n_gpu:
            return self.predict_data_parallel(battles, [f"cuda:{k}" for k in range(n_gpu)])
        if self.params.swap_tta:
            return swap_tta(self.predict_one_order, battles)
        return self.predict_one_order(battles).astype(np.float64)

    def predict_data_parallel(self, battles: pd.DataFrame, devices: list) -> np.ndarray:
        """Split the battles across ``devices`` (one spawned process each) and reassemble in order."""
        import torch.multiprocessing as mp

        # Character counts stand in for token counts: good enough to balance the shards' work.
        chars = [sum(len(t) for turns in row for t in turns)
                 for row in zip(battles["prompt"], battles["response_a"], battles["response_b"])]
        shards = shard_indices(chars, len(devices))
        with tempfile.TemporaryDirectory(prefix="decoder-dp-") as scratch:
            self.save(Path(scratch) / "stage")
            parts = [battles.iloc[s].reset_index(drop=True) for s in shards]
            mp.spawn(_predict_shard, args=(str(Path(scratch) / "stage"), parts, scratch, devices),
                     nprocs=len(devices), join=True)
            out = np.zeros((len(battles), 3))
            for k, s in enumerate(shards):
                out[s] = np.load(Path(scratch) / f"logits_{k}.npy", allow_pickle=False)
        return out

    @classmethod
    def predict_folds(cls, directories, battles: pd.DataFrame, context: StageContext | None = None,
                      fold_combine: str = "average_logits", device=None) -> np.ndarray:
        """Fold-averaged logits of several saved fold stages, loading the base model once (one device).

        Each fold's adapter (LoRA weights and head) is attached to the one base model under its own
        name and activated in turn; ``fold_combine="average_logits"`` averages the folds' separately
        predicted log-probabilities (:func:`models.stage.average_logits`), which equals loading and
        predicting each fold stage on its own.
        """
        from models.stage import average_logits

        if fold_combine != "average_logits":
            raise ValueError(f"fold_combine {fold_combine!r} is not supported; use 'average_logits'")
        directories = [Path(d) for d in directories]
        if not directories:
            raise ValueError("predict_folds needs at least one saved fold directory")
        stage = cls.load(directories[0], context, device=device, adapter_name="fold0")
        stage.params.data_parallel = False  # several adapters live in this one model: predict on one device
        for k, directory in enumerate(directories[1:], start=1):
            stage.model.load_adapter(directory, adapter_name=f"fold{k}")
        per_fold = []
        for k, directory in enumerate(directories):
            logger.info("predicting with fold %d adapter (%s)", k, directory)
            stage.model.set_adapter(f"fold{k}")
            per_fold.append(stage.predict_logits(battles))
        return average_logits(per_fold)

    # -- persistence
    def save(self, directory) -> None:
        if self.model is None:
            raise RuntimeError("decoder stage is not fitted: nothing to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        write_json(directory / "stage.json", {"kind": self.kind, "params": self.params.as_dict()})

    @classmethod
    def load(cls, directory, context: StageContext | None = None, device=None,
             adapter_name: str = "default") -> "DecoderStage":
        from peft import PeftModel

        directory = Path(directory)
        meta_path = directory / "stage.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not a saved decoder stage directory")
        stage = cls(read_json(meta_path)["params"], context, device=device)
        p = stage.params
        base = load_base_model(p.model, p.quantization, stage.tokenizer.pad_token_id, p.attn_implementation, device)
        stage.model = PeftModel.from_pretrained(base, directory, adapter_name=adapter_name).eval()
        return stage
