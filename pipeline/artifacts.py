"""Files of a run directory: atomic writes, JSON, logits tables, and resume keys.

Nothing here writes a pickle: logits are CSV tables keyed by battle id, configs and metrics JSON,
models in their own library's format (written by each stage).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

LOGIT_COLUMNS = ["logit_a", "logit_b", "logit_tie"]


def is_main_process() -> bool:
    """False in the non-zero ranks of a multi-process launch (``accelerate launch``, ``torchrun``)."""
    return int(os.environ.get("RANK", "0")) == 0


def write_atomic(path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves half a file.

    Under a multi-process launch only the main process writes: every rank computes the same run
    files, and one writer keeps them whole.
    """
    if not is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj) -> None:
    write_atomic(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)))


def read_json(path):
    return json.loads(Path(path).read_text())


def _jsonable(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def config_key(*parts) -> str:
    """A short stable hash of JSON-able parts (config, data hash, folds) used to decide reuse."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_jsonable).encode()).hexdigest()[:16]


def write_logits(path, ids, logits: np.ndarray) -> None:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape != (len(ids), 3):
        raise ValueError(f"logits shape {logits.shape} does not match {len(ids)} ids x 3 classes")
    frame = pd.DataFrame(logits, columns=LOGIT_COLUMNS)
    frame.insert(0, "id", list(ids))
    write_atomic(path, lambda p: frame.to_csv(p, index=False, float_format="%.9g"))


def read_logits(path, ids=None) -> np.ndarray:
    """Read a logits table; with ``ids``, check and return rows in that order."""
    frame = pd.read_csv(path, dtype={"id": str})
    if ids is not None:
        ids = [str(i) for i in ids]
        if len(frame) != len(ids) or set(frame["id"]) != set(ids):
            raise ValueError(f"{path}: logits are for different battles than expected ({len(frame)} vs {len(ids)} rows)")
        frame = frame.set_index("id").loc[ids].reset_index()
    return frame[LOGIT_COLUMNS].to_numpy(dtype=np.float64)
