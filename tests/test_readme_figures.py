"""benchmarks/readme_figures.py: the README's marked figures come from benchmark output."""
from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.readme_figures import MARK, external_figures, main, quality_figures, rewrite
from ensemble.record import EnsembleRecord

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quality_figures_rewrite_marked_spots(finished_run, tmp_path):
    record = EnsembleRecord.read(finished_run / "ensemble/ensemble.json")
    figures = quality_figures(finished_run)
    assert figures["quality.final"] == f"{record.nested_scores.log_loss:.4f}"
    assert figures["quality.lgbm.raw"] == f"{record.stages_raw['lgbm'].log_loss:.4f}"
    readme = tmp_path / "README.md"
    readme.write_text("final <!-- fig:quality.final -->9.9999<!-- /fig --> and <!-- fig:quality.unknown -->x<!-- /fig -->\n")
    assert main(["--readme", str(readme), "--quality-run", str(finished_run), "--external-check", str(tmp_path),
                 "--check"]) == 1
    assert "9.9999" in readme.read_text(), "--check changes nothing"
    assert main(["--readme", str(readme), "--quality-run", str(finished_run), "--external-check", str(tmp_path)]) == 0
    text = readme.read_text()
    assert f"<!-- fig:quality.final -->{figures['quality.final']}<!-- /fig -->" in text
    assert "<!-- fig:quality.unknown -->x<!-- /fig -->" in text, "a figure without output is left as it is"
    assert main(["--readme", str(readme), "--quality-run", str(finished_run), "--external-check", str(tmp_path),
                 "--check"]) == 0


def test_external_figures(tmp_path):
    (tmp_path / "external_check.json").write_text(json.dumps({"settings": [
        {"setting": "none", "rows_kept": None, "log_loss": 1.03851, "delta": 0.0, "interval": [0, 0]},
        {"setting": "+pandalm", "source": "pandalm", "rows_kept": 832, "auc": 0.9381, "log_loss": 1.0684,
         "delta": 0.02991, "interval": [0.0154, 0.0437], "verdict": "drop"}]}))
    f = external_figures(tmp_path)
    assert f["external.none.log_loss"] == "1.0385" and f["external.pandalm.change"] == "+0.0299 [+0.0154, +0.0437]"
    assert f["external.pandalm.rows_kept"] == "832" and f["external.pandalm.verdict"] == "drop"


def test_readme_marks_are_well_formed():
    text = README.read_text(encoding="utf-8")
    names = MARK.findall(text)
    assert len(names) == text.count("<!-- fig:") == text.count("<!-- /fig -->") >= 10
    assert all(re.fullmatch(r"(quality|external)\.[a-z_]+(\.[a-z_]+)?", n) for n, _ in names), names
    assert rewrite(text, {})[0] == text
