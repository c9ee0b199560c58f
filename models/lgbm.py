"""LightGBM stage: feature blocks into a multiclass booster, trained on both A/B orders.

Training rows are the fold's battles plus their swapped copies (labels swapped with them), so the
model cannot learn a position preference that is not in the data twice over. Early stopping watches
the fold's validation battles (both orders) with LightGBM's own callback. Prediction averages the
straight and swapped orders with columns realigned (swap test-time augmentation). Soft labels and
row weights (external data, pseudo-labels) become LightGBM sample weights via ``expand_targets``.
The booster is saved in LightGBM's text format; block state as .npy/JSON.
"""
from __future__ import annotations

import contextlib
import ctypes
import difflib
import functools
import io
import json
import logging
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from kernel.threads import usable_cores  # first: importing it makes OpenMP wait passively, read when lightgbm loads

import lightgbm as lgb  # noqa: I001 (after kernel.threads, on purpose)
import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from scipy.special import log_softmax
from tqdm.auto import tqdm

from battles.labels import expand_targets, label_matrix, row_weights, swap_columns
from features.assemble import FeatureMatrix
from features.cache import battle_keys
from features.registry import FEATURE_BLOCKS, block_class, make_block
from kernel.files import write_text
from kernel.schema import (NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability, Section,
                           error_message, field_range)
from models.stage import Stage, StageContext

log = logging.getLogger(__name__)

# LightGBM's parameters over which a stage's ``lgb`` dict is laid (its keys replace these). ``num_threads``
# is not among them: unless the ``lgb`` dict sets it, a stage uses every core the process may use
# (kernel.threads.usable_cores). The model does not depend on it (tests/test_threads.py), so it stays
# out of the saved config and the resume keys: a run resumed on another machine keeps its fits.
DEFAULT_LGB = {
    "objective": "multiclass", "num_class": 3, "learning_rate": 0.05, "num_leaves": 15,
    "min_data_in_leaf": 40, "feature_fraction": 0.5, "bagging_fraction": 0.8, "bagging_freq": 1,
    "lambda_l2": 5.0, "max_bin": 63, "verbosity": -1,
}


class LightGBMSettings(Section):
    """What the tool relies on in a stage's ``lgb`` dict (main names; keys not declared here pass as they
    are, but no number anywhere in the dict may be NaN or infinite): a 3-class objective, a positive
    learning rate, and the ranges LightGBM itself requires of the common parameters (named here for a
    message with the key and range; :func:`lightgbm_refusal` then asks LightGBM about the whole dict). The
    stage's ``num_boost_round``, ``rounds_without_valid`` and ``early_stopping_rounds`` set the rounds."""

    model_config = ConfigDict(extra="allow")

    objective: Literal["multiclass", "multiclassova", "softmax", "multiclass_ova", "ova", "ovr"] = "multiclass"
    num_class: Literal[3] = 3
    learning_rate: PositiveFloat = 0.1
    num_leaves: int = Field(31, ge=2, le=131072)
    max_depth: int = -1
    min_data_in_leaf: NonNegativeInt = 20
    min_sum_hessian_in_leaf: NonNegativeFloat = 1e-3
    feature_fraction: float = Field(1.0, gt=0, le=1)
    feature_fraction_bynode: float = Field(1.0, gt=0, le=1)
    bagging_fraction: float = Field(1.0, gt=0, le=1)
    bagging_freq: NonNegativeInt = 0
    lambda_l1: NonNegativeFloat = 0.0
    lambda_l2: NonNegativeFloat = 0.0
    min_gain_to_split: NonNegativeFloat = 0.0
    max_bin: int = Field(255, ge=2)
    num_threads: NonNegativeInt = 0
    drop_rate: Probability = 0.1
    path_smooth: NonNegativeFloat = 0.0
    verbosity: int = -1

    @model_validator(mode="before")
    @classmethod
    def _finite_and_owned(cls, value):
        if isinstance(value, dict):
            for key, v in value.items():
                if isinstance(v, float) and not math.isfinite(v):
                    field = cls.model_fields.get(key)
                    allowed = f"; allowed: {field_range(field)}" if field is not None and field_range(field) else ""
                    raise ValueError(f"{key}: Input should be a finite number (got {v}{allowed})")
            for key, owner in (("num_iterations", "num_boost_round and rounds_without_valid"),
                               ("early_stopping_round", "early_stopping_rounds")):
                if key in value:
                    raise ValueError(f"{key!r} would override the stage's {owner}; set those (stage params) instead")
        return value


