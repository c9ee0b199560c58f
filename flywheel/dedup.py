"""De-duplicate external battles against the target (training) data and within themselves.

Two levels of "the same text", for prompts (all user turns) and replies (all turns of one side):

* exact: equal after :func:`battles.text.normalised` (case and whitespace);
* near: Jaccard similarity of word n-gram shingles (``shingle`` words, punctuation ignored) at
  least ``threshold``; candidates come from MinHashLSH (run a little below the threshold for
  recall) and are checked on the true Jaccard of their shingle sets.
  Near-duplicate texts are joined into clusters (union-find, so near-matching chains); texts shorter
  than ``min_words`` words only match exactly (their shingles say too little).

What counts as a duplicate battle, per external row, checked in this order (first reason wins):

``exact_battle_in_target`` / ``near_battle_in_target``
    prompt and both replies (either order) match one target battle: the same judgement twice. Always
    dropped: it would leak a validation label into training.
``exact_prompt_in_target`` / ``near_prompt_in_target``
    only the prompt matches a target prompt. The replies differ, but the target's folds group by
    prompt, so such a row carries the validation prompt into training folds (leakage risk, and a
    third of the public 33k arena set is exactly this). Dropped by default
    (``drop_prompt_matches=True``); set False to keep them.
``exact_within_external`` / ``near_within_external``
    the same battle already appeared earlier in the external data (any source). The first is kept.
``exact_reply_in_target`` / ``near_reply_in_target``
    a reply matches a target reply under a different prompt (short canned answers, refusals).
    Counted as ``flagged`` and kept unless ``drop_reply_matches=True``.

The report keeps counts per reason and a few example pairs (external id, matched id, texts).
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from datasketch import MinHash, MinHashLSH
from pydantic import Field
from tqdm.auto import tqdm

from battles.folds import prompt_groups
from battles.text import normalised, plain_text
from kernel.schema import NonNegativeInt, PositiveInt, Section, Seed

log = logging.getLogger(__name__)

DROP_REASONS = ["exact_battle_in_target", "near_battle_in_target", "exact_prompt_in_target", "near_prompt_in_target",
                "exact_within_external", "near_within_external"]
FLAG_REASONS = ["exact_reply_in_target", "near_reply_in_target"]


class DedupConfig(Section):
    """The config's ``external.dedup`` section (``false`` turns de-duplication off)."""

    threshold: float = Field(0.8, gt=0, le=1)  # Jaccard similarity of word shingles from which two texts are near-duplicates
    num_perm: PositiveInt = 128  # MinHash permutations (LSH candidates are then checked on the true Jaccard)
    shingle: PositiveInt = 3  # words per shingle
    min_words: NonNegativeInt = 8  # shorter texts only match exactly
    drop_prompt_matches: bool = True  # drop external battles whose prompt is a training prompt
    drop_reply_matches: bool = False  # drop external battles with a reply seen in the training data
    near: bool = True  # false: exact matching only (fast)
    seed: Seed = 1  # MinHash seed
    n_examples: NonNegativeInt = 5  # example pairs kept per reason in the report


@dataclass
class DedupReport:
    n_target: int = 0
    n_external: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)
    flagged: dict = field(default_factory=dict)
    kept_per_source: dict = field(default_factory=dict)
    dropped_per_source: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"de-duplication: {self.n_external} external battles vs {self.n_target} target battles -> kept {self.kept}"]
        for name, counts in (("dropped", self.dropped), ("flagged (kept)", self.flagged)):
            for reason, n in counts.items():
                lines.append(f"  {name:15s} {reason:24s} {n}")
        for source in sorted(set(self.kept_per_source) | set(self.dropped_per_source)):
            lines.append(f"  source {source}: kept {self.kept_per_source.get(source, 0)}, "
                         f"dropped {self.dropped_per_source.get(source, 0)}")
        for reason, pairs in self.examples.items():
            for ex in pairs[:2]:
                lines.append(f"  e.g. {reason}: {ex['external_id']} ~ {ex['match_id']} (similarity {ex['similarity']:.2f})"
                             f"\n      ext: {ex['external_text'][:90]!r}\n      hit: {ex['match_text'][:90]!r}")
        return "\n".join(lines)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", normalised(text))


