"""Verifiable runs (issue 21 part 4): every finished fold, stage and ensemble records the size and SHA-256
of the files it wrote; predict, pseudo-label, tune, resuming and distill refuse a changed, missing or
truncated file in one line naming it; a run written before manifests still loads, with a note."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import run as cli
from kernel.manifest import ManifestError, describe_folder, file_entry, verify


def _copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] = (data[i] + 1) % 256 if chr(data[i]) not in "0123456789" else ord(str((int(chr(data[i])) + 1) % 10))
    path.write_bytes(bytes(data))


def _predict(run_dir, slice_files, tmp_path, *extra) -> int:
    return cli.main(["predict", "--run", str(run_dir), "--test", str(slice_files / "test.csv"),
                     "--out", str(tmp_path / "p.csv"), "--overwrite", "--quiet", *extra])


# ----------------------------------------------------------------------------- the manifest itself
def test_verify_names_a_missing_truncated_or_changed_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 3000)
    (tmp_path / ".c.txt.tmp123").write_text("a half-written temporary file is never recorded")
    files = describe_folder(tmp_path)
    assert sorted(files) == ["a.txt", "sub/b.bin"] and files["a.txt"] == file_entry(tmp_path / "a.txt")
    verify(tmp_path, files, "here", "advice")  # unchanged: silent
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 1000)
    with pytest.raises(ManifestError, match=r"sub/b.bin: truncated \(1000 of 3000 bytes\); recorded in here; advice"):
        verify(tmp_path, files, "here", "advice")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 2999 + b"\x01")
    with pytest.raises(ManifestError, match=r"sub/b.bin: changed \(its SHA-256 differs"):
        verify(tmp_path, files, "here", "advice")
    (tmp_path / "sub" / "b.bin").unlink()
    with pytest.raises(ManifestError, match=r"sub/b.bin: missing"):
        verify(tmp_path, files, "here", "advice")


# ----------------------------------------------------------------------------- what a run records
def test_a_finished_run_records_every_file_it_wrote(finished_run):
    done = sorted(finished_run.glob("stages/*/done.json")) + sorted(finished_run.glob("stages/*/*/done.json"))
    assert len(done) >= 2 + 6  # two stages, three folds each
    for path in done:
        files = json.loads(path.read_text())["files"]
        listed = {p for p in files}
        on_disk = {p.relative_to(path.parent).as_posix() for p in path.parent.rglob("*")
                   if p.is_file() and p.name not in ("done.json", "started.json")
                   and not p.relative_to(path.parent).parts[0].startswith(("fold", "full"))}
        assert listed == on_disk, path
        verify(path.parent, files, path, "")
    assert "model/model.txt" in json.loads((finished_run / "stages/lgbm/fold0/done.json").read_text())["files"]
    ensemble = json.loads((finished_run / "ensemble/manifest.json").read_text())["files"]
    assert {"ensemble/ensemble.json", "ensemble/oof_probs.csv", "folds.csv"} <= set(ensemble)
    assert any(p.startswith("resources/word2vec-") and p.endswith("vectors.bin") for p in ensemble)
    assert not any(p.startswith(("resources/features/", "resources/embeddings/")) for p in ensemble)  # caches


@pytest.mark.parametrize("target", ["stages/lgbm/fold1/model/model.txt", "stages/lgbm/fold0/model/stage.json",
                                    "ensemble/ensemble.json", "folds.csv", "resources/word2vec"])
def test_predict_refuses_a_changed_byte_naming_the_file(finished_run, slice_files, tmp_path, caplog, target):
    broken = _copy(finished_run, tmp_path)
    path = next(broken.glob("resources/word2vec-*/vectors.bin")) if target == "resources/word2vec" else broken / target
    _flip_byte(path)
    assert _predict(broken, slice_files, tmp_path) == 2
    line = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert line.startswith(f"{path}: changed") and "\n" not in line
    assert not (tmp_path / "p.csv").exists()


def test_predict_refuses_a_truncated_or_missing_model_file(finished_run, slice_files, tmp_path, caplog):
    broken = _copy(finished_run, tmp_path)
    model = broken / "stages/lgbm/fold0/model/model.txt"
    model.write_bytes(model.read_bytes()[:100])
    assert _predict(broken, slice_files, tmp_path) == 2
    assert f"{model}: truncated (100 of " in caplog.text
    model.unlink()
    assert _predict(broken, slice_files, tmp_path) == 2
    assert f"{model}: missing; recorded in {model.parent.parent / 'done.json'}" in caplog.text


def test_pseudo_label_tune_and_distill_refuse_changed_files(finished_run, slice_files, tmp_path, caplog):
    broken = _copy(finished_run, tmp_path)
    _flip_byte(broken / "stages/lgbm/fold2/model/model.txt")
    assert cli.main(["pseudo-label", "--run", str(broken), "--data", str(slice_files / "test.csv"),
                     "--out", str(tmp_path / "pl.jsonl"), "--quiet"]) == 2
    assert "fold2/model/model.txt: changed" in caplog.text and not (tmp_path / "pl.jsonl").exists()

    before = (broken / "ensemble/ensemble.json").read_bytes()
    _flip_byte(broken / "stages/length_lr/oof_logits.csv", at=200)
    assert cli.main(["tune", "--run", str(broken), "--quiet"]) == 2
    assert "length_lr/oof_logits.csv: changed" in caplog.text
    assert (broken / "ensemble/ensemble.json").read_bytes() == before  # the saved ensemble is kept

    teacher = _copy(finished_run, tmp_path / "teacher")
    _flip_byte(teacher / "ensemble/oof_probs.csv", at=300)
    assert cli.main(["distill", "--teacher", str(teacher), "--train", str(slice_files / "train.csv"),
                     "--out", str(tmp_path / "student"), "--quiet"]) == 2
    assert "ensemble/oof_probs.csv: changed" in caplog.text


def test_a_run_from_before_manifests_loads_with_a_note(finished_run, slice_files, tmp_path, caplog):
    old = _copy(finished_run, tmp_path)
    for done in old.glob("stages/**/done.json"):
        record = json.loads(done.read_text())
        record.pop("files")
        done.write_text(json.dumps(record))
    (old / "ensemble/manifest.json").unlink()
    caplog.set_level("INFO")
    assert _predict(old, slice_files, tmp_path) == 0
    notes = [r.getMessage() for r in caplog.records if "written before file manifests" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith(str(old))


def test_the_verification_benchmark_prints_its_table(finished_run):
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "benchmarks/manifest_speed.py", "--run", str(finished_run), "--raw-mb", "4",
                           "--repeat", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for what in ("verify for predict", "verify every manifest", "verify the bundle", "raw SHA-256 of one 4 MB file"):
        assert re.search(rf"^{re.escape(what)}\s+[\d.]+\s+[\d.]+\s+\d+$", proc.stdout, re.M), proc.stdout
