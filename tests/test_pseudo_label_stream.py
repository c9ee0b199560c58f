"""Chunked reading of battle files, and the streamed, resumable pseudo-labelling job (API and CLI)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from battles.formats import count_rows
from battles.io import BattleDataError, battles_to_frame, read_battles
from battles.stream import iter_battle_chunks
from flywheel.pseudo_label import partial_path, pseudo_label_file, read_pseudo_labels

ROOT = Path(__file__).resolve().parents[1]


def _battles(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "id": [f"b{i}" for i in range(n)],
        "prompt": [[f"prompt {i}"] if i % 5 else [f"first {i}", f"second {i}"] for i in range(n)],
        "response_a": [["a" * int(rng.integers(1, 60))] * (1 if i % 5 else 2) for i in range(n)],
        "response_b": [["b" * int(rng.integers(1, 60))] * (1 if i % 5 else 2) for i in range(n)],
        "model_a": "ma", "model_b": "mb",
    })


def _write(battles: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        battles.to_parquet(path)
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        battles.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        battles_to_frame(battles).to_csv(path, index=False)
    return path


def predict(battles: pd.DataFrame) -> np.ndarray:
    """A per-row 'model': the longer reply tends to win."""
    d = np.array([len(a[-1]) - len(b[-1]) for a, b in zip(battles["response_a"], battles["response_b"])], float)
    logits = np.c_[d / 20, -d / 20, np.full(len(d), 0.3)]
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


class Interrupt(Exception):
    pass


def _stopping_after(chunks: int, calls: list):
    def fn(battles):
        calls.append(len(battles))
        if len(calls) > chunks:
            raise Interrupt
        return predict(battles)
    return fn


@pytest.mark.parametrize("name", ["data.parquet", "data.jsonl", "data.jsonl.gz", "data.csv"])
def test_chunked_reading_matches_the_reader(tmp_path, name):
    path = _write(_battles(53), tmp_path / name)
    whole, _ = read_battles(path, require_labels=False)
    chunks = list(iter_battle_chunks(path, rows=10))
    assert [first for first, _ in chunks] == [0, 10, 20, 30, 40, 50] and count_rows(path) == 53
    joined = pd.concat([c for _, c in chunks], ignore_index=True)
    pd.testing.assert_frame_equal(battles_to_frame(joined), battles_to_frame(whole))
    tail = pd.concat([c for _, c in iter_battle_chunks(path, rows=10, start=17)], ignore_index=True)
    assert tail["id"].tolist() == whole["id"].tolist()[17:]


@pytest.mark.parametrize("name", ["data.parquet", "data.jsonl", "data.csv"])
def test_chunked_reading_names_the_file_row(tmp_path, name):
    battles = _battles(30)
    battles.at[23, "response_b"] = ["x", "y"]  # turn counts differ, in the third chunk
    path = _write(battles, tmp_path / name)
    with pytest.raises(BattleDataError, match=rf"{name}, row 24, column 'prompt': turn counts differ"):
        list(iter_battle_chunks(path, rows=10))
    battles = _battles(30)
    battles.at[25, "id"] = "b3"
    path = _write(battles, tmp_path / name)
    with pytest.raises(BattleDataError, match=rf"{name}, row 26, column 'id': duplicate id 'b3'"):
        list(iter_battle_chunks(path, rows=10))


def _rows(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()[1:]


def _header(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8").splitlines()[0])["provenance"]


PROVENANCE = {"run": "runs/teacher", "stages": ["lgbm"], "run_config_hash": "abc"}


@pytest.mark.parametrize("name", ["data.parquet", "data.jsonl"])
def test_interrupted_job_resumes_to_the_uninterrupted_output(tmp_path, name):
    data = _write(_battles(95), tmp_path / name)
    whole = tmp_path / "whole.jsonl"
    assert pseudo_label_file(data, predict, whole, PROVENANCE, chunk_rows=20, temperature=0.7, progress=False) == 95
    out = tmp_path / "pseudo.jsonl"
    calls: list = []
    with pytest.raises(Interrupt):
        pseudo_label_file(data, _stopping_after(2, calls), out, PROVENANCE, chunk_rows=20, temperature=0.7,
                          progress=False)
    partial = partial_path(out)
    assert not out.exists() and len(_rows(partial)) == 40 and "n_battles" not in _header(partial)
    with pytest.raises(BattleDataError, match="unfinished pseudo-label job"):
        read_pseudo_labels(partial)
    with open(partial, "a", encoding="utf-8") as f:  # killed in the middle of a line
        f.write(_rows(whole)[40][:25])
    calls.clear()
    counted = lambda b: (calls.append(len(b)), predict(b))[1]  # noqa: E731
    assert pseudo_label_file(data, counted, out, PROVENANCE, chunk_rows=20, temperature=0.7, progress=False) == 95
    assert calls == [20, 20, 15], "only the battles not yet written are scored"
    assert not partial.exists() and _rows(out) == _rows(whole)
    a, b = _header(out), _header(whole)
    for volatile in ("started_at", "written_at"):
        a.pop(volatile), b.pop(volatile)
    assert a == b and a["n_battles"] == 95 and a["temperature"] == 0.7 and a["data_sha256"]
    battles, provenance = read_pseudo_labels(out)
    assert len(battles) == 95 and provenance["run"] == "runs/teacher"
    expected = predict(_battles(95)) ** (1 / 0.7)
    np.testing.assert_allclose(battles[["soft_a", "soft_b", "soft_tie"]].to_numpy(),
                               expected / expected.sum(axis=1, keepdims=True), atol=1e-12)


def test_resume_refuses_other_inputs_and_overwrite_starts_afresh(tmp_path):
    data = _write(_battles(50), tmp_path / "data.jsonl")
    out = tmp_path / "pseudo.jsonl"
    with pytest.raises(Interrupt):
        pseudo_label_file(data, _stopping_after(1, []), out, PROVENANCE, chunk_rows=20, progress=False)
    with pytest.raises(FileExistsError, match=r"unfinished job with other inputs \(temperature: 1.0 then, 0.5 now\)"):
        pseudo_label_file(data, predict, out, PROVENANCE, chunk_rows=20, temperature=0.5, progress=False)
    with pytest.raises(FileExistsError, match="run_config_hash: 'abc' then, 'xyz' now"):
        pseudo_label_file(data, predict, out, {**PROVENANCE, "run_config_hash": "xyz"}, chunk_rows=20, progress=False)
    _write(_battles(51), data)  # the data file changed under the same name
    with pytest.raises(FileExistsError, match="data_bytes.*data_sha256"):
        pseudo_label_file(data, predict, out, PROVENANCE, chunk_rows=20, progress=False)
    calls: list = []
    counted = lambda b: (calls.append(len(b)), predict(b))[1]  # noqa: E731
    assert pseudo_label_file(data, counted, out, PROVENANCE, chunk_rows=20, overwrite=True, progress=False) == 51
    assert calls == [20, 20, 11] and len(read_pseudo_labels(out)[0]) == 51
    with pytest.raises(FileExistsError, match="overwrite"):
        pseudo_label_file(data, predict, out, PROVENANCE, progress=False)
    foreign = tmp_path / "other.jsonl"
    partial_path(foreign).write_text("not ours\n")
    with pytest.raises(FileExistsError, match="not an unfinished pseudo-label file"):
        pseudo_label_file(data, predict, foreign, PROVENANCE, overwrite=True, progress=False)
    assert partial_path(foreign).read_text() == "not ours\n"


_SLOW_JOB = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_pseudo_label_stream import PROVENANCE, predict
from flywheel.pseudo_label import pseudo_label_file

def slow(battles):
    time.sleep(0.3)
    return predict(battles)

pseudo_label_file({data!r}, slow, {out!r}, PROVENANCE, chunk_rows=10, progress=False)
"""


