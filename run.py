#!/usr/bin/env python
"""Arena preference stack: one entry point.

  python run.py --train train.csv [--test test.csv] --out runs/first      # everything, end to end
  python run.py train STAGE --train train.csv [--test ...] --out runs/x    # one stage (name or type)
  python run.py stack --run runs/x                                         # refit only the stacker
  python run.py tune --run runs/x                                          # compare ensembles, save the chosen one
  python run.py predict --run runs/x --test new.csv --out preds.csv        # predict new battles with a run

A rerun of the same command resumes: finished folds and stages are reused. Every command that fits the
ensemble writes runs/x/ensemble/ensemble.json (what predict uses), submission.csv (with a test set) and
report.html. See README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

COMMANDS = ("all", "train", "stack", "tune", "predict", "pseudo-label", "pair-chatlogs")
log = logging.getLogger("run")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("gensim", "smart_open", "matplotlib", "PIL", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")

    def common(sp, need_train=True):
        sp.add_argument("--train", required=False, help="labelled battles (.csv/.parquet/.jsonl)")
        sp.add_argument("--test", help="unlabelled battles to predict; writes submission.csv")
        sp.add_argument("--out", "--run", dest="out", required=True, help="run directory")
        sp.add_argument("--config", help="JSON config over the defaults (see pipeline/config.py)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override one config value, e.g. --set n_folds=3 or --set stages.lgbm_full.params.lgb.learning_rate=0.05")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument("--verbose", action="store_true")

    common(sub.add_parser("all", help="run every configured stage, stack, report (the default)"))
    t = sub.add_parser("train", help="cross-fit one stage (by name in the config, or by stage type)")
    t.add_argument("stage")
    t.add_argument("--model", help="local checkpoint directory for deep stages (sets params.model)")
    common(t)
    common(sub.add_parser("stack", help="refit only the stacking layer on the saved OOF logits"))
    common(sub.add_parser("tune", help="compare ensembles (average, weighted, logistic, +meta) by nested CV on "
                                       "the saved OOF logits; save the chosen one; refresh submission and report"))
    pr = sub.add_parser("predict", help="predict new battles with a finished run's fold models and ensemble")
    pr.add_argument("--run", required=True, help="a finished run directory")
    pr.add_argument("--test", required=True, help="battles to predict (.csv/.parquet/.jsonl; labels ignored)")
    pr.add_argument("--out", required=True, help="where to write the predictions (CSV: id + winner_* columns)")
    pr.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    pr.add_argument("--quiet", action="store_true")
    pr.add_argument("--verbose", action="store_true")
    pl = sub.add_parser("pseudo-label", help="score unlabelled battles with a finished run; write soft labels "
                                             "with provenance (JSONL) for training")
    pl.add_argument("--run", required=True, help="a finished run directory")
    pl.add_argument("--data", required=True, help="unlabelled battles (.csv/.parquet/.jsonl)")
    pl.add_argument("--out", required=True, help="pseudo-label file to write (.jsonl)")
    pl.add_argument("--source", default="pseudo", help="source tag of the written rows")
    pl.add_argument("--weight", type=float, default=1.0, help="training weight written on every row")
    pl.add_argument("--temperature", type=float, default=1.0, help="< 1 sharpens, > 1 softens the soft labels")
    pl.add_argument("--chunk-rows", type=int, default=4096, help="battles read, scored and written at a time")
    pl.add_argument("--overwrite", action="store_true", help="replace --out (or an unfinished <out>.partial of "
                                                             "other inputs) instead of refusing; a rerun of the same "
                                                             "command resumes an interrupted job")
    pl.add_argument("--quiet", action="store_true")
    pl.add_argument("--verbose", action="store_true")
    pc = sub.add_parser("pair-chatlogs", help="pair single-reply chat logs (LMSYS-Chat-1M layout) into unlabelled "
                                              "battles, streamed (see battles/chatlogs.py)")
    pc.add_argument("--data", required=True, nargs="+", help="chat logs (.parquet/.jsonl[.gz]): conversation_id, "
                                                             "model, conversation, [language]")
    pc.add_argument("--out", required=True, help="battle file to write (.parquet or .jsonl); report beside it")
    pc.add_argument("--train", help="training battles: pairs repeating their prompts or battles are dropped")
    pc.add_argument("--max-pairs-per-prompt", type=int, help="cap of pairs per prompt (default 3; 0: no cap)")
    pc.add_argument("--seed", type=int, help="seed of sides, cap samples and repeat picks")
    pc.add_argument("--source", help="source tag (and id prefix) of the pairs (default chatlog)")
    pc.add_argument("--language", action="append", help="keep only this language (repeatable)")
    pc.add_argument("--keep-prompt-matches", action="store_true", help="keep pairs whose prompt is a training prompt")
    pc.add_argument("--overwrite", action="store_true", help="replace --out and its report if they exist")
    pc.add_argument("--quiet", action="store_true")
    pc.add_argument("--verbose", action="store_true")
    return p


def _apply_sets(cfg: dict, sets: list[str]) -> dict:
    for item in sets:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected KEY=JSON")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


def _resolve_config(args) -> dict:
    from pipeline.config import load_config, validate_config

    saved = Path(args.out) / "config.json"
    if args.config is None and saved.exists():
        cfg = json.loads(saved.read_text())
        log.info("using the run's saved config %s", saved)
    else:
        cfg = load_config(args.config)
    if getattr(args, "command", None) == "train":
        _add_trained_stage(cfg, args)
    cfg = _apply_sets(cfg, args.set)  # after the trained stage exists, so --set can tune its params
    validate_config(cfg, args.config or saved)
    return cfg


def _add_trained_stage(cfg: dict, args) -> None:
    from models.stage import STAGE_TYPES

    name = args.stage
    if name not in cfg["stages"]:
        if name not in STAGE_TYPES:
            raise SystemExit(f"unknown stage {name!r}: not in the config's stages {sorted(cfg['stages'])} "
                             f"nor a stage type {sorted(STAGE_TYPES)}")
        same_type = [n for n, s in cfg["stages"].items() if s["type"] == name]
        if same_type and not args.model:
            args.stage_names = same_type
            return
        cfg["stages"][name] = {"type": name, "params": {}}
    if args.model:
        cfg["stages"][name].setdefault("params", {})["model"] = str(Path(args.model).resolve())
    args.stage_names = [name]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["all", *argv]
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)

    from battles.io import BattleDataError
    from pipeline.config import ConfigError
    from pipeline.runner import Run, RunError, run_all

    if args.command == "predict":
        return _predict(args)
    if args.command == "pseudo-label":
        return _pseudo_label(args)
    if args.command == "pair-chatlogs":
        return _pair_chatlogs(args)
    try:
        cfg = _resolve_config(args)
        run = Run(args.out, cfg, args.train, args.test)
        if args.command == "all":
            if args.train is None and not (Path(args.out) / "run.json").exists():
                raise SystemExit("--train is required for a new run")
            summary = run_all(run, progress=not args.quiet)
        else:
            run.load_data()
            if args.command == "train":
                for name in args.stage_names:
                    run.run_stage(name, progress=not args.quiet)
            summary = run.stack()
            from pipeline.report import write_report

            write_report(run, summary)
    except (BattleDataError, ConfigError, RunError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    _print_summary(summary, args.out)
    if args.command == "tune":
        _print_tune_table(summary, args.out)
    return 0


def _predictor_and_battles(args, data_path):
    """The start of ``predict``: refuse to overwrite ``--out`` unless told, load the finished run, read
    the battles to score (labels, if any, ignored). ``pseudo-label`` streams its input instead."""
    from battles.io import read_battles
    from pipeline.predict import Predictor

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    return Predictor.load(args.run), read_battles(data_path, require_labels=False)[0]


def _predict(args) -> int:
    from battles.io import BattleDataError
    from pipeline.predict import write_predictions
    from pipeline.runner import RunError

    try:
        predictor, battles = _predictor_and_battles(args, args.test)
        frame = predictor.predict_frame(battles)
        write_predictions(frame, args.out, overwrite=args.overwrite)
    except (BattleDataError, RunError, FileNotFoundError, FileExistsError) as exc:
        log.error("%s", exc)
        return 2
    print(f"wrote {len(frame)} predictions to {args.out} (ensemble: {predictor.ensemble['chosen']})")
    return 0


def _pseudo_label(args) -> int:
    from battles.io import BattleDataError
    from battles.pseudo_label import pseudo_label_file
    from battles.files import content_key, read_json
    from pipeline.predict import Predictor
    from pipeline.runner import RunError

    try:
        if Path(args.out).exists() and not args.overwrite:  # before loading the run's models
            raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
        predictor = Predictor.load(args.run)
        provenance = {"run": str(Path(args.run).resolve()), "stages": predictor.ensemble["stages"],
                      "ensemble": predictor.ensemble["chosen"], "ensemble_key": content_key(predictor.ensemble),
                      "run_config_hash": content_key(read_json(Path(args.run) / "config.json"))}
        n = pseudo_label_file(args.data, predictor.predict_proba, args.out, provenance, source=args.source,
                              weight=args.weight, temperature=args.temperature, chunk_rows=args.chunk_rows,
                              overwrite=args.overwrite, progress=not args.quiet)
    except (BattleDataError, RunError, FileNotFoundError, FileExistsError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    print(f"wrote {n} pseudo-labelled battles to {args.out}")
    return 0


def _pair_chatlogs(args) -> int:
    from battles.chatlogs import pair_chatlogs
    from battles.io import BattleDataError

    given = {"source": args.source, "seed": args.seed, "languages": args.language,
             "max_pairs_per_prompt": args.max_pairs_per_prompt}
    params = {k: v for k, v in given.items() if v is not None}  # defaults live in PairingParams
    if args.max_pairs_per_prompt == 0:
        params["max_pairs_per_prompt"] = None  # no cap
    if args.keep_prompt_matches:
        params["drop_prompt_matches"] = False
    try:
        report = pair_chatlogs(args.data, args.out, train=args.train, params=params, overwrite=args.overwrite,
                               progress=not args.quiet)
    except (BattleDataError, FileNotFoundError, FileExistsError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    print(report.summary())
    return 0


def _print_tune_table(summary: dict, out) -> None:
    names = summary["stages"]
    width = max(len(m["method"]) for m in summary["methods"]) + 2
    print(f"\nensemble tuning (every row scored by nested CV on the run's folds; weights: share per stage)")
    print(f"{'method':<{width}}{'nested LL':>10}{'accuracy':>10}  {'best candidate':<24}" + "".join(f"{n[:14]:>15}" for n in names))
    for m in summary["methods"]:
        mark = " *" if m["chosen"] and not m["method"].startswith("selected") else ""
        print(f"{m['method'] + mark:<{width}}{m['nested_log_loss']:>10.4f}{m['nested_accuracy']:>10.3f}  "
              f"{m['best_candidate']:<24}" + "".join(f"{m['weights'][n]:>15.3f}" for n in names))
    print(f"chosen: {summary['chosen']} (* above); saved to {Path(out) / 'ensemble' / 'ensemble.json'}")
    print(f"stages carrying weight (share >= 5%): {', '.join(summary['carrying_weight']) or 'none'}")


def _print_summary(summary: dict, out) -> None:
    print(f"\nrun directory: {out}")
    print(f"{'output':<28}{'OOF log loss':>14}{'calibrated':>12}{'accuracy':>10}")
    print(f"{'class prior':<28}{summary['prior_log_loss']:>14.4f}")
    for name, s in summary["stages_raw"].items():
        cal = summary["stages_calibrated"].get(name, float("nan"))
        print(f"{name:<28}{s['log_loss']:>14.4f}{cal:>12.4f}{s['accuracy']:>10.3f}")
    f = summary["nested_scores"]
    print(f"{'final: ' + summary['chosen']:<28}{f['log_loss']:>14.4f}{'(nested)':>12}{f['accuracy']:>10.3f}")


if __name__ == "__main__":
    sys.exit(main())
