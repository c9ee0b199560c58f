"""The run configuration: one schema, assembled from the sections each layer declares.

    RunConfig                                   (this module)
      seed, n_folds
      stages: {name: StageSpec}                 type, params, folds, refit_full
        params                                  the stage type's own Params (models/*.py), e.g.
                                                LightGBMParams with its feature blocks' Params
      stacker: StackerConfig                    (ensemble/stacking.py)
      external: ExternalConfig                  (flywheel/sources.py; dedup, shift sections)

Every key has one declared type and one default, where the code that reads it lives. A config is
built from layers, each checked as it is laid on, so an error names where it came from: the
defaults, then a run's saved ``config.json`` (when a run is resumed without ``--config``), then the
user's ``--config`` file, then what a command adds (``train decoder --model ...``), then each
``--set key=value`` in order. Unknown keys and wrong types are errors that name the layer and the key
path and suggest the closest known key. Paths in a config file (:func:`path_keys`: a stage's
checkpoint ``model``, a feature block's ``model``, an external source's ``path``) resolve from the
file's folder, not the working directory, and are saved absolute; :func:`check_source_paths` refuses a
missing one naming its key before a run writes anything. What a run saves (``config.json``) and hashes into its
resume keys is the *resolved* config: every default written out, so changing a default in code
invalidates the finished stages it affects.
"""
from __future__ import annotations

import copy
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import Field, ValidationError, field_validator, model_validator

from ensemble.stacking import StackerConfig
from flywheel.sources import ExternalConfig
from kernel.context import DEFAULT_SEED
from kernel.errors import UserError
from kernel.schema import NUMBER_ERRORS, Section, Seed, annotation_range, error_message, field_range
from models.stage import STAGE_TYPES, stage_class

# The stages a run fits when the config names none. lgbm_full uses LightGBMParams' default blocks.
DEFAULT_STAGES = {
    "length_lr": {"type": "length_lr"},
    "lgbm_stats": {"type": "lgbm", "params": {"blocks": [{"type": "text_stats"}, {"type": "similarity"}]}},
    "lgbm_full": {"type": "lgbm"},
}


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the file or ``--set`` it came from and the key."""


class StageSpec(Section):
    """One stage of the run: its type, its params, and which folds it is fitted on."""

    type: str  # a stage type: length_lr, lgbm, encoder, decoder
    params: dict[str, Any] = Field(default_factory=dict)  # the type's Params (checked by the stage type)
    folds: list[int] | None = None  # cross-fit only these folds (OOF logits for their rows); null: all
    refit_full: bool = False  # after the folds, one more model on every training row gives the test logits

    @field_validator("type")
    @classmethod
    def _known_type(cls, value):
        if value not in STAGE_TYPES:
            raise ValueError(f"unknown stage type {value!r}{_did_you_mean(value, STAGE_TYPES)}; "
                             f"types: {sorted(STAGE_TYPES)}")
        return value

    @field_validator("folds")
    @classmethod
    def _fold_list(cls, value):
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("folds must be a non-empty list of distinct fold indices (or null for all folds)")
        return None if value is None else sorted(value)


class RunConfig(Section):
    """The whole run. ``n_folds >= 3``: the stacker's nested CV chooses by an inner CV on the other folds."""

    seed: Seed = DEFAULT_SEED  # folds, models, samples: every random choice of the run
    n_folds: int = Field(5, ge=3)  # grouped folds by prompt
    stages: dict[str, StageSpec] = Field(default_factory=lambda: copy.deepcopy(DEFAULT_STAGES), min_length=1,
                                         validate_default=True)  # name -> stage; a config's stages replace these
    stacker: StackerConfig = Field(default_factory=StackerConfig)  # how the ensemble is chosen
    external: ExternalConfig = Field(default_factory=ExternalConfig)  # training-only external data

    @model_validator(mode="after")
    def _folds_exist(self):
        for name, spec in self.stages.items():
            bad = [k for k in spec.folds or [] if not 0 <= k < self.n_folds]
            if bad:
                raise ValueError(f"stages.{name}.folds: {bad} not among the run's folds 0..{self.n_folds - 1}")
        unknown = [n for n in self.stacker.exclude if n not in self.stages]
        if unknown:
            raise ValueError(f"stacker.exclude: {', '.join(map(repr, unknown))} is not a stage of the config"
                             f"{_did_you_mean(unknown[0], self.stages)} (stages: {', '.join(self.stages)})")
        return self


