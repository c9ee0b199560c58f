"""Word2Vec trained with gensim on the run's own texts (no labels), mean-pooled per reply.

``prepare`` trains one model on the prompts and replies of the run (training and test battles, a
seeded sample of ``max_train_texts`` when there are more; no labels are read, so this is not label
leakage) and caches its vectors in the run's resource folder,
keyed by the texts, the parameters and the seed, in word2vec's own binary format. Training runs in
gensim's worker thread outside the GIL, so a stage may prepare its other blocks meanwhile
(``trains_outside_gil``). Per side: the mean word
vector (entering the model as A minus B) and the cosine to the prompt's mean vector; shared: the
cosine between the replies. With the default single worker the same texts and seed give the same
vectors in every process; ``workers`` > 1 trains faster but thread scheduling makes it irreproducible.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from gensim.models import KeyedVectors, Word2Vec
from gensim.models.callbacks import CallbackAny2Vec
from tqdm.auto import tqdm

from battles.text import FIELDS, plain_text, words
from features.base import FeatureBlock, SidedFeatures, row_cosine
from features.parallel import map_chunks
from kernel.files import write_atomic, write_json
from kernel.schema import PositiveInt, Section

log = logging.getLogger(__name__)


class Word2VecParams(Section):
    vector_size: PositiveInt = 64  # dimensions of a word vector (and of each reply's mean-pooled vector)
    window: PositiveInt = 5  # context words on each side that a word is trained to predict
    min_count: PositiveInt = 3  # words seen fewer times in the training texts get no vector (ignored in pooling)
    epochs: PositiveInt = 5  # passes over the training texts
    max_tokens_per_text: PositiveInt = 2000  # word tokens of a text used for training and pooling
    max_train_texts: PositiveInt = 50_000  # a seeded sample of the run's distinct texts trains the vectors
    workers: PositiveInt = 1  # 1: identical vectors in every process; more: faster, not reproducible


class _EpochBar(CallbackAny2Vec):
    """Advances a progress bar after every training epoch."""

    def __init__(self, bar):
        self.bar = bar

    def on_epoch_end(self, model):
        self.bar.update(1)


def _mean_vectors(texts: list[str], context) -> np.ndarray:
    """Mean word vector of each text's first tokens (zeros where no token is in the vocabulary)."""
    vectors, limit = context
    out = np.zeros((len(texts), vectors.vector_size), dtype=np.float32)
    for i, text in enumerate(texts):
        ids = [vectors.key_to_index[w] for w in words(text)[:limit] if w in vectors.key_to_index]
        if ids:
            out[i] = vectors.vectors[ids].mean(axis=0)
    return out


class Word2VecBlock(FeatureBlock):
    name = "w2v"
    Params = Word2VecParams
    trains_outside_gil = True  # gensim trains in its own thread: a stage may prepare other blocks meanwhile

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self.vectors: KeyedVectors | None = None
        self.resource_name: str | None = None

    def _resource_dir(self) -> Path | None:
        root = self.context.resource_dir
        return Path(root) if root else None

    def prepare(self, battles: pd.DataFrame) -> None:
        p = self.params.as_dict()
        texts = sorted({plain_text(t) for c in FIELDS for t in battles[c]})
        digest = hashlib.sha256(json.dumps([p, self.context.seed, len(texts)], sort_keys=True).encode())
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\x00")
        self.resource_name = f"word2vec-{digest.hexdigest()[:12]}"
        root = self._resource_dir()
        path = root / self.resource_name / "vectors.bin" if root else None
        if path is not None and path.exists():
            self.vectors = KeyedVectors.load_word2vec_format(str(path), binary=True)
            log.info("word2vec: reusing %s (%d words)", path, len(self.vectors))
            return
        chosen = range(len(texts))
        if len(texts) > p["max_train_texts"]:  # a seeded sample is plenty for 64-d vectors, and bounded in time
            rng = np.random.default_rng(self.context.seed)
            chosen = sorted(rng.choice(len(texts), p["max_train_texts"], replace=False))
        corpus = [words(texts[i])[:p["max_tokens_per_text"]] for i in chosen]  # only the sample is tokenised
        log.info("word2vec: training on %d texts (%d tokens)", len(corpus), sum(map(len, corpus)))
        with tqdm(total=p["epochs"], desc="word2vec epochs", unit="epoch", leave=False,
                  disable=not self.context.progress) as bar:
            model = Word2Vec(sentences=corpus, vector_size=p["vector_size"], window=p["window"],
                             min_count=p["min_count"], epochs=p["epochs"], workers=p["workers"],
                             seed=self.context.seed, callbacks=[_EpochBar(bar)])
        self.vectors = model.wv
        if path is not None:
            write_atomic(path, lambda tmp: self.vectors.save_word2vec_format(str(tmp), binary=True))
            write_json(path.parent / "params.json", p)

    def state_key(self):
        return self.resource_name  # the trained vectors (corpus and params)

    def _embed(self, texts: list[str]) -> np.ndarray:
        parts = map_chunks(_mean_vectors, texts, desc="word2vec pooling", progress=self.context.progress,
                           context=(self.vectors, self.params.max_tokens_per_text))
        return np.vstack(parts) if parts else np.zeros((0, self.vectors.vector_size), dtype=np.float32)

    def transform(self, battles: pd.DataFrame) -> SidedFeatures:
        if self.vectors is None:
            raise RuntimeError("Word2VecBlock.transform called before prepare")
        n = len(battles)
        pooled = self._embed([plain_text(t) for c in ("prompt", "response_a", "response_b") for t in battles[c]])
        p, a, b = pooled[:n], pooled[n:2 * n], pooled[2 * n:]

        cos = row_cosine
        names = [f"dim{i}" for i in range(a.shape[1])]
        return SidedFeatures(names + ["prompt_cos"], np.hstack([a, cos(p, a)[:, None]]),
                             np.hstack([b, cos(p, b)[:, None]]), ["ab_cos"], cos(a, b)[:, None],
                             combine=("diff",))

    def save(self, directory: Path) -> None:
        write_json(Path(directory) / "word2vec.json", {"resource": self.resource_name, "params": self.params.as_dict()})

    def load(self, directory: Path) -> None:
        meta = json.loads((Path(directory) / "word2vec.json").read_text())
        self.resource_name = meta["resource"]
        root = self._resource_dir()
        if root is None:
            raise FileNotFoundError(f"{directory}: word2vec vectors live in the run's resource folder; "
                                    "load the stage with a context whose resource_dir is the run's resources/")
        path = root / self.resource_name / "vectors.bin"
        if not path.exists():
            raise FileNotFoundError(f"{path}: word2vec vectors referenced by {directory} are missing")
        self.vectors = KeyedVectors.load_word2vec_format(str(path), binary=True)
