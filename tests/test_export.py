"""``run.py export`` (issue 19 parts 1-2): a verified bundle that predicts the run's submission after the run
is gone, refuses any changed or missing file naming it, references (or copies) a deep stage's base checkpoint
and finds it elsewhere with --base-dir; and the offline install kit, installed with --no-index into a fresh
venv that already has torch, predicting from the bundle."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import run as cli
from battles.columns import LABEL_COLUMNS
from kernel.manifest import ManifestError
from pipeline.bundle import BundleError
from pipeline.predict import Predictor
from tests.conftest import ROOT, shared_file


def _probs(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"id": str}).sort_values("id").reset_index(drop=True)


def _flip(path: Path) -> bytes:
    data = path.read_bytes()
    changed = bytearray(data)
    changed[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(changed))
    return data


@pytest.fixture(scope="module")
def bundle(finished_run, tmp_path_factory):
    """The finished run exported, the bundle moved to another directory, the exported copy of the run deleted."""
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    shutil.copytree(finished_run, run)
    assert cli.main(["export", "--run", str(run), "--out", str(root / "bundle"), "--quiet"]) == 0
    shutil.move(root / "bundle", root / "elsewhere")
    submission = _probs(run / "submission.csv")
    shutil.rmtree(run)
    return root / "elsewhere", submission


def test_a_moved_bundle_predicts_the_run_submission(bundle, slice_files, tmp_path, capsys):
    path, submission = bundle
    record = json.loads((path / "bundle.json").read_text())
    assert record["format_version"] == 1 and record["label_order"] == LABEL_COLUMNS
    assert record["libraries"]["lightgbm"] and record["bases"] == []
    assert set(record["stages"]) == set(json.loads((path / "ensemble/ensemble.json").read_text())["stages"])
    listed = set(record["files"])
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "bundle.json"}
    assert listed == on_disk
    # only what prediction needs (and a budgeted prediction's fallback ensemble: the ensemble stages' out-of-fold
    # logits, the ensemble's out-of-fold probabilities, the training rows' labels): no other logits tables, no
    # report, no feature caches, no unused stage
    fallback = {f"stages/{n}/oof_logits.csv" for n in record["stages"]}
    assert fallback | {"ensemble/oof_probs.csv", "ensemble/fallback_train.csv"} <= listed
    assert not any(p.endswith(("logits.csv", ".html")) and p not in fallback or "/features/" in p for p in listed)
    assert any(p.startswith("resources/word2vec-") for p in listed)
    assert cli.main(["predict", "--run", str(path), "--test", str(slice_files / "test.csv"),
                     "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    pred = _probs(tmp_path / "p.csv")
    assert pred["id"].tolist() == submission["id"].tolist()
    np.testing.assert_allclose(pred[LABEL_COLUMNS].to_numpy(), submission[LABEL_COLUMNS].to_numpy(), rtol=0, atol=1e-9)


def test_a_changed_byte_in_any_bundled_file_is_refused_naming_it(bundle, tmp_path):
    path = tmp_path / "b"
    shutil.copytree(bundle[0], path)
    files = sorted(json.loads((path / "bundle.json").read_text())["files"])
    for rel in files:
        original = _flip(path / rel)
        with pytest.raises(ManifestError, match=f"^{path / rel}: changed"):
            Predictor.load(path, progress=False)
        (path / rel).write_bytes(original)
    (path / files[0]).unlink()
    with pytest.raises(ManifestError, match=f"^{path / files[0]}: missing; recorded in {path / 'bundle.json'}"):
        Predictor.load(path, progress=False)


def test_export_refuses_an_out_it_did_not_make(finished_run, tmp_path, caplog):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert cli.main(["export", "--run", str(finished_run), "--out", str(foreign), "--quiet"]) == 2
    assert "not a bundle exported by arena-stack" in caplog.text and os.listdir(foreign) == ["notes.txt"]
    out = tmp_path / "bundle"
    assert cli.main(["export", "--run", str(finished_run), "--out", str(out), "--quiet"]) == 0
    assert cli.main(["export", "--run", str(finished_run), "--out", str(out), "--quiet"]) == 2
    assert "pass --overwrite" in caplog.text
    assert cli.main(["export", "--run", str(finished_run), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]  # no temporary folder left
    assert cli.main(["export", "--run", str(out), "--out", str(tmp_path / "again"), "--quiet"]) == 2
    assert "is a bundle already; export from the run directory" in caplog.text
    assert cli.main(["export", "--run", str(shutil.copytree(ROOT / "tests" / "fixtures", tmp_path / "x")),
                     "--out", str(tmp_path / "again"), "--quiet"]) == 2
    assert "not a run directory of arena-stack" in caplog.text and not (tmp_path / "again").exists()
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "notes.txt").write_text("mine")
    assert cli.main(["export", "--run", str(finished_run), "--out", str(tmp_path / "again"), "--wheels",
                     str(tmp_path / "kit"), "--quiet"]) == 2
    assert "holds files other than wheels" in caplog.text and not (tmp_path / "again").exists()


# ----------------------------------------------------------------------------- a tiny deep stage
@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    from tests.tiny_models import build_checkpoint

    root = tmp_path_factory.mktemp("deep-export")
    base = build_checkpoint(root / "tiny-gemma2", "gemma2")
    frame = pd.read_csv(shared_file("arena/train_sample.csv"))
    frame.iloc[:24].to_csv(root / "train.csv", index=False)
    frame.iloc[24:30][["id", "prompt", "response_a", "response_b"]].to_csv(root / "test.csv", index=False)
    params = {"max_length": 192, "max_steps": 1, "train_batch_size": 4, "grad_accum": 1, "lora_r": 4, "lora_alpha": 8,
              "gradient_checkpointing": False, "quantization": "none"}
    sets = [a for k, v in params.items() for a in ("--set", f"stages.decoder.params.{k}={json.dumps(v)}")]
    assert cli.main(["train", "decoder", "--model", str(base), "--train", str(root / "train.csv"),
                     "--test", str(root / "test.csv"), "--out", str(root / "run"), "--quiet", "--set", "n_folds=3",
                     "--set", "stages.decoder.folds=[0]", *sets]) == 0
    return root, base


def test_a_deep_bundle_references_its_base_and_finds_it_with_base_dir(decoder_run, tmp_path, caplog, capsys):
    root, base = decoder_run
    out = tmp_path / "bundle"
    assert cli.main(["export", "--run", str(root / "run"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wrote the bundle" in printed and "referenced, not copied" in printed
    record = json.loads((out / "bundle.json").read_text())
    [ref] = record["bases"]
    assert ref["path"] == str(base.resolve()) and ref["stages"] == ["decoder"] and not ref["included"]
    assert {"config.json", "tokenizer.json"} <= set(ref["files"]) and "model.safetensors" not in ref["files"]
    assert not any(p.endswith("model.safetensors") and not p.startswith("stages/") for p in record["files"])
    assert record["stages"]["decoder"]["packing"] == {"max_length": 192, "prompt_share": 0.2, "swap_tta": True}

    included = tmp_path / "with-base"
    assert cli.main(["export", "--run", str(root / "run"), "--out", str(included), "--include-base", "--quiet"]) == 0
    assert (included / "bases" / base.name / "model.safetensors").is_file()
    assert "bases/" + base.name + "/model.safetensors" in json.loads((included / "bundle.json").read_text())["files"]

    moved = tmp_path / "kaggle-input" / base.name
    shutil.copytree(base, moved)
    hidden = base.with_name(base.name + "-away")
    base.rename(hidden)  # the checkpoint is not where the run was trained any more
    try:
        args = ["predict", "--run", str(out), "--test", str(root / "test.csv"), "--out", str(tmp_path / "p.csv"),
                "--quiet"]
        assert cli.main(args) == 2 and f"base checkpoint '{base.name}' of stage(s) decoder not found" in caplog.text
        assert cli.main([*args, "--base-dir", str(tmp_path / "kaggle-input")]) == 0
        submission = _probs(root / "run" / "submission.csv")
        np.testing.assert_allclose(_probs(tmp_path / "p.csv")[LABEL_COLUMNS].to_numpy(),
                                   submission[LABEL_COLUMNS].to_numpy(), rtol=0, atol=1e-6)
        _flip(moved / "tokenizer.json")
        with pytest.raises(ManifestError, match=f"^{moved / 'tokenizer.json'}: changed.*not the checkpoint"):
            Predictor.load(out, progress=False, base_dir=moved)  # DIR itself may be the checkpoint
        with pytest.raises(BundleError, match="--base-dir is for exported bundles"):
            Predictor.load(root / "run", progress=False, base_dir=moved)
        assert cli.main(["predict", "--run", str(included), "--test", str(root / "test.csv"),
                         "--out", str(tmp_path / "q.csv"), "--quiet"]) == 0
        pd.testing.assert_frame_equal(_probs(tmp_path / "q.csv"), _probs(tmp_path / "p.csv"))
    finally:
        hidden.rename(base)


# ----------------------------------------------------------------------------- the offline install kit
def _installed_closure(name: str) -> set[str]:
    """``name`` and every distribution it needs, as installed here (markers evaluated)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), [name]
    while todo:
        dist = todo.pop().lower()
        if dist in seen:
            continue
        seen.add(dist)
        for line in metadata.requires(dist) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _torch_only_site(folder: Path) -> Path:
    """A folder that shows torch and what it needs (links into this interpreter's site-packages), nothing else:
    what a Kaggle image's torch looks like to a fresh venv (read through a .pth file)."""
    from importlib import metadata

    folder.mkdir()
    for name in _installed_closure("torch"):
        dist = metadata.distribution(name)
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if not (folder / top).exists() and (site / top).exists():
                (folder / top).symlink_to(site / top)
    return folder