def lightgbm_parameter_names() -> dict[str, str]:
    """Every name LightGBM accepts (main names and aliases) -> its main name, from LightGBM itself."""
    from lightgbm.basic import _ConfigAliases

    names = {}
    for main, aliases in _ConfigAliases._get_all_param_aliases().items():
        names[main] = main
        for alias in aliases:
            names.setdefault(alias, main)
    return names


def _block_spec_union():
    """``{"type": <block>, "params": {...}}`` validated by that block's own ``Params``."""
    specs = [create_model(f"{kind}_block", __base__=Section, type=(Literal[kind], ...),
                          params=(block_class(kind).Params, Field(default_factory=block_class(kind).Params)))
             for kind in FEATURE_BLOCKS]
    return Annotated[Union[tuple(specs)], Field(discriminator="type")]


BlockSpec = _block_spec_union()


class LightGBMParams(Section):
    blocks: list[BlockSpec] = Field(default_factory=lambda: [  # feature blocks, in column order
        {"type": "text_stats"}, {"type": "similarity"}, {"type": "tfidf"}, {"type": "word2vec"}],
        validate_default=True)
    num_boost_round: PositiveInt = 2000  # cap on boosting rounds
    early_stopping_rounds: PositiveInt = 50  # patience on the fold's validation battles
    rounds_without_valid: PositiveInt = 300  # rounds when fitted without validation battles
    swap_augment: bool = True  # train on every battle in both A/B orders
    lgb: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_LGB))  # LightGBM parameters, checked: a 3-class objective, learning_rate > 0, finite numbers, LightGBM's ranges (the rounds are the keys above)

    @field_validator("lgb", mode="before")
    @classmethod
    def _lightgbm_names(cls, value):
        """Keys must be LightGBM parameter names or aliases (stored under the main name) and are
        laid over :data:`DEFAULT_LGB`, so the saved config holds every value LightGBM gets but the thread
        count (which does not change the model: see :data:`DEFAULT_LGB`)."""
        if not isinstance(value, dict):
            return value
        known = lightgbm_parameter_names()
        out = dict(DEFAULT_LGB)
        for key, v in value.items():
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{key!r} is not a LightGBM parameter{hint}")
            out[known[key]] = v
        if "seed" in out:
            raise ValueError("'seed' comes from the run's seed; set the top-level 'seed' instead")
        try:
            checked = LightGBMSettings.model_validate(out)
        except ValidationError as exc:
            raise ValueError(_settings_error(exc)) from None
        out = {key: getattr(checked, key) if key in LightGBMSettings.model_fields else v for key, v in out.items()}
        refusal = lightgbm_refusal(json.dumps(out, sort_keys=True))
        if refusal:
            raise ValueError(f"LightGBM refuses these parameters: {refusal}")
        return out


@contextlib.contextmanager
def _native_output_silenced():
    """Standard output and error discarded at the file-descriptor level (LightGBM's C++ prints its
    "[Fatal]" line there before raising), restored afterwards."""
    try:
        libc = ctypes.CDLL(None)
        sys.stdout.flush(), sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError):  # no C library or no such descriptors: nothing to silence
        yield
        return
    try:
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        libc.fflush(None)
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


# Keys whose values name columns or files of the real data: LightGBM checks them on the real data only.
_DATA_KEYS = ("categorical_feature", "label_column", "weight_column", "group_column", "ignore_column")


