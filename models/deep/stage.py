"""What the two deep stages share at the stage level: set-up in fit/load (tokenizer, input encoding,
device, precision), sharded scoring, optional swap TTA and main-process saving."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kernel.dist import is_main_process
from kernel.local_models import default_device, load_tokenizer
from models.deep.batching import predict_sharded
from models.deep.precision import resolve_precision
from models.stage import Stage, StageContext


class DeepStage(Stage):
    """Base of :class:`models.encoder.EncoderStage` and :class:`models.decoder.DecoderStage`.

    A subclass names its input encoding (``Encoding``: battles -> token ids), whether its tokenizer pads
    with EOS, and implements ``_score`` (logits of one shard of battles), ``fit``, ``save`` and ``load``."""

    Encoding: type  # models.deep.inputs.ChatEncoding or PairEncoding
    pad_with_eos = False

    def __init__(self, params=None, context: StageContext | None = None):
        super().__init__(params, context)
        self.model = None  # the fitted or loaded model
        self.tokenizer = None
        self.log_history: list[dict] = []

    # -- set-up (in fit / load, never in __init__)
    def _setup(self) -> None:
        if self.tokenizer is not None:
            return
        p = self.params
        self.tokenizer = load_tokenizer(p.model, self.kind, pad_with_eos=self.pad_with_eos)
        self.encoding = self.Encoding(self.tokenizer, p.max_length, p.prompt_share)
        self.device = default_device()
        self.precision = resolve_precision(p.precision, self.device, self.kind)

    def training_callbacks(self, has_eval: bool) -> list:
        """Extra ``TrainerCallback``s for this stage's Trainer (none by default)."""
        return []

    # -- inference
    def predict_one_order(self, battles: pd.DataFrame) -> np.ndarray:
        """Logits for the battles as given (no TTA); under a multi-process launch each rank scores a shard."""
        if self.model is None:
            raise RuntimeError(f"{self.kind} stage is not fitted or loaded: call fit() or load() first")
        return predict_sharded(self._score, battles)

    @property
    def tta_from_orders(self) -> bool:
        """With swap TTA the answer is the base class's average of both orders: the pipeline may then
        ask for the two orders itself and keep them for the position-bias check."""
        return bool(self.params.swap_tta)

    def predict_logits(self, battles: pd.DataFrame) -> np.ndarray:
        if self.params.swap_tta:
            return super().predict_logits(battles)
        return self.predict_one_order(battles).astype(np.float64)

    def save_directory(self, directory) -> Path | None:
        """Where ``save`` writes (created), or None on a non-main rank of a multi-process launch."""
        if self.model is None:
            raise RuntimeError(f"{self.kind} stage is not fitted: nothing to save")
        if not is_main_process():
            return None
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return directory
