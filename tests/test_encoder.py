"""Encoder stage on CPU: a tiny random DeBERTa-v2 (tokenizer trained on the fly) and the real MiniLM."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from battles.labels import LABEL_COLUMNS, swap_battles, swap_columns  # noqa: E402
from models.encoder import BattleEncoding, EncoderStage, soft_cross_entropy, training_losses  # noqa: E402
from models.stage import StageContext, make_stage, predict_with_orders  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUIET = StageContext(progress=False)
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega python code answer question".split()


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


def make_tiny_deberta(directory: Path) -> Path:
    """A 2-layer, hidden-32 random DeBERTa-v2 with a WordPiece tokenizer trained on the toy words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [" ".join(WORDS)] * 10 + ["Turn 1: [...] earlier turns omitted the a of to is 0123456789"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(directory)
    config = DebertaV2Config(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=256, type_vocab_size=0,
                             pad_token_id=fast.pad_token_id, num_labels=3)
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta"))


TINY_PARAMS = {"max_length": 64, "max_steps": 6, "train_batch_size": 8, "predict_batch_size": 16,
               "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": 3}


def test_bad_params_are_refused_with_clear_messages(tmp_path, tiny_model):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        EncoderStage({"model": str(missing)})
    with pytest.raises(ValueError, match="model\\n  Field required"):
        EncoderStage({})
    with pytest.raises(ValueError, match="lr\\n  Extra inputs are not permitted"):
        EncoderStage({"model": str(tiny_model), "lr": 1e-5})
    with pytest.raises(ValueError, match="precision"):
        EncoderStage({"model": str(tiny_model), "precision": "fp8"})
    with pytest.raises(RuntimeError, match="not fitted"):
        EncoderStage({"model": str(tiny_model)}).predict_logits(synthetic_battles(2))


def test_soft_cross_entropy_matches_torch_and_weights():
    logits = torch.randn(5, 3)
    hard = torch.tensor([0, 1, 2, 2, 0])
    onehot = torch.nn.functional.one_hot(hard, 3).float()
    assert torch.allclose(soft_cross_entropy(logits, onehot), torch.nn.functional.cross_entropy(logits, hard))
    smoothed = torch.nn.functional.cross_entropy(logits, hard, label_smoothing=0.1)
    assert torch.allclose(soft_cross_entropy(logits, onehot, smoothing=0.1), smoothed)
    weights = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(soft_cross_entropy(logits, onehot, weights),
                          torch.nn.functional.cross_entropy(logits[:1], hard[:1]))


def test_sequence_layout_real_tokens(minilm_dir, arena_battles):
    battles = arena_battles
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    encode = BattleEncoding(tok, max_length=256, prompt_share=0.2)
    features = encode(battles.iloc[:200])
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


def test_soft_labels_and_weights_reach_the_loss(tiny_model):
    """Soft targets follow the swap; zero-weight rows give exactly zero training loss."""
    train = synthetic_battles(16, seed=3)
    train["soft_a"], train["soft_b"], train["soft_tie"] = 0.6, 0.3, 0.1
    stage = EncoderStage({"model": str(tiny_model), **TINY_PARAMS, "max_steps": 2, "eval_steps": None}, QUIET)
    stage._load_pretrained(stage.model_dir, num_labels_new=True)
    features = stage._dataset(train, with_swaps=True)
    assert len(features) == 32
    assert features[0]["labels"] == pytest.approx([0.6, 0.3, 0.1])
    assert features[16]["labels"] == pytest.approx([0.3, 0.6, 0.1])  # the swapped copy
    assert training_losses(stage.fit(train).log_history)[0] > 0.5
    train["weight"] = 0.0
    assert training_losses(stage.fit(train).log_history) == [0.0, 0.0]


def test_minilm_fine_tune_loss_goes_down(minilm_dir, arena_battles):
    battles = arena_battles.iloc[:16]
    params = {"model": minilm_dir, "max_length": 96, "max_steps": 12, "train_batch_size": 8, "learning_rate": 3e-4,
              "warmup_ratio": 0.0, "logging_steps": 1, "swap_augment": False}
    stage = EncoderStage(params, QUIET).fit(battles)
    losses = training_losses(stage.log_history)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses  # it memorises 16 battles
    logits = stage.predict_logits(battles)
    assert logits.shape == (16, 3)
    np.testing.assert_allclose(stage.predict_logits(swap_battles(battles)), swap_columns(logits), atol=1e-6)


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


def test_gpu_benchmark_parses_and_refuses_without_cuda(capsys):
    from benchmarks import encoder_gpu
    args = encoder_gpu.parse_args(["--max-lengths", "512", "1024", "--batch-size", "4"])
    assert args.max_lengths == [512, 1024] and args.precision == "bf16"
    config = encoder_gpu.base_config()
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (768, 12, 128100)
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the refusal path is not reachable")
    assert encoder_gpu.main(["--steps", "1"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
