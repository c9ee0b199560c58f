#!/usr/bin/env python
"""Arena preference stack: one entry point.

  python run.py --train train.csv [--test test.csv] --out runs/first      # everything, end to end
  python run.py train STAGE --train train.csv [--test ...] --out runs/x    # one stage (name or type)
  python run.py tune --run runs/x [--set ...] [--apply]                    # an ensemble experiment in runs/x/tune/
  python run.py predict --run runs/x --test new.csv --out preds.csv        # predict new battles with a run
  python run.py evaluate --run runs/x --data holdout.csv                   # score a run on labelled battles
  python run.py remove-stage --run runs/x STAGE                            # drop a stage from a run
  python run.py pseudo-label --run runs/x --data unlabelled.jsonl --out pseudo.jsonl   # soft labels for training
  python run.py pair-chatlogs --data chat.parquet --out pairs.parquet --train train.csv # battles from chat logs
  python run.py convert --kind scored_answers --data rated.csv --source bench --out bench.jsonl  # external -> battles
  python run.py distill --teacher runs/x --train train.csv --out runs/student      # teacher OOF probs as targets
  python run.py external-check --train train.csv --config cfg.json --out runs/check # a verdict per external source
  python run.py score --run runs/x --prompt "..." --a "..." --b "..."               # explain one pair's score
  python run.py score --run runs/x --jsonl pairs.jsonl --out scored.jsonl          # one JSON line per battle
  python run.py serve --run runs/x                                                 # a local page (127.0.0.1:8000)
  python run.py export --run runs/x --out bundle/ [--wheels kit/]          # what predict needs, verified; offline kit

A rerun of the same command resumes: finished folds and stages are reused. Every command that fits the
ensemble writes runs/x/ensemble/ensemble.json (what predict uses), submission.csv (with a test set) and
report.html; tune writes them to runs/x/tune/NAME/ and into the run only with --apply. A mistake in a file, a config or the command line ends in one line naming it and exit code 2
(--verbose shows the traceback); Ctrl-C ends with exit code 130 and says what finished. See README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the commands import what they use when they run (a fast --help)
    from ensemble.record import EnsembleRecord
    from pipeline.config import RunConfig
    from pipeline.runner import Run

COMMANDS = ("all", "train", "tune", "predict", "evaluate", "remove-stage", "pseudo-label", "pair-chatlogs", "convert",
            "distill", "external-check", "score", "serve", "export")
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130
log = logging.getLogger("run")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("gensim", "smart_open", "matplotlib", "PIL", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line in one line (exit 2) like every other user error."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: str):
    """An argparse type: a number in the range ``kind`` names in :mod:`kernel.schema` (``PositiveInt``,
    ``Probability``, ...), checked by the same pydantic constraint as a config key, so a bad value is
    refused naming the option and the allowed range before anything runs."""
    def parse(text: str):
        from pydantic import ConfigDict, TypeAdapter, ValidationError

        import kernel.schema as schema

        annotation = getattr(schema, kind)
        try:
            return TypeAdapter(annotation, config=ConfigDict(allow_inf_nan=False)).validate_python(text.strip())
        except ValidationError as exc:
            error = exc.errors()[0]
            raise argparse.ArgumentTypeError(f"{error['msg']} (got {text}; allowed: "
                                             f"{schema.annotation_range(annotation)})") from None

    parse.__name__ = kind
    return parse


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")

    def loudness(sp):
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--verbose", action="store_true", help="debug logs, and the traceback of an error")

    def output_file(sp, what, overwrite="replace --out if it exists"):
        """``--out`` (a file this command writes) and ``--overwrite``: the one overwrite rule's switch."""
        sp.add_argument("--out", required=True, help=what)
        sp.add_argument("--overwrite", action="store_true", help=overwrite)

    def training(sp, train_required=False):
        sp.add_argument("--train", required=train_required,
                        help="labelled battles (.csv/.parquet/.jsonl); a resumed run remembers it")
        sp.add_argument("--test", help="unlabelled battles to predict; writes submission.csv")
        sp.add_argument("--out", "--run", dest="out", required=True, help="run directory (new, empty, or a run of ours)")
        sp.add_argument("--config", help="JSON config over the defaults (README: configuration reference)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set n_folds=3 or "
                             "--set stages.lgbm_full.params.lgb.learning_rate=0.1 (value as JSON)")
        loudness(sp)

    training(sub.add_parser("all", help="run every configured stage, fit the ensemble, report (the default)"))
    t = sub.add_parser("train", help="cross-fit one stage (by name in the config, or by stage type), then the ensemble")
    t.add_argument("stage")
    t.add_argument("--model", help="local checkpoint directory for deep stages (sets params.model)")
    training(t)
    tu = sub.add_parser("tune", help="an experiment: refit the ensemble (single stages, average, weighted, logistic, "
                                     "+meta, by nested CV on the saved OOF logits) into runs/x/tune/NAME/ and compare "
                                     "it with the saved one; --apply makes it the run's")
    tu.add_argument("--run", "--out", dest="out", required=True, help="a run directory with finished stages")
    tu.add_argument("--config", help="a config whose 'stacker' section replaces the run's")
    tu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. --set stacker.C_grid=[0.1]")
    tu.add_argument("--name", help="the candidate's folder under runs/x/tune/ (default: the UTC time)")
    tu.add_argument("--apply", action="store_true", help="replace the run's config, ensemble, submission and report "
                                                         "with the candidate once it is fitted")
    loudness(tu)
    pr = sub.add_parser("predict", help="predict new battles with a finished run's models and ensemble")
    pr.add_argument("--run", required=True, help="a finished run directory")
    pr.add_argument("--test", required=True, help="battles to predict (.csv/.parquet/.jsonl; labels ignored)")
    pr.add_argument("--base-dir", help="an exported bundle's base checkpoints live here (DIR/<name>, or DIR itself)")
    output_file(pr, "the CSV to write (id + winner_* columns)")
    pr.add_argument("--budget", metavar="DURATION",
                    help="finish within this wall time (e.g. 90s, 45m, 8h30m, 1.5h), counted from the start: degrade "
                         "by the stated plan where needed; writes <out stem>.treatment.csv (each row's treatment) too")
    loudness(pr)
    ev = sub.add_parser("evaluate", help="score a finished run on labelled battles (each stage and the ensemble: log "
                                         "loss with a 90%% interval, accuracy, reliability, subgroups); writes "
                                         "runs/x/evaluations/<data stem>/report.md")
    ev.add_argument("--run", required=True, help="a finished run directory")
    ev.add_argument("--data", required=True, help="labelled battles (.csv/.parquet/.jsonl) the run did not train on")
    loudness(ev)
    rs = sub.add_parser("remove-stage", help="take a stage out of a run: its config entry and its files (refused while "
                                             "the saved ensemble uses it, unless --refit)")
    rs.add_argument("stage")
    rs.add_argument("--run", required=True, help="a run directory")
    rs.add_argument("--refit", action="store_true", help="when the saved ensemble uses the stage: refit the ensemble "
                                                         "over the other finished stages first (as tune --apply)")
    loudness(rs)
    pl = sub.add_parser("pseudo-label", help="score unlabelled battles with a finished run; write soft labels "
                                             "with provenance (JSONL) for training")
    pl.add_argument("--run", required=True, help="a finished run directory")
    pl.add_argument("--data", required=True, help="unlabelled battles (.csv/.parquet/.jsonl)")
    pl.add_argument("--base-dir", help="an exported bundle's base checkpoints live here (DIR/<name>, or DIR itself)")
    output_file(pl, "pseudo-label file to write (.jsonl)",
                "replace --out (or an unfinished <out>.partial of other inputs) instead of refusing; a rerun of the "
                "same command resumes an interrupted job")
    pl.add_argument("--source", default="pseudo", help="source tag of the written rows")
    pl.add_argument("--weight", type=_number("PositiveFloat"), default=1.0, help="training weight written on every row (> 0)")
    pl.add_argument("--temperature", type=_number("PositiveFloat"), default=1.0,
                    help="> 0: < 1 sharpens, > 1 softens the soft labels")
    pl.add_argument("--chunk-rows", type=_number("PositiveInt"), default=4096,
                    help="battles read, scored and written at a time (>= 1)")
    loudness(pl)
    pc = sub.add_parser("pair-chatlogs", help="pair single-reply chat logs (LMSYS-Chat-1M layout) into unlabelled "
                                              "battles, streamed (see flywheel/chatlogs.py)")
    pc.add_argument("--data", required=True, nargs="+", help="chat logs (.parquet/.jsonl[.gz]): conversation_id, "
                                                             "model, conversation, [language]")
    output_file(pc, "battle file to write (.parquet or .jsonl); report beside it",
                "replace --out and its report if they exist")
    pc.add_argument("--train", help="training battles: pairs repeating their prompts or battles are dropped")
    pc.add_argument("--max-pairs-per-prompt", type=_number("NonNegativeInt"),
                    help="cap of pairs per prompt (default 3; 0: no cap)")
    pc.add_argument("--seed", type=_number("Seed"), help="seed of sides, cap samples and repeat picks")
    pc.add_argument("--source", help="source tag (and id prefix) of the pairs (default chatlog)")
    pc.add_argument("--language", action="append", help="keep only this language (repeatable)")
    pc.add_argument("--keep-prompt-matches", action="store_true", help="keep pairs whose prompt is a training prompt")
    loudness(pc)
    cv = sub.add_parser("convert", help="convert an external data file (a source kind of the config's external "
                                        "section) into a battle file (.jsonl) that pseudo-label, predict or --train read")
    cv.add_argument("--kind", required=True, help="the converter: competition, preference_pairs, scored_answers, "
                                                  "arena_conversations, pseudo_labels")
    cv.add_argument("--data", required=True, help="the external file")
    cv.add_argument("--source", required=True, help="source tag written on the rows (and prefixed to their ids)")
    cv.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a converter option (value as JSON), e.g. --option max_pairs_per_prompt=10")
    output_file(cv, "the .jsonl battle file to write")
    loudness(cv)
    d = sub.add_parser("distill", help="train a student run on a finished teacher run's out-of-fold probabilities "
                                       "mixed with the hard labels, on the teacher's folds")
    d.add_argument("--teacher", required=True, help="a finished run directory (trained on --train)")
    d.add_argument("--soft-weight", type=float, default=0.5,  # in [0, 1]: checked by pipeline.distill
                   help="target = W x teacher OOF probability + (1 - W) x label (default %(default)s)")
    training(d, train_required=True)
    ec = sub.add_parser("external-check", help="per external source of the config: rows kept, adversarial AUC, change "
                                               "in OOF log loss of a cheap stage, and a keep/drop/down-weight verdict")
    ec.add_argument("--stage", help="a stage of the config to measure with (default: LightGBM on text statistics, "
                                    "similarity and Word2Vec features)")
    ec.add_argument("--train", required=True, help="labelled battles (.csv/.parquet/.jsonl)")
    ec.add_argument("--out", required=True, help="directory for the check (new, empty, or an earlier check)")
    ec.add_argument("--config", help="JSON config whose 'external' section lists the sources")
    ec.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config value")
    loudness(ec)
    sc = sub.add_parser("score", help="score one pair (or a JSONL file of battles) with a finished run: probabilities, "
                                      "verdict, both A/B orders, each stage's share, what truncation kept")
    sc.add_argument("--run", required=True, help="a finished run directory")
    for flag, field in (("prompt", "the prompt"), ("a", "response A"), ("b", "response B")):
        one = sc.add_mutually_exclusive_group()
        one.add_argument(f"--{flag}", help=f"{field} as text: one turn, or a JSON list of strings (one per turn)")
        one.add_argument(f"--{flag}-file", help=f"a UTF-8 text file holding {field}")
    sc.add_argument("--json", action="store_true", help="print the pair's explanation as one JSON line")
    sc.add_argument("--jsonl", help="a JSONL file of battles (prompt/response_a/response_b: lists, JSON-list strings "
                                    "or plain strings; optional id); needs --out")
    sc.add_argument("--out", help="with --jsonl: the JSONL file to write (one line per battle)")
    sc.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    loudness(sc)
    sv = sub.add_parser("serve", help="a local page: paste a prompt and two replies, see the run's probabilities")
    sv.add_argument("--run", required=True, help="a finished run directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s, this machine "
                                                        "only; another address is logged as a warning)")
    sv.add_argument("--port", type=_number("Port"), default=8000, help="port (default %(default)s; 0: a free one)")
    sv.add_argument("--max-bytes", type=_number("PositiveInt"), default=1 << 20, help="largest request body (default %(default)s)")
    loudness(sv)
    ex = sub.add_parser("export", help="copy what prediction needs from a finished run into a verified bundle "
                                       "(bundle.json: every file's size and SHA-256); optionally an offline install kit")
    ex.add_argument("--run", required=True, help="a finished run directory")
    ex.add_argument("--out", required=True, help="the bundle directory to write (new, empty, or a bundle of ours)")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it is a bundle exported earlier")
    ex.add_argument("--include-base", action="store_true", help="copy the deep stages' base checkpoints into the "
                                                                "bundle (default: referenced by path and hashes)")
    ex.add_argument("--wheels", help="also write an offline install kit here: every wheel the target lacks, the "
                                     "project's own wheel and INSTALL.txt")
    ex.add_argument("--python-version", help="the kit's target Python, e.g. 3.11 (default: this interpreter's)")
    ex.add_argument("--platform", action="append", help="the kit's target pip platform tag, e.g. "
                                                        "manylinux_2_35_x86_64 for a glibc 2.35 machine (older "
                                                        "manylinux tags follow; repeatable; default: this machine's)")
    ex.add_argument("--target-has", default="torch", help="comma-separated packages the target already has, left "
                                                          "out of the kit with their dependencies (default: "
                                                          "%(default)s, as on a Kaggle image; '' for none)")
    loudness(ex)
    return p