def _shingles(words: list[str], k: int) -> list[bytes]:
    if len(words) < k:
        return [" ".join(words).encode("utf-8", "surrogatepass")]
    return list({" ".join(words[i:i + k]).encode("utf-8", "surrogatepass") for i in range(len(words) - k + 1)})


def _exact_key(text: str) -> str:
    return hashlib.md5(normalised(text).encode("utf-8", "surrogatepass")).hexdigest()


class _TextClusters:
    """Exact keys and near-duplicate cluster ids for a list of texts (target texts first)."""

    def __init__(self, texts: list[str], config: DedupConfig, what: str, progress: bool = True):
        self.exact = [_exact_key(t) for t in texts]
        uniq = {}
        for i, k in enumerate(self.exact):
            uniq.setdefault(k, i)
        parent = {k: k for k in uniq}
        self.similarity: dict = {}

        def find(k):
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        if config.near:
            # LSH at a lower threshold for recall; candidates are then checked on the true Jaccard of
            # their shingle sets, so the threshold is exact, not an estimate.
            lsh = MinHashLSH(threshold=max(0.3, config.threshold - 0.2), num_perm=config.num_perm)
            keys, shingle_sets = [], []
            for k, i in uniq.items():
                words = _words(texts[i])
                if len(words) >= config.min_words:
                    keys.append(k)
                    shingle_sets.append(_shingles(words, config.shingle))
            sets = {k: set(sh) for k, sh in zip(keys, shingle_sets)}
            hashes = dict(zip(keys, MinHash.bulk(shingle_sets, num_perm=config.num_perm, seed=config.seed)))
            for k in tqdm(keys, desc=f"near-duplicate {what}", disable=not progress or len(keys) < 5000, leave=False):
                mine = sets[k]
                for other in lsh.query(hashes[k]):
                    theirs = sets[other]
                    sim = len(mine & theirs) / len(mine | theirs)
                    if sim >= config.threshold:
                        a, b = find(k), find(other)
                        if a != b:
                            parent[max(a, b, key=lambda x: uniq[x])] = min(a, b, key=lambda x: uniq[x])
                        self.similarity[(k, other)] = self.similarity[(other, k)] = sim
                lsh.insert(k, hashes[k])
        self.cluster = [find(k) for k in self.exact]

    def sim(self, i: int, j: int) -> float:
        if self.exact[i] == self.exact[j]:
            return 1.0
        return self.similarity.get((self.exact[i], self.exact[j]), float("nan"))  # nan: joined via a chain


