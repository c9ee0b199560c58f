"""Frozen-encoder features: mean-pooled sentence embeddings of the prompt and both replies.

With a local checkpoint (e.g. the all-MiniLM-L6-v2 directory, or the encoder stage's model) and no
fine-tuning, ``prepare`` embeds every distinct text of the run once (turns joined as in
:mod:`models.packing`, long texts cut to their first ``max_length`` tokens), mean-pooling the last
hidden states over the attention mask. Embeddings are cached on disk keyed by a hash of the text,
the checkpoint and ``max_length`` (``<resource_dir>/embeddings/<key>/chunk-*.npz``, plain arrays,
no pickles), so reruns and per-fold fits cost nothing.

Features per side: the reply embedding (``emb0..``) and ``cos_prompt`` = cosine(prompt, reply);
the block's model matrix uses their A-minus-B difference (``combine=("diff",)``). Shared,
swap-invariant columns: ``cos_ab`` = cosine(A, B) and ``cos_prompt_mean`` (with the difference it
recovers both prompt cosines).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from battles.text import labelled_text
from features.base import FeatureBlock, SidedFeatures, row_cosine
from kernel.files import write_npz
from kernel.local_models import check_model_dir, default_device
from kernel.schema import PositiveInt, Section

log = logging.getLogger(__name__)


class EmbeddingParams(Section):
    model: str  # local Hugging Face checkpoint directory (required)
    max_length: PositiveInt = 256  # tokens per text; longer texts are cut to their beginning
    batch_size: PositiveInt = 32  # texts per forward pass of the frozen encoder (lower it if memory runs out)


def _text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class EmbeddingBlock(FeatureBlock):
    name = "emb"
    Params = EmbeddingParams

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self.model_dir = check_model_dir(self.params.model, "embeddings").resolve()
        self._checkpoint_config = (self.model_dir / "config.json").read_bytes()  # what identifies the checkpoint
        self._vectors: dict[str, np.ndarray] = {}
        self._model = self._tokenizer = None
        self.n_embedded = 0  # texts embedded by this instance (not read from the cache)

    # ---- cache ----
    def _cache_dir(self) -> Path | None:
        root = self.context.resource_dir
        if root is None:
            return None
        key = hashlib.sha1(self._checkpoint_config + str(self.model_dir).encode() + str(self.params.max_length).encode())
        return Path(root) / "embeddings" / f"{self.model_dir.name}-{key.hexdigest()[:12]}"

    def _read_cache(self) -> None:
        cache = self._cache_dir()
        if cache is None or not cache.exists():
            return
        for chunk in sorted(cache.glob("chunk-*.npz")):
            with np.load(chunk, allow_pickle=False) as data:
                self._vectors.update(zip(data["keys"].tolist(), data["vectors"]))

    def _write_chunk(self, keys: list[str], vectors: np.ndarray) -> None:
        cache = self._cache_dir()
        if cache is None or not keys:
            return
        name = f"chunk-{_text_hash(''.join(keys))[:16]}.npz"
        write_npz(cache / name, keys=np.array(keys, dtype="U40"), vectors=vectors.astype(np.float32))

    def state_key(self):
        return hashlib.sha1(self._checkpoint_config).hexdigest()  # the checkpoint

    # ---- embedding ----
    def _load_model(self) -> None:
        import torch  # noqa: F401  (imported here so a LightGBM-only run never loads torch)
        from transformers import AutoModel, AutoTokenizer

        if self._model is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self._model = AutoModel.from_pretrained(self.model_dir).eval()

    def _embed(self, texts: list[str]) -> np.ndarray:
        import torch

        self._load_model()
        tok, model = self._tokenizer, self._model
        device = default_device()
        model.to(device)
        lengths = [len(t) for t in texts]
        order = np.argsort(lengths, kind="stable")  # similar lengths together: little padding
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        bs = int(self.params.batch_size)
        progress = self.context.progress
        with torch.inference_mode():
            for start in tqdm(range(0, len(texts), bs), desc="embedding texts", disable=not progress, leave=False):
                idx = order[start:start + bs]
                batch = tok([texts[i] for i in idx], padding=True, truncation=True,
                            max_length=int(self.params.max_length), return_tensors="pt").to(device)
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
                out[idx] = pooled.float().cpu().numpy()
        return out

    def _ensure(self, texts) -> None:
        missing = sorted({_text_hash(t): t for t in texts if _text_hash(t) not in self._vectors}.items())
        if not missing:
            return
        log.info("embeddings: embedding %d new texts with %s", len(missing), self.model_dir)
        keys, values = zip(*missing)
        vectors = self._embed(list(values))
        self._vectors.update(zip(keys, vectors))
        self.n_embedded += len(keys)
        self._write_chunk(list(keys), vectors)

    @staticmethod
    def _texts(battles: pd.DataFrame) -> dict[str, list[str]]:
        return {c: [labelled_text(t) for t in battles[c]] for c in ("prompt", "response_a", "response_b")}

    # ---- block contract ----
    def prepare(self, battles: pd.DataFrame) -> None:
        """Embed every distinct text of the run once (cached on disk when a resource_dir is given)."""
        self._read_cache()
        texts = self._texts(battles)
        self._ensure([t for column in texts.values() for t in column])

    def transform(self, battles: pd.DataFrame) -> SidedFeatures:
        texts = self._texts(battles)
        self._ensure([t for column in texts.values() for t in column])
        p, a, b = (np.stack([self._vectors[_text_hash(t)] for t in texts[c]])
                   for c in ("prompt", "response_a", "response_b"))
        cos_pa, cos_pb = row_cosine(p, a), row_cosine(p, b)
        names = [f"emb{i}" for i in range(a.shape[1])] + ["cos_prompt"]
        return SidedFeatures(
            names=names,
            a=np.hstack([a, cos_pa[:, None]]),
            b=np.hstack([b, cos_pb[:, None]]),
            shared_names=["cos_ab", "cos_prompt_mean"],
            shared=np.stack([row_cosine(a, b), 0.5 * (cos_pa + cos_pb)], axis=1),
            combine=("diff",),
        )

