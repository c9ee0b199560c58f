"""What a decoder prediction pays for (issue 18): each battle set encoded once per A/B order however many
fold adapters score it, batches bounded by the token budget (short battles fill it), and fold adapters
held in the compute dtype, identical after training and after reloading."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from battles import swap_battles
from models.decoder import DecoderStage
from models.deep.batching import length_batches
from models.deep.inputs import ChatEncoding, RecentEncodings, battles_fingerprint
from models.deep.quantization import inference_layout
from models.stage import predict_with_orders
from pipeline.budget import one_order_logits
from tests.test_decoder import FAST, QUIET, gemma_dir, make, one_thread, toy_battles  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def three_folds(gemma_dir, tmp_path_factory):  # noqa: F811
    """Three saved fold adapters of the tiny Gemma-2 (4-bit), each trained on other battles."""
    root = tmp_path_factory.mktemp("decoder-folds")
    stage = make(gemma_dir, quantization="4bit", max_steps=1, max_length=192)
    dirs = []
    for k in range(3):
        stage.fit(toy_battles(8, seed=k))
        stage.save(root / f"fold{k}")
        dirs.append(root / f"fold{k}")
    return dirs


class CountingEncode:
    """Counts the battles ChatEncoding really encodes (one ``encode_battle`` call each)."""

    def __init__(self, monkeypatch):
        self.battles = 0
        real = ChatEncoding.encode_battle

        def spy(encoding, *args):
            self.battles += 1
            return real(encoding, *args)

        monkeypatch.setattr(ChatEncoding, "encode_battle", spy)


def _encode_every_time(monkeypatch):
    """Today's behaviour before the rule: every call encodes anew."""
    monkeypatch.setattr(RecentEncodings, "encode", lambda self, battles, progress=False:
                        self.encoding.encode(battles, progress))


# ----------------------------------------------------------------------------- 1. one encoding per order
def test_three_fold_adapters_with_swap_tta_encode_each_order_once(three_folds, monkeypatch):
    test = toy_battles(10, seed=7)
    folds = DecoderStage.load_folds(three_folds, QUIET)
    counted = CountingEncode(monkeypatch)
    logits = folds.predict_logits(test)
    assert counted.battles == 2 * len(test)  # the given and the swapped order, not 3 adapters x 2 orders
    again = folds.predict_logits(test)  # the next call (the same battles) encodes nothing
    assert counted.battles == 2 * len(test)
    np.testing.assert_array_equal(again, logits)

    # the budgeted path (every adapter's given order, then the swapped order of the least sure half)
    counted.battles = 0
    budgeted, second = one_order_logits(folds, toy_battles(10, seed=8), 0.5)
    assert counted.battles == 10 + int(second.sum())

    # bit-identical to encoding anew for every adapter and order, as before the rule
    _encode_every_time(monkeypatch)
    counted.battles = 0
    fresh = DecoderStage.load_folds(three_folds, QUIET)
    np.testing.assert_array_equal(fresh.predict_logits(test), logits)
    assert counted.battles == 6 * len(test)
    np.testing.assert_array_equal(one_order_logits(fresh, toy_battles(10, seed=8), 0.5)[0], budgeted)


def test_a_fold_model_alone_and_its_orders_match_the_memoised_answer(three_folds, monkeypatch):
    """predict_with_orders on one adapter (what cross-fitting and explain use) reuses the encodings
    and answers as the stage did when it encoded every time."""
    test = toy_battles(6, seed=3)
    adapter = DecoderStage.load_folds(three_folds[:1], QUIET).models[0]
    counted = CountingEncode(monkeypatch)
    logits, straight, swapped = predict_with_orders(adapter, test)
    assert len(adapter.encode(test).truncation) == len(test)  # the report's truncation records: no new work
    assert counted.battles == 2 * len(test)
    _encode_every_time(monkeypatch)
    fresh = DecoderStage.load_folds(three_folds[:1], QUIET).models[0]
    for got, want in zip(predict_with_orders(fresh, test), (logits, straight, swapped)):
        np.testing.assert_array_equal(got, want)


