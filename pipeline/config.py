"""Run configuration: defaults, loading a user's JSON over them, and validation with clear errors."""
from __future__ import annotations

import copy
import json
from pathlib import Path

DEFAULT_CONFIG = {
    "seed": 42,
    "n_folds": 5,
    # Stage name -> {"type": registered stage type, "params": {...}}. Several LightGBM feature sets
    # are several stages. The stacker sees the OOF logits of every stage listed here.
    "stages": {
        "length_lr": {"type": "length_lr", "params": {}},
        "lgbm_stats": {"type": "lgbm", "params": {"blocks": [{"type": "text_stats"}, {"type": "similarity"}]}},
        "lgbm_full": {"type": "lgbm", "params": {"blocks": [
            {"type": "text_stats"}, {"type": "similarity"}, {"type": "tfidf"}, {"type": "word2vec"}]}},
    },
    # The ensemble candidates (see ensemble/stacking.py): every stage alone, the plain average, the
    # simplex-weighted average ("weighted"), logistic stacking at each C, and logistic stacking with the
    # cheap meta features ("meta_features"). Each is scored by nested CV; "exclude" drops stages.
    # "selection_tolerance" > 0 picks the simplest candidate within that much CV log loss of the best.
    "stacker": {"C_grid": [0.01, 0.1, 1.0], "weighted": True, "meta_features": True, "exclude": [],
                "selection_tolerance": 0.0},
    # Training-only external data, e.g.
    # {"sources": [{"kind": "competition", "path": "pandalm.csv", "source": "pandalm", "weight": 0.5}],
    #  "dedup": {"threshold": 0.8}, "shift_weighting": true}
    # kinds: competition, preference_pairs, scored_answers, arena_conversations (battles/converters.py)
    "external": {},
}


class ConfigError(ValueError):
    pass


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if k == "stages":  # a user's stage list replaces ours: they say which stages run
            out[k] = copy.deepcopy(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path=None, overrides: dict | None = None) -> dict:
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    if path is not None:
        path = Path(path)
        try:
            user = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        cfg = _merge(cfg, user)
    if overrides:
        cfg = _merge(cfg, overrides)
    validate_config(cfg, path or "<config>")
    return cfg


def validate_config(cfg: dict, where="<config>") -> None:
    from models.stage import STAGE_TYPES

    if not isinstance(cfg.get("n_folds"), int) or cfg["n_folds"] < 3:
        # the stacker's nested CV chooses on the other folds by an inner CV: that needs two of them
        raise ConfigError(f"{where}: n_folds must be an integer >= 3 (nested CV), got {cfg.get('n_folds')!r}")
    stages = cfg.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{where}: 'stages' must be a non-empty object of name -> {{type, params}}")
    for name, spec in stages.items():
        if not isinstance(spec, dict) or spec.get("type") not in STAGE_TYPES:
            raise ConfigError(f"{where}: stage {name!r} needs a 'type' among {sorted(STAGE_TYPES)}, got "
                              f"{spec.get('type') if isinstance(spec, dict) else spec!r}")
        spec.setdefault("params", {})
