"""Nothing finished is touched until the new work has succeeded (issue 21 part 2, issue 22 item 6).

A refused command changes no byte of a finished run (a changed ``n_folds``, a mistyped ``--model``);
a stage refitted on a finished run is fitted beside it and replaces it only when the command's work
succeeded, so a fit that fails leaves every file of the run byte-identical and ``predict`` working; a
run being written is locked, and a second writer is refused in one line naming the holder.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys

import pytest

from kernel.lock import LOCK_NAME, DirLockedError, lock_dir
from pipeline.rundir import RunDir, RunDirError, replace_dir, settle_dir
from tests.conftest import FAST_LGBM, ROOT
from tests.cli_helpers import logged_errors, run_quiet, snapshot  # noqa: E402
from tests.test_decoder import gemma_dir  # noqa: F401  (the session-wide tiny Gemma-2 fixture, read only)

CONFIG = {"n_folds": 3, "stacker": {"C_grid": [0.1]}, "stages": {
    "lgbm_stats": {"type": "lgbm", "params": {**FAST_LGBM, "blocks": [{"type": "text_stats"}]}},
    "length_lr": {"type": "length_lr"}}}


_main, _snapshot, _errors = run_quiet, snapshot, logged_errors


@pytest.fixture(scope="module")
def finished(slice_files):
    (slice_files / "txn.json").write_text(json.dumps(CONFIG))
    out = slice_files / "txn_run"
    assert _main("--train", slice_files / "train.csv", "--test", slice_files / "test.csv", "--out", out,
                 "--config", slice_files / "txn.json") == 0
    return out


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run (modification times kept)."""
    return shutil.copytree(finished, tmp_path / "run")


def _predicts(run, slice_files, tmp_path) -> bytes:
    out = tmp_path / "preds.csv"
    assert _main("predict", "--run", run, "--test", slice_files / "test.csv", "--out", out, "--overwrite") == 0
    return out.read_bytes()


# -- a refit that fails ----------------------------------------------------------------------------
class FitFailed(RuntimeError):
    """What LightGBM raises for a value it rejects at fit time."""


def test_a_refit_failing_at_fit_time_leaves_the_finished_run_byte_identical(run, slice_files, tmp_path,
                                                                           monkeypatch):
    from models.lgbm import LightGBMStage

    before = _snapshot(run)
    preds = _predicts(run, slice_files, tmp_path)
    fit, calls = LightGBMStage.fit, []

    def failing_on_fold1(self, train, valid=None):
        calls.append(1)
        if len(calls) == 2:
            raise FitFailed("learning_rate rejected")
        return fit(self, train, valid)

    monkeypatch.setattr(LightGBMStage, "fit", failing_on_fold1)
    with pytest.raises(FitFailed):
        _main("train", "lgbm_stats", "--out", run, "--set", "stages.lgbm_stats.params.lgb.learning_rate=0.05")
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k in before} == before  # no finished byte changed (not even mtimes)
    assert all(k.startswith("stages/lgbm_stats.new/") for k in set(after) - set(before))  # the refit's own place
    assert set(before) <= set(after) and not (run / LOCK_NAME).exists()
    assert _predicts(run, slice_files, tmp_path) == preds

    # the same command again: fold 0 of the refit is reused, then the refit replaces the stage
    fold0 = run / "stages/lgbm_stats.new/fold0/done.json"
    stamp = fold0.stat().st_mtime_ns
    monkeypatch.setattr(LightGBMStage, "fit", fit)
    assert _main("train", "lgbm_stats", "--out", run, "--set", "stages.lgbm_stats.params.lgb.learning_rate=0.05") == 0
    assert not (run / "stages/lgbm_stats.new").exists() and not (run / "stages/lgbm_stats.old").exists()
    assert (run / "stages/lgbm_stats/fold0/done.json").stat().st_mtime_ns == stamp
    assert json.loads((run / "config.json").read_text())["stages"]["lgbm_stats"]["params"]["lgb"]["learning_rate"] == 0.05
    assert (run / "stages/lgbm_stats/fold0/model/model.txt").read_bytes() != before["stages/lgbm_stats/fold0/model/model.txt"][0]
    assert len(_predicts(run, slice_files, tmp_path)) > 0


