#!/usr/bin/env python
"""Rewrite the README's measured figures from the benchmarks' own output, so the text cannot drift.

A figure in README.md is marked ``<!-- fig:NAME -->1.0410<!-- /fig -->``; this script replaces the
text between the marks with the value NAME has in the benchmark output, and leaves a mark whose
benchmark output is absent as it is (and says so). The figures and where they come from:

* ``quality.*`` from the quality benchmark's run (``benchmarks/quality.py --out runs/bench-quality``):
  ``quality.rows``, ``quality.prior``, ``quality.<stage>.raw|calibrated|accuracy``,
  ``quality.final``, ``quality.final.accuracy``, ``quality.final.interval`` (``lo-hi``),
  ``quality.final.method``;
* ``external.<setting>.*`` from an external-check directory (``run.py external-check ... --out
  runs/check``, its ``external_check.json``): ``log_loss``, ``change`` (``+d [+lo, +hi]``), ``verdict``,
  ``rows_kept``, ``auc``; ``<setting>`` is ``none``, ``all`` or the source tag.

    python benchmarks/readme_figures.py --run          # run the quality benchmark if its run is missing, rewrite
    python benchmarks/readme_figures.py --check        # exit 1 when README.md is not what the outputs say
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARK = re.compile(r"<!-- fig:([A-Za-z0-9_.+-]+) -->(.*?)<!-- /fig -->", re.DOTALL)


def _f4(x: float) -> str:
    return f"{x:.4f}"


def quality_figures(run_dir) -> dict[str, str]:
    """The ``quality.*`` figures of a finished quality run (its ``ensemble/ensemble.json``)."""
    from ensemble.record import EnsembleRecord

    path = Path(run_dir) / "ensemble" / "ensemble.json"
    if not path.exists():
        return {}
    record = EnsembleRecord.read(path)
    lo, hi = record.nested_interval
    out = {"quality.rows": f"{record.rows:,}", "quality.prior": _f4(record.prior_log_loss),
           "quality.final": _f4(record.nested_scores.log_loss),
           "quality.final.accuracy": f"{record.nested_scores.accuracy:.3f}",
           "quality.final.interval": f"{lo:.4f}-{hi:.4f}", "quality.final.method": record.chosen}
    for name, s in record.stages_raw.items():
        out[f"quality.{name}.raw"] = _f4(s.log_loss)
        out[f"quality.{name}.accuracy"] = f"{s.accuracy:.3f}"
        if name in record.stages_calibrated:
            out[f"quality.{name}.calibrated"] = _f4(record.stages_calibrated[name])
    return out


def external_figures(check_dir) -> dict[str, str]:
    """The ``external.*`` figures of an external-check directory (its ``external_check.json``)."""
    path = Path(check_dir) / "external_check.json"
    if not path.exists():
        return {}
    out = {}
    for row in json.loads(path.read_text(encoding="utf-8"))["settings"]:
        key = f"external.{row.get('source') or row['setting']}"
        out[f"{key}.log_loss"] = _f4(row["log_loss"])
        if row["setting"] != "none":
            lo, hi = row["interval"]
            out[f"{key}.change"] = f"{row['delta']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            out[f"{key}.verdict"] = row["verdict"]
        if row.get("rows_kept") is not None:
            out[f"{key}.rows_kept"] = f"{row['rows_kept']:,}"
        if row.get("auc") is not None:
            out[f"{key}.auc"] = f"{row['auc']:.3f}"
    return out


def rewrite(text: str, figures: dict[str, str]) -> tuple[str, list[str], list[str]]:
    """``text`` with every marked figure that ``figures`` knows replaced; the names changed, and the
    names left as they were (no benchmark output for them)."""
    changed, missing = [], []

    def one(m: re.Match) -> str:
        name, old = m.group(1), m.group(2)
        if name not in figures:
            missing.append(name)
            return m.group(0)
        if figures[name] != old:
            changed.append(f"{name}: {old} -> {figures[name]}")
        return f"<!-- fig:{name} -->{figures[name]}<!-- /fig -->"

    return MARK.sub(one, text), changed, missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--quality-run", default="runs/bench-quality", help="the quality benchmark's --out")
    ap.add_argument("--external-check", default="runs/check", help="an external-check --out directory")
    ap.add_argument("--run", action="store_true", help="run the quality benchmark first when its run is missing")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a figure differs")
    args = ap.parse_args(argv)
    if args.run and not (Path(args.quality_run) / "ensemble" / "ensemble.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--out", args.quality_run], check=True)
    figures = {**quality_figures(args.quality_run), **external_figures(args.external_check)}
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    new, changed, missing = rewrite(text, figures)
    for line in changed:
        print(f"{'differs' if args.check else 'updated'}: {line}")
    if missing:
        print(f"left as they are (no benchmark output for them): {', '.join(sorted(set(missing)))}")
    if args.check:
        return 1 if changed else 0
    if new != text:
        from kernel.files import write_text

        write_text(readme, new)
    print(f"{len(changed)} figure(s) changed in {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
