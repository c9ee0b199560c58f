"""Training both deep stages: the one soft-label loss, the one Trainer subclass, Trainer arguments,
and the fold's checkpoints (resume after a kill).

Checkpoints: with ``save_steps > 0`` the Trainer saves a full checkpoint (adapter or model weights,
optimizer, scheduler, RNG states, data position) every ``save_steps`` optimizer steps under
``<fold dir>/checkpoints``; a rerun of the same fold (the pipeline wipes a fold directory whose
resume key changed, so what is there belongs to this config and data) resumes from the newest one,
and the folder is removed when the fold's training finishes. Without a fold directory (a stage used
on its own) no checkpoint is kept.

One process, one GPU: in a single process that sees several GPUs (Kaggle's 2x T4 with plain ``python
run.py``) the Trainer would feed ``per_device x n_gpu`` rows to the model's one GPU (a quantised model
is never wrapped in ``DataParallel``) and take ``1/n_gpu`` of the configured optimizer steps;
:func:`training_arguments` pins the Trainer to this process's device, as the Trainer itself does for a
model-parallel model, and logs how to use every GPU (``accelerate launch``, one process per GPU).

Memory after a fold: :meth:`PreferenceTrainer.train` releases what bitsandbytes keeps in process-wide
registries once training ends (the 8-bit optimizer manager's hold on the model's embedding modules,
the paged optimizer state's managed memory), so the next fold or stage in the same process starts
from the memory it had before this one.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from kernel.dist import is_main_process, wait_for_everyone
from models.deep.precision import Precision

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def preference_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                    smoothing: float = 0.0) -> torch.Tensor:
    """Weighted mean over rows of KL(target || softmax(logits)), computed in fp32.

    ``target`` rows are distributions over ``[a, b, tie]``: one-hot for human labels (KL is then the
    cross-entropy), soft for teacher or pseudo labels (KL is zero when the model matches the teacher;
    the gradient is that of the soft cross-entropy). ``smoothing`` mixes that share of the uniform
    distribution into every target. Normalised by the batch's total weight, so the loss is a per-batch
    mean (the Trainer divides it by the accumulation steps; see :class:`PreferenceTrainer`).
    """
    target = target.float()
    if smoothing:
        target = (1.0 - smoothing) * target + smoothing / target.shape[-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    per_row = (torch.special.xlogy(target, target) - target * logp).sum(-1)
    if weight is None:
        return per_row.mean()
    weight = weight.float()
    return (weight * per_row).sum() / weight.sum().clamp_min(1e-12)


class PreferenceTrainer(Trainer):
    """Trainer whose loss is :func:`preference_loss` on ``labels`` (n, 3) and row weights ``weight``.

    ``loss_is_scaled_for_ga = False`` tells the Trainer our loss is a per-batch mean that it must divide
    by the accumulation steps: a model whose ``forward`` takes ``**kwargs`` (Gemma-2, Llama) would
    otherwise be taken to normalise by ``num_items_in_batch`` itself, and accumulation over k batches
    would give k times the gradient of one k-times-larger batch.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        target, weight = inputs.pop("labels"), inputs.pop("weight", None)
        outputs = model(**inputs)
        smoothing = self.label_smoothing if model.training else 0.0  # validation log loss is unsmoothed
        loss = preference_loss(outputs.logits, target, weight, smoothing)
        return (loss, outputs) if return_outputs else loss

    def train(self, *args, **kwargs):
        """``Trainer.train``, then the optimizer's memory released (also when training fails)."""
        try:
            return super().train(*args, **kwargs)
        finally:
            release_optimizer(self.optimizer, self.model)
            self.optimizer = self.lr_scheduler = None


