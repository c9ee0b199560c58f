"""Frozen MiniLM embedding features on a slice of real battles: shapes, swap symmetry, disk cache."""
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from battles.labels import swap_battles  # noqa: E402
from features.registry import make_block  # noqa: E402
from models.stage import StageContext  # noqa: E402


def test_embedding_block_features_and_cache(tmp_path, minilm_dir, arena_battles):
    battles = arena_battles.iloc[:24].reset_index(drop=True)
    context = StageContext(resource_dir=tmp_path, progress=False)
    block = make_block("embeddings", {"model": minilm_dir, "max_length": 128}, context)
    block.prepare(battles)
    assert block.n_embedded == len({t for c in ("prompt", "response_a", "response_b")
                                     for t in block._texts(battles)[c]})
    feats = block.transform(battles)
    assert feats.a.shape == (24, 385) and feats.names[-1] == "cos_prompt"
    assert feats.shared_names == ["cos_ab", "cos_prompt_mean"] and feats.combine == ("diff",)
    assert np.all(np.abs(feats.a[:, -1]) <= 1 + 1e-6) and np.all(feats.shared[:, 0] <= 1 + 1e-6)
    # replies are about their prompts: clearly positive mean prompt-reply cosine
    assert feats.a[:, -1].mean() > 0.3
    matrix, names = feats.matrix("emb_")
    assert matrix.shape == (24, 385 + 2) and names[0] == "emb_emb0_diff"
    # swapping A and B swaps the sides and leaves the shared columns alone
    swapped = block.transform(swap_battles(battles))
    np.testing.assert_array_equal(swapped.a, feats.b)
    np.testing.assert_array_equal(swapped.shared, feats.shared)
    # the disk cache: plain .npz chunks, and a fresh block reuses them without embedding anything
    files = list(tmp_path.rglob("*"))
    assert any(f.suffix == ".npz" for f in files) and not any(f.suffix in (".pkl", ".pickle") for f in files)
    again = make_block("embeddings", {"model": minilm_dir, "max_length": 128}, context)
    again.prepare(battles)
    assert again.n_embedded == 0 and again._model is None
    np.testing.assert_allclose(again.transform(battles).a, feats.a, atol=1e-6)
    # a different truncation length is a different cache
    other = make_block("embeddings", {"model": minilm_dir, "max_length": 64}, context)
    other.prepare(battles.iloc[:2])
    assert other.n_embedded > 0


def test_embedding_block_bad_params(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        make_block("embeddings", {"model": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="pooling\n  Extra inputs are not permitted"):
        make_block("embeddings", {"model": str(tmp_path), "pooling": "cls"})
