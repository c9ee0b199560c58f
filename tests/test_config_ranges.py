"""Every number of the config and of the command line declares its range; a value outside it is refused
in one line naming where it came from and the allowed range, before any data is read (issue 21)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import typing
from pathlib import Path

import annotated_types as at
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import run as cli
from features.registry import FEATURE_BLOCKS, block_class
from kernel.schema import Section, annotation_range, field_range
from models.lgbm import LightGBMSettings
from models.stage import STAGE_TYPES, stage_class
from pipeline.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]

# Numbers whose every value is meaningful (no range to declare): LightGBM's "no limit" depth and its log level.
UNBOUNDED = {"LightGBMSettings.max_depth", "LightGBMSettings.verbosity"}


# -- the numeric keys of the schema, found by walking it (a new key is covered without editing this file) --
def _numbers_in(annotation) -> tuple[str, typing.Any] | None:
    """('scalar' | 'list' | 'pair', the number's annotation) when ``annotation`` holds a number, else None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        found = _numbers_in(args[0])
        return (found[0], annotation) if found and found[0] == "scalar" else found
    if annotation in (int, float):
        return "scalar", annotation
    if origin in (typing.Union, type(int | None)):
        for arg in args:
            found = _numbers_in(arg)
            if found:
                return found
    if origin is list and args and _numbers_in(args[0]) and _numbers_in(args[0])[0] == "scalar":
        return "list", args[0]
    if origin is tuple and args and all(_numbers_in(a) for a in args):
        return "pair", args[0]
    return None


def _sections(cls, prefix: str, wrap):
    """(key path, class.field, container, item annotation, field, wrap) for every numeric key under ``cls``;
    ``wrap(key, value)`` turns a value at a key into the ``--set`` items that lay it on."""
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        for member in typing.get_args(annotation) or (annotation,):
            if isinstance(member, type) and issubclass(member, Section) and member is not cls:
                yield from _sections(member, f"{prefix}{name}.", wrap)
        found = _numbers_in(annotation)
        if found:
            yield f"{prefix}{name}", f"{cls.__name__}.{name}", found[0], found[1], field, wrap


def numeric_keys():
    keys = []
    top = lambda key, value: [f"{key}={json.dumps(value)}"]  # noqa: E731
    for found in _sections(RunConfig, "", top):
        if not found[0].startswith(("stages.", "external.sources.")):
            keys.append(found)
    source = {"kind": "competition", "path": "x.csv", "source": "x"}
    from flywheel.sources import ExternalSource
    for found in _sections(ExternalSource, "", None):
        keys.append((f"external.sources[].{found[0]}", *found[1:5],
                     lambda key, value, n=found[0]: [f"external.sources={json.dumps([{**source, n: value}])}"]))
    for kind in STAGE_TYPES:
        spec = {"type": kind, "params": {"model": "/models/m"} if kind in ("encoder", "decoder") else {}}

        def lay(key, value, spec=spec):
            name = key.split(".", 1)[1]
            return [f"stages={json.dumps({'s': spec})}", f"stages.s.params.{name}={json.dumps(value)}"]
        for found in _sections(stage_class(kind).Params, f"{kind}.", None):
            keys.append((*found[:5], lay))
    for kind in FEATURE_BLOCKS:
        def lay_block(key, value, kind=kind):
            name = key.split(".", 1)[1]
            block = {"type": kind, "params": {name: value, **({"model": "/m"} if kind == "embeddings" else {})}}
            return [f"stages={json.dumps({'s': {'type': 'lgbm', 'params': {'blocks': [block]}}})}"]
        for found in _sections(block_class(kind).Params, f"{kind}.", None):
            keys.append((*found[:5], lay_block))
    for found in _sections(LightGBMSettings, "lgb.", None):
        keys.append((*found[:5], lambda key, value: [f"stages.lgbm_stats.params.{key}={json.dumps(value)}"]))
    return keys


KEYS = numeric_keys()


def test_the_walk_finds_the_numbers():
    labels = {k[1] for k in KEYS}
    for expected in ("RunConfig.seed", "RunConfig.n_folds", "StackerConfig.C_grid", "StackerConfig.selection_tolerance",
                     "Word2VecParams.vector_size", "TfidfParams.svd_components", "LengthParams.C",
                     "LightGBMParams.num_boost_round", "LightGBMSettings.learning_rate", "DecoderParams.lora_r",
                     "EncoderParams.learning_rate", "DedupConfig.threshold", "ShiftConfig.clip_min",
                     "ExternalSource.weight"):
        assert expected in labels, expected
    assert len(KEYS) > 60


def _range_of(container, item, field) -> str:
    return field_range(field) if container == "scalar" else annotation_range(item)


@pytest.mark.parametrize("key", [k for k in KEYS if k[1] not in UNBOUNDED], ids=lambda k: k[0])
def test_every_number_declares_its_range(key):
    path, label, container, item, field, _ = key
    assert _range_of(container, item, field), f"{label} ({path}) declares no range"


def _within(value, metadata) -> bool:
    checks = {at.Gt: lambda c: value > c.gt, at.Ge: lambda c: value >= c.ge, at.Lt: lambda c: value < c.lt,
              at.Le: lambda c: value <= c.le}
    return all(checks[type(c)](c) for c in metadata if type(c) in checks)


def _constraints(container, item, field) -> list:
    if container == "scalar":
        meta = list(field.metadata)
        if typing.get_origin(field.annotation) is typing.Annotated:
            item = field.annotation
    else:
        meta = []
    if typing.get_origin(item) is typing.Annotated:
        for extra in typing.get_args(item)[1:]:
            meta += list(getattr(extra, "metadata", [extra]))
    for arg in typing.get_args(field.annotation):  # int | None with Field(ge=...) keeps metadata on the field
        if typing.get_origin(arg) is typing.Annotated:
            for extra in typing.get_args(arg)[1:]:
                meta += list(getattr(extra, "metadata", [extra]))
    return meta


def _value_at(resolved: dict, key: str):
    path, _, _, _, _, _ = key
    if path.startswith("external.sources[]."):
        return resolved["external"]["sources"][0][path.split(".")[-1]]
    if path.startswith("lgb."):
        return resolved["stages"]["lgbm_stats"]["params"]["lgb"][path.split(".", 1)[1]]
    head, name = path.split(".", 1) if "." in path else ("", path)
    if head in STAGE_TYPES:
        return resolved["stages"]["s"]["params"][name]
    if head in FEATURE_BLOCKS:
        return resolved["stages"]["s"]["params"]["blocks"][0]["params"][name]
    node = resolved
    for part in path.split("."):
        node = node[part]
    return node


HOSTILE = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0, 0.0, -0.0, -1, -1.5, 1, 2, 0.5, 1e300, -1e300, 2**64, 2**31, 3,
                     True, False, "1", "fast", None]),
    st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=HOSTILE)