# ----------------------------------------------------------------------------------------------- loading
def load_config(path=None, sets: Iterable[str] = (), *, saved: dict | None = None, overrides: dict | None = None,
                edit: Callable[[dict], None] | None = None, overrides_origin: str = "the overrides") -> RunConfig:
    """The resolved config from its layers (see the module docstring), each checked as it is laid on.

    ``saved``: a run's saved config (the base when resuming without a file); ``overrides``: a dict laid
    on after the file (programmatic use, e.g. benchmarks; ``overrides_origin`` names it in errors);
    ``edit``: a function that changes the dict after the file (a command adding its stage); ``sets``:
    ``key.path=JSON`` strings, in order."""
    data = RunConfig().as_dict() if saved is None else copy.deepcopy(saved)
    data = _check(data, "the saved run config" if saved is not None else "the defaults")
    if path is not None:
        data = merge(data, resolve_paths(read_config_file(path), Path(path).resolve().parent))
        data = _check(data, str(path))
    if overrides:
        data = _check(merge(data, overrides), overrides_origin)
    if edit is not None:
        edit(data)
        data = _check(data, "the command line")
    for item in sets:
        data = _check(apply_set(data, item), f"--set {item}")
    return RunConfig.model_validate(data)


def read_config_file(path) -> dict:
    path = Path(path)
    try:
        user = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a JSON config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: a config is a JSON object of sections, got {type(user).__name__}")
    return user


def path_keys(data: dict) -> list[tuple[tuple, str]]:
    """Every path value of a config dict: ``(key path, value)`` for each stage's params ``model`` (at any
    depth, e.g. a feature block's) and each external source's ``path``."""
    out = []

    def walk(node, at):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "model" and isinstance(v, str):
                    out.append(((*at, k), v))
                else:
                    walk(v, (*at, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*at, i))

    for name, spec in (data.get("stages") or {}).items():
        if isinstance(spec, dict):
            walk(spec.get("params"), ("stages", name, "params"))
    external = data.get("external")
    for i, source in enumerate(external.get("sources") or [] if isinstance(external, dict) else []):
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            out.append((("external", "sources", i, "path"), source["path"]))
    return out


def resolve_paths(data: dict, folder: Path) -> dict:
    """A copy of a config file's dict with its relative paths (:func:`path_keys`) resolved from ``folder``
    (the file's own folder); ``~`` is expanded."""
    out = copy.deepcopy(data)
    for key, value in path_keys(out):
        p = Path(value).expanduser()
        node = out
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = str(p if p.is_absolute() else (folder / p).resolve())
    return out


def check_source_paths(config: RunConfig) -> None:
    """Refuse (naming the key) an external source's path that does not exist; called before a run writes
    anything. (The stages' checkpoint paths are checked by ``pipeline.runner.Run.check_stage_models``, for
    the stages about to be fitted.)"""
    for key, value in path_keys(config.as_dict()):
        if key[0] != "stages" and not Path(value).exists():
            where = ".".join(str(k) for k in key)
            raise ConfigError(f"{where}: {value} does not exist (a relative path in a config file resolves from "
                              "the file's folder; on the command line, from the working directory)")


def merge(base: dict, override: dict) -> dict:
    """``override`` laid over ``base``: objects merge key by key, except ``stages``, which a user's
    layer replaces whole (they say which stages run), and anything else, which replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key == "stages" or not (isinstance(value, dict) and isinstance(out.get(key), dict)):
            out[key] = copy.deepcopy(value)
        else:
            out[key] = merge(out[key], value)
    return out


def apply_set(data: dict, item: str) -> dict:
    """``key.path=value`` (value as JSON, else as a plain string) laid on a copy of ``data``."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set n_folds=3")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    out = copy.deepcopy(data)
    node, parts = out, key.strip().split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item}: {'.'.join(parts[:depth + 1])} is {json.dumps(child)}, not an object")
        node = child
    node[parts[-1]] = value
    return out


