"""What the pipeline hands every stage and feature block besides data.

One place for the run-time context (where to cache label-free resources, the seed, how loud to be,
where a fold may keep its scratch files) and for the default seed of the whole stack.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_SEED = 42


@dataclass
class StageContext:
    """Run-time context of a stage or feature block (never part of its params or resume key)."""

    resource_dir: Path | None = None  # run-level cache of label-free resources (Word2Vec, embeddings)
    seed: int = DEFAULT_SEED
    progress: bool = True  # progress bars
    work_dir: Path | None = None  # the fold's own directory for scratch files (training checkpoints)
