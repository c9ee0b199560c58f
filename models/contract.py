"""The stage contract as a check anyone adding a stage can run: :func:`check_stage`.

In the spirit of scikit-learn's ``check_estimator`` / ``parametrize_with_checks``: one call fits the
stage on a few labelled battles and checks everything the pipeline relies on (:mod:`models.stage`):

======================  ========================================================================
check                   what must hold
======================  ========================================================================
``declared``            ``kind`` and ``Params`` set; a registered ``kind`` names this class
                        (:data:`models.stage.STAGE_TYPES`); capabilities of the right type
                        (``tta_from_orders`` a bool, ``passes_per_battle`` 1 or 2, 2 when the
                        answer is the base swap TTA)
``params``              ``params`` is the stage's ``Params`` with every default filled in, and
                        its plain dict validates back to the same params
``fit``                 ``prepare`` on the unlabelled battles, ``fit(train, valid)`` returns the stage
``predict``             ``predict_logits`` gives an ``(n, 3)`` array of finite floats
``swap``                swap equivariance: the swapped battles' answer is the answer with A and B
                        exchanged (stages scoring both orders, ``passes_per_battle == 2``)
``orders``              :func:`models.stage.predict_with_orders` gives the same answer, and its
                        single orders (where given) combine to it
``save_load``           ``save`` then ``load`` gives the same answer
``stage_json``          ``stage.json`` holds ``kind`` and the resolved params; the loaded stage has
                        them (a path may point at the saved directory itself)
``load_folds``          ``load_folds([dir])`` predicts like the one model and counts its passes
``missing``             ``load`` of a directory without ``stage.json`` is a
                        :class:`models.stage.StageFileError` (the one reader)
======================  ========================================================================

Answers are compared as log-probabilities (logits are defined up to a per-row constant) within
``atol``. The first failing check raises :class:`StageContractError` naming it; on success the
names of the checks are returned, with ``"skipped: ..."`` for a check that does not apply.
``tests/test_stage_contract.py`` runs it on the four stage types of this repository.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import log_softmax

from battles.columns import LABEL_COLUMNS, SOFT_COLUMNS
from battles.labels import swap_battles, swap_columns
from kernel.context import StageContext
from kernel.schema import Section, validated
from models.stage import (
    STAGE_TYPES,
    Stage,
    StageFileError,
    average_logits,
    combine_orders,
    make_stage,
    predict_with_orders,
    stage_class,
)

CHECKS = ("declared", "params", "fit", "predict", "swap", "orders", "save_load", "stage_json", "load_folds",
          "missing")


class StageContractError(AssertionError):
    """A stage broke the contract; the message names the stage and the check."""


def check_stage(stage, battles: pd.DataFrame, params=None, context: StageContext | None = None,
                directory=None, atol: float = 1e-5) -> dict[str, str]:
    """Run every check of the stage contract on ``stage`` (module docstring).

    ``stage``: an unfitted :class:`Stage` (its params and context are used), a ``Stage`` subclass, or a
    registered type name (``"lgbm"``); for the last two ``params`` are its params. ``battles``: labelled
    battles, at least 8; the last quarter is the validation set that is also predicted. ``context``:
    default a quiet one with its resources in the working directory. ``directory``: where the stage is
    saved (default: a temporary directory, removed afterwards). Returns ``{check: "ok" or "skipped: why"}``.
    """
    if len(battles) < 8:
        raise ValueError(f"check_stage needs at least 8 labelled battles, got {len(battles)}")
    with tempfile.TemporaryDirectory(prefix="stage-contract-") as tmp:
        tmp = Path(tmp)
        if isinstance(stage, Stage):
            context = stage.context
        else:
            context = context or StageContext(progress=False, resource_dir=tmp / "resources")
            stage = make_stage(stage, params, context) if isinstance(stage, str) else stage(params, context)
        return _Checks(stage, battles.reset_index(drop=True), Path(directory or tmp / "stage"), tmp, atol).run()


class _Checks:
    def __init__(self, stage: Stage, battles: pd.DataFrame, directory: Path, tmp: Path, atol: float):
        self.stage, self.directory, self.tmp, self.atol = stage, directory, tmp, atol
        n_valid = max(2, len(battles) // 4)
        self.train, self.valid = battles.iloc[:-n_valid], battles.iloc[-n_valid:].reset_index(drop=True)
        self.results: dict[str, str] = {}

    def run(self) -> dict[str, str]:
        for name in CHECKS:
            outcome = getattr(self, f"check_{name}")()
            self.results[name] = outcome or "ok"
        return self.results

    def fail(self, check: str, message: str):
        raise StageContractError(f"stage {self.stage.kind!r} ({type(self.stage).__name__}): {check}: {message}")

    def expect(self, check: str, condition: bool, message: str) -> None:
        if not condition:
            self.fail(check, message)

    def close(self, check: str, got, want, what: str) -> None:
        """``got`` and ``want`` equal as log-probabilities within ``atol``."""
        got, want = _log_probs(got), _log_probs(want)
        gap = float(np.max(np.abs(got - want))) if got.shape == want.shape else np.inf
        self.expect(check, gap <= self.atol, f"{what}: largest difference {gap:.3g} > atol {self.atol:g}")

    # -- the checks, in order
    def check_declared(self):
        cls, kind = type(self.stage), self.stage.kind
        self.expect("declared", isinstance(kind, str) and kind and kind != Stage.kind,
                    "set the class attribute `kind` (the stage type name)")
        self.expect("declared", isinstance(cls.Params, type) and issubclass(cls.Params, Section),
                    "set the class attribute `Params` (a kernel.schema.Section subclass)")
        if kind in STAGE_TYPES:
            self.expect("declared", issubclass(cls, stage_class(kind)),
                        f"kind {kind!r} is registered for {STAGE_TYPES[kind]}, not this class")
        tta, passes = self.stage.tta_from_orders, self.stage.passes_per_battle
        self.expect("declared", isinstance(tta, bool), f"tta_from_orders must be a bool, got {tta!r}")
        self.expect("declared", passes in (1, 2) and isinstance(passes, int),
                    f"passes_per_battle must be 1 or 2, got {passes!r}")
        self.expect("declared", passes == 2 or not tta,
                    "tta_from_orders is True (both orders averaged) but passes_per_battle is not 2")

    def check_params(self):
        params, cls = self.stage.params, type(self.stage).Params
        self.expect("params", isinstance(params, cls), f"params is a {type(params).__name__}, not {cls.__name__}")
        plain = params.as_dict()
        missing = sorted(set(cls.model_fields) - set(plain))
        self.expect("params", not missing, f"resolved params lack {missing}")
        self.expect("params", validated(cls, plain) == params, "params.as_dict() does not validate back to the params")

    def check_fit(self):
        self.stage.prepare(self.train.drop(columns=[c for c in (*LABEL_COLUMNS, *SOFT_COLUMNS)
                                                    if c in self.train.columns]))
        fitted = self.stage.fit(self.train, self.valid)
        self.expect("fit", fitted is self.stage, "fit must return the stage itself")

    def check_predict(self):
        self.logits = np.asarray(self.stage.predict_logits(self.valid))
        n = len(self.valid)
        self.expect("predict", self.logits.shape == (n, 3),
                    f"predict_logits gave shape {self.logits.shape}, not ({n}, 3)")
        self.expect("predict", np.issubdtype(self.logits.dtype, np.floating) and np.isfinite(self.logits).all(),
                    "predict_logits must give finite floats")

    def check_swap(self):
        if self.stage.passes_per_battle != 2:
            return "skipped: one A/B order scored (passes_per_battle == 1), no equivariance promised"
        swapped = self.stage.predict_logits(swap_battles(self.valid))
        self.close("swap", swap_columns(_log_probs(swapped)), self.logits,
                   "the swapped battles' answer is not the answer with A and B exchanged")

    def check_orders(self):
        combined, straight, swapped = predict_with_orders(self.stage, self.valid)
        self.close("orders", combined, self.logits, "predict_with_orders disagrees with predict_logits")
        if self.stage.tta_from_orders:
            self.expect("orders", straight is not None and swapped is not None,
                        "tta_from_orders is True but predict_with_orders gave no single orders")
        if straight is None:
            return "skipped: the stage gives no single orders"
        for name, part in (("straight", straight), ("swapped", swapped)):
            part = np.asarray(part)
            self.expect("orders", part.shape == self.logits.shape and np.isfinite(part).all(),
                        f"the {name} order has shape {part.shape} or non-finite values")
        self.close("orders", combine_orders(straight, swapped), self.logits,
                   "the single orders do not combine to the answer")

    def check_save_load(self):
        self.stage.save(self.directory)
        self.loaded = type(self.stage).load(self.directory, self.stage.context)
        self.close("save_load", self.loaded.predict_logits(self.valid), self.logits,
                   "the loaded stage answers differently")

    def check_stage_json(self):
        meta = type(self.stage).read_stage_json(self.directory)
        self.expect("stage_json", meta["kind"] == self.stage.kind, f"stage.json kind {meta['kind']!r}")
        self.expect("stage_json", meta["params"] == self.stage.params.as_dict(),
                    "stage.json params are not the stage's resolved params")
        saved, loaded = self.stage.params.as_dict(), self.loaded.params.as_dict()
        # a stage may read its files from the directory it was saved in (the encoder: params.model)
        other = sorted(k for k in saved if loaded[k] != saved[k] and loaded[k] != str(self.directory))
        self.expect("stage_json", not other, f"the loaded stage has other params: {other}")

    def check_load_folds(self):
        folds = type(self.stage).load_folds([self.directory], self.stage.context)
        self.expect("load_folds", len(folds) == 1, f"load_folds of one directory holds {len(folds)} models")
        self.expect("load_folds", folds.passes_per_battle == self.stage.passes_per_battle,
                    f"load_folds counts {folds.passes_per_battle} passes per battle, the stage "
                    f"{self.stage.passes_per_battle}")
        self.close("load_folds", folds.predict_logits(self.valid), average_logits([self.logits]),
                   "load_folds([dir]) answers differently from the saved stage")

    def check_missing(self):
        empty = self.tmp / "not-a-stage"
        empty.mkdir()
        try:
            type(self.stage).load(empty, self.stage.context)
        except StageFileError:
            return None
        except Exception as exc:  # noqa: BLE001 - any other error is the finding
            self.fail("missing", f"load of a directory without stage.json raised {type(exc).__name__} ({exc}), "
                                 "not StageFileError: read it with Stage.read_stage_json")
        self.fail("missing", "load of a directory without stage.json succeeded")


def _log_probs(logits) -> np.ndarray:
    return log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