# ----------------------------------------------------------------------------------------------- config
def _config(args):
    """The resolved config: the run's saved config (resuming without --config) or the defaults, the
    --config file, the stage ``train`` adds, then every --set."""
    from kernel.files import read_json
    from pipeline.config import load_config
    from pipeline.rundir import RunDir

    run = RunDir(args.out)
    saved = read_json(run.config) if args.config is None and run.is_ours() and run.config.exists() else None
    if saved is not None:
        log.info("using the run's saved config %s", run.config)
    edit = (lambda data: _add_trained_stage(data, args.stage, args.model)) if args.command == "train" else None
    return load_config(args.config, args.set, saved=saved, edit=edit)


def _add_trained_stage(data: dict, name: str, model) -> None:
    """``train NAME``: a stage of the config, or a stage type (its stages; with --model, a stage of that
    type named after it, reading the checkpoint from --model)."""
    from models.stage import STAGE_TYPES
    from pipeline.config import ConfigError

    stages = data["stages"]
    if name not in stages:
        if name not in STAGE_TYPES:
            raise ConfigError(f"train {name}: not a stage of the config {sorted(stages)} nor a stage type "
                              f"{sorted(STAGE_TYPES)}")
        if any(s["type"] == name for s in stages.values()) and not model:
            return  # the config's stages of that type
        stages[name] = {"type": name, "params": {}}
    if model:
        from kernel.local_models import check_model_dir

        try:  # before anything is written: a mistyped path never reaches the run's config
            check_model_dir(model, f"train {name} --model:")
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{exc}; nothing was written") from None
        stages[name].setdefault("params", {})["model"] = str(Path(model).resolve())