def test_recent_encodings_key_on_the_texts_and_hand_out_fresh_lists(gemma_dir):  # noqa: F811
    stage = make(gemma_dir, max_length=192)
    stage.check_inputs()
    battles = toy_battles(5)
    memo = RecentEncodings(stage.encoding)
    first = memo.encode(battles)
    want = stage.encoding.encode(battles)
    assert first.input_ids == want.input_ids and first.truncation == want.truncation
    first.input_ids[0].append(-1)  # a caller's change does not reach the next caller
    assert memo.encode(battles).input_ids == want.input_ids and memo.encoded_battles == 5
    # a copy of the same texts is the same key; any change of text or of turn boundaries is another
    assert battles_fingerprint(battles.copy()) == battles_fingerprint(battles)
    moved = battles.copy()
    moved.at[0, "prompt"] = [battles.at[0, "prompt"][0][:5], battles.at[0, "prompt"][0][5:]]
    other = battles.copy()
    other.at[4, "response_b"] = [battles.at[4, "response_b"][0] + "!"]
    keys = {battles_fingerprint(b) for b in (battles, moved, other, swap_battles(battles), battles.iloc[:4])}
    assert len(keys) == 5
    # four kept: cross-fitting's fold k scores its validation battles, then the test battles, in both
    # orders; the next fold's validation battles push out fold k's, and the test battles are kept
    memo = RecentEncodings(stage.encoding)
    test = toy_battles(3, seed=9)
    for k in range(3):
        valid = toy_battles(4, seed=10 + k)
        for order in (valid, swap_battles(valid), test, swap_battles(test)):
            memo.encode(order)
    assert memo.encoded_battles == 3 * 2 * 4 + 2 * 3
    memo.encode(toy_battles(4, seed=10))  # fold 0's validation battles were pushed out
    assert memo.encoded_battles == 3 * 2 * 4 + 2 * 3 + 4


# ----------------------------------------------------------------------------- 2. the token budget bounds a batch
def test_length_batches_without_a_row_cap_fill_the_token_budget():
    lengths = [100] * 50 + [400] * 4
    batches = length_batches(lengths, 1000, None)
    assert [len(b) for b in batches] == [2, 2, 10, 10, 10, 10, 10]
    assert [len(b) for b in length_batches(lengths, 1000, 4)] == [2, 2] + [4] * 12 + [2]
    assert [len(b) for b in length_batches([3000, 10], 1000, None)] == [1, 1]  # too long alone: still scored


def test_short_battles_fill_a_decoder_batch_to_the_token_budget(three_folds):
    stage = DecoderStage.load(three_folds[0], QUIET)
    assert stage.params.predict_batch_size is None  # the decoder's default: tokens alone bound a batch
    battles = toy_battles(80, seed=1)
    lengths = stage.encode(battles).lengths
    shapes = []
    hook = stage.model.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)),
                                                 with_kwargs=True)
    budget = 40 * max(lengths)
    stage.params.predict_batch_tokens = budget
    one = stage.predict_one_order(battles)
    assert [rows for rows, _ in shapes] == [40, 40]  # 40 rows of the longest battle: far above the old cap of 32
    assert all(rows * width <= budget for rows, width in shapes)
    shapes.clear()
    stage.params.predict_batch_size = 16  # a user's row cap still holds
    capped = stage.predict_one_order(battles)
    hook.remove()
    assert [rows for rows, _ in shapes] == [16] * 5
    np.testing.assert_allclose(capped, one, atol=1e-5)  # other padding, the same answers


# ----------------------------------------------------------------------------- 3. adapters in the compute dtype
def _adapter_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}


@pytest.mark.parametrize("quant", ["4bit", "none"])
def test_bf16_adapters_after_fit_equal_after_load(quant, gemma_dir, tmp_path):  # noqa: F811
    battles, test = toy_battles(8), toy_battles(6, seed=5)
    stage = make(gemma_dir, quantization=quant, precision="bf16", max_steps=2, max_length=192)
    stage.fit(battles)
    assert _adapter_dtypes(stage.model) == {torch.bfloat16}
    after_fit = stage.predict_logits(test)
    # holding them in bf16 changes no logit: autocast casts fp32 adapter weights to bf16 at every matmul
    with torch.no_grad():
        for n, p in stage.model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.data = p.data.float()
        np.testing.assert_array_equal(stage.predict_logits(test), after_fit)
    inference_layout(stage.model, torch.bfloat16)  # back to the layout fit left
    stage.save(tmp_path / "s")
    with safe_open(str(tmp_path / "s" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    reloaded = DecoderStage.load(tmp_path / "s", QUIET)
    assert _adapter_dtypes(reloaded.model) == {torch.bfloat16}
    np.testing.assert_array_equal(reloaded.predict_logits(test), after_fit)
    folds = DecoderStage.load_folds([tmp_path / "s"], QUIET)
    assert _adapter_dtypes(folds.models[0].stage.model) == {torch.bfloat16}
    # the next fold on the same object trains its adapters in fp32 again and equals a fresh stage's fold
    if quant == "4bit":
        stage.fit(toy_battles(8, seed=2))
        fresh = make(gemma_dir, quantization=quant, precision="bf16", max_steps=2, max_length=192)
        fresh.fit(toy_battles(8, seed=2))
        np.testing.assert_array_equal(stage.predict_logits(test), fresh.predict_logits(test))


def test_the_fp32_layout_on_cpu_is_unchanged(three_folds):
    stage = DecoderStage.load(three_folds[0], QUIET)
    assert stage.precision.name == "fp32" and _adapter_dtypes(stage.model) == {torch.float32}