def test_a_value_lightgbm_rejects_leaves_the_finished_run_byte_identical(run, caplog):
    """The issue's example: refused by the schema (one line, exit 2) or by LightGBM at fit time; either way
    the finished stage, fold 0's model included, and the run's config stay as they were."""
    before = _snapshot(run)
    try:
        code = _main("train", "lgbm_stats", "--out", run, "--set", "stages.lgbm_stats.params.lgb.learning_rate=-0.1")
    except Exception:  # noqa: BLE001 - LightGBM's own error; what matters is the files
        code = None
    assert code != 0
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(k.startswith("stages/lgbm_stats.new/") for k in set(after) - set(before))


# -- refused before any write -----------------------------------------------------------------------
def test_a_changed_n_folds_is_refused_before_any_write(run, caplog):
    before = _snapshot(run)
    assert _main("--out", run, "--set", "n_folds=4") == 2
    assert _snapshot(run) == before  # run.json and config.json included; no new file
    [error] = _errors(caplog)
    assert "n_folds=4" in error and "nothing was changed" in error
    assert _main("tune", "--run", run) == 0  # the run still works


@pytest.mark.parametrize("what", ["missing", "not a checkpoint"])
def test_train_with_a_bad_model_path_is_refused_before_any_write(run, tmp_path, caplog, what):
    model = tmp_path / "no-such-model"
    if what == "not a checkpoint":
        model.mkdir()
        (model / "weights.bin").write_bytes(b"")
    before = _snapshot(run)
    assert _main("train", "decoder", "--model", model, "--out", run) == 2
    assert _snapshot(run) == before
    [error] = _errors(caplog)
    assert str(model) in error and "nothing was written" in error and "\n" not in error
    if what == "missing":
        assert _main("tune", "--run", run) == 0  # later commands are not broken by it


def test_a_bad_model_path_in_a_feature_block_is_refused_before_any_write(run, tmp_path, caplog):
    before = _snapshot(run)
    blocks = json.dumps([{"type": "embeddings", "params": {"model": str(tmp_path / "nope")}}])
    assert _main("train", "lgbm_stats", "--out", run, "--set", f"stages.lgbm_stats.params.blocks={blocks}") == 2
    assert _snapshot(run) == before
    [error] = _errors(caplog)
    assert "stages.lgbm_stats.params.blocks.0.params.model" in error and str(tmp_path / "nope") in error


# -- one writer at a time -------------------------------------------------------------------------
HOLD = "import sys, time; from pipeline.rundir import RunDir; l = RunDir(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(600)"


def test_a_second_writer_is_refused_naming_the_holder(run, slice_files, tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run)
        assert _main("tune", "--run", run) == 2
        assert _main("--out", run) == 2
        errors = _errors(caplog)
        assert len(errors) == 2 and all(f"pid {holder.pid}" in e and "since" in e and "-c" in e for e in errors)
        assert _snapshot(run) == before
        assert len(_predicts(run, slice_files, tmp_path)) > 0  # readers take no lock
    finally:
        holder.send_signal(signal.SIGKILL)  # a dead writer's lock goes with it
        holder.wait()
    assert _main("tune", "--run", run) == 0
    assert not (run / LOCK_NAME).exists()


def test_lock_is_exclusive_released_and_taken_over_after_a_dead_writer(tmp_path):
    first = lock_dir(tmp_path)
    with pytest.raises(DirLockedError, match=rf"pid {os.getpid()} on .* since "):
        lock_dir(tmp_path)
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with lock_dir(tmp_path):
        pass
    # a writer killed before writing the run's marker leaves only its lock file: the folder counts as empty
    (tmp_path / LOCK_NAME).write_text('{"pid": 1}')
    assert RunDir.check_writable(tmp_path, None).path == tmp_path
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(RunDirError, match="not empty"):
        RunDir.check_writable(tmp_path, None)


# -- the swap ----------------------------------------------------------------------------------------
def test_a_swap_cut_between_its_renames_is_completed(tmp_path):
    final, new = tmp_path / "stage", tmp_path / "stage.new"
    for folder, text in ((final, "old"), (new, "new")):
        folder.mkdir()
        (folder / "done.json").write_text(text)
    os.rename(final, tmp_path / "stage.old")  # the first rename of replace_dir, then a crash
    settle_dir(new, final, "done.json")
    assert (final / "done.json").read_text() == "new" and not (tmp_path / "stage.old").exists()
    # an unfinished new one does not replace the old
    new.mkdir()
    os.rename(final, tmp_path / "stage.old")
    settle_dir(new, final, "done.json")
    assert (final / "done.json").read_text() == "new" and new.exists()
    (new / "done.json").write_text("newer")
    replace_dir(new, final)
    assert (final / "done.json").read_text() == "newer" and not new.exists()