class CostProjection(TrainerCallback):
    """Logs the fold's projected training time once the first optimizer steps are timed: the pace of steps
    2..``1 + timed`` (the first step also pays for warm-up) times the steps left, plus the time spent. On
    CPU, a warning above ``warn_minutes`` says how to shorten it (``max_steps``, ``max_length``, a GPU)."""

    timed = 2  # optimizer steps timed after the first
    WARN_MINUTES = 30.0  # on CPU, warn when a fold's training is projected to take longer

    def __init__(self, stage: str, device: torch.device, warn_minutes: float | None = None):
        self.stage, self.device = stage, device
        self.warn_minutes = self.WARN_MINUTES if warn_minutes is None else warn_minutes
        self.start = self.after_first = None
        self.projected_minutes: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.monotonic(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        done = state.global_step - self.first_step
        if done == 1:
            self.after_first = time.monotonic()
        elif done == 1 + self.timed and self.projected_minutes is None and self.after_first is not None:
            now = time.monotonic()
            pace = (now - self.after_first) / self.timed
            self.projected_minutes = ((now - self.start) + pace * max(state.max_steps - state.global_step, 0)) / 60
            log.info("%s: projected %.1f min for this fold's training (%d optimizer steps, %.1f s per step on %s)",
                     self.stage, self.projected_minutes, state.max_steps, pace, self.device)
            if self.device.type == "cpu" and self.projected_minutes > self.warn_minutes:
                log.warning("%s: this fold's training will take about %.0f min on CPU (%d steps of %.1f s); for a "
                            "short run lower max_steps or max_length, train fewer folds, or use a GPU",
                            self.stage, self.projected_minutes, state.max_steps, pace)


def release_optimizer(optimizer, model) -> None:
    """Free what outlives a finished training in bitsandbytes' process-wide registries.

    - ``GlobalOptimManager`` (the Trainer registers every ``nn.Embedding`` there for 32-bit optimizer
      state) keeps the modules, hence the whole frozen embedding, alive after the stage is gone, and
      its per-parameter configs keyed by ``id()`` could match a later model's parameters;
    - a paged optimizer's state tensors are CUDA managed memory that ``GlobalPageManager`` lists
      forever and that nothing frees: they are unlisted and freed (``cudaFree``) here.
    The optimizer's own state is cleared too. A no-op for torch's optimizers.
    """
    import sys

    bnb = sys.modules.get("bitsandbytes")
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if bnb is None:
        return
    modules = {id(m) for m in model.modules()} if model is not None else set()
    params = {id(p) for p in model.parameters()} if model is not None else set()
    manager = bnb.optim.GlobalOptimManager.get_instance()
    dropped = [c for m, _, c in manager.module_weight_config_triple if id(m) in modules]
    manager.module_weight_config_triple = [t for t in manager.module_weight_config_triple if id(t[0]) not in modules]
    manager.pid2config = {k: v for k, v in manager.pid2config.items()
                          if k not in params and not any(v is c for c in dropped)}
    manager.index2config = {k: v for k, v in manager.index2config.items() if not any(v is c for c in dropped)}
    if inner is None:
        return
    paged = [t for state in inner.state.values() for t in state.values()
             if isinstance(t, torch.Tensor) and getattr(t, "is_paged", False)]
    if paged:
        pages = bnb.functional.GlobalPageManager.get_instance()
        ours = {id(t) for t in paged}
        pages.paged_tensors = [t for t in pages.paged_tensors if id(t) not in ours]
        _free_managed([t.data_ptr() for t in paged])
    inner.state.clear()


def _free_managed(pointers: list[int]) -> None:
    """``cudaFree`` the CUDA managed allocations at ``pointers`` (bitsandbytes' paged buffers, which it
    never frees), through the CUDA runtime already loaded in this process."""
    import ctypes

    if not pointers:
        return
    torch.cuda.synchronize()
    runtime = _cuda_runtime()
    if runtime is None:
        log.warning("could not find the CUDA runtime library: %d paged optimizer buffers stay allocated", len(pointers))
        return
    for pointer in pointers:
        runtime.cudaFree(ctypes.c_void_p(pointer))


def _cuda_runtime():
    """The ``libcudart`` this process has loaded (torch's or bitsandbytes'), via ctypes; None if none is."""
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def training_arguments(params, precision: Precision, device: torch.device, optim: str,
                       seed: int, progress: bool, **overrides) -> TrainingArguments:
    """The Trainer arguments both deep stages share; ``overrides`` adds or replaces stage-specific ones.
    The output directory is the fold's checkpoint folder, set by :func:`checkpoint_folder`."""
    p = params
    kwargs = dict(
        use_cpu=device.type == "cpu", per_device_train_batch_size=int(p.train_batch_size),
        per_device_eval_batch_size=int(p.predict_batch_size or p.train_batch_size),  # None: the decoder's token budget
        gradient_accumulation_steps=int(p.grad_accum),
        learning_rate=float(p.learning_rate), weight_decay=float(p.weight_decay), num_train_epochs=float(p.epochs),
        max_steps=int(p.max_steps), lr_scheduler_type="cosine", warmup_steps=float(p.warmup_ratio),  # < 1: a ratio
        max_grad_norm=float(p.max_grad_norm), optim=optim, logging_steps=int(p.logging_steps),
        save_strategy="steps" if p.save_steps else "no", save_steps=int(p.save_steps) or 500, save_total_limit=1,
        report_to="none", remove_unused_columns=False, label_names=["labels"],
        train_sampling_strategy="group_by_length", seed=int(seed), data_seed=int(seed), disable_tqdm=not progress,
        dataloader_num_workers=int(p.num_workers), dataloader_pin_memory=device.type == "cuda",
        ddp_find_unused_parameters=False, **precision.trainer_flags(),
    )
    kwargs.update(overrides)
    args = TrainingArguments(**kwargs)
    if args.n_gpu > 1:  # one process seeing several GPUs: DataParallel, or n_gpu x the batch on one GPU
        log.warning("this process sees %d GPUs and trains on one (%s); to train on all of them, start one "
                    "process per GPU: accelerate launch --num_processes %d run.py ...", args.n_gpu, device, args.n_gpu)
        args._n_gpu = 1  # as the Trainer does for a model-parallel model: batches are per_device rows
    return args


@contextmanager
def checkpoint_folder(work_dir, args: TrainingArguments):
    """Point ``args.output_dir`` at one fold's checkpoint folder and yield the checkpoint to resume
    from (or None); remove the folder when training succeeded.

    ``work_dir`` is the fold directory (checkpoints kept there, and resumed from) or ``None`` (a
    temporary folder that every rank of a multi-process launch shares; nothing is resumed).
    """
    from accelerate.utils import broadcast_object_list

    args.device  # sets up the process group of a multi-process launch
    if work_dir is not None:
        folder = Path(work_dir) / CHECKPOINTS
    else:
        made = [tempfile.mkdtemp(prefix="deep-trainer-") if is_main_process() else None]
        broadcast_object_list(made)
        folder = Path(made[0])
    resume = get_last_checkpoint(folder) if work_dir is not None and folder.is_dir() else None
    if resume:
        log.info("resuming the fold's training from %s", resume)
    args.output_dir = str(folder)
    yield resume
    wait_for_everyone()
    if is_main_process():
        shutil.rmtree(folder, ignore_errors=True)
