"""Feature block type name -> "module:Class", imported lazily (the embedding block needs torch)."""
from __future__ import annotations

import importlib

FEATURE_BLOCKS: dict[str, str] = {
    "text_stats": "features.text_stats:TextStatsBlock",
    "similarity": "features.similarity:SimilarityBlock",
    "tfidf": "features.tfidf:TfidfBlock",
    "word2vec": "features.word2vec:Word2VecBlock",
    "embeddings": "features.embeddings:EmbeddingBlock",
}


def block_class(kind: str):
    if kind not in FEATURE_BLOCKS:
        raise ValueError(f"unknown feature block {kind!r}; known: {sorted(FEATURE_BLOCKS)}")
    module, name = FEATURE_BLOCKS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def make_block(kind: str, params=None, context=None):
    return block_class(kind)(params, context)