def test_the_offline_kit_installs_with_no_index_beside_torch_and_predicts_from_the_bundle(
        finished_run, bundle, slice_files, tmp_path, capsys):
    started = time.time()
    kit = tmp_path / "kit"
    assert cli.main(["export", "--run", str(finished_run), "--out", str(tmp_path / "b"), "--wheels", str(kit),
                     "--quiet"]) == 0  # for this machine's Python and platform; the target has torch (the default)
    command = f"pip install --no-index --find-links {kit} arena-stack"
    assert command in capsys.readouterr().out
    assert (kit / "INSTALL.txt").read_text().strip() == command
    wheels = {p.name.split("-")[0].lower() for p in kit.glob("*.whl")}
    assert {"arena_stack", "pandas", "lightgbm", "transformers"} <= wheels and "torch" not in wheels
    assert not wheels & {"sympy", "networkx", "filelock"}  # torch's own dependencies: the target has them
    built = time.time()

    venv = tmp_path / "venv"
    # no ensurepip (its pip and old setuptools: the setuptools would shadow the one torch needs, the target's,
    # read through the .pth below); the kit's command is run by this interpreter's pip for the venv (--python)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "target_has_torch.pth").write_text(str(_torch_only_site(tmp_path / "kaggle-site")) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index or find-links from a pip.conf: the kit alone
    # --no-compile: compiling the wheels' bytecode is most of an install's time here and tests nothing of the kit
    pip, args = command.split(maxsplit=1)
    installing = subprocess.run([sys.executable, "-m", pip, "--python", str(py), *args.split(), "--no-compile"],
                                env=env, cwd=tmp_path, capture_output=True, text=True)
    assert installing.returncode == 0, installing.stdout[-3000:] + installing.stderr[-3000:]
    installed = time.time()
    done = subprocess.run([str(py), "-m", "run", "predict", "--run", str(bundle[0]), "--test",
                           str(slice_files / "test.csv"), "--out", str(tmp_path / "p.csv"), "--quiet"],
                          env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    where = subprocess.run([str(py), "-c", "import pipeline, torch; print(pipeline.__file__, torch.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where.split()[0] and "kaggle-site" in where.split()[1]  # the kit's code, the target's torch
    pred, submission = _probs(tmp_path / "p.csv"), bundle[1]
    np.testing.assert_allclose(pred[LABEL_COLUMNS].to_numpy(), submission[LABEL_COLUMNS].to_numpy(), rtol=0, atol=1e-9)
    print(f"kit: built {built - started:.0f} s, installed {installed - built:.0f} s, predicted "
          f"{time.time() - installed:.0f} s")


def test_moved_checkpoints_are_read_through_views_of_the_model_folders(tmp_path):
    from pipeline.bundle import Bundle
    from pipeline.rundir import RunDir

    old, new = "/train/machine/gemma", str(tmp_path / "here" / "gemma")
    folders = []
    for stage in ("decoder", "lgbm_emb"):
        for k in range(2):
            d = tmp_path / stage / f"fold{k}" / "model"
            d.mkdir(parents=True)
            params = {"model": old} if stage == "decoder" else {"blocks": [{"params": {"model": old}}]}
            (d / "stage.json").write_text(json.dumps({"kind": stage, "params": params}))
            (d / "weights.bin").write_bytes(bytes([k]) * 10)
            folders.append(d)
    untouched = tmp_path / "other" / "model"
    untouched.mkdir(parents=True)
    (untouched / "stage.json").write_text(json.dumps({"kind": "lgbm", "params": {"model": "/elsewhere"}}))
    bundle = Bundle(RunDir(tmp_path), {}, {old: Path(new), "/elsewhere": Path("/elsewhere")})
    views = bundle.model_dirs(folders[:2]) + bundle.model_dirs([*folders[2:], untouched])  # two stages
    assert len(set(views)) == 5 and views[-1] == untouched
    for view, folder in zip(views, folders):
        assert view != folder and (view / "weights.bin").read_bytes() == (folder / "weights.bin").read_bytes()
        assert old not in (view / "stage.json").read_text() and new in (view / "stage.json").read_text()
        assert old in (folder / "stage.json").read_text()  # the bundle's own files are not touched