def _trained_stages(config: RunConfig, name: str) -> list[str]:
    """The stages ``train NAME`` fits: the stage ``NAME`` (of the config, or added by
    :func:`_add_trained_stage`), else the config's stages of type ``NAME``."""
    if name in config.stages:
        return [name]
    return [n for n, s in config.stages.items() if s.type == name]


@contextlib.contextmanager
def _interruptible(run: Run):
    """Ctrl-C inside ends as :class:`_Interrupted`, which says what ``run`` finished."""
    try:
        yield run
    except KeyboardInterrupt:
        raise _Interrupted(_interrupt_note(run)) from None
    finally:
        run.close()  # the run's writer lock


class _Interrupted(KeyboardInterrupt):
    def __init__(self, note: str):
        super().__init__(note)
        self.note = note


# ----------------------------------------------------------------------------------------------- commands
def _cmd_train(args) -> int:
    from pipeline.runner import Run, run_all

    config = _config(args)
    stages = _trained_stages(config, args.stage) if args.command == "train" else None
    with _interruptible(Run(args.out, config, args.train, args.test, progress=not args.quiet)) as run:
        record = run_all(run, stages)
    _print_summary(record, args.out)
    return 0


def _cmd_tune(args) -> int:
    from kernel.files import read_json
    from pipeline.config import load_config
    from pipeline.rundir import RunDir
    from pipeline.tune import tune

    rundir = RunDir.open(args.out)
    config = load_config(None, args.set, saved=read_json(rundir.config),
                         overrides={"stacker": _stacker_section(args.config)} if args.config else None,
                         overrides_origin=f"{args.config} (its stacker section)")
    result = tune(rundir.path, config, name=args.name, apply=args.apply, progress=not args.quiet)
    _print_summary(result.record, args.out)
    _print_tune_table(result.record, result.folder)
    _print_tune_comparison(result, args.out)
    return 0


