"""What the two deep stages share at the stage level: optional swap TTA and main-process saving."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from battles.files import is_main_process
from models.stage import Stage


class DeepStage(Stage):
    """Base of :class:`models.encoder.EncoderStage` and :class:`models.decoder.DecoderStage`."""

    model = None

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