def test_every_number_is_refused_in_one_line_or_valid_and_finite(key, value):
    path, label, container, item, field, wrap = key
    laid = value if container == "scalar" else [value] if container == "list" else [value, value]
    sets = wrap(path, laid)
    try:
        config = load_config(sets=sets)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"--set {sets[-1]}: "), message
        assert path.split(".")[-1] in message or "stages" in message, message  # names the key
        return
    got = _value_at(config.as_dict(), key)
    got = got if container == "scalar" else got[0]
    if got is None:  # null is a declared value of this key (e.g. "no cap")
        assert value is None and type(None) in typing.get_args(field.annotation), (path, value)
        return
    assert not isinstance(got, bool) and math.isfinite(got), (path, value, got)
    assert _within(got, _constraints(container, item, field)), (path, value, got)
    assert RunConfig.model_validate(config.as_dict()).as_dict() == config.as_dict()  # the saved config reloads


# -- the issue's examples: each one line naming the --set, the key and the allowed range -------------------
@pytest.mark.parametrize("setting, expected", [
    ("stages.lgbm_stats.params.lgb.learning_rate=NaN", "stages.lgbm_stats.params.lgb.learning_rate: Input should be a "
                                                      "finite number (got nan; allowed: > 0)"),
    ("stages.lgbm_stats.params.lgb.learning_rate=true", "lgb.learning_rate: Input should be a number, not true"),
    ("stages.lgbm_stats.params.num_boost_round=true", "params.num_boost_round: Input should be a number, not true"),
    ("stacker.C_grid=[0.1, false]", "stacker.C_grid: Input should be a number, not false"),
    ("stages.lgbm_stats.params.lgb.learning_rate=Infinity", "learning_rate: Input should be a finite number (got inf"),
    ("stages.lgbm_stats.params.lgb.learning_rate=-0.1", "learning_rate: Input should be greater than 0 (got -0.1; "
                                                        "allowed: > 0)"),
    ("stages.lgbm_stats.params.lgb.learning_rate=fast", 'learning_rate: Input should be a valid number'),
    ("stages.lgbm_stats.params.lgb.objective=regression", "objective: Input should be 'multiclass'"),
    ("stages.lgbm_stats.params.lgb.num_class=2", "num_class: Input should be 3"),
    ("stages.lgbm_stats.params.lgb.n_estimators=10", "'num_iterations' would override the stage's num_boost_round"),
    ("stages.lgbm_stats.params.lgb.top_k=-5", "lgb: LightGBM refuses these parameters: Check failed: (top_k) > (0)"),
    ("stages.lgbm_stats.params.lgb.boosting=nope", "LightGBM refuses these parameters: Unknown boosting type nope"),
    ("stages.lgbm_stats.params.num_boost_round=-5", "stages.lgbm_stats.params.num_boost_round: Input should be "
                                                    "greater than or equal to 1 (got -5; allowed: >= 1)"),
    ("stages.length_lr.params.C=-1", "stages.length_lr.params.C: Input should be greater than 0 (got -1; allowed: > 0)"),
    ("stacker.C_grid=[-1]", "stacker.C_grid.0: Input should be greater than 0 (got -1; allowed: > 0)"),
    ("stacker.C_grid=[0]", "stacker.C_grid.0: Input should be greater than 0 (got 0; allowed: > 0)"),
    ("stacker.C_grid=[]", "stacker.C_grid: List should have at least 1 item"),
    ("stacker.selection_tolerance=-1", "stacker.selection_tolerance: Input should be greater than or equal to 0"),
    ('stacker.exclude=["lgbm_stat"]', "stacker.exclude: 'lgbm_stat' is not a stage of the config; did you mean "
                                      "'lgbm_stats'?"),
    ("seed=-1", "seed: Input should be greater than or equal to 0 (got -1; allowed: in [0, 2^32-1])"),
    ("n_folds=NaN", "n_folds: Input should be a finite number (got nan; allowed: >= 3)"),
    ('stages.lgbm_full.params.blocks=[{"type": "word2vec", "params": {"vector_size": 0}}]',
     "blocks.0.params.vector_size: Input should be greater than or equal to 1 (got 0; allowed: >= 1)"),
    ('stages.lgbm_full.params.blocks=[{"type": "tfidf", "params": {"svd_components": 0}}]',
     "blocks.0.params.svd_components: Input should be greater than or equal to 1"),
    ('stages.lgbm_full.params.blocks=[{"type": "tfidf", "params": {"word_ngrams": [2, 1]}}]',
     "an n-gram range is [smallest, largest], got [2, 1]"),
    ("external.shift.clip_min=10", "clip_min 10.0 must be <= clip_max 5.0"),
    ("external.dedup.threshold=1.5", "external.dedup.threshold: Input should be less than or equal to 1 (got 1.5; "
                                     "allowed: in (0, 1])"),
])
def test_issue_examples_are_refused_naming_set_key_and_range(setting, expected):
    with pytest.raises(ConfigError) as info:
        load_config(sets=[setting])
    message = str(info.value)
    assert message.startswith(f"--set {setting}: ") and "\n" not in message, message
    assert expected in message, message