@functools.lru_cache(maxsize=256)
def lightgbm_refusal(params_json: str) -> str | None:
    """LightGBM's own verdict on a parameter set (its ranges, names of boosting types, metrics...): one
    boosting round on 6 made-up rows, in milliseconds; its error message, or None when it accepts them.
    Lists and keys about the data's columns or files are left to the real fit."""
    params = {k: v for k, v in json.loads(params_json).items()
              if not isinstance(v, (list, dict)) and k not in _DATA_KEYS and "filename" not in k and "model" not in k}
    x, y = np.arange(6, dtype=np.float64).reshape(-1, 1), np.arange(6) % 3
    try:
        with _native_output_silenced():
            lgb.train({**params, "verbosity": -1, "num_threads": 1}, lgb.Dataset(x, y), num_boost_round=1)
    except lgb.basic.LightGBMError as exc:
        return re.sub(r" at \S+, line \d+ ?\.?$", "", " ".join(str(exc).split()))
    return None


def _settings_error(exc: ValidationError) -> str:
    """The first error of :class:`LightGBMSettings` in one line: the key, what is wrong, the allowed range."""
    error = exc.errors()[0]
    key = ".".join(str(p) for p in error["loc"])
    field = LightGBMSettings.model_fields.get(key)
    message = error_message(error, field_range(field) if field is not None else "")
    return f"{key}: {message}" if key else message


class RoundsBar:
    """A LightGBM callback: a progress bar over boosting rounds. With early stopping (``patience`` rounds)
    its total is where training stops unless the validation score improves again, the best round so far
    plus the patience (capped by ``rounds``), moved as the best round moves; not the round cap, which
    an early-stopping fit seldom reaches."""

    def __init__(self, rounds: int, patience: int | None, progress: bool):
        self.rounds, self.patience = rounds, patience
        self.best_round, self.best_score = 0, None
        self.bar = tqdm(total=self.horizon(), desc="lightgbm rounds", unit="round", leave=False, disable=not progress)

    def horizon(self) -> int:
        return self.rounds if self.patience is None else min(self.rounds, max(self.best_round, 1) + self.patience)

    def __call__(self, env) -> None:
        if self.patience is not None and env.evaluation_result_list:
            _, _, score, higher_better = env.evaluation_result_list[0][:4]
            if self.best_score is None or (score > self.best_score if higher_better else score < self.best_score):
                self.best_round, self.best_score = env.iteration - env.begin_iteration + 1, score
                if self.bar.total != self.horizon():
                    self.bar.total = self.horizon()
                    self.bar.refresh()
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class LightGBMStage(Stage):
    kind = "lgbm"
    Params = LightGBMParams

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self.lgb_params = {"num_threads": usable_cores(), **self.params.lgb, "seed": self.context.seed}
        self.features = FeatureMatrix([make_block(b.type, b.params, self.context) for b in self.params.blocks])
        self.booster: lgb.Booster | None = None
        self.feature_names: list[str] = []
        self._valid_matrices = None  # (battle keys, build) of the last fit's validation battles
        self._deferred = None  # (futures, battles, blocks) of blocks preparing in the background: prepare / _ready

    def _build(self, battles: pd.DataFrame):
        """The feature matrices; the validation battles' build is kept from ``fit`` for their prediction."""
        if self._valid_matrices is not None and self._valid_matrices[0] == battle_keys(battles):
            return self._valid_matrices[1]
        return self.features.build(battles)

    def prepare(self, battles: pd.DataFrame) -> None:
        """Label-free preparation of every block. Blocks that train in a thread of their own outside
        the GIL (Word2Vec: one gensim worker, so its vectors stay reproducible) are started in the
        background: the other blocks prepare meanwhile, and the first fold's fold-dependent fitting
        (TF-IDF) runs before their features are needed (:meth:`_ready`)."""
        background = [b for b in self.features.blocks if b.trains_outside_gil]
        futures = []
        if background:
            pool = ThreadPoolExecutor(max_workers=1)
            futures = [pool.submit(b.prepare, battles) for b in background]
            pool.shutdown(wait=False)  # the submitted work still runs; _ready waits for it
        foreground = [b for b in self.features.blocks if b not in background]
        for block in foreground:
            block.prepare(battles)
        self.features.warm(battles, foreground)
        self._deferred = (futures, battles, background)

    def _ready(self) -> None:
        """Wait for the blocks preparing in the background, then compute their cached features."""
        if self._deferred is not None:
            futures, battles, blocks = self._deferred
            for future in futures:
                future.result()
            self._deferred = None
            self.features.warm(battles, blocks)

    def _dataset(self, battles: pd.DataFrame, reference=None) -> lgb.Dataset:
        x, xs, names = self._build(battles)
        self.feature_names = names
        targets, weights = label_matrix(battles), row_weights(battles)
        parts = [(x, *expand_targets(targets, weights))]
        if self.params.swap_augment:
            parts.append((xs, *expand_targets(swap_columns(targets), weights)))
        matrix = np.empty((sum(len(rows) for _, rows, _, _ in parts), x.shape[1]), dtype=x.dtype)
        start = 0
        for source, rows, _, _ in parts:  # rows written in place: no stacked copies at 500k battles
            np.take(source, rows, axis=0, out=matrix[start:start + len(rows)])
            start += len(rows)
        return lgb.Dataset(matrix, np.concatenate([y for _, _, y, _ in parts]),
                           weight=np.concatenate([w for _, _, _, w in parts]),
                           feature_name=[n.replace(" ", "_") for n in names], reference=reference,
                           free_raw_data=True)

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> "LightGBMStage":
        for block in self.features.blocks:
            block.fit(train)
        self._ready()
        self._valid_matrices = None
        dtrain = self._dataset(train)
        early = valid is not None and len(valid) > 0
        rounds = self.params.num_boost_round if early else self.params.rounds_without_valid
        bar = RoundsBar(rounds, self.params.early_stopping_rounds if early else None, self.context.progress)
        callbacks = [lgb.log_evaluation(period=0), bar]
        if early:
            self._valid_matrices = (battle_keys(valid), self.features.build(valid))
            dvalid = self._dataset(valid, reference=dtrain)
            callbacks.append(lgb.early_stopping(self.params.early_stopping_rounds, verbose=False))
            self.booster = lgb.train(self.lgb_params, dtrain, rounds,
                                     valid_sets=[dvalid], valid_names=["valid"], callbacks=callbacks)
            log.info("lgbm: best iteration %d, valid multi_logloss %.4f", self.booster.best_iteration,
                     self.booster.best_score["valid"]["multi_logloss"])
        else:
            self.booster = lgb.train(self.lgb_params, dtrain, rounds, callbacks=callbacks)
        bar.close()
        return self

    def predict_both_orders(self, battles: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Both orders from one feature build (the swapped matrix costs nothing); TTA is the base class's."""
        if self.booster is None:
            raise RuntimeError("LightGBMStage.predict_logits called before fit or load")
        self._ready()
        x, xs, _ = self._build(battles)
        it = self.booster.best_iteration or None
        straight = log_softmax(self.booster.predict(x, raw_score=True, num_iteration=it), axis=1)
        swapped = log_softmax(self.booster.predict(xs, raw_score=True, num_iteration=it), axis=1)
        return straight, swapped

    def save(self, directory) -> None:
        """The booster in LightGBM's text format (``model.txt``), each block's state, ``stage.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        booster = self.booster.model_to_string(num_iteration=self.booster.best_iteration or None)
        write_text(directory / "model.txt", booster)
        for i, block in enumerate(self.features.blocks):
            block.save(directory / f"block{i}_{block.name}")
        self.write_stage_json(directory)

    @classmethod
    def load(cls, directory, context: StageContext | None = None) -> "LightGBMStage":
        directory = Path(directory)
        stage = cls(cls.read_stage_json(directory)["params"], context)
        for i, block in enumerate(stage.features.blocks):
            block.load(directory / f"block{i}_{block.name}")
        stage.booster = lgb.Booster(model_file=str(directory / "model.txt"))
        return stage
