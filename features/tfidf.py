"""TF-IDF of word and character n-grams, fitted inside each fold, reduced with truncated SVD.

Counting n-grams is the slow part, and it needs no labels, so ``prepare`` counts every distinct text
of the run once with sklearn's stateless ``HashingVectorizer`` (float32 sparse rows kept in memory).
``fit`` (inside a fold, training rows only) learns the IDF weights from the training texts' document
frequencies and an SVD basis with ``TruncatedSVD`` on (a seeded sample of) the training replies:
validation and test texts never shape the weighting or the projection, so there is no leakage.
Everything after counting runs in chunks, so memory stays flat at 57k battles.

Per side the block gives the SVD coordinates of the reply and its TF-IDF cosine to the prompt;
shared, the TF-IDF cosine between the two replies. Fitted state is saved as .npy (IDF vector, SVD
components), never pickles.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field, field_validator
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.preprocessing import normalize

from battles.text import FIELDS, plain_text
from features.base import FeatureBlock, SidedFeatures, row_cosine
from features.parallel import map_battles, map_chunks
from kernel.files import write_npy
from kernel.schema import PositiveInt, Section


def _key(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def _count_texts(texts: list[str], context) -> sp.csr_matrix:
    """Hashed word and character n-gram counts of texts (``context``: the two vectorizers, char limit)."""
    word, char, char_limit = context
    m = word.transform(texts)
    if char is not None:
        m = m + char.transform([t[:char_limit] for t in texts])
    m = sp.csr_matrix(m, dtype=np.float32)
    if m.nnz and m.data.max() <= np.iinfo(np.uint16).max:  # whole counts: 2 bytes instead of 4 (500k battles)
        m = sp.csr_matrix((m.data.astype(np.uint16), m.indices, m.indptr), shape=m.shape)
    return m


def _battle_features(rows: list, context: "TfidfBlock") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-side SVD coordinates and prompt cosines, and the A-B cosine, of a chunk of
    ``(prompt, response_a, response_b)`` battles (``context``: the fitted block)."""
    block = context
    p, a, b = (block._tfidf(block._counts_for([plain_text(r[i]) for r in rows])) for i in range(3))
    cos = lambda x, y: row_cosine(x, y, unit_rows=True)  # noqa: E731 (rows are L2-normalised)
    return (np.hstack([np.asarray(a @ block.components_.T), cos(p, a)[:, None]]),
            np.hstack([np.asarray(b @ block.components_.T), cos(p, b)[:, None]]),
            cos(a, b)[:, None])


class TfidfParams(Section):
    word_ngrams: tuple[PositiveInt, PositiveInt] = (1, 2)  # word n-gram range
    char_ngrams: tuple[PositiveInt, PositiveInt] | None = (3, 4)  # char_wb n-gram range; null: no character n-grams
    char_limit: PositiveInt = 500  # characters of each text fed to the character n-grams
    n_features: int = Field(2**18, ge=2)  # hashing space
    svd_components: PositiveInt = 32  # SVD coordinates per reply
    svd_max_rows: PositiveInt = 20000  # replies sampled to fit the SVD
    chunk: PositiveInt = 5000  # texts per chunk (memory stays flat)

    @field_validator("word_ngrams", "char_ngrams")
    @classmethod
    def _ngram_range(cls, value):
        if value is not None and value[0] > value[1]:
            raise ValueError(f"an n-gram range is [smallest, largest], got {list(value)}")
        return value