def test_lgb_values_are_stored_as_numbers():
    config = load_config(sets=['stages.lgbm_stats.params.lgb.learning_rate="0.2"', "stages.lgbm_stats.params.lgb.eta=0.3"])
    assert config.stages["lgbm_stats"].params["lgb"]["learning_rate"] == 0.3  # the alias, laid on last, wins
    config = load_config(sets=['stages.lgbm_stats.params.lgb.learning_rate="0.2"'])
    assert config.stages["lgbm_stats"].params["lgb"]["learning_rate"] == 0.2


def test_a_config_file_value_names_the_file_and_key(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"stacker": {"C_grid": [0.1, -2]}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: stacker.C_grid.1: Input should be greater than 0 (got -2; allowed: > 0)"


# -- the command line's numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["pseudo-label", "--run", "r", "--data", "d", "--out", "o", "--temperature", "0"],
     "argument --temperature: Input should be greater than 0 (got 0; allowed: > 0)"),
    (["pseudo-label", "--run", "r", "--data", "d", "--out", "o", "--temperature", "-1"], "argument --temperature"),
    (["pseudo-label", "--run", "r", "--data", "d", "--out", "o", "--temperature", "nan"],
     "argument --temperature: Input should be a finite number"),
    (["pseudo-label", "--run", "r", "--data", "d", "--out", "o", "--weight", "-1"], "argument --weight"),
    (["pseudo-label", "--run", "r", "--data", "d", "--out", "o", "--chunk-rows", "0"],
     "argument --chunk-rows: Input should be greater than or equal to 1 (got 0; allowed: >= 1)"),
    (["pair-chatlogs", "--data", "d", "--out", "o", "--max-pairs-per-prompt", "-2"], "argument --max-pairs-per-prompt"),
    (["pair-chatlogs", "--data", "d", "--out", "o", "--seed", "-3"], "argument --seed"),
    (["serve", "--run", "r", "--port", "70000"], "argument --port: Input should be less than or equal to 65535"),
    (["serve", "--run", "r", "--max-bytes", "0"], "argument --max-bytes: Input should be greater than or equal to 1"),
])
def test_cli_numbers_are_refused_in_one_line_naming_the_option(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_numbers_in_range_parse():
    args = cli._parser().parse_args(["pseudo-label", "--run", "r", "--data", "d", "--out", "o", "--temperature",
                                     "0.5", "--weight", "2", "--chunk-rows", "7"])
    assert (args.temperature, args.weight, args.chunk_rows) == (0.5, 2.0, 7)


# -- end to end: a refused --set on a run directory exits 2 in one line and changes nothing ---------------
def test_refused_set_exits_2_in_one_line_and_leaves_the_run_directory_untouched(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("finished work")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "train", "lgbm_stats", "--train",
                           str(tmp_path / "never_read.csv"), "--out", str(out), "--quiet", "--set",
                           "stages.lgbm_stats.params.lgb.learning_rate=-0.1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--set stages.lgbm_stats.params.lgb.learning_rate=-0.1: " in errors[0] and "allowed: > 0" in errors[0]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


@pytest.mark.parametrize("setting", ["stacker.C_grid=[-1]", "stacker.C_grid=[0]", "stacker.selection_tolerance=-1",
                                     'stacker.exclude=["nope"]'])
def test_tune_refuses_a_bad_override_before_touching_the_run(finished_run, setting, caplog):
    before = {p.relative_to(finished_run).as_posix(): p.read_bytes() for p in sorted(finished_run.rglob("*"))
              if p.is_file()}
    assert cli.main(["tune", "--run", str(finished_run), "--set", setting, "--quiet"]) == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.startswith(f"--set {setting}: stacker"), error
    after = {p.relative_to(finished_run).as_posix(): p.read_bytes() for p in sorted(finished_run.rglob("*"))
             if p.is_file()}
    assert after == before


def test_tune_config_file_names_the_file(finished_run, tmp_path, caplog):
    path = tmp_path / "stacker.json"
    path.write_text(json.dumps({"stacker": {"C_grid": [0.1, -1]}}))
    before = {p.relative_to(finished_run).as_posix(): p.read_bytes() for p in sorted(finished_run.rglob("*"))
              if p.is_file()}
    assert cli.main(["tune", "--run", str(finished_run), "--config", str(path), "--quiet"]) == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error == f"{path} (its stacker section): stacker.C_grid.1: Input should be greater than 0 (got -1; allowed: > 0)"
    assert {p.relative_to(finished_run).as_posix(): p.read_bytes() for p in sorted(finished_run.rglob("*"))
            if p.is_file()} == before


@pytest.mark.parametrize("options, expected", [
    ({"seed": -1}, "options.seed: Input should be greater than or equal to 0 (got -1; allowed: in [0, 2^32-1])"),
    ({"max_pairs_per_prompt": 0}, "options.max_pairs_per_prompt: Input should be greater than or equal to 1"),
    ({"tie_margin": math.nan}, "options.tie_margin: Input should be a finite number (got nan; allowed: >= 0)"),
    ({"keep_ties": "perhaps"}, "options.keep_ties: Input should be a valid boolean"),
])
def test_converter_options_are_checked_by_their_declared_types(options, expected):
    sources = [{"kind": "scored_answers", "path": "x.jsonl", "source": "s", "options": options}]
    with pytest.raises(ConfigError) as info:
        load_config(sets=[f"external.sources={json.dumps(sources)}"])
    assert expected in str(info.value) and "\n" not in str(info.value)
    good = [{**sources[0], "options": {"seed": 3, "max_pairs_per_prompt": 2, "tie_margin": 0.5}}]
    assert load_config(sets=[f"external.sources={json.dumps(good)}"]).external.sources[0].options["seed"] == 3