def find_duplicates(target: pd.DataFrame, external: pd.DataFrame,
                    config: DedupConfig | None = None, progress: bool = True) -> tuple[np.ndarray, DedupReport]:
    """A reason per external row ('' = keep; a DROP_REASONS entry = drop) and the report.

    Flag-only reasons (reply matches) are counted in the report but give '' unless
    ``config.drop_reply_matches``.
    """
    config = config or DedupConfig()
    nt, ne = len(target), len(external)
    both = pd.concat([target[["id", "prompt", "response_a", "response_b"]],
                      external[["id", "prompt", "response_a", "response_b"]]], ignore_index=True)
    prompts_exact = prompt_groups(both)
    prompt_texts = [plain_text(p) for p in both["prompt"]]
    prompts = _TextClusters(prompt_texts, config, "prompts", progress)
    reply_texts = [plain_text(r) for r in both["response_a"]] + [plain_text(r) for r in both["response_b"]]
    replies = _TextClusters(reply_texts, config, "replies", progress)
    n = len(both)

    def battle_keys(idx, level):
        p = prompts_exact[idx] if level == "exact" else prompts.cluster[idx]
        ra = (replies.exact if level == "exact" else replies.cluster)[idx]
        rb = (replies.exact if level == "exact" else replies.cluster)[idx + n]
        return (p, *sorted((ra, rb)))

    # target lookups: key -> first target row
    lookups = {name: {} for name in ("exact_battle", "near_battle", "exact_prompt", "near_prompt",
                                     "exact_reply", "near_reply")}
    for i in range(nt):
        lookups["exact_battle"].setdefault(battle_keys(i, "exact"), i)
        lookups["near_battle"].setdefault(battle_keys(i, "near"), i)
        lookups["exact_prompt"].setdefault(prompts_exact[i], i)
        lookups["near_prompt"].setdefault(prompts.cluster[i], i)
        for j in (i, i + n):
            lookups["exact_reply"].setdefault(replies.exact[j], i)
            lookups["near_reply"].setdefault(replies.cluster[j], i)

    report = DedupReport(n_target=nt, n_external=ne, config=config.as_dict())
    reasons = np.full(ne, "", dtype=object)
    seen_exact: dict = {}
    seen_near: dict = {}
    sources = external["source"].to_numpy() if "source" in external.columns else np.full(ne, "external")

    def note(bucket, reason, e, m, sim, ext_text, hit_text):
        bucket[reason] = bucket.get(reason, 0) + 1
        ex = report.examples.setdefault(reason, [])
        if len(ex) < config.n_examples:
            ex.append({"external_id": str(both["id"].iat[e]), "match_id": str(both["id"].iat[m]),
                       "similarity": float(sim), "external_text": ext_text[:300], "match_text": hit_text[:300]})

    for k in range(ne):
        e = nt + k
        reason, match, sim = "", None, 1.0
        bx, bn = battle_keys(e, "exact"), battle_keys(e, "near")
        if bx in lookups["exact_battle"]:
            reason, match = "exact_battle_in_target", lookups["exact_battle"][bx]
        elif config.near and bn in lookups["near_battle"]:
            reason, match = "near_battle_in_target", lookups["near_battle"][bn]
            sim = prompts.sim(e, match)
        elif config.drop_prompt_matches and prompts_exact[e] in lookups["exact_prompt"]:
            reason, match = "exact_prompt_in_target", lookups["exact_prompt"][prompts_exact[e]]
        elif config.drop_prompt_matches and config.near and prompts.cluster[e] in lookups["near_prompt"]:
            reason, match = "near_prompt_in_target", lookups["near_prompt"][prompts.cluster[e]]
            sim = prompts.sim(e, match)
        elif bx in seen_exact:
            reason, match = "exact_within_external", seen_exact[bx]
        elif config.near and bn in seen_near:
            reason, match = "near_within_external", seen_near[bn]
            sim = prompts.sim(e, match)
        if reason:
            note(report.dropped, reason, e, match, sim, prompt_texts[e], prompt_texts[match])
        else:
            # reply-level matches against the target: counted, dropped only on request
            for j in (e, e + n):
                if not reply_texts[j].strip():
                    continue  # an empty reply (a failed answer) matching another says nothing
                if replies.exact[j] in lookups["exact_reply"]:
                    flag, m = "exact_reply_in_target", lookups["exact_reply"][replies.exact[j]]
                elif config.near and replies.cluster[j] in lookups["near_reply"]:
                    flag, m = "near_reply_in_target", lookups["near_reply"][replies.cluster[j]]
                else:
                    continue
                mj = m if replies.cluster[m] == replies.cluster[j] else m + n
                note(report.flagged, flag, e, m, replies.sim(j, mj), reply_texts[j], reply_texts[mj])
                if config.drop_reply_matches:
                    reason = flag
                break
            seen_exact.setdefault(bx, e)
            seen_near.setdefault(bn, e)
        reasons[k] = reason
    kept = reasons == ""
    report.kept = int(kept.sum())
    for s in np.unique(sources):
        report.kept_per_source[str(s)] = int((kept & (sources == s)).sum())
        report.dropped_per_source[str(s)] = int((~kept & (sources == s)).sum())
    return reasons, report


def deduplicate(target: pd.DataFrame, external: pd.DataFrame,
                config: DedupConfig | None = None, progress: bool = True) -> tuple[pd.DataFrame, DedupReport]:
    """External battles with duplicates (see module docstring) removed, and the report."""
    reasons, report = find_duplicates(target, external, config, progress)
    log.info("de-duplication: kept %d of %d external battles; dropped %s; flagged %s", report.kept, len(external),
             report.dropped, report.flagged)
    return external.loc[reasons == ""].reset_index(drop=True), report
