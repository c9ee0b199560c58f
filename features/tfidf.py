"""TF-IDF of word and character n-grams, fitted inside each fold, reduced with truncated SVD.

Counting n-grams is the slow part, and it needs no labels, so ``prepare`` counts every text of the
run once with sklearn's stateless ``HashingVectorizer`` and keeps the sparse counts in memory.
``fit`` (inside a fold, training rows only) learns the IDF weights with ``TfidfTransformer`` and an
SVD basis with ``TruncatedSVD``: validation and test texts never shape the vocabulary weighting or
the projection, so there is no leakage. Per side the block gives the SVD coordinates (used as the
A-minus-B vector) and the TF-IDF cosine to the prompt; shared, the TF-IDF cosine between replies.
Fitted state is saved as .npy files (IDF vector, SVD components), never pickles.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
from sklearn.preprocessing import normalize

from features.base import FeatureBlock, SidedFeatures
from features.text import join_turns

DEFAULTS = {"word_ngrams": [1, 2], "char_ngrams": [3, 5], "char_limit": 1500, "n_features": 2**18,
            "svd_components": 32}


def _key(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


class TfidfBlock(FeatureBlock):
    name = "tfidf"
    fold_dependent = True

    def __init__(self, params=None, context=None):
        super().__init__({**DEFAULTS, **(params or {})}, context)
        p = self.params
        self._word = HashingVectorizer(ngram_range=tuple(p["word_ngrams"]), n_features=p["n_features"],
                                       alternate_sign=False, norm=None, lowercase=True)
        self._char = None
        if p["char_ngrams"]:
            self._char = HashingVectorizer(analyzer="char_wb", ngram_range=tuple(p["char_ngrams"]),
                                           n_features=p["n_features"], alternate_sign=False, norm=None)
        self._cache: dict[str, int] = {}
        self._counts = None
        self.idf_ = None
        self.components_ = None

    def _count(self, texts: list[str]) -> sp.csr_matrix:
        m = self._word.transform(texts)
        if self._char is not None:
            limit = self.params["char_limit"]
            m = m + self._char.transform([t[:limit] for t in texts])
        return sp.csr_matrix(m, dtype=np.float32)

    @staticmethod
    def _texts(battles: pd.DataFrame) -> dict[str, list[str]]:
        return {c: [join_turns(t) for t in battles[c]] for c in ("prompt", "response_a", "response_b")}

    def prepare(self, battles: pd.DataFrame) -> None:
        texts = sorted(set(sum(self._texts(battles).values(), [])))
        self._cache = {_key(t): i for i, t in enumerate(texts)}
        self._counts = self._count(texts)

    def _counts_for(self, texts: list[str]) -> sp.csr_matrix:
        if self._counts is None:
            return self._count(texts)
        rows = [self._cache.get(_key(t), -1) for t in texts]
        missing = [i for i, r in enumerate(rows) if r < 0]
        out = self._counts[[max(r, 0) for r in rows]]
        if missing:
            out = out.tolil()
            fresh = self._count([texts[i] for i in missing])
            for j, i in enumerate(missing):
                out[i] = fresh[j]
            out = out.tocsr()
        return out

    def _tfidf(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        weighted = counts.multiply(self.idf_[None, :]).tocsr()
        weighted.data = np.log1p(weighted.data)  # sublinear tf after idf scaling keeps long replies in range
        return normalize(weighted)

    def fit(self, train: pd.DataFrame) -> None:
        texts = self._texts(train)
        counts = self._counts_for(texts["prompt"] + texts["response_a"] + texts["response_b"])
        self.idf_ = TfidfTransformer(sublinear_tf=True).fit(counts).idf_.astype(np.float32)
        replies = self._tfidf(self._counts_for(texts["response_a"] + texts["response_b"]))
        k = min(self.params["svd_components"], replies.shape[0] - 1)
        svd = TruncatedSVD(n_components=k, random_state=getattr(self.context, "seed", 0)).fit(replies)
        self.components_ = svd.components_.astype(np.float32)

    def transform(self, battles: pd.DataFrame) -> SidedFeatures:
        if self.idf_ is None:
            raise RuntimeError("TfidfBlock.transform called before fit")
        texts = self._texts(battles)
        p, a, b = (self._tfidf(self._counts_for(texts[c])) for c in ("prompt", "response_a", "response_b"))
        cos = lambda x, y: np.asarray(x.multiply(y).sum(axis=1)).ravel()
        za, zb = (np.asarray(m @ self.components_.T) for m in (a, b))
        k = za.shape[1]
        names = [f"svd{i}" for i in range(k)]
        side_a = np.hstack([za, cos(p, a)[:, None]])
        side_b = np.hstack([zb, cos(p, b)[:, None]])
        # Per-side SVD coordinates enter the model as A-minus-B (diff); the prompt cosine also raw.
        return SidedFeatures(names + ["prompt_cos"], side_a, side_b, ["ab_cos"], cos(a, b)[:, None],
                             combine=("diff", "a", "b"))

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "idf.npy", self.idf_)
        np.save(directory / "svd_components.npy", self.components_)

    def load(self, directory: Path) -> None:
        self.idf_ = np.load(Path(directory) / "idf.npy")
        self.components_ = np.load(Path(directory) / "svd_components.npy")
