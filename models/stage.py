"""The stage contract: anything that turns battles into ``(n, 3)`` logits in ``[a, b, tie]`` order.

A stage is built from its params (a dict or its ``Params`` section: declared keys, types and
defaults, :mod:`kernel.schema`), optionally ``prepare``s label-free resources on all
texts of the run (e.g. Word2Vec, an embedding cache), is ``fit`` on one fold's training battles
(with that fold's validation battles for early stopping), returns logits with ``predict_logits``,
and round-trips through ``save(dir)`` / ``load(dir)`` with no pickles.

Logits are log-probabilities up to a per-row constant; ``predict_logits`` returns the stage's final
answer, which for every stage in this repo is averaged over both A/B orders (:func:`combine_orders`), so
``predict_logits(swap_battles(x)) == swap_columns(predict_logits(x))``.

Swap TTA is written once here. A stage implements ``predict_one_order`` (one A/B order, no TTA), or
``predict_both_orders`` when it can score both orders more cheaply at once (LightGBM builds both
feature matrices together); the base ``predict_logits`` combines the two orders with
:func:`combine_orders`. The single-order predictions are kept by cross-fitting (the report's
position-bias check); :func:`predict_with_orders` is the one call that gives both.

Capabilities are declared on :class:`Stage` with their defaults (``tta_from_orders``,
``passes_per_battle``); a subclass overrides what differs. ``stage.json`` (the stage type and its
resolved params, plus whatever plain state a stage keeps there) is written and read here for every
stage (:meth:`Stage.write_stage_json`, :meth:`Stage.read_stage_json`); a directory without a readable
one of the right type is one :class:`StageFileError`. :mod:`models.contract` checks a stage against
this contract.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import log_softmax

from battles.labels import swap_battles, swap_columns
from kernel.context import StageContext
from kernel.errors import UserError
from kernel.files import as_stored, read_json, write_json
from kernel.schema import Section, validated

# Stage type name -> "module:Class". Imported lazily so a LightGBM-only run never imports torch.
STAGE_TYPES: dict[str, str] = {
    "lgbm": "models.lgbm:LightGBMStage",
    "encoder": "models.encoder:EncoderStage",
    "length_lr": "models.length_baseline:LengthLogisticStage",
    "decoder": "models.decoder:DecoderStage",
}
STAGE_FILE = "stage.json"


class StageFileError(UserError, ValueError):
    """A directory that holds no saved stage of the expected type: ``stage.json`` missing, unreadable,
    or written by another stage type."""


class Stage:
    """Base class. Subclasses set ``kind`` and ``Params`` and implement ``fit``, ``save``, ``load``, and
    either ``predict_one_order`` / ``predict_both_orders`` (then ``predict_logits`` is the base swap TTA
    and cross-fitting keeps the single-order OOF logits for the position-bias check) or
    ``predict_logits``. As in scikit-learn, ``__init__`` only stores params and context: the work
    (loading tokenizers, probing devices) happens in ``fit`` / ``load``."""

    kind: str = "stage"
    Params: type[Section] = Section

    def __init__(self, params=None, context: StageContext | None = None):
        self.params = validated(self.Params, params)
        self.context = context or StageContext()

    def check_inputs(self) -> None:
        """Check the settings against what the stage reads, before any data is read or model loaded: a
        setting it cannot honour is one :class:`kernel.errors.UserError` line. A run calls this for every
        stage it is about to fit, before its first write. Default: nothing to check (the deep stages load
        their tokenizer and measure the input frame against ``max_length``)."""

    def prepare(self, battles: pd.DataFrame) -> None:
        """Fit label-free resources on every text of the run (train and test). Optional."""

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "Stage":
        raise NotImplementedError

    def predict_one_order(self, battles: pd.DataFrame) -> np.ndarray:
        """Logits for the battles as given, without swap TTA. Implement this or ``predict_both_orders``."""
        raise NotImplementedError

    def predict_both_orders(self, battles: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities for the battles as given and for the swapped battles (columns as predicted
        for the swapped battle, i.e. not realigned)."""
        straight = log_softmax(np.asarray(self.predict_one_order(battles), dtype=np.float64), axis=1)
        swapped = log_softmax(np.asarray(self.predict_one_order(swap_battles(battles)), dtype=np.float64), axis=1)
        return straight, swapped

    def predict_logits(self, battles: pd.DataFrame) -> np.ndarray:
        """The stage's answer: both A/B orders averaged (stages may override, e.g. deep stages)."""
        return combine_orders(*self.predict_both_orders(battles))

    # -- declared capabilities (defaults here; a subclass overrides what differs)
    @property
    def tta_from_orders(self) -> bool:
        """Whether ``predict_logits`` is exactly :func:`combine_orders` of ``predict_both_orders``, so
        the pipeline may ask for the two orders itself and keep them for the position-bias check
        (:func:`predict_with_orders`). True when the subclass keeps the base ``predict_logits``; a stage
        that overrides ``predict_logits`` says so itself (the deep stages: when ``swap_tta`` is on)."""
        return type(self).predict_logits is Stage.predict_logits

    @property
    def passes_per_battle(self) -> int:
        """Forward passes (or feature-matrix predictions) per battle of one fitted model: 2 with swap
        TTA (both A/B orders), 1 without. The base ``predict_logits`` always scores both orders; the
        deep stages follow their ``swap_tta``. What the inference plan counts."""
        return 2

    # -- persistence
    def save(self, directory) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, directory, context: StageContext | None = None) -> "Stage":
        raise NotImplementedError

    def write_stage_json(self, directory, **state) -> None:
        """``<directory>/stage.json``: the stage type (``kind``), its resolved params and ``state``
        (plain JSON-able values a stage keeps there, e.g. the length baseline's coefficients)."""
        write_json(Path(directory) / STAGE_FILE, {"kind": self.kind, "params": self.params.as_dict(), **state})

    @classmethod
    def read_stage_json(cls, directory) -> dict:
        """What :meth:`write_stage_json` wrote in ``directory`` (``kind``, ``params`` and the stage's own
        keys), checked to be a saved stage of this type; else :class:`StageFileError`."""
        path = Path(directory) / STAGE_FILE
        expected = f"expected a saved {cls.kind!r} stage (written by its save())"
        if not path.is_file():
            raise StageFileError(f"{path}: not found; {expected}")
        try:
            meta = read_json(path)
        except (OSError, ValueError) as exc:
            raise StageFileError(f"{path}: unreadable ({exc}); {expected}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("params"), dict):
            raise StageFileError(f"{path}: no 'params' object; {expected}")
        if meta.get("kind") != cls.kind:
            raise StageFileError(f"{path}: holds a saved {meta.get('kind')!r} stage; {expected}")
        return meta

    @classmethod
    def saved_figures(cls, directory) -> dict:
        """Figures a saved model keeps beside its weights for the run's ``metrics.json`` (the deep stages:
        what packing cut of the battles it trained on); none by default."""
        return {}

    @classmethod
    def load_folds(cls, directories, context: StageContext | None = None) -> "FoldModels":
        """Several saved models of this stage (one per fold, or the one refitted on all rows), ready to
        predict together. Stages whose models share a large part override this (the decoder loads its
        base model once for every fold's adapter)."""
        return FoldModels([cls.load(d, context) for d in directories])


class FoldModels:
    """The saved models of one stage, predicting as cross-fitting averages its test logits."""

    def __init__(self, models: list):
        if not models:
            raise ValueError("FoldModels needs at least one model")
        self.models = models

    def __len__(self) -> int:
        """How many models are averaged (the inference plan counts them)."""
        return len(self.models)

    @property
    def passes_per_battle(self) -> int:
        """Forward passes per battle of the whole set: each model's :attr:`Stage.passes_per_battle`, summed."""
        return sum(m.passes_per_battle for m in self.models)

    def predict_logits(self, battles: pd.DataFrame) -> np.ndarray:
        return average_logits([m.predict_logits(battles) for m in self.models])


def stage_class(kind: str) -> type[Stage]:
    if kind not in STAGE_TYPES:
        raise ValueError(f"unknown stage type {kind!r}; known: {sorted(STAGE_TYPES)}")
    module, name = STAGE_TYPES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def make_stage(kind: str, params=None, context: StageContext | None = None) -> Stage:
    return stage_class(kind)(params, context)


def combine_orders(straight: np.ndarray, swapped: np.ndarray) -> np.ndarray:
    """Swap TTA: average the log-probabilities of the given order and of the swapped order (realigned).

    The result is exactly swap-equivariant: swapping the input swaps the output's A and B columns.
    """
    straight = log_softmax(np.asarray(straight, dtype=np.float64), axis=1)
    swapped = log_softmax(np.asarray(swapped, dtype=np.float64), axis=1)
    return 0.5 * (straight + swap_columns(swapped))


def predict_with_orders(stage: Stage, battles: pd.DataFrame):
    """``(logits, straight, swapped)``: the stage's answer and, where the stage can give them without
    extra cost, its single-order log-probabilities (else ``None, None``). A stage whose answer is the
    base TTA (:attr:`Stage.tta_from_orders`) gets them from one ``predict_both_orders`` call; any other
    stage is asked only for its answer."""
    if stage.tta_from_orders:
        try:
            straight, swapped = stage.predict_both_orders(battles)
        except NotImplementedError:
            pass
        else:
            return combine_orders(straight, swapped), straight, swapped
    return stage.predict_logits(battles), None, None


def average_logits(per_fold: list[np.ndarray]) -> np.ndarray:
    """Average several models' logits as log-probabilities (what test predictions across folds use). Each
    model's logits are first rounded as a run stores them (:func:`kernel.files.as_stored`), so an average
    over folds fitted now, folds read back from disk, or saved models predicting anew is the same."""
    return np.mean([log_softmax(as_stored(x), axis=1) for x in per_fold], axis=0)