# ----------------------------------------------------------------------------------------------- checking
def _check(data: dict, origin: str) -> dict:
    """Validate ``data`` (raise :class:`ConfigError` naming ``origin``); return it with every stage's
    params resolved by its type's ``Params`` (defaults written out)."""
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin, RunConfig, (), data)) from None
    resolved = config.as_dict()
    for name, spec in config.stages.items():
        params_cls = stage_class(spec.type).Params
        try:
            resolved["stages"][name]["params"] = params_cls.model_validate(spec.params).as_dict()
        except ValidationError as exc:
            raise ConfigError(_describe(exc, origin, params_cls, ("stages", name, "params"), data)) from None
    return resolved


def _describe(exc: ValidationError, origin: str, model: type, prefix: tuple, data: dict) -> str:
    """The first error as one line: origin, key path, what is wrong, and the closest known key."""
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    path = ".".join(str(p) for p in prefix + _visible(model, loc))
    kind = error["type"]
    if kind == "extra_forbidden":
        known = _keys_at(model, loc[:-1])
        return f"{origin}: unknown key {path!r}{_did_you_mean(str(loc[-1]), known)}" + (
            f" (known here: {', '.join(sorted(known))})" if known and len(known) <= 12 else "")
    if kind == "missing" and prefix == () and len(loc) == 3 and loc[0] == "stages" and loc[2] == "type":
        name = loc[1]
        others = [n for n in data.get("stages", {}) if n != name and isinstance(data["stages"][n], dict)
                  and "type" in data["stages"][n]]
        return (f"{origin}: stage {name!r} has no 'type'{_did_you_mean(str(name), others)} "
                f"(stages: {', '.join(others) or 'none'}; types: {', '.join(sorted(STAGE_TYPES))})")
    message = error_message(error, _range_at(model, loc) if kind in NUMBER_ERRORS else "")
    inner = re.match(r"([A-Za-z_]\w*(?:\.\w+)*): ", message) if kind == "value_error" else None
    if inner:  # a section's own check names the key below it: "lgb" + "learning_rate: ..." -> "lgb.learning_rate: ..."
        path, message = ".".join(p for p in (path, inner.group(1)) if p), message[inner.end():]
    return f"{origin}: {path}: {message}" if path else f"{origin}: {message}"


def _range_at(model: type, loc: tuple) -> str:
    """The range declared for the value at ``loc`` below ``model`` (a field's, or a list item's), or ''."""
    annotation, field = model, None
    for part in loc:
        current = _unwrap(annotation)
        if isinstance(current, type) and issubclass(current, Section):
            field = current.model_fields.get(str(part))
            annotation = field.annotation if field else None
        else:
            field = None
            annotation, _ = _step(annotation, part)
    return field_range(field) if field is not None else annotation_range(annotation)


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _visible(model: type, loc: tuple) -> tuple:
    """``loc`` without the tags pydantic adds for discriminated unions (e.g. a block's type name)."""
    out, annotation = [], model
    for part in loc:
        annotation, is_tag = _step(annotation, part)
        if not is_tag:
            out.append(part)
    return tuple(out)


def _keys_at(model: type, loc: tuple) -> list[str]:
    """The keys a config object accepts at ``loc`` below ``model`` ([] when not an object of ours)."""
    annotation = model
    for part in loc:
        annotation, _ = _step(annotation, part)
    return list(annotation.model_fields) if isinstance(annotation, type) and issubclass(annotation, Section) else []


def _step(annotation, part):
    """The annotation one level down ``part`` (a field name, a dict key, a list index or a union tag),
    and whether ``part`` was a union tag."""
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Section):
        field = annotation.model_fields.get(str(part))
        return (field.annotation if field else None), False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (dict, list) and args:
        return args[-1], False
    if origin in (typing.Union, types.UnionType):
        for member in args:
            member = _unwrap(member)
            if isinstance(member, type) and member.__name__ == part:  # pydantic names the union member tried
                return member, True
            if isinstance(member, type) and issubclass(member, Section):
                tag = member.model_fields.get("type")
                if tag is not None and part in typing.get_args(tag.annotation):
                    return member, True
        sections = [m for m in map(_unwrap, args) if isinstance(m, type) and issubclass(m, Section)]
        if len(sections) == 1:
            return _step(sections[0], part)
    return None, False


def _unwrap(annotation):
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation
