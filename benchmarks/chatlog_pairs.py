#!/usr/bin/env python
"""Chat-log pairing at scale: rows/s and peak memory of ``run.py pair-chatlogs`` on generated logs.

Generates ``--rows`` short conversations in the LMSYS-Chat-1M layout (``conversation_id``, ``model``,
``conversation`` as a list of ``{role, content}``, ``language``): 25 models; half the prompts asked
once, the other half drawn from a pool with Zipf-like popularity (a few prompts asked thousands of
times); 10% multi-turn (two or three user turns, later turns from a small set so some match); 2% a
canned greeting reply (identical replies); 1% a prompt of the training sample (dropped by the
de-duplication); 0.5% empty conversations and 0.5% without a reply. The file is written in 100k-row
batches (the generator never holds it whole either).

Each format runs ``run.py pair-chatlogs`` in a fresh subprocess; peak memory is that subprocess's
maximum resident set size (``os.wait4``), rows/s is rows read / wall time
(interpreter start and imports included); CPU seconds (user + system) are given beside it.

    python benchmarks/chatlog_pairs.py [--rows 1000000] [--formats parquet jsonl] [--workdir /tmp/chatlog-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = ROOT.parent / "shared" / "data" / "arena" / "train_sample.csv"
BATCH = 100_000
MODELS = [f"model-{k:02d}" for k in range(25)]
LANGUAGES = ["English"] * 17 + ["Chinese", "Spanish", "German"]
GREETING = "Hello! How can I assist you today?"
SCHEMA = pa.schema([("conversation_id", pa.string()), ("model", pa.string()),
                    ("conversation", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                    ("turn", pa.int64()), ("language", pa.string())])


def _vocabulary(rng: np.random.Generator, n: int = 5000) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(n)])


def _sentences(rng, vocab, n: int, low: int, high: int) -> list[str]:
    lengths = rng.integers(low, high, size=n)
    words = vocab[rng.integers(0, len(vocab), size=int(lengths.sum()))]
    ends = np.cumsum(lengths)
    return [" ".join(words[e - k:e]) for e, k in zip(ends, lengths)]


def generate(path: Path, rows: int, train_prompts: list[str], seed: int = 0) -> None:
    """Write ``rows`` conversations (parquet, or JSONL when the name says so) in batches."""
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    pool = _sentences(rng, vocab, 50_000, 3, 15)  # repeated prompts
    popularity = 1.0 / np.arange(1, len(pool) + 1) ** 1.1
    popularity /= popularity.sum()
    follow_ups = _sentences(rng, vocab, 20, 2, 6)  # later user turns: few, so some multi-turn pairs match
    writer = pq.ParquetWriter(path, SCHEMA) if path.suffix == ".parquet" else open(path, "w", encoding="utf-8")
    try:
        for start in range(0, rows, BATCH):
            n = min(BATCH, rows - start)
            kind = rng.random(n)
            fresh = _sentences(rng, vocab, n, 3, 15)
            pooled = rng.choice(len(pool), size=n, p=popularity)
            replies = _sentences(rng, vocab, n * 3, 10, 40)
            models = rng.integers(0, len(MODELS), size=n)
            turns = np.where(rng.random(n) < 0.10, rng.integers(2, 4, size=n), 1)
            conversations = []
            for i in range(n):
                if kind[i] < 0.01 and train_prompts:
                    prompt = train_prompts[int(rng.integers(0, len(train_prompts)))]
                elif kind[i] < 0.50:
                    prompt = fresh[i]
                else:
                    prompt = pool[pooled[i]]
                users = [prompt] + [follow_ups[int(rng.integers(0, len(follow_ups)))] for _ in range(turns[i] - 1)]
                conv = []
                for t, user in enumerate(users):
                    reply = GREETING if kind[i] > 0.98 else replies[3 * i + t]
                    conv += [{"content": user, "role": "user"}, {"content": reply, "role": "assistant"}]
                u = rng.random()
                if u < 0.005:
                    conv = []
                elif u < 0.01:
                    conv = conv[:1]
                conversations.append(conv)
            batch = {"conversation_id": [f"{start + i:08x}" for i in range(n)],
                     "model": [MODELS[m] for m in models], "conversation": conversations,
                     "turn": turns.tolist(), "language": [LANGUAGES[k] for k in rng.integers(0, len(LANGUAGES), n)]}
            if isinstance(writer, pq.ParquetWriter):
                writer.write_table(pa.Table.from_pydict(batch, schema=SCHEMA))
            else:
                for rec in pd.DataFrame(batch).to_dict("records"):
                    writer.write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--formats", nargs="+", default=["parquet"], choices=["parquet", "jsonl"])
    ap.add_argument("--train", default=str(DEFAULT_TRAIN), help="training file to de-duplicate against")
    ap.add_argument("--workdir", default="/tmp/chatlog-bench")
    args = ap.parse_args()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    train = Path(args.train)
    train_prompts = []
    if train.exists():
        firsts = (json.loads(p)[0] for p in pd.read_csv(train, dtype=str, keep_default_na=False)["prompt"])
        train_prompts = [t for t in firsts if isinstance(t, str) and t.strip()]
    results = []
    for fmt in args.formats:
        data = work / f"chat.{fmt}"
        started = time.time()
        generate(data, args.rows, train_prompts)
        print(f"generated {args.rows} conversations in {time.time() - started:.0f} s: {data} "
              f"({data.stat().st_size / 2**20:.0f} MiB)", flush=True)
        out = work / f"pairs_{fmt}.parquet"
        cmd = [sys.executable, str(ROOT / "run.py"), "pair-chatlogs", "--data", str(data), "--out", str(out), "--quiet"]
        cmd += ["--train", str(train)] if train.exists() else []
        started = time.time()
        with open(work / f"{fmt}.stdout", "w") as so, open(work / f"{fmt}.stderr", "w") as se:
            proc = subprocess.Popen(cmd, stdout=so, stderr=se, env={**os.environ, "PYTHONPATH": str(ROOT)})
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        wall = time.time() - started
        if os.waitstatus_to_exitcode(status) != 0:
            print((work / f"{fmt}.stderr").read_text()[-3000:])
            sys.exit(f"pair-chatlogs failed on {data}")
        peak_gib = usage.ru_maxrss / 2**20  # KiB on Linux
        cpu = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to other load on the machine
        report = json.loads(out.with_name(out.name + ".report.json").read_text())
        results.append((fmt, report, wall, cpu, peak_gib))
        print((work / f"{fmt}.stdout").read_text().strip(), flush=True)
    print(f"\n{'format':<8}{'rows read':>11}{'pairs kept':>12}{'wall (s)':>10}{'rows/s':>9}{'CPU (s)':>9}"
          f"{'rows/CPU-s':>12}{'peak RSS (GiB)':>16}")
    for fmt, report, wall, cpu, gib in results:
        print(f"{fmt:<8}{report['rows_read']:>11}{report['kept']:>12}{wall:>10.1f}{report['rows_read'] / wall:>9.0f}"
              f"{cpu:>9.1f}{report['rows_read'] / cpu:>12.0f}{gib:>16.2f}")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