def test_killed_job_resumes(tmp_path):
    data = _write(_battles(200), tmp_path / "data.parquet")
    out = tmp_path / "pseudo.jsonl"
    script = _SLOW_JOB.format(root=str(ROOT), data=str(data), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)})
    partial = partial_path(out)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and len(_rows(partial)) >= 30:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(_rows(partial))
    assert 30 <= written < 200 and not out.exists()
    calls: list = []
    counted = lambda b: (calls.append(len(b)), predict(b))[1]  # noqa: E731
    assert pseudo_label_file(data, counted, out, PROVENANCE, chunk_rows=10, progress=False) == 200
    assert sum(calls) == 200 - written
    whole = tmp_path / "whole.jsonl"
    pseudo_label_file(data, predict, whole, PROVENANCE, chunk_rows=10, progress=False)
    assert _rows(out) == _rows(whole)


def test_pseudo_label_cli_resumes(finished_run, slice_files, tmp_path, monkeypatch, caplog):
    """run.py pseudo-label stopped after one chunk, rerun: the same file an uninterrupted run writes."""
    import run as cli
    from pipeline.predict import Predictor

    data = slice_files / "test.csv"
    whole, out = tmp_path / "whole.jsonl", tmp_path / "pseudo.jsonl"
    args = ["pseudo-label", "--run", str(finished_run), "--data", str(data), "--chunk-rows", "16", "--quiet"]
    assert cli.main([*args, "--out", str(whole)]) == 0
    original = Predictor.predict_proba
    calls: list = []

    def stop_after_one(self, battles):
        calls.append(len(battles))
        if len(calls) > 1:
            raise Interrupt
        return original(self, battles)

    monkeypatch.setattr(Predictor, "predict_proba", stop_after_one)
    with pytest.raises(Interrupt):
        cli.main([*args, "--out", str(out)])
    monkeypatch.setattr(Predictor, "predict_proba", original)
    assert len(_rows(partial_path(out))) == 16
    assert cli.main([*args, "--out", str(out), "--temperature", "2"]) == 2
    assert "temperature: 1.0 then, 2.0 now" in caplog.text
    assert cli.main([*args, "--out", str(out)]) == 0
    assert _rows(out) == _rows(whole) and not partial_path(out).exists()
    battles, provenance = read_pseudo_labels(out)
    assert len(battles) == 60 and provenance["data"] == str(data.resolve()) and provenance["ensemble_key"]
