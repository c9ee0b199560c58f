"""Feature blocks on real battles: swap structure, fold fitting without leakage, save/load."""
from __future__ import annotations

import numpy as np
import pandas as pd

from battles.labels import swap_battles
from features.assemble import FeatureMatrix
from features.registry import make_block
from features.text_stats import SIDE_NAMES, reply_stats
from models.stage import StageContext


def test_reply_stats_count_markdown_and_refusals():
    text = "# Title\n\n- one\n- two\n\n**bold** and `code` [link](http://x.y)\n\n```py\nx=1\n```\nI'm sorry, as an AI I cannot."
    row = dict(zip(SIDE_NAMES, reply_stats([text, "second turn?"])))
    assert row["headers"] == 1 and row["list_items"] == 2 and row["bold"] == 1 and row["code_blocks"] == 1
    assert row["links"] == 1 and row["inline_code"] == 1 and row["refusals"] >= 3
    assert row["question_marks"] == 1 and row["last_turn_chars"] == len("second turn?")
    assert row["turn_chars_max"] == len(text)


def test_feature_matrix_of_swapped_battles_is_the_swapped_matrix(arena_battles, tmp_path):
    battles = arena_battles.head(60)
    blocks = [make_block(k, p, StageContext(resource_dir=tmp_path)) for k, p in [
        ("text_stats", None), ("similarity", None),
        ("tfidf", {"svd_components": 4, "n_features": 4096}), ("word2vec", {"vector_size": 8, "epochs": 1})]]
    fm = FeatureMatrix(blocks)
    for b in blocks:
        b.prepare(battles)
        b.fit(battles)
    x, xs, names = fm.build(battles)
    y, ys, _ = fm.build(swap_battles(battles))
    assert x.shape == (60, len(names)) and len(set(names)) == len(names)
    np.testing.assert_allclose(y, xs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ys, x, rtol=1e-5, atol=1e-6)


def test_tfidf_weights_come_from_training_rows_only(arena_battles):
    train, valid = arena_battles.iloc[:200], arena_battles.iloc[200:260]
    block = make_block("tfidf", {"svd_components": 4, "n_features": 4096})
    block.prepare(arena_battles)  # label-free counting of every text is allowed
    block.fit(train)
    idf = block.idf_.copy()
    other = make_block("tfidf", {"svd_components": 4, "n_features": 4096})
    other.fit(train)  # no prepare, no validation texts anywhere
    np.testing.assert_allclose(idf, other.idf_, rtol=1e-6)
    partly = make_block("tfidf", {"svd_components": 4, "n_features": 4096, "chunk": 16})
    partly.prepare(arena_battles.iloc[:230])  # valid battles 230.. are counted on the spot, in order
    partly.fit(train)
    np.testing.assert_array_equal(partly.transform(valid).a, block.transform(valid).a)
    changed = pd.concat([train, valid])
    block.fit(changed)
    assert not np.allclose(idf, block.idf_), "adding rows to the fit must change the IDF weights"


def test_blocks_save_and_load(arena_battles, tmp_path):
    battles = arena_battles.head(80)
    ctx = StageContext(resource_dir=tmp_path / "res")
    for kind, params in [("tfidf", {"svd_components": 4, "n_features": 4096}), ("word2vec", {"vector_size": 8})]:
        block = make_block(kind, params, ctx)
        block.prepare(battles)
        block.fit(battles)
        block.save(tmp_path / kind)
        again = make_block(kind, params, ctx)
        again.load(tmp_path / kind)
        a, b = block.transform(battles.head(10)), again.transform(battles.head(10))
        np.testing.assert_allclose(a.a, b.a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.shared, b.shared, rtol=1e-5, atol=1e-6)


def test_word2vec_is_reproducible_across_processes(arena_battles, tmp_path):
    """Same texts and seed give the same vectors in a fresh process (string hashing differs per process)."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from battles import read_battles; from features.registry import make_block;"
        "from models.stage import StageContext;"
        "b = read_battles(sys.argv[1])[0].head(60);"
        "blk = make_block('word2vec', {'vector_size': 8, 'epochs': 1, 'min_count': 1}, StageContext());"
        "blk.prepare(b); np.save(sys.argv[2], blk.transform(b).a)"
    )
    from tests.conftest import ROOT, shared_file

    sample = shared_file("arena/train_sample.csv")
    for name in ("one.npy", "two.npy"):
        subprocess.run([sys.executable, "-c", code, str(sample), str(tmp_path / name)], check=True, cwd=ROOT)
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))


def test_forked_workers_give_the_same_features_as_one_process(arena_battles, monkeypatch):
    """Chunks handed to forked workers come back in order: every number equals the in-process one."""
    import features.parallel as parallel

    battles = arena_battles.head(90)
    blocks = [make_block(k, p) for k, p in [
        ("text_stats", None), ("similarity", None),
        ("tfidf", {"svd_components": 4, "n_features": 4096, "chunk": 7}),
        ("word2vec", {"vector_size": 8, "epochs": 1})]]
    for b in blocks:
        b.prepare(battles)
        b.fit(battles)
    inline = [b.transform(battles) for b in blocks]
    one_chunk = make_block("tfidf", {"svd_components": 4, "n_features": 4096})  # counts in one chunk
    one_chunk.prepare(battles)
    one_chunk.fit(battles)
    np.testing.assert_array_equal(one_chunk.transform(battles).a, inline[2].a)
    monkeypatch.setattr(parallel, "MIN_PARALLEL_ITEMS", 0)
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    monkeypatch.setattr(parallel, "CHUNK", 11)
    forks = []
    real_pool = parallel.ProcessPoolExecutor
    monkeypatch.setattr(parallel, "ProcessPoolExecutor", lambda *a, **k: forks.append(1) or real_pool(*a, **k))
    for block, expected in zip(blocks, inline):
        got = block.transform(battles)
        for part in ("a", "b", "shared"):
            np.testing.assert_array_equal(getattr(got, part), getattr(expected, part), err_msg=block.name)
    assert len(forks) == len(blocks), "every block's transform went through the worker pool"


def test_feature_cache_is_shared_through_the_run_resources(arena_battles, tmp_path, monkeypatch):
    """A second stage's block reads the first one's features from disk; unseen battles are computed."""
    from features.cache import BlockCache
    from features.text_stats import TextStatsBlock

    battles = arena_battles.head(50)
    ctx = StageContext(resource_dir=tmp_path)
    first = BlockCache(TextStatsBlock(context=ctx))
    first.warm(battles)
    assert len(list((tmp_path / "features").glob("stats-*/a.npy"))) == 1

    calls = []
    block = TextStatsBlock(context=ctx)
    original = block.transform
    monkeypatch.setattr(block, "transform", lambda b: calls.append(len(b)) or original(b))
    second = BlockCache(block)
    second.warm(battles)
    assert calls == [], "the second cache must read the saved features, not recompute them"
    subset = battles.iloc[[7, 3, 3]]
    np.testing.assert_array_equal(second.sided(subset).a, TextStatsBlock().transform(subset).a)
    assert calls == []
    swapped = swap_battles(subset)  # other content: not in the cache, computed once per distinct battle
    np.testing.assert_array_equal(second.sided(swapped).a, TextStatsBlock().transform(swapped).a)
    assert calls == [2]