# -- every write through the atomic writer -----------------------------------------------------------
WRITES = re.compile(r"""open\([^)]*["'][wax]b?t?["']|np\.save|\.to_csv\(|\.to_parquet\(|\.to_json\([^)]*orient=|"""
                    r"""save_pretrained\(|\.write_text\(|\.write_bytes\(|json\.dump\(|\bsave_model\(|ParquetWriter\(|"""
                    r"""\.tofile\(|torch\.save\(|save_word2vec_format\(|os\.write\(""")
# Writes that are not made through kernel.files.write_atomic at their own line, and why they are safe:
ALLOWED = {
    "kernel/files.py": "the atomic writer itself (writes a temporary file, then renames)",
    "kernel/lock.py": "the lock file: its inode is what is locked, so it is written in place",
    "battles/stream.py": "BattleWriter streams into the temporary file of a write_atomic around the whole job",
    "flywheel/pseudo_label.py": "the resumable job's <out>.partial (appended on purpose, torn lines cut on resume)",
    "flywheel/chatlogs.py": "scratch shards in a temporary folder, removed with it",
    "models/decoder.py": "save_pretrained into fold<k>.partial/, renamed into place when the model is done",
    "models/encoder.py": "save_pretrained into fold<k>.partial/, renamed into place when the model is done",
    "pipeline/bundle.py": "stage.json of a remapped model's view in this process's scratch folder (removed with it; "
                          "every rank writes its own, which write_atomic would not)",
}


def _calls(line: str) -> list[str]:
    return [m.group(0) for m in WRITES.finditer(line.split("#")[0])]


def test_every_file_is_written_through_the_atomic_writer():
    """A new direct write (``open(.., 'w')``, ``np.save``, ``to_csv``...) outside ``write_atomic``'s callback
    fails here: it would leave half a file under its final name when the process dies or the disk fills."""
    offenders = []
    for package in ("kernel", "battles", "flywheel", "features", "ensemble", "models", "pipeline"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if _calls(line) and rel not in ALLOWED and "write_atomic(" not in line:
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    for n, line in enumerate((ROOT / "run.py").read_text(encoding="utf-8").splitlines(), start=1):
        if _calls(line) and "write_atomic(" not in line:
            offenders.append(f"run.py:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert _calls('with open(p, "w") as f:') and _calls("np.save(fh, a)") and not _calls("stacked.to_json(names)")


def test_model_paths_are_checked_only_for_stages_that_will_be_fitted(tmp_path):
    """A stage finished with these very params is reused without reading its checkpoint (a run copied to
    another machine still tunes and gains stages); one whose params changed needs its checkpoint first."""
    from pipeline.config import load_config
    from pipeline.runner import Run, RunError

    config = load_config(None, ['stages={"dec": {"type": "decoder", "params": {"model": "/no/such/checkpoint"}}}'])
    run = Run(tmp_path, config)
    with pytest.raises(RunError, match=r"^stages\.dec\.params\.model: .*/no/such/checkpoint.*nothing was written"):
        run.check_stage_models(["dec"])
    stage = run.dir.stage("dec")
    stage.path.mkdir(parents=True)
    stage.spec.write_text(json.dumps(config.stages["dec"].as_dict()))
    stage.done.write_text("{}")
    run.check_stage_models(["dec"])  # finished with the same params: not refused
    stage.spec.write_text(json.dumps({**config.stages["dec"].as_dict(), "folds": [0]}))
    with pytest.raises(RunError):
        run.check_stage_models(["dec"])


def test_a_max_length_below_the_input_frame_is_refused_before_any_write(run, gemma_dir, caplog):  # noqa: F811
    """The decoder's input frame (template + instructions) is measured with its tokenizer before the first
    write: a max_length it cannot fit is one line naming the stage and the minimum, and no file changes."""
    before = _snapshot(run)
    assert _main("train", "decoder", "--model", gemma_dir, "--out", run, "--set", "stages.decoder.params.max_length=100") == 2
    assert _snapshot(run) == before
    [error] = _errors(caplog)
    assert re.match(r"^stages\.decoder\.params: decoder: max_length=100 is too small for the \d+-token input frame.*"
                    r"at least \d+; nothing was written$", error), error