def _stacker_section(path) -> dict:
    from pipeline.config import read_config_file

    return read_config_file(path).get("stacker", {})


def _cmd_predict(args) -> int:
    import time

    started = time.monotonic()  # a budget counts from here: the imports below, reading and loading included
    from battles.io import read_battles
    from kernel.files import check_output_file
    from pipeline.checks import run_overlap_warning
    from pipeline.predict import Predictor
    from pipeline.rundir import write_probs

    budget = None
    if args.budget is not None:
        from pipeline.budget import Budget, parse_duration, treatment_path

        budget = Budget(parse_duration(args.budget), started=started)
        treatment = check_output_file(treatment_path(args.out), args.overwrite)
    out = check_output_file(args.out, args.overwrite)
    battles, _ = read_battles(args.test, require_labels=False)
    predictor = Predictor.load(args.run, progress=not args.quiet, base_dir=args.base_dir)
    run_overlap_warning(predictor.run, battles, f"--test {args.test}")
    if budget is None:
        write_probs(out, battles["id"], predictor.predict_proba(battles))
    else:
        from kernel.files import write_atomic
        from pipeline.budget import treatment_frame

        result = predictor.predict_within(battles, budget)
        write_probs(out, battles["id"], result.probs)
        frame = treatment_frame(battles["id"], result.treatment)
        write_atomic(treatment, lambda p: frame.to_csv(p, index=False))
        print(f"{result.summary}; treatments in {treatment}")
    print(f"wrote {len(battles)} predictions to {out} (ensemble: {predictor.ensemble.chosen})")
    return 0


