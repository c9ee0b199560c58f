"""What the pipeline hands every stage and feature block besides data.

One place for the run-time context (where to cache label-free resources, the seed, how loud to be,
where a fold may keep its scratch files) and for the default seed of the whole stack.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SEED = 42


@dataclass
class StageContext:
    """Run-time context of a stage or feature block (never part of its params or resume key)."""

    resource_dir: Path | None = None  # run-level cache of label-free resources (Word2Vec, embeddings)
    seed: int = DEFAULT_SEED
    progress: bool = True  # progress bars
    work_dir: Path | None = None  # the fold's own directory for scratch files (training checkpoints)
    # run-level store of fold-independent features (features/cache.py): the stages of one run share
    # them in memory; the copy under resource_dir is read only by a later (resumed) process
    feature_memo: dict = field(default_factory=dict, repr=False)