class TfidfBlock(FeatureBlock):
    name = "tfidf"
    fold_dependent = True  # the vocabulary and SVD are fitted on each fold's training battles
    Params = TfidfParams

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        p = self.params
        self._word = HashingVectorizer(ngram_range=tuple(p.word_ngrams), n_features=p.n_features,
                                       alternate_sign=False, norm=None, dtype=np.float32)
        self._char = None
        if p.char_ngrams:
            self._char = HashingVectorizer(analyzer="char_wb", ngram_range=tuple(p.char_ngrams),
                                           n_features=p.n_features, alternate_sign=False, norm=None,
                                           dtype=np.float32)
        self._index: dict[str, int] = {}  # text key -> row of the prepared counts
        self._chunks: list[sp.csr_matrix] = []  # prepared counts, ``chunk`` rows each
        self.idf_ = None
        self.components_ = None

    # -- counting (label-free) -------------------------------------------------------------------
    def _count(self, texts: list[str]) -> sp.csr_matrix:
        return _count_texts(texts, (self._word, self._char, self.params.char_limit))

    def prepare(self, battles: pd.DataFrame) -> None:
        texts = sorted({plain_text(t) for c in FIELDS for t in battles[c]})
        self._index = {_key(t): i for i, t in enumerate(texts)}
        # kept as the workers' chunks: stacking them into one matrix would hold the counts twice
        self._chunks = map_chunks(_count_texts, texts, chunk=self.params.chunk, desc="tf-idf counting",
                                  progress=self.context.progress,
                                  context=(self._word, self._char, self.params.char_limit))

    def _prepared_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows of the prepared counts (as if the chunks were one matrix)."""
        if len(rows) == 0:
            return sp.csr_matrix((0, self.params.n_features), dtype=np.float32)
        size = self.params.chunk
        which = rows // size
        order = np.argsort(which, kind="stable")
        ordered, chunk_of = rows[order], which[order]
        parts = [self._chunks[c][ordered[chunk_of == c] - c * size] for c in np.unique(chunk_of)]
        stacked = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
        if np.all(order[1:] > order[:-1]):
            return stacked
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return stacked[inverse]

    def _counts_for(self, texts: list[str]) -> sp.csr_matrix:
        rows = np.array([self._index.get(_key(t), -1) for t in texts], dtype=np.int64)
        known = rows >= 0
        if known.all():
            return self._prepared_rows(rows)
        fresh = self._count([t for t, k in zip(texts, known) if not k])
        if not known.any():
            return fresh
        stacked = sp.vstack([self._prepared_rows(rows[known]), fresh], format="csr")
        order = np.argsort(np.argsort(~known, kind="stable"), kind="stable")
        return stacked[order]

    # -- fold fitting ----------------------------------------------------------------------------
    def _tfidf(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        weighted = counts.multiply(self.idf_[None, :]).tocsr()
        weighted.data = np.log1p(weighted.data)  # sublinear tf keeps long replies in range
        return normalize(weighted)

    def fit(self, train: pd.DataFrame) -> None:
        texts = sorted({plain_text(t) for c in FIELDS for t in train[c]})
        step = self.params.chunk
        df = np.zeros(self.params.n_features, dtype=np.float64)
        for i in range(0, len(texts), step):
            df += np.bincount(self._counts_for(texts[i:i + step]).indices, minlength=len(df))
        n = len(texts)
        self.idf_ = (np.log((1 + n) / (1 + df)) + 1).astype(np.float32)  # sklearn's smoothed idf
        replies = sorted({plain_text(t) for c in FIELDS[1:] for t in train[c]})
        rng = np.random.default_rng(self.context.seed)
        if len(replies) > self.params.svd_max_rows:
            replies = [replies[i] for i in sorted(rng.choice(len(replies), self.params.svd_max_rows, replace=False))]
        sample = self._tfidf(self._counts_for(replies))
        k = min(self.params.svd_components, sample.shape[0] - 1)
        svd = TruncatedSVD(n_components=k, random_state=self.context.seed).fit(sample)
        self.components_ = svd.components_.astype(np.float32)

    def transform(self, battles: pd.DataFrame) -> SidedFeatures:
        if self.idf_ is None:
            raise RuntimeError("TfidfBlock.transform called before fit")
        names = [f"svd{i}" for i in range(self.components_.shape[0])] + ["prompt_cos"]
        a, b, shared = map_battles(_battle_features, battles, (len(names), len(names), 1), "tf-idf features",
                                   self.context.progress, chunk=self.params.chunk, context=self)
        return SidedFeatures(names, a, b, ["ab_cos"], shared, combine=("diff", "a", "b"))

    def save(self, directory: Path) -> None:
        write_npy(Path(directory) / "idf.npy", self.idf_)
        write_npy(Path(directory) / "svd_components.npy", self.components_)

    def load(self, directory: Path) -> None:
        self.idf_ = np.load(Path(directory) / "idf.npy")
        self.components_ = np.load(Path(directory) / "svd_components.npy")
