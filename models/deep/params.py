"""Parameters both deep stages share (each stage's ``Params`` extends :class:`DeepParams`).

Fields whose default differs between the encoder and the decoder (``max_length``, ``learning_rate``,
batch sizes, ``predict_batch_tokens``, ...) are declared on the stage's own ``Params`` with that
stage's default; every default lives in exactly one class, and the code below the stages (the
packing policy, the input encodings) takes these values as required arguments. The choices of
``precision`` are those of :mod:`models.deep.precision` (and the decoder's ``quantization`` those of
:mod:`models.deep.quantization`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from kernel.schema import NonNegativeFloat, Section
from models.deep.precision import DTYPES

Precision = Literal[("auto", *DTYPES)]


class DeepParams(Section):
    model: str  # local checkpoint directory (required), e.g. /models/gemma-2-9b-it or /models/deberta-v3-large
    prompt_share: float = Field(0.2, gt=0.0, lt=1.0)  # packing: the prompt's share of the text budget
    epochs: float = Field(1.0, gt=0.0)  # passes over the training rows (fractions allowed)
    max_steps: int = Field(-1, ge=-1)  # > 0 caps optimizer steps (overrides epochs): short schedules, CPU smoke runs
    predict_batch_size: int = Field(32, ge=1)  # sequences per inference batch (per device)
    max_grad_norm: NonNegativeFloat = 1.0  # gradient clipping; 0 disables
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)  # hard labels only mix this much of the uniform target in
    precision: Precision = "auto"  # auto: bf16 where the GPU has it natively, else fp16 (loss scaling); fp32 on CPU
    save_steps: int = Field(200, ge=0)  # Trainer checkpoint (resume point) every n optimizer steps; 0 = none
    logging_steps: int = Field(10, ge=1)  # log the training loss every n optimizer steps
    swap_tta: bool = True  # average both A/B orders at prediction
    num_workers: int = Field(0, ge=0)  # DataLoader worker processes
