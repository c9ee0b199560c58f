"""The run directory: its layout, its tables, and who may write into it.

(Being filled in: logits tables for now.)
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from battles.files import write_atomic

LOGIT_COLUMNS = ["logit_a", "logit_b", "logit_tie"]


def write_logits(path, ids, logits: np.ndarray) -> None:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape != (len(ids), 3):
        raise ValueError(f"logits shape {logits.shape} does not match {len(ids)} ids x 3 classes")
    frame = pd.DataFrame(logits, columns=LOGIT_COLUMNS)
    frame.insert(0, "id", list(ids))
    write_atomic(path, lambda p: frame.to_csv(p, index=False, float_format="%.9g"))


def read_logits(path, ids=None) -> np.ndarray:
    """Read a logits table; with ``ids``, check and return rows in that order."""
    frame = pd.read_csv(path, dtype={"id": str}, keep_default_na=False)
    if ids is not None:
        ids = [str(i) for i in ids]
        if len(frame) != len(ids) or set(frame["id"]) != set(ids):
            raise ValueError(f"{path}: logits are for different battles than expected ({len(frame)} vs {len(ids)} rows)")
        frame = frame.set_index("id").loc[ids].reset_index()
    return frame[LOGIT_COLUMNS].to_numpy(dtype=np.float64)