def _cmd_evaluate(args) -> int:
    from pipeline.evaluate import evaluate

    result = evaluate(args.run, args.data, progress=not args.quiet)
    print(f"\nevaluation of {args.run} on {args.data}: {result.rows} labelled battles")
    print(f"{'output':<40}{'rows':>7}{'log loss':>10}{'90% interval':>18}{'accuracy':>10}")
    for r in result.table:
        lo, hi = r["interval"]
        print(f"{r['output']:<40}{r['rows']:>7}{r['log_loss']:>10.4f}{f'{lo:.4f}-{hi:.4f}':>18}{r['accuracy']:>10.3f}")
    for p in result.paired:
        lo, hi = p["interval"]
        print(f"{p['comparison']:<40}{p['rows']:>7}{p['difference']:>+10.4f}  [{lo:+.4f}, {hi:+.4f}] {p['verdict']}")
    for w in result.warnings:
        print(f"WARNING: {w}")
    print(f"report: {result.folder / 'report.md'}")
    return 0


def _cmd_remove_stage(args) -> int:
    from pipeline.remove_stage import remove_stage

    print(remove_stage(args.run, args.stage, refit=args.refit, progress=not args.quiet))
    return 0


def _cmd_pseudo_label(args) -> int:
    from flywheel.pseudo_label import pseudo_label_file
    from kernel.files import check_output_file, content_key, read_json
    from pipeline.predict import Predictor

    check_output_file(args.out, args.overwrite)  # before loading the run's models
    predictor = Predictor.load(args.run, progress=False, base_dir=args.base_dir)
    provenance = {"run": str(Path(args.run).resolve()), "stages": predictor.ensemble.stages,
                  "ensemble": predictor.ensemble.chosen, "ensemble_key": predictor.ensemble.key(),
                  "run_config_hash": content_key(read_json(predictor.run.config))}
    n = pseudo_label_file(args.data, predictor.predict_proba, args.out, provenance, source=args.source,
                          weight=args.weight, temperature=args.temperature, chunk_rows=args.chunk_rows,
                          overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {n} pseudo-labelled battles to {args.out}")
    return 0


def _cmd_pair_chatlogs(args) -> int:
    from flywheel.chatlogs import pair_chatlogs

    given = {"source": args.source, "seed": args.seed, "languages": args.language,
             "max_pairs_per_prompt": args.max_pairs_per_prompt}
    params = {k: v for k, v in given.items() if v is not None}  # defaults live in PairingParams
    if args.max_pairs_per_prompt == 0:
        params["max_pairs_per_prompt"] = None  # no cap
    if args.keep_prompt_matches:
        params["drop_prompt_matches"] = False
    report = pair_chatlogs(args.data, args.out, train=args.train, params=params, overwrite=args.overwrite,
                           progress=not args.quiet)
    print(report.summary())
    return 0


def _cmd_convert(args) -> int:
    from pydantic import ValidationError

    from flywheel.sources import ExternalSource, convert_sources
    from kernel.files import check_output_file, write_atomic
    from pipeline.config import ConfigError, apply_set

    out = check_output_file(args.out, args.overwrite)
    if not out.name.endswith(".jsonl"):
        raise ConfigError(f"--out {out}: convert writes JSONL; name the file *.jsonl")
    options: dict = {}
    for item in args.option:
        options = apply_set(options, item)
    try:
        source = ExternalSource(kind=args.kind, path=args.data, source=args.source, options=options)
    except ValidationError as exc:
        raise ConfigError(f"convert: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    [(battles, report)] = convert_sources([source])
    write_atomic(out, lambda p: battles.to_json(p, orient="records", lines=True, force_ascii=False))
    print(f"wrote {len(battles)} battles to {out} (read {report['rows_read']}, dropped {report['dropped'] or 'none'})")
    return 0


def _cmd_distill(args) -> int:
    from pipeline.distill import prepare_student
    from pipeline.runner import run_all

    student = prepare_student(args.teacher, args.train, args.out, _config(args), args.soft_weight)
    with _interruptible(student.run(args.test, progress=not args.quiet)) as run:
        record = run_all(run)
    _print_summary(record, args.out)
    return 0


def _cmd_external_check(args) -> int:
    from pipeline.external_check import external_check, format_table
    from pipeline.runner import Run

    with _interruptible(Run(args.out, _config(args), args.train, progress=not args.quiet)) as run:
        summary = external_check(run, stage=args.stage)
    print(format_table(summary))
    return 0


def _cmd_score(args) -> int:
    from kernel.errors import UserError
    from kernel.files import check_output_file
    from pipeline.explain import (explain, format_explanation, pair_battle, read_score_file, read_text_arg,
                                  write_explanations)
    from pipeline.predict import Predictor

    texts = {}
    for flag in ("prompt", "a", "b"):
        path = getattr(args, f"{flag}_file")
        texts[flag] = read_text_arg(path, f"--{flag}-file") if path is not None else getattr(args, flag)
    given = [f for f, t in texts.items() if t is not None]
    if args.jsonl is not None:
        if given or args.json:
            raise UserError("score: --jsonl scores a file; leave out --prompt/--a/--b (and their files) and --json")
        if args.out is None:
            raise UserError("score --jsonl: name the JSONL file to write with --out")
        out = check_output_file(args.out, args.overwrite)
        battles = read_score_file(args.jsonl)
        explanations = explain(Predictor.load(args.run, progress=not args.quiet), battles)
        write_explanations(out, explanations)
        print(f"wrote {len(explanations)} scored battles to {out}")
        return 0
    if args.out is not None:
        raise UserError("score: --out goes with --jsonl; one pair is printed")
    if len(given) < 3:
        missing = [f"--{f}" for f in texts if texts[f] is None]
        raise UserError(f"score: give {' '.join(missing)} (or the -file variants), or --jsonl FILE --out FILE")
    battle = pair_battle(texts["prompt"], texts["a"], texts["b"])
    [e] = explain(Predictor.load(args.run, progress=False), battle)
    print(json.dumps(e.as_dict(), ensure_ascii=False) if args.json else format_explanation(e))
    return 0


def _cmd_serve(args) -> int:
    from pipeline.serve import serve

    serve(args.run, host=args.host, port=args.port, max_bytes=args.max_bytes)
    return 0


def _cmd_export(args) -> int:
    from dataclasses import replace

    from pipeline.export import build_kit, check_kit_dir, export_run, human_size, platform_tags, this_machine

    if args.wheels:
        check_kit_dir(Path(args.wheels))  # before anything is written
    summary = export_run(args.run, args.out, include_base=args.include_base, overwrite=args.overwrite)
    print(f"wrote the bundle {summary.out}: {summary.files} files, {human_size(summary.size)}")
    for base in summary.bases:
        how = "copied into the bundle" if base["included"] else "referenced, not copied (attach it; --base-dir)"
        print(f"  base checkpoint {base['name']} ({base['path']}) of {', '.join(base['stages'])}: {how}")
    if args.wheels:
        target = this_machine([p.strip() for p in args.target_has.split(",") if p.strip()])
        if args.python_version:
            target = replace(target, python_version=args.python_version)
        if args.platform:
            target = replace(target, platforms=tuple(t for p in args.platform for t in platform_tags(p)))
        print(f"install kit in {args.wheels}; install it with:\n  {build_kit(Path(args.wheels), target)}")
    return 0


HANDLERS = {"all": _cmd_train, "train": _cmd_train, "tune": _cmd_tune, "predict": _cmd_predict, "evaluate": _cmd_evaluate,
            "remove-stage": _cmd_remove_stage,
            "pseudo-label": _cmd_pseudo_label, "pair-chatlogs": _cmd_pair_chatlogs, "convert": _cmd_convert,
            "distill": _cmd_distill, "external-check": _cmd_external_check, "score": _cmd_score,
            "serve": _cmd_serve, "export": _cmd_export}


# ----------------------------------------------------------------------------------------------- errors
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["all", *argv]
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    from kernel.errors import UserError

    try:
        code = HANDLERS[args.command](args)
        if code == 0:
            from kernel.dist import finish_launch

            finish_launch()  # under torchrun: no rank leaves the process group while another still works
        return code
    except _Interrupted as exc:
        log.error("interrupted. %s", exc.note)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        log.error("interrupted. Nothing was written.")
        return EXIT_INTERRUPTED
    except UserError as exc:
        return _fail(str(exc), args)
    except OSError as exc:  # a user's path: missing, a directory, not writable, disk full
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", args)


def _fail(message: str, args) -> int:
    """The one line (``--verbose`` adds the traceback; ``--help`` lists ``--verbose``)."""
    log.error("%s", message)
    if args.verbose:
        traceback.print_exc()
    return EXIT_USER_ERROR


def _interrupt_note(run: Run) -> str:
    """What ``run`` finished, and how to resume."""
    if not run.dir.path.exists():
        return "Nothing was written."
    finished = run.finished_stages()
    partial = []
    for name in run.config.stages:
        if name in finished:
            continue
        folds = run.dir.stage(name).finished_folds()
        if folds:
            partial.append(f"{name} ({', '.join(folds)} done)")
    parts = [f"finished stages: {', '.join(finished) or 'none'}"]
    if partial:
        parts.append(f"partly done: {'; '.join(partial)}")
    return "; ".join(parts) + ". Run the same command again to resume: finished folds and stages are reused."


# ----------------------------------------------------------------------------------------------- output
def _print_tune_table(record: EnsembleRecord, out) -> None:
    from pipeline.rundir import RunDir

    names = record.stages
    width = max(len(m.method) for m in record.methods) + 2
    print(f"\nensemble tuning on {record.rows} rows (every row scored by nested CV; weights: share per stage)")
    print(f"{'method':<{width}}{'nested LL':>10}{'accuracy':>10}  {'best candidate':<24}" + "".join(f"{n[:14]:>15}" for n in names))
    for m in record.methods:
        mark = " *" if m.chosen and not m.method.startswith("selected") else ""
        print(f"{m.method + mark:<{width}}{m.nested_log_loss:>10.4f}{m.nested_accuracy:>10.3f}  "
              f"{m.best_candidate:<24}" + "".join(f"{m.weights[n]:>15.3f}" for n in names))
    lo, hi = record.nested_interval
    print(f"chosen: {record.chosen} (* above); selected nested log loss 90% interval {lo:.4f}-{hi:.4f} "
          f"on {record.rows} rows; saved to {RunDir(out).ensemble}")
    print(f"stages carrying weight (share >= 5%): {', '.join(record.carrying_weight) or 'none'}")
    if len(record.stage_sets) > 1:
        print("\nstage sets (each on the rows all its stages cover; compared on the common rows):")
        for t in record.stage_sets:
            print(f"  {' + '.join(t.stages):<40}{t.rows:>7} rows  nested {t.nested_log_loss:.4f} "
                  f"[{t.interval[0]:.4f}, {t.interval[1]:.4f}]  minus chosen on {t.common_rows} common rows "
                  f"{t.minus_chosen_on_common_rows:+.4f} [{t.minus_chosen_interval[0]:+.4f}, "
                  f"{t.minus_chosen_interval[1]:+.4f}]{'  (chosen)' if t.chosen else ''}")
    if record.selection is not None:
        print(f"stage set: {record.selection.decided_by}")


def _print_tune_comparison(result, out) -> None:
    c = result.comparison
    print(f"\ncandidate: {result.folder} (changed: {'; '.join(c.get('config_changes') or []) or 'nothing'})")
    if c.get("saved"):
        lo, hi = c["minus_saved_interval"]
        print(f"candidate minus saved ensemble on {c['rows']} rows: {c['candidate_log_loss']:.4f} - "
              f"{c['saved_log_loss']:.4f} = {c['minus_saved']:+.4f}, paired 90% interval [{lo:+.4f}, {hi:+.4f}]: "
              f"{c['verdict']}")
    else:
        print(f"candidate: {c['verdict']}")
    if result.applied:
        print(f"applied: {out}'s config.json, ensemble, submission and report are now the candidate's")
    else:
        print(f"not applied: {out} is unchanged; `run.py tune --run {out} ... --apply` makes such a candidate the run's")


def _print_summary(record: EnsembleRecord, out) -> None:
    """The scores table; each figure beside the rows it stands on (pipeline.report.score_table)."""
    from pipeline.report import score_table

    print(f"\nrun directory: {out}")
    print(f"{'output':<28}{'rows':>7}{'OOF log loss':>14}{'rows':>7}{'calibrated':>12}{'accuracy':>10}")
    print(f"{'class prior':<28}{record.rows:>7}{record.prior_log_loss:>14.4f}")
    for row in score_table(record):
        raw, cal = row["log loss (raw)"], row["log loss (calibrated, CV)"]
        if row["output"].startswith("final: "):  # the nested figure, in the OOF column
            lo, hi = record.nested_interval
            print(f"{row['output']:<28}{row['rows']:>7}{cal:>14.4f}{'':>7}{'(nested)':>12}{row['accuracy']:>10.3f}"
                  f"   90% interval {lo:.4f}-{hi:.4f}")
        else:
            print(f"{row['output']:<28}{row['rows']:>7}{raw:>14.4f}{row['rows (calibrated)']:>7}{cal:>12.4f}"
                  f"{row['accuracy']:>10.3f}")
    for w in record.warnings:
        print(f"WARNING: {w}")


if __name__ == "__main__":
    sys.exit(main())
